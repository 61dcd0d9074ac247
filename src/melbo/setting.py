"""Config fields that describe themselves: a default, a help text and, where the command line offers the field as an
option, its flags. The config dataclasses hold them once; ``melbo.cli`` builds its options from them, so a default or
a description is written in one place for Python, study files and the shell.

>>> @dataclass(frozen=True)                                             # doctest: +SKIP
... class Config:
...     count: int = setting(32, "K: number of vectors.", "--count", "-k")
"""

from __future__ import annotations

import dataclasses
from typing import Any


def setting(default: Any, help: str, *flags: str, text: bool = False, minimum: float | None = None) -> Any:
    """A dataclass field with ``default``, offered on the command line as ``flags`` (default ``--field-name``).

    ``text``: the option takes text the config parses (e.g. R: a number or ``auto``); ``minimum``: the option refuses
    smaller values at parse time."""
    return dataclasses.field(default=default, metadata={"help": help, "flags": flags, "text": text, "minimum": minimum})


def described(cls: type) -> list[dataclasses.Field[Any]]:
    """The fields of config ``cls`` made with :func:`setting`, in declaration order."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]
