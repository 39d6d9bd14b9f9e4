"""QA-LoRA: Quantization-Aware Low-Rank Adaptation (Xu et al. 2023, arXiv 2309.14717).

QLoRA's adapter, B A x, has the shape of the whole weight: merged into an INT4 model it either stays
beside it in float or breaks the INT4 grid. QA-LoRA makes A read the input *average-pooled within
each quantization group* of L columns (the base is group-wise INT-b, ``intn.quantize_groupwise``):

    h = Ŵ x + s B A pool(x),      pool(x)_g = (1/L) Σ_{j in group g} x_j,      A: r x (d_in / L)

so the update's column j is s (B A)[:, g(j)] / L, the same for every column of a group. Such an
update is absorbed exactly by the group's zero point, since Ŵ = scale (q - z):

    scale (q - z) + s (B A) / L = scale (q - z'),      z' = z - s (B A) / (L scale)         (merge)

After merging, the codes q and the scales are untouched and only the zeros moved: the model is
still exactly INT-b, with no float side branch (``QALoRALinear.merge``).

The official code (yuhuixu1993/qa-lora, ``peft_utils.py``): ``lora_A(lora_dropout(AvgPool1d(L)(x)))``,
A Xavier-uniform and B zero; its ``merge.py`` subtracts (B A)^T s / L / scales from the zeros: ours.
peft's ``LoraConfig(use_qalora=True)`` (GPTQ layers only) multiplies the pooled mean by the number of
groups d_in / L, which the official code does not: ``pool_scale="peft"`` gives that factor (the
update, and so the merge, are then d_in / L times larger for the same A and B).

Where the codes live: the layer keeps the frozen float ``nn.Linear`` it wraps (so removing the adapter
gives it back, and a saved adapter, A and B only, reloads onto the same float base) and computes with
its INT-b version, quantized when the adapter is added (``bits``, ``group_size``, round-to-nearest,
deterministic) and held as non-persistent buffers. Training thus sees exactly the INT-b base it will
be merged into, at the memory of a float base (QLoRA's notebook is the place for the 4-bit memory
saving). ``export_intn(model)`` merges and replaces every layer by its ``LinearIntN``: the deployable
INT-b model, no float weight and no side branch left.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core import AdapterConfig, AdapterLayer, adapter_layers, merge_adapter, register, set_module
from .intn import BITS, GroupState, LinearIntN, check_format, dequantize_groupwise, quantize_groupwise, shift_zeros


class QALoRALinear(AdapterLayer):
    """x -> Ŵ x + b + s B A drop(pool(x)), Ŵ the INT-b version of the frozen ``nn.Linear`` it wraps."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0, bits: int = 4,
                 group_size: int = 32, init: str = "xavier", pool_scale: str = "official", name: str = ""):
        super().__init__(base_layer)
        d_out, d_in = base_layer.weight.shape
        check_format((d_out, d_in), bits, group_size)
        groups = d_in // group_size
        if not isinstance(r, int) or not 1 <= r <= min(groups, d_out):
            raise ValueError(f"rank r={r!r} does not fit layer {name or 'Linear'}: A reads its {groups} pooled groups, "
                             f"so r must be an integer between 1 and min(d_in / L, d_out) = {min(groups, d_out)}")
        state = quantize_groupwise(base_layer.weight, bits, group_size)
        for key in ("packed", "scales", "zeros"):                 # rebuilt from the base on load: not saved
            self.register_buffer(key, getattr(state, key), persistent=False)
        self.bits, self.group_size = bits, group_size
        self.r, self.scaling, self.pool_scale = r, alpha / r, pool_scale
        device = base_layer.weight.device
        self.A = nn.Parameter(torch.empty(r, groups, device=device))
        self.B = nn.Parameter(torch.zeros(d_out, r, device=device))
        if init == "xavier":
            nn.init.xavier_uniform_(self.A)
        else:
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.train(base_layer.training)

    @property
    def state(self) -> GroupState:
        return GroupState(self.packed, self.scales, self.zeros, self.bits, self.group_size,
                          tuple(self.base_layer.weight.shape))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., d_in / L): each group's mean (times d_in / L with ``pool_scale="peft"``)."""
        pooled = x.unflatten(-1, (-1, self.group_size)).mean(-1)
        return pooled * pooled.shape[-1] if self.pool_scale == "peft" else pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.base_layer.bias
        result = F.linear(x, dequantize_groupwise(self.state).to(x.dtype), None if bias is None else bias.to(x.dtype))
        if self.merged:
            return result
        branch = F.linear(F.linear(self.dropout(self.pool(x.to(self.A.dtype))), self.A), self.B) * self.scaling
        return result + branch.to(result.dtype)

    def group_delta(self) -> torch.Tensor:
        """The update per (row, group), (d_out, d_in / L): s (B A) / L (x d_in / L with peft's factor)."""
        groups = self.A.shape[1]
        return (self.B @ self.A).detach() * self.scaling / self.group_size * (groups if self.pool_scale == "peft" else 1)

    def delta_weight(self) -> torch.Tensor:
        return self.group_delta().repeat_interleave(self.group_size, dim=1)

    def merge_problem(self) -> str | None:
        return None                            # it merges into the zero points, not into the float weight

    def _merge(self) -> None:
        self.zeros.copy_(shift_zeros(self.state, self.group_delta()).zeros)

    def _unmerge(self) -> None:
        self.zeros.copy_(shift_zeros(self.state, -self.group_delta()).zeros)

    def quantized_layer(self) -> LinearIntN:
        """This layer's INT-b linear layer as it computes now (merged: with the adapter folded in)."""
        bias = self.base_layer.bias
        return LinearIntN(GroupState(self.packed.clone(), self.scales.clone(), self.zeros.clone(), self.bits,
                                     self.group_size, self.state.shape), bias)


@register("qa_lora", family="quantized", paper="xu2023qa")
@dataclass
class QALoRAConfig(AdapterConfig):
    """QA-LoRA's choices: the base format (``bits``, ``group_size``: the official runs use INT4, L = 32)
    and the pooled LoRA (``r``, ``alpha``, ``dropout``; ``init`` "xavier" as the official code or
    "kaiming"; ``pool_scale`` "official" or "peft")."""
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    bits: int = 4
    group_size: int = 32
    init: str = "xavier"
    pool_scale: str = "official"

    identity_at_init: ClassVar[bool | str] = ("a fresh QA-LoRA layer computes with the INT-b weights (the method's "
                                              "premise), not the float ones; with B = 0 it starts as that INT-b base")

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"QA-LoRA rank r must be a positive integer, got {self.r!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits!r}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")
        if self.init not in ("xavier", "kaiming"):
            raise ValueError(f"init must be 'xavier' (the official code's) or 'kaiming', got {self.init!r}")
        if self.pool_scale not in ("official", "peft"):
            raise ValueError(f"pool_scale must be 'official' or 'peft' (x d_in / L, peft's use_qalora), got {self.pool_scale!r}")

    def make_layer(self, name: str, module: nn.Linear) -> QALoRALinear:
        return QALoRALinear(module, self.r, self.alpha, self.dropout, self.bits, self.group_size, self.init,
                            self.pool_scale, name=name)

    @classmethod
    def examples(cls):
        return [("llama", cls(r=2, alpha=4, group_size=16, target_modules=["q_proj", "v_proj"])),
                ("llama", cls(r=2, alpha=4, bits=3, group_size=32, pool_scale="peft", init="kaiming",
                              target_modules="all-linear")),
                ("bert", cls(r=2, alpha=4, bits=2, group_size=16, target_modules="all-linear", modules_to_save=["classifier"]))]

    @classmethod
    def invalid_examples(cls):
        return [{"r": 0}, {"bits": 5}, {"group_size": 0}, {"init": "gaussian"}, {"pool_scale": "x16"}, {"dropout": 1.0}]


def export_intn(model: nn.Module) -> nn.Module:
    """Merge every QA-LoRA layer into its zeros and put its ``LinearIntN`` in its place: the INT-b model
    to deploy (codes and scales as quantized, the zeros moved; no float weight, no adapter). In place."""
    layers = adapter_layers(model)
    if not layers or not all(isinstance(layer, QALoRALinear) for layer in layers.values()):
        raise ValueError("export_intn needs a model whose adapter is QA-LoRA (QALoRAConfig)")
    if not any(layer.merged for layer in layers.values()):
        merge_adapter(model)
    for name, layer in layers.items():
        set_module(model, name, layer.quantized_layer())
    del model.adapter_config
    return model
