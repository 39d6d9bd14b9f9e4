"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021, arXiv 2106.09685).

A frozen linear layer W0 (d_out x d_in) gets a trainable low-rank update (paper, eq. 3):

    h = W0 x + (alpha / r) * B A x,        A: r x d_in,  B: d_out x r,  r << min(d_in, d_out)

B starts at zero, so the adapted model starts identical to the base. Dropout acts on the input of
the LoRA branch only. Because BA has the shape of W0, it can be merged: W = W0 + (alpha/r) BA, and
inference then costs nothing extra.

The branch itself, s B A dropout(x) with its init and rank check, is ``blocks.lowrank.LowRank``,
held as ``layer.lora``; this file adds the wrapping, the merge and the config. A *variant* (DoRA)
changes what the layer computes from that branch: it is passed to the layer as ``variant`` and
called by ``forward``/``merge``/``unmerge``, so LoRA never imports its variants (peft's
``LoraVariant`` pattern). ``interop.peft`` maps our names to peft's ``LoraConfig`` and its files.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..blocks.lowrank import LowRank, adapter_like, check_init
from ..core import AdapterConfig, AdapterLayer, register


class LoRAVariant(nn.Module):
    """What a variant of LoRA overrides; it holds its own parameters (DoRA: the magnitude m).

    The layer passes itself in, so a variant reads ``layer.base_layer`` and ``layer.lora`` without
    owning them.
    """

    def forward(self, layer: "LoRALinear", x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def merge(self, layer: "LoRALinear") -> None:
        raise NotImplementedError

    def unmerge(self, layer: "LoRALinear") -> None:
        raise NotImplementedError


class LoRALinear(AdapterLayer):
    """x -> W0 x + (alpha/r) B A dropout(x), around a frozen ``nn.Linear``.

    Args:
        base_layer: the frozen linear layer W0 (d_in -> d_out); a 4-bit ``Linear4bit`` works too.
        r, alpha, dropout, use_rslora, init: the low-rank branch's (``LowRank``).
        name: the layer's name, for error messages.
        variant: a function ``variant(layer) -> LoRAVariant`` (e.g. DoRA), called once the branch exists.
    Raises:
        ValueError: if r is not in [1, min(d_in, d_out)].
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming", name: str = "",
                 variant: Callable[["LoRALinear"], LoRAVariant] | None = None):
        super().__init__(base_layer)
        d_out, d_in = base_layer.out_features, base_layer.in_features  # not weight.shape: a 4-bit base packs it
        self.lora = LowRank(d_in, d_out, r, alpha, dropout, use_rslora, init, name=name, **adapter_like(base_layer))
        self.variant = variant(self) if variant is not None else None
        self.train(base_layer.training)  # new modules start in training mode; follow the wrapped layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x: (..., d_in) -> (..., d_out)
        if self.merged:
            return self.base_layer(x)
        if self.variant is not None:
            return self.variant(self, x)
        result = self.base_layer(x)
        return (result + self.lora(x)).to(result.dtype)   # add in the adapter's dtype, round once (as peft)

    def delta_weight(self) -> torch.Tensor:
        """Delta W = (alpha/r) B A, the update merge() adds to W0."""
        return self.lora.delta()

    def _merge(self) -> None:
        if self.variant is not None:
            return self.variant.merge(self)
        super()._merge()

    def _unmerge(self) -> None:
        if self.variant is not None:
            return self.variant.unmerge(self)
        super()._unmerge()


@register("lora", family="reparameterized", paper="hu2021lora")
@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA's hyper-parameters.

    Args:
        r: the rank. alpha: the scaling numerator (the update is scaled by alpha / r).
        dropout: on the LoRA branch's input. use_rslora: scale by alpha / sqrt(r) (rsLoRA).
        init: "kaiming" (A Kaiming-uniform, peft's default) or "gaussian" (A ~ N(0, 1/r^2)).

    peft's ``LoraConfig`` calls them ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora`` and
    ``init_lora_weights`` (True for "kaiming"); ``interop.peft.LORA_FIELDS`` is the mapping.
    """
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"

    variant: ClassVar[Callable[[LoRALinear], LoRAVariant] | None] = None
    renames_v1: ClassVar = ((r"\.A$", ".lora.A"), (r"\.B$", ".lora.B"))

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        check_init(self.init)

    def make_layer(self, name: str, module: nn.Linear) -> LoRALinear:
        return LoRALinear(module, self.r, self.alpha, self.dropout, self.use_rslora, self.init, name=name,
                          variant=self.variant)

    @classmethod
    def examples(cls):
        return [("llama", cls(r=2, alpha=4, target_modules=["q_proj", "v_proj"])),
                ("llama", cls(r=4, alpha=4, use_rslora=True, init="gaussian", target_modules="all-linear")),
                ("bert", cls(r=4, alpha=8, dropout=0.1, target_modules="all-linear", modules_to_save=["classifier"]))]

    @classmethod
    def invalid_examples(cls):
        return [{"r": 0}, {"r": 2.5}, {"dropout": 1.0}, {"init": "xavier"}]
