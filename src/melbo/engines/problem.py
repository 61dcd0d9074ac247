"""The MELBO discovery problem on one model and prompt set: the loss of a block of vectors and how a block is trained.

Discovery (:mod:`melbo.engines.discover`) and the choice of R (:mod:`melbo.engines.radius`) both train blocks of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from melbo.engines.config import DiscoverSettings, Positions
from melbo.engines.optimise import optimise
from melbo.model.fastpath import bfloat16_products
from melbo.model.forward import PromptState, target_residual
from melbo.model.loading import LoadedModel
from melbo.objectives import melbo_loss, orthogonalize_block, random_orthogonal_block, to_sphere


@dataclass
class DiscoveryProblem:
    """Discovery's loss on one model and prompt set: the unsteered target residuals are computed once."""

    lm: LoadedModel
    states: list[PromptState]
    settings: DiscoverSettings
    baselines: list[Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        zeros = torch.zeros(1, self.lm.d_model, device=self.lm.device)
        s = self.settings
        with torch.no_grad():
            self.baselines = [target_residual(self.lm.model, state, s.source, s.target, zeros) for state in self.states]

    def losses(self, thetas: Tensor) -> Tensor:
        """MELBO loss of each row of ``thetas`` ``(B,)``, averaged over prompts."""
        s = self.settings
        pos = Positions(s.positions)
        total = thetas.new_zeros(thetas.shape[0])
        for state, base in zip(self.states, self.baselines):
            sel = pos.index(state.length)
            steered = target_residual(self.lm.model, state, s.source, s.target, thetas)
            total = total + melbo_loss(steered[:, sel] - base[:, sel], s.p, s.q)
        return total / len(self.states)

    def training_losses(self, thetas: Tensor) -> Tensor:
        """:meth:`losses` as training computes them: with precision bfloat16 under autocast, the model's matrix products
        in bfloat16 on its own weights (:func:`melbo.model.fastpath.bfloat16_products`). The projections between steps
        and the recorded losses stay float32."""
        with bfloat16_products(self.lm.model, self.lm.device, enabled=self.settings.precision == "bfloat16"):
            return self.losses(thetas)

    def train(self, basis: Tensor | None, size: int, generator: torch.Generator,
              on_step: Callable[[int, float], None] | None = None) -> tuple[Tensor, int]:
        """``size`` vectors of norm R orthogonal to ``basis`` and to each other, trained with MELBO's original
        optimiser (AdamW, betas (0.9, 0.98), amsgrad, no weight decay)."""
        s = self.settings
        init = random_orthogonal_block(size, self.lm.d_model, s.radius, basis, generator).to(self.lm.device)
        theta = torch.nn.Parameter(init)
        steps = optimise(
            theta, self.training_losses, lambda t: to_sphere(orthogonalize_block(t, basis), s.radius), s.lr, s.steps, cosine=False,
            on_step=on_step,
            make_optimizer=lambda params, rate: torch.optim.AdamW(params, lr=rate, betas=(0.9, 0.98), weight_decay=0.0, amsgrad=True),
        )
        return theta.detach().clone(), steps
