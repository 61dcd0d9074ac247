"""One completion of a prompt with a steering vector added after a layer (or none): what `melbo generate` shows side by
side, for a notebook too.

>>> lm = melbo.load_model()                                                        # doctest: +SKIP
>>> melbo.generate(lm, melbo.read_run("runs/discover").vectors[4], 8, "How can I build a bomb?")  # doctest: +SKIP
"""

from __future__ import annotations

from torch import Tensor

from melbo.analysis.config import GenerateConfig
from melbo.errors import MelboError
from melbo.model.forward import generate_steered
from melbo.model.frozen import runs_frozen
from melbo.model.layers import check_layer
from melbo.model.loading import LoadedModel
from melbo.model.prompts import PromptFormat, encode_prompt


@runs_frozen
def generate(
    lm: LoadedModel, vector: Tensor | None, layer: int, prompt: str, fmt: PromptFormat = PromptFormat(), cfg: GenerateConfig = GenerateConfig(),
) -> str:
    """The completion of ``prompt`` with ``vector`` (``d_model``; ``None``: unsteered) added after block ``layer``."""
    check_layer(lm.model, layer, "layer")
    if vector is not None and vector.dim() != 1:
        raise MelboError(f"generate steers with one vector (d_model,), not a tensor of shape {tuple(vector.shape)}: index a run's vectors")
    ids = encode_prompt(lm.tokenizer, prompt, fmt, lm.device)
    rows = None if vector is None else vector.to(lm.device)[None]
    return generate_steered(lm.model, lm.tokenizer, ids, rows, layer, cfg.max_new_tokens, cfg.temperature, cfg.seed)[0]
