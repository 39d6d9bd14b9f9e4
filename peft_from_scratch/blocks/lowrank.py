"""The low-rank piece: x -> s B A dropout(x), for every method that has an A and a B.

LoRA, DoRA and RoSA hold one ``LowRank`` as ``layer.lora`` (composition, as rasbt's
``LinearWithLoRA`` holds a ``LoRALayer``), so the rank check, the init, the dropout, the scaling
and the product live here once:

    A: r x d_in,  B: d_out x r,  s = alpha / r  (alpha / sqrt(r) with rsLoRA, Kalajdzievski 2023)

Initialisation (Hu et al. 2021, section 4.1): B = 0, so the update BA starts at zero. The paper
draws A from a Gaussian; peft and microsoft/loralib use Kaiming-uniform with a = sqrt(5), the
``nn.Linear`` default, i.e. A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) ("kaiming", our default);
"gaussian" is peft's N(0, 1/r^2).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

INITS = ("kaiming", "gaussian")


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def adapter_like(base_layer: nn.Module) -> dict:
    """dtype and device for an adapter's tensors: the base weight's, float32 for a quantized base."""
    dtype = base_layer.weight.dtype
    return dict(dtype=dtype if dtype.is_floating_point else torch.float32, device=base_layer.weight.device)


def check_init(init: str) -> None:
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")


class LowRank(nn.Module):
    """s B A dropout(x): (..., d_in) -> (..., d_out), as two thin matmuls (BA is never formed).

    Args:
        d_in, d_out: the wrapped layer's sizes.
        r: the rank, 1 <= r <= min(d_in, d_out).
        alpha: the scaling numerator.
        dropout: dropout probability on the branch's input.
        use_rslora: scale by alpha / sqrt(r).
        init: "kaiming" (peft's default) or "gaussian".
        dtype, device: of A and B (``adapter_like(base_layer)``).
        name: the wrapped layer's name, for error messages.
    Raises:
        ValueError: r not in [1, min(d_in, d_out)], or an unknown init.
    """

    def __init__(self, d_in: int, d_out: int, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 init: str = "kaiming", dtype: torch.dtype | None = None, device=None, name: str = ""):
        super().__init__()
        if not isinstance(r, int) or not 1 <= r <= min(d_in, d_out):
            raise ValueError(f"rank r={r!r} does not fit layer {name or 'Linear'} ({d_in} -> {d_out}): "
                             f"r must be an integer between 1 and min(d_in, d_out) = {min(d_in, d_out)}")
        check_init(init)
        self.r, self.alpha, self.init = r, alpha, init
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.A = nn.Parameter(torch.empty(r, d_in, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.empty(d_out, r, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """A from Kaiming-uniform (a = sqrt(5)) or N(0, 1/r^2); B = 0."""
        if self.init == "kaiming":
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.A, std=1 / self.r)
        self.B.zero_()

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """s B A x without dropout: (..., d_in) -> (..., d_out)."""
        return F.linear(F.linear(x.to(self.A.dtype), self.A), self.B) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(self.dropout(x))

    def delta(self) -> torch.Tensor:
        """s B A, the (d_out, d_in) update this branch adds to a weight."""
        return (self.B @ self.A) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"
