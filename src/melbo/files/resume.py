"""The resume policy of run folders: what a resumed run must share with the folder it continues, and what differs."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from melbo.errors import MelboError
from melbo.files.runs import RunMeta

SPEED_ONLY = ("compiled",)  # settings that change how fast a run goes, not what it computes (to rounding): a resume may differ


def resume_key(meta: RunMeta) -> dict[str, Any]:
    """What a resumed run must share with the run folder it continues (every setting but :data:`SPEED_ONLY`)."""
    return {
        "kind": meta.kind,
        "model_identity": meta.model_identity,
        "layers": {"source": meta.source, "target": meta.target},
        "prompts": meta.prompts,
        "prompt_format": dataclasses.asdict(meta.prompt_format),
        "config": {key: value for key, value in meta.config.items() if key not in SPEED_ONLY},
    }


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, old value, new value)`` for every setting that differs, one level of nesting spelled ``key.field``."""
    out = []
    for key in sorted(set(old) | set(new), key=lambda k: (k not in old, list(old).index(k) if k in old else 0)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [(f"{key}.{k}", a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append((key, a, b))
    return out


def check_same_settings(previous: RunMeta, current: RunMeta, added_later: Mapping[str, Any] | None = None) -> None:
    """Refuse to resume a run with other settings; the message names every setting that differs.

    ``added_later``: settings with a default that reproduces what melbo did before they existed (e.g. ``precision``
    float32); a run made before one existed has no record of it and ran at that default, so it is compared as such."""
    before = resume_key(previous)
    missing = {k: v for k, v in (added_later or {}).items() if k not in before["config"] and k not in SPEED_ONLY}
    if missing:
        before["config"] = {**before["config"], **missing}
    differ = [f"{key} ({a!r} in the run, {b!r} now)" for key, a, b in differences(before, resume_key(current))]
    if differ:
        raise MelboError("cannot resume with different settings: " + "; ".join(differ) + "; use the run's settings or a new --out")
