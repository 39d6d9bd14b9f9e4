"""Group-wise asymmetric integer quantization: the base-weight format of GPTQ and of QA-LoRA (Xu et al.
2023, arXiv 2309.14717), here with GPTQ's round-to-nearest quantizer and no Hessian correction.

A weight W (d_out x d_in) is cut along its input dimension into groups of L consecutive columns. Each
row o of each group g gets its own scale s and zero point z, from the group's range stretched to hold
0 (GPTQ's ``Quantizer.find_params`` with ``sym=False``; a group of zeros gets the range [-1, 1]):

    lo = min(0, min W[o, g]),  hi = max(0, max W[o, g]),  s = (hi - lo) / (2^b - 1),  z = round(-lo / s)
    q  = clamp(round(W / s) + z, 0, 2^b - 1)                         (the b-bit code of each weight)
    Ŵ  = s (q - z)                                                   (what the layer computes with)

so 0 is exactly representable, and a weight is off by at most s / 2 where it lies inside the range.
Codes are stored packed, ``32 // b`` to an int32 word (8 at 4 bits; 10 at 3 bits, 2 bits of each word
unused; 16 at 2 bits), scales and zeros in float: ``bits_per_weight`` counts all of it.

QA-LoRA's point is what this format allows: an update that is constant inside each group can be
absorbed exactly by the zero points, leaving codes and scales as they were (``shift_zeros``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .linear4bit import apply_keeping_state_dtypes

BITS = (2, 3, 4, 8)


@dataclass
class GroupState:
    """A quantized matrix: ``packed`` codes, per-(row, group) ``scales`` and ``zeros`` (d_out, d_in / L)."""
    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    shape: tuple[int, int]


def check_format(shape, bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    if len(shape) != 2:
        raise ValueError(f"group-wise quantization takes a 2-D weight (d_out, d_in), got shape {tuple(shape)}")
    if not isinstance(group_size, int) or group_size < 1 or shape[1] % group_size:
        raise ValueError(f"group_size={group_size!r} must be a positive integer dividing the input width "
                         f"d_in={shape[1]} (the groups are runs of consecutive input columns)")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2^bits) -> int32 words, ``32 // bits`` codes each, lowest bits first."""
    per = 32 // bits
    flat = codes.reshape(-1).to(torch.int64)
    flat = torch.cat([flat, flat.new_zeros((-len(flat)) % per)]).view(-1, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = (flat << shifts).sum(-1)                            # < 2^32: fits an unsigned 32-bit word
    return (words - (words >= 2 ** 31).long() * 2 ** 32).to(torch.int32)   # the same bits, as int32


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """``pack``'s inverse: the first ``count`` codes, as int64."""
    per = 32 // bits
    words = packed.to(torch.int64) & (2 ** 32 - 1)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    return ((words[:, None] >> shifts) & (2 ** bits - 1)).reshape(-1)[:count]


def quantize_groupwise(W: torch.Tensor, bits: int = 4, group_size: int = 32) -> GroupState:
    """Round-to-nearest group-wise asymmetric quantization of ``W`` (GPTQ's quantizer, per group)."""
    check_format(W.shape, bits, group_size)
    if not torch.isfinite(W).all():
        raise ValueError("the weight has inf or NaN entries: they have no b-bit code")
    d_out, d_in = W.shape
    maxq = 2 ** bits - 1
    groups = W.detach().float().reshape(d_out, d_in // group_size, group_size)
    lo = groups.amin(-1).clamp(max=0)
    hi = groups.amax(-1).clamp(min=0)
    empty = (lo == 0) & (hi == 0)
    lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
    scales = (hi - lo) / maxq
    zeros = torch.round(-lo / scales)
    codes = torch.clamp(torch.round(groups / scales[..., None]) + zeros[..., None], 0, maxq)
    return GroupState(pack(codes, bits), scales, zeros, bits, group_size, (d_out, d_in))


def codes(state: GroupState) -> torch.Tensor:
    """The (d_out, d_in) integer codes."""
    return unpack(state.packed, state.bits, state.shape[0] * state.shape[1]).view(state.shape)


def dequantize_groupwise(state: GroupState, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Ŵ = s (q - z), each group's scale and zero broadcast over its L columns."""
    d_out, d_in = state.shape
    q = codes(state).view(d_out, d_in // state.group_size, state.group_size).float()
    return (state.scales[..., None] * (q - state.zeros[..., None])).reshape(d_out, d_in).to(dtype)


def shift_zeros(state: GroupState, delta: torch.Tensor) -> GroupState:
    """The state whose dequantized weight is Ŵ + Δ, for Δ (d_out, d_in / L) constant inside each group:
    s (q - z') = s (q - z) + Δ with z' = z - Δ / s. Codes and scales are shared, not copied."""
    if delta.shape != state.zeros.shape:
        raise ValueError(f"a group-constant update has one value per (row, group), shape {tuple(state.zeros.shape)}; "
                         f"got {tuple(delta.shape)}")
    return GroupState(state.packed, state.scales, state.zeros - delta.float() / state.scales, state.bits,
                      state.group_size, state.shape)


def bits_per_weight(bits: int, group_size: int, scale_bits: int = 32) -> float:
    """Storage per weight: the packed code (32 / (32 // b) bits) plus a scale and a zero per L weights."""
    return 32 / (32 // bits) + 2 * scale_bits / group_size


class LinearIntN(nn.Module):
    """y = x Ŵ^T + b with Ŵ = s (q - z) stored group-wise (``quantize_groupwise``) and dequantized at
    every forward. Buffers ``packed`` (int32), ``scales``, ``zeros`` (float32); the bias stays a float
    parameter. ``.half()`` and ``.to(dtype)`` leave the state as it is (it is not a float weight)."""

    def __init__(self, state: GroupState, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = state.shape
        self.bits, self.group_size = state.bits, state.group_size
        self.register_buffer("packed", state.packed)
        self.register_buffer("scales", state.scales)
        self.register_buffer("zeros", state.zeros)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 32) -> "LinearIntN":
        return cls(quantize_groupwise(linear.weight, bits, group_size), linear.bias)

    @property
    def state(self) -> GroupState:
        return GroupState(self.packed, self.scales, self.zeros, self.bits, self.group_size,
                          (self.out_features, self.in_features))

    def dequantize(self) -> torch.Tensor:
        return dequantize_groupwise(self.state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def _apply(self, fn, recurse=True):
        return apply_keeping_state_dtypes(self, super()._apply, fn, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}")

