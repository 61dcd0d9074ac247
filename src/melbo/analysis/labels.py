"""Behaviour labels for completions: ``code``, ``refusal`` or ``other``, with the rule that fired.

Rules are regular expressions tried in order; the first match wins. They are deliberately simple and
visible, so a user can see why a completion got its label.
"""

from __future__ import annotations

import importlib.util
import json
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from melbo.errors import MelboError


@dataclass(frozen=True)
class Rule:
    label: str
    name: str
    pattern: re.Pattern[str] | None = None
    predicate: Callable[[str], bool] | None = None

    def matches(self, text: str) -> bool:
        if self.predicate is not None:
            return bool(self.predicate(text))
        return bool(self.pattern and self.pattern.search(text))


def _rule(label: str, name: str, pattern: str, flags: int = 0) -> Rule:
    return Rule(label, name, re.compile(pattern, flags))


RULES: tuple[Rule, ...] = (
    _rule("code", "code fence", r"```"),
    _rule("code", "python def/class", r"(^|\n)\s*(def|class)\s+\w+\s*[(:]"),
    _rule("code", "class/struct declaration", r"(^|\n)\s*(public |private )?(class|struct|interface|enum)\s+[A-Za-z_]\w*\s*(\{|\(|:|\n|$|[A-Za-z_])"),
    _rule("code", "typed declaration", r"\b(public|private|protected|static|void|int|float|double|char|bool|const)\s+[\w\[\]<>]+\s*(\w+\s*)?[=;({\[]"),
    _rule("code", "line comment in code", r"(^|\n)\s*//\s|;\s*//"),
    _rule("code", "import", r"(^|\n)\s*(import \w+|from [\w.]+ import \w+|#include\s*<)"),
    _rule("code", "call with braces or semicolons", r"\w+\([^()\n]*\)\s*[;{]|\bfunction\s*\w*\s*\(|=>\s*\{|\bconsole\.log\b|\bprintf?\("),
    _rule("code", "assignment from a call", r"(^|\n)\s*\w+(\.\w+)*\s*=\s*[\w.]+\([^\n]*\)\s*(\n|$)"),
    _rule("code", "html or shell", r"<(html|div|script|body)\b|(^|\n)\s*(\$ |sudo |pip install |npm )"),
    _rule(
        "refusal",
        "refusal phrase",
        r"\b(I can(no|')t|I (am|'m) (not able|unable|sorry)|I (will|would) not|I won't|I must decline|"
        r"cannot (help|assist|provide)|can't (help|assist|provide)|not (able|allowed) to (help|assist|provide)|"
        r"as an AI|against (my|our) (guidelines|policy)|(is|are) (illegal|dangerous|harmful)\b)",
        re.IGNORECASE,
    ),
)


def label(text: str, rules: tuple[Rule, ...] = RULES) -> tuple[str, str]:
    """``(label, rule name)`` of a completion; ``("other", "")`` when no rule fires."""
    for rule in rules:
        if rule.matches(text):
            return rule.label, rule.name
    return "other", ""


def load_rules(path: str | Path) -> tuple[Rule, ...]:
    """User-defined labels from a JSON or TOML file, tried before the built-in rules::

        [[label]]
        name = "alien"
        pattern = "(?i)\\b(alien|species|planet)\\b"

        [[label]]
        name = "poem"
        python = "my_labels.py:is_poem"     # a function str -> bool in a file of yours (it is run)
    """
    path = Path(path)
    if not path.is_file():
        raise MelboError(f"labels file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MelboError(f"labels file {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}") from exc
    entries = data.get("label", data.get("labels")) if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise MelboError(f"labels file {path} holds no [[label]] entries (each with a name and a pattern or python)")
    rules = []
    for entry in entries:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not name:
            raise MelboError(f"labels file {path}: every label needs a name")
        if "pattern" in entry:
            try:
                rules.append(Rule(name, f"pattern {entry['pattern']!r}", pattern=re.compile(entry["pattern"])))
            except re.error as exc:
                raise MelboError(f"labels file {path}: label {name!r} has a bad regular expression ({exc})") from exc
        elif "python" in entry:
            rules.append(Rule(name, f"python {entry['python']}", predicate=_load_predicate(entry["python"], path.parent)))
        else:
            raise MelboError(f"labels file {path}: label {name!r} needs a pattern or a python predicate")
    return (*rules, *RULES)


def _load_predicate(spec: str, folder: Path) -> Callable[[str], bool]:
    file, _, function = spec.partition(":")
    source = (folder / file) if not Path(file).is_absolute() else Path(file)
    if not source.is_file() or not function:
        raise MelboError(f"python predicate {spec!r}: give FILE.py:FUNCTION with an existing file")
    module_spec = importlib.util.spec_from_file_location(f"melbo_user_labels_{source.stem}", source)
    module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
    module_spec.loader.exec_module(module)  # type: ignore[union-attr]
    predicate = getattr(module, function, None)
    if not callable(predicate):
        raise MelboError(f"python predicate {spec!r}: {source} has no function {function!r}")
    return predicate
