"""The training-step protocol: what one step of the training loop does to the model.

The loop (``training.train``) owns everything around a step: the data stream, the learning-rate
schedule, the progress bar, evaluation, the history. A *step* owns what happens to the weights. Each
optimizer step the loop calls

    result = step(model, batches, forward, lr_scale)

with the ``grad_accum`` micro-batches of this step, ``forward(batch) -> loss`` (the model on the
batch, on the right device, under autocast), and the schedule's factor on the base learning rate.
The step returns a ``StepResult`` (mean loss, gradient norm, the lr it used). Before the first
step the loop calls ``step.setup(model, config)``, which returns the tensors it trains.

Because the step, not the loop, calls ``backward`` and updates the weights, the protocol admits
steps of other shapes without a second loop:

* ``BackpropStep``: backward on each micro-batch, clip, ``optimizer.step()`` (the default; any
  ``torch.optim`` optimizer, e.g. a paged or projected one, through ``make_optimizer``);
* ``selective.MaskedGradientStep``: a burn-in that only accumulates gradient statistics, then
  training through a fixed gradient mask (Child-Tuning, Xu et al. 2021b; Fu et al. 2023);
* updates applied inside backward hooks, with no stored gradients (LOMO), or forward passes only
  (MeZO): a step that calls ``forward`` under ``torch.no_grad`` or registers its own hooks
  (``tests/test_steps.py`` builds both in a few lines and runs them through ``train``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn



@dataclass
class StepResult:
    loss: float              # mean loss over the step's micro-batches
    grad_norm: float         # norm of the gradient before clipping (nan if the step has none)
    lr: float                # the learning rate this step used (of the first parameter group)


def make_adamw(params, config) -> torch.optim.Optimizer:
    """The default ``make_optimizer(params, config)``; e.g. a paged optimizer can replace it."""
    return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps,
                             weight_decay=config.weight_decay)


class Step:
    """The protocol: ``setup`` once, then one call per optimizer step.

    ``parallel`` names the multi-process modes under which the step trains what it would in one
    process on the whole batch (``training.distributed``): a step whose update depends on the data
    only through gradients that DDP averages (or FSDP reduce-scatters) across ranks.
    """
    parallel: tuple[str, ...] = ()

    def setup(self, model: nn.Module, config) -> list[torch.Tensor]:
        """Prepare (build the optimizer, ...) and return the tensors this step trains."""
        raise NotImplementedError

    def __call__(self, model: nn.Module, batches: list[Mapping], forward: Callable[[Mapping], torch.Tensor],
                 lr_scale: float) -> StepResult:
        raise NotImplementedError


class BackpropStep(Step):
    """Backpropagation and an optimizer step: each micro-batch loss, divided by their number, is
    back-propagated; the summed gradient is clipped to ``config.max_grad_norm`` (None: measured only)
    and the optimizer steps. Each group's lr is its initial lr times the schedule's factor.

    Args:
        make_optimizer: ``make_optimizer(param_groups, config) -> torch.optim.Optimizer``.
        params: what to train: tensors or param-group dicts (groups without "lr" use ``config.lr``);
            default every parameter that requires grad.
    """

    parallel = ("ddp", "fsdp")

    def __init__(self, make_optimizer: Callable[..., torch.optim.Optimizer] = make_adamw, params=None):
        self.make_optimizer = make_optimizer
        self.params = params
        self.optimizer: torch.optim.Optimizer | None = None

    def setup(self, model: nn.Module, config) -> list[torch.Tensor]:
        params = list(self.params) if self.params is not None else [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: no parameter requires grad (did add_adapter run, or is every "
                             "parameter frozen?)")
        groups = params if isinstance(params[0], Mapping) else [{"params": params}]
        self.optimizer = self.make_optimizer(groups, config)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.max_norm = math.inf if config.max_grad_norm is None else config.max_grad_norm
        self.trainable = list({id(p): p for g in self.optimizer.param_groups for p in g["params"]}.values())
        return self.trainable

    def set_lr(self, lr_scale: float) -> float:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * lr_scale
        return self.optimizer.param_groups[0]["lr"]

    def backward(self, batches, forward) -> float:
        """Accumulate the gradient of the mean micro-batch loss; returns that mean."""
        loss_sum = 0.0
        for batch in batches:
            loss = forward(batch)
            (loss / len(batches)).backward()
            loss_sum = loss_sum + loss.detach().float()       # a tensor: one host sync per step, below
        return loss_sum.item() / len(batches)

    def __call__(self, model, batches, forward, lr_scale) -> StepResult:
        lr = self.set_lr(lr_scale)
        loss = self.backward(batches, forward)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.max_norm)  # the norm before clipping
        if hasattr(grad_norm, "full_tensor"):     # under FSDP: a DTensor, already reduced over the ranks
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, float(grad_norm), lr)
