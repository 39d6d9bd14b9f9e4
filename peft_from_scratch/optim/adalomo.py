"""AdaLomo: LOMO's fused backward with an adaptive learning rate from a factored second moment.

Lv, Yan, Guo, Lv and Qiu (2023), "AdaLomo: Low-memory Optimization with Adaptive Learning Rate",
arXiv 2310.10195. LOMO's plain SGD is sensitive to the learning rate; AdaLomo gives every entry its
own step size from Adam's second moment (the paper finds that this, not momentum, closes most of
the gap to AdamW), stored factored as in Adafactor (Shazeer & Stern 2018) so that the state of an
m x n matrix is m + n floats. It keeps no first moment. Per parameter, at step t (Algorithm 1):

    β2_t = 1 - t^c                                   (c = decay_rate = -0.8; β2_1 = 0)
    matrix G (m x n):  R_t = β2_t R_{t-1} + (1 - β2_t) (G² + ε1) 1_n       row sums,    (m,)
                       C_t = β2_t C_{t-1} + (1 - β2_t) 1_mᵀ (G² + ε1)      column sums, (n,)
                       V̂_t = R_t C_t / (1_mᵀ R_t)                          (m, n), rank one
    vector g:          V̂_t = β2_t V̂_{t-1} + (1 - β2_t) (g² + ε1)
    U_t = G / sqrt(V̂_t);   Û_t = U_t / max(1, RMS(U_t) / d)     (grouped update normalisation, d = clip_threshold)
    η_t = α_t max(ε2, RMS(θ_{t-1}));   θ_t = (1 - η_t λ) θ_{t-1} - η_t Û_t

with ε1 = 1e-30, ε2 = 1e-3 and λ the weight decay. The update normalisation, one tensor at a time,
is what keeps AdaLomo stable without global-norm clipping (which, as in LOMO, costs a second
backward pass; ``config.max_grad_norm=None`` turns it off). The fused step keeps row and column
*means* (R/n, C/m), as the reference and transformers' Adafactor do: V̂ = r c / mean(r), the same
matrix. ``AdaLomoReference`` below is the same equations as a plain, unfused optimizer, written with
the sums above; the fused step is tested against it.

Where the reference (``lomo_optim.AdaLomo`` 0.1.1) departs from the paper: it allocates its states
with ``.cuda()`` (so it needs a GPU) for every parameter, trained or not; it multiplies the loss by a
fixed 2^10 in every precision and divides the gradients back (a power of two: exact in float32);
like its LOMO it has no finiteness check. Its weight decay multiplies θ by 1 - η_t λ with the
*scaled* η_t, before the update (as above; transformers' Adafactor does the same). Here: the same
update; states only for trained parameters, on their device, in float32; the fp16 scaler and the
checks of ``LomoStep``.
"""
from __future__ import annotations

import torch

from ..core import register
from .lomo import LomoStep


def rms(x: torch.Tensor) -> torch.Tensor:
    return torch.norm(x, 2.0) / x.numel() ** 0.5


@register("adalomo", family="optimizers", kind="step", paper="lv2023adalomo", parent="lomo")
class AdaLomoStep(LomoStep):
    """AdaLomo's update inside LOMO's backward hooks (``LomoStep``: same config fields, same checks).

    Args:
        clip_threshold: d of the update normalisation.
        eps: (ε1 added to G², ε2 the floor of RMS(θ) in the step size).
        decay_rate: c of β2_t = 1 - t^c (negative).
        clip_grad_value, init_scale, scale_window: as ``LomoStep``.
    """

    def __init__(self, clip_threshold: float = 1.0, eps: tuple[float, float] = (1e-30, 1e-3),
                 decay_rate: float = -0.8, **lomo):
        if not clip_threshold > 0 or not decay_rate < 0 or len(eps) != 2 or not min(eps) >= 0:
            raise ValueError(f"need clip_threshold > 0, decay_rate < 0 and two eps >= 0; got clip_threshold="
                             f"{clip_threshold}, decay_rate={decay_rate}, eps={eps}")
        super().__init__(**lomo)
        self.clip_threshold, self.eps, self.decay_rate = clip_threshold, tuple(eps), decay_rate

    def setup(self, model, config):
        trained = super().setup(model, config)
        self.t = 0
        self.state = {}
        for name, p in self.named.items():      # float32 states, m + n floats for an m x n matrix
            f32 = dict(dtype=torch.float32, device=p.device)
            self.state[name] = ({"row": torch.zeros(p.shape[:-1], **f32),                 # (m,)
                                 "col": torch.zeros(p.shape[:-2] + p.shape[-1:], **f32)}  # (n,)
                                if p.dim() >= 2 else {"v": torch.zeros(p.shape, **f32)})
        return trained

    def state_bytes(self) -> int:
        """Bytes of the optimizer state (for an m x n matrix 4 (m + n); AdamW holds 8 m n)."""
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values())

    def begin_update(self) -> None:
        self.t += 1

    def update(self, name, p, g, lr):
        beta2 = 1.0 - self.t ** self.decay_rate               # β2_t = 1 - t^c
        (eps1, eps2), s = self.eps, self.state[name]
        sq = g * g + eps1                                     # G² + ε1
        if g.dim() >= 2:
            s["row"].mul_(beta2).add_(sq.mean(dim=-1), alpha=1.0 - beta2)   # r = R / n, (m,)
            s["col"].mul_(beta2).add_(sq.mean(dim=-2), alpha=1.0 - beta2)   # c = C / m, (n,)
            r = (s["row"] / s["row"].mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)   # (m, 1)
            u = r * s["col"].unsqueeze(-2).rsqrt() * g        # U = G / sqrt(r c / mean(r)), (m, n)
        else:
            s["v"].mul_(beta2).add_(sq, alpha=1.0 - beta2)
            u = s["v"].rsqrt() * g
        u.div_((rms(u) / self.clip_threshold).clamp(min=1.0))  # Û = U / max(1, RMS(U) / d)
        theta = p if p.dtype == torch.float32 else p.float()
        eta = lr * max(eps2, rms(theta))                      # η_t = α_t max(ε2, RMS(θ_{t-1}))
        if self.weight_decay:
            theta.mul_(1.0 - eta * self.weight_decay)
        theta.add_(u, alpha=-eta)
        if theta is not p:
            p.copy_(theta)


class AdaLomoReference(torch.optim.Optimizer):
    """The readable reference: AdaLomo's equations (module docstring) as an ordinary, unfused
    optimizer that reads ``p.grad`` after a full backward (so it stores every gradient, as AdamW
    does). Vectors and matrices only. ``BackpropStep(lambda groups, c: AdaLomoReference(groups,
    lr=c.lr, weight_decay=c.weight_decay))`` trains with it; its clipping is then ``BackpropStep``'s."""

    def __init__(self, params, lr: float = 1e-3, eps=(1e-30, 1e-3), clip_threshold: float = 1.0,
                 decay_rate: float = -0.8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (eps1, eps2), d, lam = group["eps"], group["clip_threshold"], group["weight_decay"]
            for theta in group["params"]:
                if theta.grad is None:
                    continue
                if theta.dim() > 2:
                    raise NotImplementedError("the readable reference covers vectors and matrices")
                state, G = self.state[theta], theta.grad.float()
                state["t"] = t = state.get("t", 0) + 1
                beta2 = 1.0 - t ** group["decay_rate"]
                if G.dim() == 2:
                    R = state.setdefault("R", G.new_zeros(G.shape[0]))
                    C = state.setdefault("C", G.new_zeros(G.shape[1]))
                    R.mul_(beta2).add_((G ** 2 + eps1).sum(dim=1), alpha=1 - beta2)   # (m,)
                    C.mul_(beta2).add_((G ** 2 + eps1).sum(dim=0), alpha=1 - beta2)   # (n,)
                    V = torch.outer(R, C) / R.sum()                                  # V̂ = R C / 1ᵀR, (m, n)
                else:
                    V = state.setdefault("V", torch.zeros_like(G))
                    V.mul_(beta2).add_(G ** 2 + eps1, alpha=1 - beta2)
                U = G / V.sqrt()
                U_hat = U / max(1.0, float(rms(U)) / d)
                eta = group["lr"] * max(eps2, float(rms(theta.float())))
                new = (1 - eta * lam) * theta.float() - eta * U_hat
                theta.copy_(new)
        return loss
