"""The score-and-mask piece: accumulate gradient statistics, then keep the top-k entries per tensor.

Sparse and selective methods choose *which* weights to train from gradients: RoSA (Nikdan et al.
2024) the entries of its sparse update, Child-Tuning (Xu et al. 2021b) and Fu et al. (2023) a mask
on the network's own weights. Each does the same two things:

1. **score**: run some batches and accumulate a statistic of each weight's gradient, most often
   its mean square over gradient samples (the empirical diagonal Fisher information);
2. **mask**: keep, per tensor, the k = floor(density * numel) entries with the largest score.

Two collectors, for the two places the gradient lives:

* ``WeightGradientCollector`` for the full weight of frozen layers (RoSA): forward hooks keep each
  layer's input x, an autograd tap catches grad_out, and G = grad_out^T x is the weight's gradient.
  W0 never needs ``requires_grad`` (and may be 4-bit), and the adapter's ``.grad`` is left alone.
* ``ParameterGradientCollector`` for trainable parameters (Child-Tuning's burn-in): it reads
  ``p.grad`` after each backward pass.

``top_k_mask`` breaks ties deterministically (the earlier entry in row-major order wins), so the
same scores always give the same mask.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn


def n_entries(density: float, numel: int) -> int:
    """k = floor(density * numel); the 1e-6 keeps a density given as a ratio k / numel from rounding down."""
    return math.floor(density * numel + 1e-6)


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of ``scores``; among equal scores the earlier entry in
    row-major order wins, so the choice is deterministic (``torch.topk`` does not promise an order)."""
    if not torch.isfinite(scores).all():
        raise ValueError("the scores contain NaN or inf: the accumulated gradients overflowed or diverged")
    flat = scores.flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k <= 0:
        return mask.view_as(scores)
    threshold = torch.topk(flat, k, sorted=False).values.min()     # the k-th largest value
    mask = flat > threshold
    ties = (flat == threshold).nonzero().squeeze(1)[: k - int(mask.sum())]
    mask[ties] = True
    return mask.view_as(scores)


def select_masks(scores: Mapping[str, torch.Tensor],
                 density: float | Mapping[str, float] | Callable[[str], float]) -> dict[str, torch.Tensor]:
    """Per tensor, the top k = floor(density * numel) entries of its score: {name: bool mask}.

    ``density``: one value for all, {name: density}, or a function of the name. Tensors whose k is 0
    get no mask.
    """
    def density_of(name: str) -> float:
        if callable(density):
            return density(name)
        return density[name] if isinstance(density, Mapping) else density

    masks = {}
    for name, s in scores.items():
        k = n_entries(density_of(name), s.numel())
        if k:
            masks[name] = top_k_mask(s, k)
    return masks


class _GradTap(torch.autograd.Function):
    """Identity in forward; in backward hands grad_out to ``callback`` (with the layer's input x).

    ``dummy`` is a scalar that requires grad, so the backward reaches every tap even when nothing
    else in the layer requires grad (a frozen layer, or RoSA's sparse-only baseline before a mask)."""

    @staticmethod
    def forward(ctx, out, dummy, x, callback):
        ctx.x, ctx.callback = x.detach(), callback
        return out.clone()          # a new tensor, not a view: later in-place ops on it stay legal

    @staticmethod
    def backward(ctx, grad_out):
        ctx.callback(grad_out, ctx.x)
        return (grad_out if ctx.needs_input_grad[0] else None), None, None, None


class WeightGradientCollector:
    """Context manager: while open, every backward pass through one of ``modules`` (linear maps
    x (..., d_in) -> (..., d_out)) adds G^2, G = grad_out^T x, to a per-module sum. ``mean_squares()``
    gives the mean G^2 per backward pass: the empirical diagonal Fisher when each pass is one example.

    ``backward(loss)`` back-propagates only into the taps (``inputs=[dummy]``), so no parameter's
    ``.grad`` changes. ``device``: where the sums live (default: each module's).
    """

    def __init__(self, modules: Mapping[str, nn.Module], device: torch.device | str | None = None):
        if not modules:
            raise ValueError("no modules to collect gradients for")
        self.modules = dict(modules)
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {name: 0 for name in self.modules}
        self.dummy = torch.zeros((), requires_grad=True)
        self._handles = []

    def _accumulate(self, name: str, grad_out: torch.Tensor, x: torch.Tensor) -> None:
        with torch.no_grad():
            g = grad_out.reshape(-1, grad_out.shape[-1]).float()
            G = g.T @ x.reshape(-1, x.shape[-1]).float()               # (d_out, d_in): the weight's gradient
            G = G.to(self.device) if self.device is not None else G
            if name in self.sums:
                self.sums[name].addcmul_(G, G)
            else:
                self.sums[name] = G * G
            self.counts[name] += 1

    def __enter__(self) -> "WeightGradientCollector":
        for name, module in self.modules.items():
            def hook(module, args, out, name=name):
                callback = lambda g, x: self._accumulate(name, g, x)   # noqa: E731
                return _GradTap.apply(out, self.dummy.to(out.device), args[0], callback)
            self._handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def backward(self, loss: torch.Tensor) -> None:
        torch.autograd.backward(loss, inputs=[self.dummy])

    def mean_squares(self) -> dict[str, torch.Tensor]:
        missing = [n for n, c in self.counts.items() if c == 0]
        if missing:
            raise RuntimeError(f"no gradient reached {len(missing)} modules (e.g. {missing[0]}): "
                               "run forward and backward passes inside the collector first")
        return {n: s / self.counts[n] for n, s in self.sums.items()}


def default_loss(model: nn.Module, batch: Mapping) -> torch.Tensor:
    out = model(**batch)
    return out["loss"] if isinstance(out, Mapping) else out.loss


def weight_gradient_mean_squares(model: nn.Module, modules: Mapping[str, nn.Module], batches: Iterable[Mapping],
                                 loss_fn: Callable[[nn.Module, Mapping], torch.Tensor] | None = None,
                                 per_example: bool = False,
                                 device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Mean G^2 of each of ``modules``' full weight over ``batches`` (dicts of tensors).

    ``loss_fn(model, batch)`` defaults to ``model(**batch).loss``. Each batch is one gradient sample;
    ``per_example=True`` splits every batch into single examples first. Runs the model in training
    mode (dropout on, as during training) and restores its mode; no ``.grad`` is touched.
    """
    loss_fn = loss_fn or default_loss
    was_training = model.training
    model.train()
    try:
        with WeightGradientCollector(modules, device) as collector:
            for batch in batches:
                size = next(len(v) for v in batch.values() if torch.is_tensor(v))
                parts = [{k: v[i:i + 1] if torch.is_tensor(v) else v for k, v in batch.items()}
                         for i in range(size)] if per_example else [batch]
                for part in parts:
                    collector.backward(loss_fn(model, part))
    finally:
        model.train(was_training)
    return collector.mean_squares()


class ParameterGradientCollector:
    """Sums of ``p.grad ** 2`` for named trainable parameters, one ``add()`` per backward pass."""

    def __init__(self, params: Mapping[str, torch.Tensor]):
        self.params = {n: p for n, p in params.items() if p.requires_grad}
        if not self.params:
            raise ValueError("no trainable parameter to collect gradients for")
        self.sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        self.count = 0

    @torch.no_grad()
    def add(self) -> None:
        for n, p in self.params.items():
            if p.grad is not None:
                g = p.grad.float()
                self.sums[n].addcmul_(g, g)
        self.count += 1

    def mean_squares(self) -> dict[str, torch.Tensor]:
        if not self.count:
            raise RuntimeError("no backward pass was collected: call add() after each backward")
        return {n: s / self.count for n, s in self.sums.items()}
