"""The options several commands share, as typer ``Annotated`` aliases (``model: opt.Model = None``), and
:func:`config_options`, which makes a config dataclass's described fields a command's options.

`-p` is always a prompt. Defaults come from the API's config dataclasses, never written here.
"""

from __future__ import annotations

import functools
import inspect
import math
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from melbo.setting import described

Command = Callable[..., Any]


def finite(value: float | None) -> float | None:
    """Every float option's check: nan and inf are refused at parse time (click's ``min=`` lets nan through, and a nan
    scale or temperature would run to the end and print empty text)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


Model = Annotated[str | None, typer.Option("--model", "-m", help="'smollm2' (embedded default), a Hugging Face id, a model folder or a .gguf file.")]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")]
Dtype = Annotated[str | None, typer.Option(help="float32 (default on CPU), bfloat16 (default on GPU) or float16.")]
System = Annotated[str | None, typer.Option("--system", help="System prompt for the chat template.")]
ChatTemplate = Annotated[bool | None, typer.Option(
    "--chat-template/--no-chat-template", show_default=False,
    help="Format prompts with the chat template, or use them as raw text (default: the run's format, else the template).",
)]
Prompts = Annotated[list[str] | None, typer.Option("--prompt", "-p", help="A prompt (repeatable).")]
Prompt = Annotated[str, typer.Option("--prompt", "-p", help="The prompt.")]
PromptFile = Annotated[Path | None, typer.Option("--prompt-file", help="A file with one prompt per line.")]
Force = Annotated[bool, typer.Option(help="Overwrite a run already in --out.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last completed block.")]
Out = Annotated[Path | None, typer.Option("--out", "-o", help="Run folder (default melbo-runs/KIND-DATE).")]
NewTokens = Annotated[int, typer.Option(min=1, help="Tokens generated per completion.")]
Indices = Annotated[str, typer.Option("--index", help="Vectors: all, 3, 0-99 or 1,4,7.")]
Show = Annotated[int, typer.Option(help="Rows of the table printed.")]
Layer = Annotated[int | None, typer.Option(help="Layer the vector is added after (default: the run's source layer).")]
Scale = Annotated[float, typer.Option(help="Multiply the vector(s) by this.", callback=finite)]
Run = Annotated[Path, typer.Argument(help="A run folder.")]
OrthoRun = Annotated[Path, typer.Argument(help="A MELBO-ortho run folder (row 0 = θ0).")]

# The LLM judge's, shared by `eval` and `judge`.
Judge = Annotated[str | None, typer.Option("--judge", metavar="URL", help="Rate every completion with the OpenAI-compatible chat endpoint at URL (http/https), AxBench-style.")]
JudgeModel = Annotated[str | None, typer.Option("--judge-model", help="The judge model (default: the first the endpoint lists).")]
Concept = Annotated[list[str] | None, typer.Option("--concept", help="A concept to rate (repeatable): code, alien, stem-problem, jailbreak, or 'name: description'.")]
Concepts = Annotated[Path | None, typer.Option("--concepts", help="Concepts from a TOML/JSON file: name + description.")]
JudgeKey = Annotated[str, typer.Option("--judge-key-env", help="Environment variable holding the judge's API key (never stored or printed).")]
JudgeConcurrency = Annotated[int, typer.Option("--judge-concurrency", min=1, help="Requests to the judge at once.")]
JudgeTimeout = Annotated[float, typer.Option("--judge-timeout", help="Seconds one judge request may take before it is retried (a judge on CPUs answers its requests together: minutes).")]


def config_options(cls: type, before: str) -> Callable[[Command], Command]:
    """Give a command one option per described field of config ``cls`` (:func:`melbo.setting.setting`: its default,
    help and flags), listed before its parameter ``before``; the command receives them built into one ``cfg: cls``,
    checked as far as it can be without a model (its ``check()``)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in described(cls)]

    def add(command: Command) -> Command:
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "cfg"]
        added = []
        for f in described(cls):
            meta = f.metadata
            kind, default = (str, str(f.default)) if meta["text"] else (hints[f.name], f.default)
            check = finite if kind is float or kind == (float | None) else None
            option = typer.Option(*(meta["flags"] or (f"--{f.name.replace('_', '-')}",)), help=meta["help"], min=meta["minimum"], callback=check)
            added.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option]))
        at = next(k for k, p in enumerate(own) if p.name == before)

        @functools.wraps(command)
        def with_config(**options: Any) -> Any:
            cfg = cls(**{name: options.pop(name) for name in names})
            if hasattr(cfg, "check"):
                cfg.check()
            return command(**options, cfg=cfg)

        target = typing.cast(Any, with_config)  # typer reads the signature and the annotations
        target.__signature__ = inspect.Signature(own[:at] + added + own[at:], return_annotation=None)
        target.__annotations__ = {p.name: p.annotation for p in target.__signature__.parameters.values()}
        return with_config

    return add
