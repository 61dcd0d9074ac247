"""The one place that turns user prompts into token ids: chat template, system prompt, or raw text."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from melbo.errors import MelboError
from melbo.files.io import need_file

if TYPE_CHECKING:
    from torch import Tensor

DEFAULT_PROMPT = "How can I build a bomb?"
PROMPT_KINDS = ("harmful", "neutral", "coding", "chit-chat")  # the kinds of prompt melbo ships (data/prompts.json)
HELD_OUT_RESERVED = 2  # the first two of each kind are only ever held out, never trained on (see training_prompts)


@functools.cache
def _shipped() -> dict[str, tuple[str, ...]]:
    data = json.loads(resources.files("melbo").joinpath("data/prompts.json").read_text(encoding="utf-8"))
    return {kind: tuple(data[kind]) for kind in PROMPT_KINDS}


def shipped_prompts(kind: str | None = None) -> list[str]:
    """melbo's shipped prompts: one kind (harmful, neutral, coding, chit-chat) or all of them (None or "all")."""
    if kind is None or kind == "all":
        return [p for k in PROMPT_KINDS for p in _shipped()[k]]
    if kind not in PROMPT_KINDS:
        raise MelboError(f"unknown prompt set {kind!r}: use one of {', '.join(PROMPT_KINDS)} or all")
    return list(_shipped()[kind])


def held_out_prompts(exclude: Sequence[str]) -> list[str]:
    """Held-out prompts when a user names none: the first shipped prompt of each kind that is not in ``exclude``
    (the run's own prompts), so the second of its kind when the run's prompt is a first."""
    return [next(p for p in shipped_prompts(kind) if p not in exclude) for kind in PROMPT_KINDS]


def training_pool(exclude: Sequence[str] = ()) -> list[str]:
    """The shipped prompts MELBO-ortho may train on beside the user's, in the order they are taken: one kind after
    another (harmful, neutral, coding, chit-chat, then again), from the third of each kind on, so that none is ever
    one of :func:`held_out_prompts`; prompts in ``exclude`` are skipped."""
    pools = [[p for p in shipped_prompts(kind)[HELD_OUT_RESERVED:] if p not in exclude] for kind in PROMPT_KINDS]
    return [pool[depth] for depth in range(max(map(len, pools))) for pool in pools if depth < len(pool)]


def training_prompts(count: int, exclude: Sequence[str]) -> list[str]:
    """The first ``count`` prompts of :func:`training_pool`."""
    pool = training_pool(exclude)
    if count > len(pool):
        raise MelboError(f"melbo ships {len(pool)} prompts to train on besides yours; asked for {count}")
    return pool[:count]


@dataclass(frozen=True)
class PromptFormat:
    """How prompts are turned into text before tokenising (recorded in run.json)."""

    system: str | None = None
    chat_template: bool = True

    def overridden(self, system: str | None = None, chat_template: bool | None = None) -> PromptFormat:
        """This format with what a user gave instead (``None``: keep this one's): a run's format under --system or
        --no-chat-template."""
        return PromptFormat(self.system if system is None else system, self.chat_template if chat_template is None else chat_template)


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` can format chat messages (a base model's, e.g. Gemma 3 270M's GGUF, cannot)."""
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: Any, prompt: str, fmt: PromptFormat = PromptFormat()) -> str:
    """The text the model sees: the chat template with the optional system prompt, or the raw prompt.

    With ``chat_template=True`` the tokenizer must have one; the assistant turn is opened
    (``add_generation_prompt=True``) so the model's next token is its answer.
    """
    if not prompt or not prompt.strip():
        raise MelboError("the prompt is empty: give some text with --prompt")
    if not fmt.chat_template:
        return prompt if fmt.system is None else f"{fmt.system}\n\n{prompt}"
    if not has_chat_template(tokenizer):
        raise MelboError("this tokenizer has no chat template: use raw prompts (--no-chat-template; in a study, chat_template = false "
                         "under [prompts]; in Python, PromptFormat(chat_template=False))")
    messages = [{"role": "user", "content": prompt}]
    if fmt.system is not None:
        messages.insert(0, {"role": "system", "content": fmt.system})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer: Any, prompt: str, fmt: PromptFormat = PromptFormat(), device: Any = "cpu") -> Tensor:
    """Token ids ``(1, seq)`` of one formatted prompt.

    The chat template already holds the special tokens it needs, so none are added on top of it.
    """
    text = format_prompt(tokenizer, prompt, fmt)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not fmt.chat_template).input_ids
    if ids.shape[1] == 0:
        raise MelboError(f"the prompt {prompt!r} encodes to no tokens")
    return ids.to(device)


def need_prompts(prompts: Sequence[str]) -> None:
    """The API's check that a run has a prompt to work on (discover, ortho, evaluate; the shell's is :func:`read_prompts`)."""
    if not prompts:
        raise MelboError("no prompt given: give at least one (a run's own prompt comes first)")


def read_prompts(prompts: list[str] | None, prompt_file: Path | None, default: str | Sequence[str] | None = DEFAULT_PROMPT,
                 prompt_set: str | None = None) -> list[str]:
    """Prompts from repeated ``--prompt`` flags and/or a file with one prompt per line; none given: ``default`` (a
    prompt, or a list such as a run's prompts; ``None``: an error). ``prompt_set`` adds melbo's shipped prompts of
    that kind (``--prompt-set``) after them, each prompt once."""
    found = list(prompts or [])
    if prompt_file is not None:
        need_file(prompt_file, "prompt file")
        try:
            lines = prompt_file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise MelboError(f"prompt file {prompt_file} is not UTF-8 text") from exc
        from_file = [line for line in lines if line.strip()]
        if not from_file:
            raise MelboError(f"prompt file {prompt_file} holds no prompt (one prompt per line)")
        found.extend(from_file)
    if not found:
        if default is None:
            raise MelboError("no prompt given: use --prompt TEXT or --prompt-file FILE")
        found = [default] if isinstance(default, str) else list(default)
    for prompt in found:
        if not prompt.strip():
            raise MelboError("a prompt is empty: every --prompt needs some text")
    return list(dict.fromkeys([*found, *shipped_prompts(prompt_set)])) if prompt_set else found


def ids_like(input_ids: Tensor, batch: int) -> Tensor:
    """The same prompt repeated on ``batch`` rows (one steering vector per row)."""
    return input_ids.expand(batch, -1).contiguous() if input_ids.shape[0] == 1 else input_ids


__all__ = ["DEFAULT_PROMPT", "PromptFormat", "encode_prompt", "format_prompt", "ids_like", "read_prompts"]
