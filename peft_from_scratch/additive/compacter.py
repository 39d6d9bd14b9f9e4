"""Compacter (Karimi Mahabadi, Henderson & Ruder 2021, "Compacter: Efficient Low-Rank Hypercomplex
Adapter Layers", arXiv 2106.04647).

A Houlsby adapter h + W_up f(W_down h) whose two projections are PHM layers (parameterized
hypercomplex multiplication). A PHM layer's weight is a sum of n Kronecker products (paper, Eq. 3):

    W = sum_{i=1..n} A_i (x) B_i,      A_i: n x n,   B_i: (k/n) x (d/n),   W: k x d

Compacter adds two things (Eqs. 4-5):

* the "slow" weights A_i are **shared** by every Compacter layer of the model (the down and the up
  projection of every adapter): one n x n x n tensor in all;
* the "fast" weights B_i are **rank one**, B_i = s_i t_i^T, so a layer has n (k/n + d/n) = k + d
  weights instead of k d: O(k + d) per layer.

**Layout.** We follow the official code (rabeehk/compacter ``seq2seq/hypercomplex/layers.py``) and
AdapterHub (``adapters/methods/modeling.py``, ``PHMLayer``), which store the transpose of the paper's W
and multiply row vectors:

    y = x H + b,     H = sum_i C_i (x) (L_i R_i)   (d_in x d_out),   L_i: (d_in/n) x r,   R_i: r x (d_out/n)

H is W^T with A_i = C_i^T and B_i = (L_i R_i)^T, so it is the same family of matrices; ``C`` is the
shared tensor (``phm_rule`` in both codes), ``L`` and ``R`` are ``W_left`` and ``W_right``, and
r = ``rank`` is 1 in the paper.

**Placements.** ``CompacterConfig(placement="houlsby")`` is Compacter: two adapters per layer, after
the attention output and after the feed-forward output, as Houlsby's. ``placement="pfeiffer"`` is
Compacter++: one adapter per layer, after the feed-forward block. As in the paper (and the official
configs' ``unfreeze_layer_norms: true``) the layer norms train too; the reduction factor is 32
(m = d / 32).

**Initialisation** (official code): C ~ N(0, 1e-4^2) (``phm_c_init="normal"``, ``phm_init_range``),
every L_i and R_i Glorot-uniform with gain sqrt(2) (``hypercomplex/inits.py``), biases zero. So H is
about 1e-4 of a Glorot matrix and the adapter starts near the identity.

**Against AdapterHub** (``adapters`` 1.3.0, ``interop.adapterhub``): ``placement="houlsby"`` =
``CompacterConfig()`` and ``placement="pfeiffer"`` = ``CompacterPlusPlusConfig(original_ln_before=False)``;
with copied weights the two compute the same numbers. Where AdapterHub parts from the paper:

* ``CompacterPlusPlusConfig()``'s default ``original_ln_before=True`` feeds the adapter LN(h + x)
  instead of the feed-forward output h and applies that LayerNorm twice (as its ``SeqBnConfig``);
  the official code's T5LayerFF applies the adapter to the feed-forward output, as ours.
* its ``init_W`` tests ``if config["hypercomplex_nonlinearity"]:`` (a non-empty string, always true),
  so the W's are drawn Glorot-*normal* with gain 1 whatever is asked (default "glorot-uniform").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core import AdapterConfig, AdapterLayer, ModelAdapter, register
from ..core.adapter import install
from ..core.targets import check_wraps, find_targets
from .bottleneck import NON_LINEARITIES, check_non_linearity, float_dtype
from .houlsby import LAYER_NORMS, HoulsbyAdapterLinear, placement_targets


class SharedRule(ModelAdapter):
    """The slow weights C_1..C_n (n x n each), one tensor for the whole model: ``model.phm_rule.C``."""
    attr: ClassVar[str] = "phm_rule"

    def __init__(self, n: int, init_range: float = 1e-4, dtype=None, device=None):
        super().__init__()
        self.C = nn.Parameter(torch.empty(n, n, n, dtype=dtype, device=device).normal_(std=init_range))


class PHMLinear(nn.Module):
    """y = x H + b with H = sum_i C_i (x) (L_i R_i); C is the model's ``SharedRule``, L, R, b are this layer's."""

    def __init__(self, d_in: int, d_out: int, rule: SharedRule, rank: int = 1, dtype=None, device=None):
        super().__init__()
        n = rule.C.shape[0]
        self.rule = [rule]   # a plain list: nn.Module does not register it, so C is stored once (model.phm_rule)
        self.W_left = nn.Parameter(torch.empty(n, d_in // n, rank, dtype=dtype, device=device))     # L_i
        self.W_right = nn.Parameter(torch.empty(n, rank, d_out // n, dtype=dtype, device=device))   # R_i
        self.b = nn.Parameter(torch.zeros(d_out, dtype=dtype, device=device))
        for i in range(n):
            nn.init.xavier_uniform_(self.W_left[i], gain=math.sqrt(2))
            nn.init.xavier_uniform_(self.W_right[i], gain=math.sqrt(2))

    def weight(self) -> torch.Tensor:
        """H (d_in x d_out): the sum of the n Kronecker products, Eq. 3 in the row-vector layout.

        kron(C_i, B_i)[a p + b, c q + e] = C_i[a, c] B_i[b, e]: all n products at once by broadcasting
        C_i (n x n) against B_i (p x q) into (n, p, n, q) blocks, then summed over i."""
        C, B = self.rule[0].C, torch.bmm(self.W_left, self.W_right)           # B_i = L_i R_i, rank <= r
        n, p, q = B.shape
        return (C[:, :, None, :, None] * B[:, None, :, None, :]).sum(0).reshape(n * p, n * q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight()) + self.b


class PHMBottleneck(nn.Module):
    """h -> up(f(down(h))) with PHM projections d -> m -> d: a Compacter layer's branch."""

    def __init__(self, d: int, m: int, rule: SharedRule, non_linearity: str = "gelu", rank: int = 1,
                 dtype=None, device=None):
        super().__init__()
        self.f = NON_LINEARITIES[non_linearity]
        self.down = PHMLinear(d, m, rule, rank, dtype, device)
        self.up = PHMLinear(m, d, rule, rank, dtype, device)

    @property
    def dtype(self) -> torch.dtype:
        return self.down.b.dtype

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.f(self.down(h)))


@register("compacter", family="additive", paper="mahabadi2021compacter", parent="houlsby")
@dataclass
class CompacterConfig(AdapterConfig):
    """Compacter (``placement="houlsby"``) and Compacter++ (``placement="pfeiffer"``).

    Args:
        reduction_factor: the bottleneck is m = d / reduction_factor (paper and official configs: 32).
        phm_dim: n, the number of Kronecker products (paper: 4); must divide d and m.
        rank: r of each B_i (paper: 1).
        phm_init_range: std of the shared C at the init (official: 1e-4).
        non_linearity: f between the projections ("gelu"; the official configs use "gelu_new").
        train_layer_norms: also train every layer norm, as the paper does.
        target_modules: None picks the output layers ``placement`` wraps (BERT or Llama family).
    """
    target_modules: list[str] | str | None = None
    reduction_factor: int = 32
    phm_dim: int = 4
    rank: int = 1
    phm_init_range: float = 1e-4
    non_linearity: str = "gelu"
    placement: str = "houlsby"
    train_layer_norms: bool = True

    wraps: ClassVar[tuple] = (nn.Linear,)
    identity_at_init: ClassVar = ("near the identity, not exactly: the shared C starts as N(0, phm_init_range^2), "
                                  "so each adapter adds about 1e-4 of a Glorot-sized branch")
    mergeable: ClassVar = "the bottleneck is non-linear (f between the PHM projections): it has no weight to fold in"

    def __post_init__(self):
        for name in ("reduction_factor", "phm_dim", "rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.placement not in ("houlsby", "pfeiffer"):
            raise ValueError(f"placement must be 'houlsby' (Compacter) or 'pfeiffer' (Compacter++), got {self.placement!r}")
        check_non_linearity(self.non_linearity)
        self.extra_trainable = list(self.extra_trainable)
        if self.train_layer_norms and LAYER_NORMS not in self.extra_trainable:
            self.extra_trainable.append(LAYER_NORMS)

    def inject(self, model: nn.Module) -> None:
        targets = find_targets(model, placement_targets(model, self.placement, self.target_modules))
        check_wraps(model, targets, self.wraps, self.method)
        n = self.phm_dim
        first = model.get_submodule(targets[0])
        rule = SharedRule(n, self.phm_init_range, float_dtype(first), first.weight.device)
        layers = {}
        for name in targets:   # every layer built (and checked) before the model is touched
            base = model.get_submodule(name)
            d = base.out_features
            m = d // self.reduction_factor
            if d % self.reduction_factor or m == 0 or d % n or m % n:
                raise ValueError(f"{name}: width d={d} with reduction_factor={self.reduction_factor} gives "
                                 f"m={d / self.reduction_factor:g}; Compacter needs an integer m >= 1 and phm_dim="
                                 f"{n} dividing both d and m (pick a reduction_factor and phm_dim that divide d)")
            branch = PHMBottleneck(d, m, rule, self.non_linearity, self.rank, float_dtype(base), base.weight.device)
            layers[name] = HoulsbyAdapterLinear(base, m, name=name, adapter=branch)
        install(model, layers, shared=rule)

    def make_layer(self, name: str, module: nn.Module) -> AdapterLayer:
        raise NotImplementedError("Compacter's layers share one rule C: add them all with core.add_adapter")

    @classmethod
    def examples(cls):
        return [("bert", cls(reduction_factor=4, phm_dim=2, modules_to_save=["classifier"])),
                ("bert", cls(reduction_factor=2, phm_dim=4, rank=2, placement="pfeiffer", non_linearity="relu",
                             modules_to_save=["classifier"])),
                ("llama", cls(reduction_factor=4, phm_dim=2, placement="pfeiffer", train_layer_norms=False))]

    @classmethod
    def invalid_examples(cls):
        return [{"reduction_factor": 0}, {"phm_dim": 2.5}, {"rank": 0}, {"placement": "parallel"},
                {"non_linearity": "softmax"}]


def parameter_count(d: int, m: int, adapters: int, n: int = 4, rank: int = 1) -> int:
    """Trainable parameters of ``adapters`` Compacter layers plus the shared C: each layer has two PHM
    projections, r (d + m) + m and r (m + d) + d, and C has n^3 (layer norms and head not counted)."""
    return adapters * (2 * rank * (d + m) + d + m) + n ** 3
