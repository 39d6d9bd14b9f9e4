"""The bottleneck MLP every adapter of this family is made of: h -> W_up f(W_down h + b_down) + b_up.

Houlsby et al. (2019) add it with a skip connection after a sub-layer (serial), He et al. (2022)
beside a sub-layer (parallel); Compacter, MAM and HyperFormer change how W_down and W_up are made.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NON_LINEARITIES = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),   # gelu_new: transformers' name
                   "relu": F.relu, "swish": F.silu, "silu": F.silu, "tanh": torch.tanh,
                   "linear": lambda x: x}                                   # linear: no non-linearity (transformers' name)


def check_non_linearity(name: str) -> None:
    if name not in NON_LINEARITIES:
        raise ValueError(f"non_linearity must be one of {sorted(NON_LINEARITIES)}, got {name!r}")


class Bottleneck(nn.Module):
    """h -> W_up f(W_down h + b_down) + b_up, the adapter's branch (without its skip connection).

    ``down`` and ``up`` are ``nn.Linear`` layers (weight + bias), initialised from a Gaussian with
    std ``init_std`` truncated at +-2 std, biases zero, as in Houlsby et al. (2019): near zero, so an
    adapter with a skip connection starts near the identity.
    """

    def __init__(self, d: int, m: int, non_linearity: str = "gelu", init_std: float = 1e-2,
                 dtype: torch.dtype | None = None, device=None, name: str = ""):
        super().__init__()
        if not isinstance(m, int) or not 1 <= m <= d:
            raise ValueError(f"adapter bottleneck m={m!r} does not fit {name or 'a layer'} of width d={d}: "
                             f"m must be an integer between 1 and d (the bottleneck projects d -> m -> d)")
        check_non_linearity(non_linearity)
        self.f = NON_LINEARITIES[non_linearity]
        self.down = nn.Linear(d, m, dtype=dtype, device=device)   # W_down, b_down
        self.up = nn.Linear(m, d, dtype=dtype, device=device)     # W_up, b_up
        for layer in (self.down, self.up):
            nn.init.trunc_normal_(layer.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
            nn.init.zeros_(layer.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:   # (..., d) -> (..., m) -> (..., d)
        return self.up(self.f(self.down(h)))

    @property
    def dtype(self) -> torch.dtype:
        return self.down.weight.dtype


def float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype for an adapter beside ``module``: its first parameter's, float32 if that is not float."""
    p = next(module.parameters())
    return p.dtype if p.dtype.is_floating_point else torch.float32


def parameter_count(d: int, m: int, adapters: int) -> int:
    """Trainable parameters of ``adapters`` bottleneck adapters: each has 2dm + d + m."""
    return adapters * (2 * d * m + d + m)
