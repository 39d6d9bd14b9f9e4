"""Training through a gradient mask: a burn-in that only scores the weights, then updates a fixed subset.

Child-Tuning (Xu et al. 2021b, "Raise a Child in Large Language Model") updates only a "child
network" of the pretrained model: its task-driven variant, Child-Tuning_D, scores every weight by
its Fisher information on the task (the mean squared gradient) and keeps the top share; Fu et al.
(2023) choose a mask the same way from a second-order approximation. Both are one training step of
the loop: the weights never change during the burn-in, and afterwards the gradient of every entry
outside the mask is zero.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from ..blocks.masks import ParameterGradientCollector, select_masks
from ..core import register
from ..core.step import BackpropStep, StepResult, make_adamw


@register("masked_gradient", family="selective", kind="step", paper="xu2021raise")
class MaskedGradientStep(BackpropStep):
    """A burn-in that only scores, then training through a fixed mask on the gradients.

    Steps 0 .. ``burn_in`` - 1 back-propagate and add each step's gradient squared to a score per
    parameter entry (``blocks.masks.ParameterGradientCollector``) without updating anything (their
    recorded lr is 0). At step ``burn_in`` the mask keeps, per tensor, the ``density`` share of
    entries with the largest mean squared gradient (the empirical Fisher, as Child-Tuning_D); from
    then on every gradient is multiplied by its mask before clipping and the optimizer step.

    With Adam, a masked entry's gradient is always 0, so its moments stay 0 and it does not move.
    Decoupled weight decay still shrinks it (as Child-Tuning's ChildTuningAdamW does); use
    ``weight_decay=0`` to keep the masked entries exactly fixed.

    Args:
        burn_in: steps that only accumulate (>= 1). ``max_steps`` counts them too.
        density: share of entries kept per tensor, in (0, 1]; or {name: density}; or a function of the name.
        make_optimizer, params: as ``BackpropStep``; ``params`` must be tensors, not groups, so they can be named.
    """
    parallel = ("ddp",)   # the masks are whole tensors; FSDP's gradients are shards

    def __init__(self, burn_in: int, density: float | Mapping[str, float] | Callable[[str], float],
                 make_optimizer: Callable[..., torch.optim.Optimizer] = make_adamw):
        if not isinstance(burn_in, int) or burn_in < 1:
            raise ValueError(f"burn_in must be a positive number of steps, got {burn_in!r}")
        if isinstance(density, (int, float)) and not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], got {density}")
        super().__init__(make_optimizer)
        self.burn_in, self.density = burn_in, density
        self.steps_done = 0
        self.masks: dict[str, torch.Tensor] | None = None

    def setup(self, model, config):
        trainable = super().setup(model, config)
        self.named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.collector = ParameterGradientCollector(self.named)
        return trainable

    def __call__(self, model, batches, forward, lr_scale) -> StepResult:
        if self.steps_done < self.burn_in:                    # burn-in: score, do not update
            loss = self.backward(batches, forward)
            self.collector.add()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, math.inf)
            self.optimizer.zero_grad(set_to_none=True)
            self.steps_done += 1
            return StepResult(loss, float(grad_norm), 0.0)
        if self.masks is None:
            scores = self.collector.mean_squares()
            self.masks = {n: m for n, m in select_masks(scores, self.density).items()}
            self.masks.update({n: torch.zeros_like(s, dtype=torch.bool) for n, s in scores.items() if n not in self.masks})
        lr = self.set_lr(lr_scale)
        loss = self.backward(batches, forward)
        with torch.no_grad():
            for name, p in self.named.items():
                if p.grad is not None:
                    p.grad.mul_(self.masks[name].to(p.grad.dtype))
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        return StepResult(loss, float(grad_norm), lr)
