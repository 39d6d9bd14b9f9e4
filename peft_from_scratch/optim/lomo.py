"""LOMO: SGD fused into the backward pass, so that no full set of gradients is ever stored.

Lv, Yang, Liu, Gao, Guo and Qiu (2023), "Full Parameter Fine-tuning for Large Language Models with
Limited Resources", arXiv 2306.09782. An optimizer step normally holds every gradient at once (as
many floats as the model) between ``backward`` and ``optimizer.step()``. LOMO applies plain SGD to
each parameter the moment its gradient is ready, inside backward, and frees it (Algorithm 1):

    for each parameter θ_i, as backward reaches it:   g_i = ∂ℓ/∂θ_i
        θ_i <- (1 - α λ) θ_i - α ĝ_i                 (λ: decoupled weight decay; 0 in the paper)
        g_i <- None

With no momentum, decoupled and L2 weight decay are the same update, so this is ``torch.optim.SGD``.

Global-norm clipping needs ‖g‖ over *all* parameters before the *first* update, which a single fused
pass cannot know; LOMO back-propagates twice: pass 1 (``retain_graph``) only adds up the squared
norms, pass 2 applies ĝ = g · min(1, c / (‖g‖ + 1e-6)) (torch's ``clip_grad_norm_`` coefficient).
Clip-by-value (ĝ = clamp(g, ±v)) needs no extra pass.

Precision. bf16 has float32's exponent range, so bf16 gradients need no loss scaling; fp16 does:
the loss is multiplied by a dynamic scale S, each gradient divided by S, and a step whose gradients
overflow is skipped and S halved (doubled again after ``scale_window`` good steps).

Failures inside backward. Once pass 2 has started, the parameters already reached are stepped and
cannot be taken back. Whenever a first pass runs (clipping, or fp16), it also checks every gradient:
a non-finite one stops the step before anything changes (fp16: skipped and S halved; else
``FloatingPointError``). Without a first pass each gradient is checked before it is applied; at the
first non-finite one, or an exception inside backward, no further parameter is updated and the
error names exactly the parameters that already were.

Where the reference (``lomo_optim.Lomo`` 0.1.1) departs from the paper, and what is done here:
its hooks are ``Tensor.register_hook`` (run *before* a gradient is accumulated), and each one
updates every parameter whose ``.grad`` is already set, so parameter i is stepped when the next
gradient arrives (one more call after backward steps the last); here a post-accumulate hook steps
each parameter itself. Clip-by-value is applied before the clipping coefficient, which is computed
from the unclipped gradients: the same here. Its fp16 scaler starts at 2^32, switches on only when
the *loss* is fp16 (transformers upcasts logits, so rarely) and then forces clipping at 1.0; here it
starts at 2^16, switches on when a trained parameter is fp16, and adds a check-only first pass.
Without a scaler it has no finiteness check: one NaN gradient makes the norm, the clipping
coefficient and so every parameter NaN (``tests/test_lomo.py`` shows it).
"""
from __future__ import annotations

import math

import torch

from ..core import register
from ..core.step import Step, StepResult

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class DynamicLossScaler:
    """fp16 loss scaling: multiply the loss by ``scale``; on overflow halve it (the step is skipped),
    after ``window`` steps without overflow double it."""

    def __init__(self, init_scale: float = 2.0 ** 16, window: int = 1000, factor: float = 2.0):
        self.scale, self.window, self.factor, self.good_steps = float(init_scale), window, factor, 0

    def update(self, overflow: bool) -> None:
        if overflow and self.scale <= 1.0:
            raise FloatingPointError("fp16 gradients overflow even with loss scale 1: the model diverged")
        self.good_steps = 0 if overflow else self.good_steps + 1
        if overflow:
            self.scale = max(self.scale / self.factor, 1.0)
        elif self.good_steps % self.window == 0:
            self.scale *= self.factor


@register("lomo", family="optimizers", kind="step", paper="lv2023full")
class LomoStep(Step):
    """SGD applied in backward hooks, one parameter at a time (see the module docstring).

    Uses the config's ``lr`` (times the schedule's factor), ``weight_decay`` (decoupled) and
    ``max_grad_norm`` (None: one backward pass, no clipping). ``grad_accum`` must be 1. The hooks
    act only while the step runs, so the model trains normally with another step afterwards;
    ``close()`` (or ``with LomoStep() as step:``) removes them.

    Args:
        clip_grad_value: clamp every gradient entry to [-v, v] (None: off).
        init_scale, scale_window: the fp16 loss scaler (used only when a trained parameter is fp16).
    """

    def __init__(self, clip_grad_value: float | None = None, init_scale: float = 2.0 ** 16, scale_window: int = 1000):
        if clip_grad_value is not None and not clip_grad_value > 0:
            raise ValueError(f"clip_grad_value must be > 0 or None, got {clip_grad_value}")
        if not init_scale >= 1 or not (isinstance(scale_window, int) and scale_window >= 1):
            raise ValueError(f"init_scale must be >= 1 and scale_window a positive int, got {init_scale}, {scale_window}")
        self.clip_grad_value, self.init_scale, self.scale_window = clip_grad_value, init_scale, scale_window
        self.handles: list = []
        self.named: dict[str, torch.Tensor] = {}
        self.phase: str | None = None       # None (hooks idle) | "norm" (pass 1) | "update" (pass 2)

    # --- setup and teardown
    def setup(self, model, config) -> list[torch.Tensor]:
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not named:
            raise ValueError("nothing to train: no parameter requires grad")
        if config.grad_accum != 1:
            raise ValueError(f"{type(self).__name__} needs grad_accum=1, got {config.grad_accum}: each gradient is "
                             "applied and freed inside backward, so there is nothing to accumulate into (use a "
                             "larger batch instead)")
        if config.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {config.precision!r}")
        bad = {n: p.dtype for n, p in named.items() if p.dtype not in DTYPES}
        if bad:
            raise ValueError(f"trained parameters must be float32, bfloat16 or float16; got {bad}")
        if config.max_grad_norm is not None and not config.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {config.max_grad_norm}")
        self.close()                                          # a second setup starts afresh
        self.named, self.base_lr, self.weight_decay = named, config.lr, config.weight_decay
        self.max_norm = config.max_grad_norm
        fp16 = any(p.dtype == torch.float16 for p in named.values())
        self.scaler = DynamicLossScaler(self.init_scale, self.scale_window) if fp16 else None
        self.skipped_steps = 0
        self.handles = [p.register_post_accumulate_grad_hook(lambda p, n=n: self._hook(n, p))
                        for n, p in named.items()]
        return list(named.values())

    def close(self) -> None:
        """Remove the backward hooks."""
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- the step
    def __call__(self, model, batches, forward, lr_scale) -> StepResult:
        self.lr = self.base_lr * lr_scale
        loss = forward(batches[0])
        loss_value = loss.detach().float().item()
        scaled = loss * self.scaler.scale if self.scaler else loss
        self.clip_coef, self.checked, grad_norm = None, False, math.nan
        if self.max_norm is not None or self.scaler is not None:
            grad_norm = self._norm_pass(scaled)
            if not math.isfinite(grad_norm):                  # fp16 overflow (anything else has raised)
                self.scaler.update(overflow=True)
                self.skipped_steps += 1
                return StepResult(loss_value, grad_norm, self.lr)
        self.begin_update()
        self.updated, self.bad = [], None
        self._backward(scaled, "update", retain_graph=False)
        if self.bad is not None:
            raise FloatingPointError(f"non-finite gradient in {self.bad}; {self._updated_message()}; set "
                                     "max_grad_norm to check every gradient before any update")
        if self.scaler:
            self.scaler.update(overflow=False)
        return StepResult(loss_value, grad_norm, self.lr)

    def _norm_pass(self, scaled) -> float:
        """Pass 1: ‖g‖ over all parameters (and a finiteness check), nothing updated."""
        self.norms = {}
        self._backward(scaled, "norm", retain_graph=True)
        norms = list(self.norms.values()) or [torch.zeros(())]   # (no parameter reached: norm 0)
        total = torch.norm(torch.stack(norms), 2.0)
        if not torch.isfinite(total):
            if self.scaler is None:
                bad = [n for n, v in self.norms.items() if not torch.isfinite(v)]
                raise FloatingPointError(f"non-finite gradient in {bad}; no parameter was updated")
            return math.inf
        if self.max_norm is not None:
            self.clip_coef = torch.clamp(self.max_norm / (total + 1e-6), max=1.0)
        self.checked = True
        return float(total)

    def _backward(self, loss, phase, retain_graph) -> None:
        self.phase = phase
        try:
            loss.backward(retain_graph=retain_graph)
        except Exception as e:
            done = "no parameter was updated" if phase == "norm" else self._updated_message()
            raise RuntimeError(f"backward failed in the {phase} pass: {done}") from e
        finally:
            self.phase = None
            for p in self.named.values():                    # what a failure left behind
                p.grad = None

    def _updated_message(self) -> str:
        return f"{len(self.updated)} of {len(self.named)} parameters were already updated this step: {self.updated}"

    @torch.no_grad()
    def _hook(self, name: str, p: torch.Tensor) -> None:
        if self.phase is None:                                # not our backward: leave the gradient alone
            return
        g = p.grad.float()                                    # (the same tensor when already float32)
        p.grad = None                                         # freed: at most this one gradient is held
        if self.scaler:
            g.div_(self.scaler.scale)
        if self.phase == "norm":
            self.norms[name] = torch.norm(g, 2.0)
            return
        if self.bad is not None:                              # an earlier gradient was non-finite: stop
            return
        if not self.checked and not torch.isfinite(g).all():
            self.bad = name
            return
        if self.clip_grad_value is not None:
            g.clamp_(-self.clip_grad_value, self.clip_grad_value)
        if self.clip_coef is not None:
            g.mul_(self.clip_coef)
        self.update(name, p, g, self.lr)
        self.updated.append(name)

    # --- the optimizer: what AdaLomo replaces
    def begin_update(self) -> None:
        """Called once per step, before the update pass (AdaLomo counts its steps here)."""

    def update(self, name: str, p: torch.Tensor, g: torch.Tensor, lr: float) -> None:
        """SGD with decoupled weight decay; ``g`` is the float32, unscaled, clipped gradient."""
        theta = p if p.dtype == torch.float32 else p.float()
        if self.weight_decay:
            theta.mul_(1 - lr * self.weight_decay)
        theta.add_(g, alpha=-lr)
        if theta is not p:
            p.copy_(theta)
