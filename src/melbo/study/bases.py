"""The ``faithful`` base choice: try a few candidate bases with a handful of MELBO-ortho copies each and keep the one
whose copies keep its behaviour (its label) most often. A base whose behaviour no orthogonal copy reproduces
cannot show what the copies do; on SmolLM2 the clearest-looking base is not always the one that copies well."""

from __future__ import annotations

import dataclasses
import statistics

from melbo.analysis.choose import BaseChoice
from melbo.analysis.config import ChooseConfig
from melbo.analysis.labels import label
from melbo.engines.config import OrthoConfig
from melbo.engines.ortho import ortho
from melbo.files.runs import Run
from melbo.model.forward import generate_steered, prepare
from melbo.model.loading import LoadedModel
from melbo.model.prompts import PromptFormat


def trial_bases(
    lm: LoadedModel, found: Run, candidates: list[BaseChoice], cfg: ChooseConfig, ortho_cfg: OrthoConfig,
    prompts: list[str], fmt: PromptFormat,
) -> list[BaseChoice]:
    """The ``cfg.count`` candidates whose trial copies keep their label most often (ties: the clearer first)."""
    trial = dataclasses.replace(
        ortho_cfg, count=cfg.trial_copies, block=cfg.trial_copies, steps=cfg.trial_steps, completion_tokens=0,
    )
    state = prepare(lm, prompts[:1], fmt, found.source_layer)[0]
    for choice in candidates:
        copies = ortho(lm, found.vectors[choice.index], prompts, trial, fmt).vectors[1:]
        texts = generate_steered(lm.model, lm.tokenizer, state.ids, copies.to(lm.device), found.source_layer, cfg.trial_tokens)
        choice.trial_share = statistics.mean(label(t)[0] == choice.label for t in texts) if texts else 0.0
    tried = [{"index": c.index, "label": c.label, "share": c.trial_share} for c in candidates]
    best = sorted(candidates, key=lambda c: -(c.trial_share or 0.0))[: cfg.count]
    for choice in best:
        choice.trials = tried
    return best
