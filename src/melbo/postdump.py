"""Read the original MELBO-ortho post's published text dumps (``code-vectors-bomb.txt`` and its siblings).

Each file holds, for every vector i, ``"{i}th orthogonal steering vector: {prompt}{completion}"``, then a
second section with the same headers followed by the top-10 logits and tokens at the last prompt position.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from melbo.errors import MelboError

_HEADER = re.compile(r"^(\d+)th orthogonal steering vector: ", re.MULTILINE)
_ASSISTANT = "<|im_start|>assistant\n"


@dataclass
class PostEntry:
    index: int
    completion: str
    top_logits: list[float] = field(default_factory=list)
    top_tokens: list[str] = field(default_factory=list)


def read_post_dump(path: str | Path) -> list[PostEntry]:
    """Completions (and, where present, top-10 logits and tokens) of every vector in a post dump."""
    path = Path(path)
    if not path.is_file():
        raise MelboError(f"{path} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    heads = list(_HEADER.finditer(text))
    if not heads:
        raise MelboError(f"{path} is not one of the post's dumps (no 'Nth orthogonal steering vector:' lines)")
    entries: dict[int, PostEntry] = {}
    for head, nxt in zip(heads, heads[1:] + [None]):
        index = int(head[1])
        body = text[head.end() : nxt.start() if nxt else len(text)]
        if body.lstrip().startswith("logits:") or body.startswith("\n\tlogits:"):
            if index in entries:
                entries[index].top_logits, entries[index].top_tokens = _parse_logits(body)
            continue
        completion = body.split(_ASSISTANT, 1)[1] if _ASSISTANT in body else body
        entries.setdefault(index, PostEntry(index=index, completion=completion.rstrip("\n")))
    return [entries[i] for i in sorted(entries)]


def _parse_logits(body: str) -> tuple[list[float], list[str]]:
    logits_match = re.search(r"logits: tensor\(\[([^\]]*)\]", body, re.DOTALL)
    tokens_match = re.search(r"indices: (\[.*\])", body, re.DOTALL)
    logits = [float(x) for x in logits_match[1].replace("\n", " ").split(",") if x.strip()] if logits_match else []
    tokens: list[str] = []
    if tokens_match:
        import ast

        try:
            tokens = [str(t) for t in ast.literal_eval(tokens_match[1].strip())]
        except (ValueError, SyntaxError):
            tokens = []
    return logits, tokens
