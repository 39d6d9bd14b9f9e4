"""MeZO: fine-tuning from forward passes only, the gradient estimated from two losses.

Malladi, Gao, Nichani, Damian, Lee, Chen and Arora (2023), "Fine-Tuning Language Models with Just Forward
Passes", arXiv 2305.17333. MeZO is zeroth-order SGD. For z ~ N(0, I_d) and a perturbation scale ε, SPSA
(Spall 1992; the paper's Definition 1, Eq. 1) estimates the gradient on a batch B by

    ∇̂L(θ; B) = (L(θ + εz; B) − L(θ − εz; B)) / (2ε) · z  ≈  z zᵀ ∇L(θ; B),

and ZO-SGD (Definition 2) steps θ ← θ − η ∇̂L(θ; B). The scalar projected_grad = (ℓ₊ − ℓ₋)/(2ε) estimates
the directional derivative zᵀ∇L. Because E[z zᵀ] = I, the step follows the gradient on average (exactly so
for a quadratic L, otherwise up to O(ε²)). The n-SPSA estimate averages n such estimates.

Algorithm 1 (MeZO) needs no more memory than inference, because z is never stored. Each step draws a
seed s. PerturbParameters(θ, ε, s) resets a random generator to s and adds εz to one parameter after
another, so the same z comes back every time it is drawn again:

    θ ← θ + εz,   ℓ₊ = L(θ; B)
    θ ← θ − 2εz,  ℓ₋ = L(θ; B)
    θ ← θ + εz                                        (reset before the descent)
    projected_grad = (ℓ₊ − ℓ₋) / (2ε)
    reset the generator to s; for each θ_i: z_i ~ N(0, 1), θ_i ← θ_i − η_t · projected_grad · z_i

Only one parameter's z_i exists at a time. The paper notes a further saving: a whole run can be stored
as the starting weights plus one (seed, projected_grad) pair per step (``MeZOStep.seeds`` and
``projected_grads`` keep these).

Floating point. In float arithmetic θ + εz − 2εz + εz is not exactly θ: each of the three additions
rounds. The official code drifts in the same way and this class reproduces it bit for bit. An exact
restore would need a copy of θ (or of its rounding errors), which is the memory MeZO exists to save;
``tests/test_mezo.py`` measures the drift.

Where the reference departs from the paper. In the official code (princeton-nlp/MeZO,
``large_models/trainer.py``: ``zo_step``, ``zo_update``):
* the update adds weight decay, θ ← θ − η (projected_grad · z + λθ), except for parameters whose
  names contain "bias", "layer_norm" or "layernorm". That name rule was written for OPT, and it misses
  Llama's final ``model.norm``. Our default ``no_decay=("bias", "norm")`` also covers that one; pass the
  official tuple to reproduce the official code exactly;
* both forward passes run in eval mode (dropout off). Ours do too, and the module modes are restored
  afterwards;
* the seed comes from numpy's global generator (``np.random.randint(10**9)``), and z from torch's
  global generator after ``torch.manual_seed(s)``. That call also resets the random state the rest of
  training draws from. Ours draws the seeds from a generator seeded with ``config.seed``, and draws z
  from private generators (one per device) seeded with s. These give the same z as the official code
  for the same s, and leave the global state alone;
* it logs ℓ₊ as the step's loss and refuses gradient accumulation (``assert grad_accum == 1``). Ours
  reports (ℓ₊ + ℓ₋)/2, which estimates L(θ) to O(ε²). With grad_accum > 1, ours takes ℓ± as the mean of
  the micro-batch losses, with one z for all of them. That is the same SPSA estimate on the step's
  whole batch, matching ``BackpropStep``'s mean over micro-batches, and it costs 2 · grad_accum forward
  passes and no memory. With grad_accum = 1 it is the official estimate;
* it uses n = 1. Ours allows n > 1 (the n-SPSA average): it takes n estimates at the same θ (up to the
  restore's rounding), then applies them one after another.
There is no gradient to clip, so ``config.max_grad_norm`` is not used (the official code does not clip).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from ..core import register
from ..core.step import Step, StepResult

OFFICIAL_NO_DECAY = ("bias", "layer_norm", "layernorm")   # the official code's name rule (OPT's names)
_SLICE = 1 << 16                                          # entries per slice of the decay term, below


def _add_decay(z: torch.Tensor, theta: torch.Tensor, weight_decay: float) -> None:
    """z += λθ with λθ rounded before the sum, as the official ``projected_grad * z + λ * θ`` is computed
    (``z.add_(θ, alpha=λ)`` may fuse the two into one rounding, and then the result differs by an ulp).
    It works slice by slice, so the temporary is one slice and never a second parameter-sized tensor."""
    for z_part, theta_part in zip(z.view(-1).split(_SLICE), theta.reshape(-1).split(_SLICE)):
        z_part.add_(theta_part * weight_decay)


def _mean_loss(batches: list[Mapping], forward: Callable[[Mapping], torch.Tensor]) -> torch.Tensor:
    """L(θ; B) over the step's micro-batches: the mean of their losses, in float32 (exactly the loss when
    there is one micro-batch)."""
    return torch.stack([forward(b).detach().float() for b in batches]).mean()


@register("mezo", family="optimizers", kind="step", paper="malladi2023finetuning")
class MeZOStep(Step):
    """MeZO (Algorithm 1): a zeroth-order SGD step from two forward passes, with z drawn again from a seed.

    It perturbs and updates only the parameters that require grad, in ``named_parameters`` order. So it
    runs as full fine-tuning, or on top of an adapter (``core.add_adapter(model, LoRAConfig(...))``,
    prefix tuning, ...), with the frozen weights left untouched. Forward passes run under
    ``torch.no_grad`` in eval mode, and no ``.grad`` is ever made. The extra memory is one z (the size of
    the largest trainable parameter) plus, with weight decay, one 2^16-entry slice.

    Per step it uses lr = ``config.lr`` × the schedule's factor, and weight decay λ = ``config.weight_decay``
    (not on names containing one of ``no_decay``). The seeds come from a generator seeded with
    ``config.seed``, so a run is deterministic.

    ``StepResult`` fields: ``loss`` is (ℓ₊ + ℓ₋)/2, averaged over the n estimates. ``grad_norm`` is
    |projected_grad|, averaged over the n estimates. That is not ‖∇L‖ but a one-direction sample of it:
    E[(zᵀ∇L)²] = ‖∇L‖² for z ~ N(0, I).

    Args:
        eps: the perturbation scale ε (> 0, finite). The official scripts use 1e-3 for full fine-tuning,
            1e-2 for LoRA and 1e-1 for prefix tuning.
        n: directions z per step (the n-SPSA average; the paper uses 1).
        no_decay: substrings of the parameter names that get no weight decay (``OFFICIAL_NO_DECAY``
            reproduces the official rule).

    Raises:
        ValueError: eps not a finite number > 0, n not an integer >= 1, or no_decay not a tuple of
            strings. ``setup`` raises if no parameter requires grad, and leaves the model untouched.
    """

    def __init__(self, eps: float = 1e-3, n: int = 1, no_decay: tuple[str, ...] = ("bias", "norm")):
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"eps (the perturbation scale ε) must be a finite number > 0, got {eps!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n (the number of directions z per step) must be an integer >= 1, got {n!r}")
        if not isinstance(no_decay, (tuple, list)) or not all(isinstance(s, str) for s in no_decay):
            raise ValueError(f"no_decay must be a tuple of name substrings, e.g. ('bias', 'norm'), got {no_decay!r}")
        self.eps, self.n, self.no_decay = float(eps), n, tuple(no_decay)
        self.named: list[tuple[str, nn.Parameter]] | None = None
        self.seeds: list[int] = []              # one per estimate, in order: with projected_grads, the run
        self.projected_grads: list[float] = []

    def setup(self, model: nn.Module, config) -> list[torch.Tensor]:
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("nothing to train: no parameter requires grad (did add_adapter run, or is every "
                             "parameter frozen?)")
        self.named = named
        self.lr, self.weight_decay = config.lr, config.weight_decay
        self.seed_source = torch.Generator().manual_seed(config.seed)
        self.seeds, self.projected_grads = [], []
        return [p for _, p in named]

    def directions(self, seed: int) -> Iterator[tuple[str, nn.Parameter, torch.Tensor]]:
        """(name, θ_i, z_i) for every trained parameter in order, with z_i ~ N(0, I) of θ_i's shape, dtype and
        device, drawn from generators reset to ``seed``. The same seed always gives the same z, and the
        same numbers as the official ``torch.manual_seed(seed)`` followed by one ``torch.normal`` per
        parameter. Each z_i is made only when the loop asks for it."""
        generators: dict[torch.device, torch.Generator] = {}
        for name, theta in self.named:
            if theta.device not in generators:
                generators[theta.device] = torch.Generator(theta.device).manual_seed(seed)
            yield name, theta, torch.normal(0.0, 1.0, theta.shape, generator=generators[theta.device],
                                            dtype=theta.dtype, device=theta.device)

    @torch.no_grad()
    def perturb(self, seed: int, scale: float) -> None:
        """θ ← θ + scale · z(seed), in place (PerturbParameters; scale is ε, −2ε, ε)."""
        for _, theta, z in self.directions(seed):
            theta.add_(z.mul_(scale))   # the same roundings as the official θ + (s z) ε, for s = 1 and −2
            del z                       # freed before the next z is drawn: one at a time

    @torch.no_grad()
    def update(self, seed: int, projected_grad: float, lr: float, weight_decay: float) -> None:
        """θ_i ← θ_i − lr (projected_grad · z_i + λ θ_i), with z drawn again from ``seed``; λ = 0 on no_decay names."""
        for name, theta, z in self.directions(seed):
            z.mul_(projected_grad)                                        # g z
            if weight_decay != 0 and not any(s in name for s in self.no_decay):
                _add_decay(z, theta, weight_decay)                        # g z + λ θ
            theta.sub_(z.mul_(lr))                                        # θ − lr (g z + λ θ)
            del z

    def estimate(self, seed: int, batches: list[Mapping], forward) -> tuple[float, float]:
        """One two-point estimate at the current θ, which it then restores (up to rounding).
        Returns (projected_grad, (ℓ₊ + ℓ₋)/2)."""
        self.perturb(seed, self.eps)
        plus = _mean_loss(batches, forward)             # ℓ₊ = L(θ + εz)
        self.perturb(seed, -2 * self.eps)
        minus = _mean_loss(batches, forward)            # ℓ₋ = L(θ − εz)
        self.perturb(seed, self.eps)                    # back to θ
        projected_grad = ((plus - minus) / (2 * self.eps)).item()
        return projected_grad, ((plus + minus) / 2).item()

    @torch.no_grad()
    def __call__(self, model, batches, forward, lr_scale) -> StepResult:
        if self.named is None:
            raise RuntimeError("MeZOStep.setup(model, config) must run before the first step (train() calls it)")
        lr = self.lr * lr_scale
        seeds = [int(torch.randint(0, 10**9, (1,), generator=self.seed_source)) for _ in range(self.n)]
        modes = [(m, m.training) for m in model.modules()]
        model.eval()                                    # dropout off for both losses, as the official code
        try:
            estimates = [self.estimate(s, batches, forward) for s in seeds]   # all at the same θ
        finally:
            for m, training in modes:
                m.training = training
        if lr != 0:
            for j, (seed, (g, _)) in enumerate(zip(seeds, estimates)):
                # the average of n estimates; the decay λθ is applied once, with the first one
                self.update(seed, g / self.n, lr, self.weight_decay if j == 0 else 0.0)
        self.seeds += seeds
        self.projected_grads += [g for g, _ in estimates]
        return StepResult(loss=sum(loss for _, loss in estimates) / self.n,
                          grad_norm=sum(abs(g) for g, _ in estimates) / self.n, lr=lr)


def official_mezo(model, seeds, step_batches, lr, eps, weight_decay=0.0):
    """The reference: MeZO as the official trainer computes it (``zo_perturb_parameters``, ``zo_step``,
    ``zo_update``), written out plainly: the global generator reseeded, ``.data`` replaced out of place,
    weight decay by ``OFFICIAL_NO_DECAY``'s name rule. Replays ``seeds`` (e.g. a ``MeZOStep``'s) with
    a constant ``lr``. ``step_batches[t]`` is step t's list of micro-batches: the official code takes
    exactly one; with more, their losses are averaged, as ``MeZOStep`` does. Returns one
    (ℓ₊, ℓ₋, projected_grad) per step. The tests, the benchmark and notebook 13 prove ``MeZOStep``
    equal to it."""
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    def perturb(seed, scaling_factor):                 # θ ← θ + scaling_factor · ε · z
        torch.manual_seed(seed)
        for _, p in trained:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data + scaling_factor * z * eps

    def loss(group):                                   # eval mode: no dropout
        model.eval()
        with torch.inference_mode():
            losses = [model(**b).loss for b in group]
            return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

    out = []
    for seed, group in zip(seeds, step_batches):
        perturb(seed, 1)
        loss_plus = loss(group)
        perturb(seed, -2)
        loss_minus = loss(group)
        projected_grad = ((loss_plus - loss_minus) / (2 * eps)).item()
        perturb(seed, 1)                               # reset before the descent
        torch.manual_seed(seed)                        # the same z again
        for name, p in trained:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            if not any(s in name for s in OFFICIAL_NO_DECAY):
                p.data = p.data - lr * (projected_grad * z + weight_decay * p.data)
            else:
                p.data = p.data - lr * (projected_grad * z)
        out.append((loss_plus.item(), loss_minus.item(), projected_grad))
    return out
