"""Triton kernel: 4-bit (NF4 / FP4 / Int4) dequantization with double-quantized block constants.

The reference is ``peft_from_scratch.quantized.nf4.dequantize_4bit``; this kernel computes the same numbers in
one pass (QLoRA's doubleDequant, paper eq. 6):

    c_b  = code2[absmax[b]] * absmax2[b // blocksize2] + offset     # the block's float32 constant
    W[i] = code[nibble(i)] * c_b,    b = i // blocksize               # high nibble = even element

Each program reads ``BYTES`` packed bytes (2 * BYTES values), looks up both nibbles in the 16-entry
code book, scales them by their block's constant and writes them interleaved back in order. The
arithmetic is the reference's, in the same order, in float32; on a GPU we switch off Triton's
fused multiply-add contraction (``enable_fp_fusion=False``) so that code2 * absmax2 + offset is
rounded twice, as in PyTorch, and the results stay bit-identical.

bfloat16 outputs are rounded to nearest-even with integer operations: the hardware conversion does
the same on a GPU, but Triton's CPU interpreter truncates, and one code path for both keeps the
interpreted test meaningful.

Triton is imported only when the kernel is first needed. Without a GPU, Triton's interpreter runs
the kernel on CPU tensors when ``TRITON_INTERPRET=1`` is set before that first call: Triton reads
the variable when a kernel is defined, which here is at first use (cached per mode), not at import.
The kernel uses only Triton's core built-ins (``tl.join`` + ``tl.reshape``, not ``tl.interleave``):
helpers of triton.language that are themselves ``@triton.jit`` functions are fixed in compiled mode
when triton is imported before the variable is set (bitsandbytes imports triton), and the
interpreter then refuses to call them.
"""
from __future__ import annotations

import functools

import torch

from .triton import require_triton

BYTES = 1024   # packed bytes per program: 2048 output values


@functools.cache
def _kernel(interpret: bool):
    """Define (and cache) the jitted kernel; ``interpret`` is part of the key because Triton decides
    between compiling and interpreting when the function is decorated."""
    import triton
    import triton.language as tl

    @triton.jit
    def dequant_4bit_kernel(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr,
                            n, n_bytes, HALF_BLOCK: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                            NESTED: tl.constexpr, OUT_BF16: tl.constexpr, BYTES: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        j = pid * BYTES + tl.arange(0, BYTES)                 # byte index
        in_range = j < n_bytes
        byte = tl.load(packed_ptr + j, mask=in_range, other=0)
        block = j // HALF_BLOCK                                # both nibbles share a block (blocksize even)
        if NESTED:
            q2 = tl.load(absmax_ptr + block, mask=in_range, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q2, mask=in_range, other=0.0) \
                * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=in_range, other=0.0)
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=in_range, other=0.0)
        first = tl.load(code_ptr + (byte >> 4).to(tl.int32), mask=in_range, other=0.0) * scale
        second = tl.load(code_ptr + (byte & 0xF).to(tl.int32), mask=in_range, other=0.0) * scale
        values = tl.reshape(tl.join(first, second), [2 * BYTES])   # (BYTES, 2) row-major: 2j, 2j+1
        if OUT_BF16:   # round to nearest even by hand: the interpreter's own cast truncates
            bits = values.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            values = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        k = pid * 2 * BYTES + tl.arange(0, 2 * BYTES)
        tl.store(out_ptr + k, values.to(out_ptr.dtype.element_ty), mask=k < n)

    return dequant_4bit_kernel


def dequantize_4bit_triton(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape, dtype: torch.dtype,
                           blocksize: int, absmax2: torch.Tensor | None = None, code2: torch.Tensor | None = None,
                           offset: torch.Tensor | None = None, blocksize2: int | None = None) -> torch.Tensor:
    """The 4-bit weight of ``shape`` in ``dtype``, from its packed codes and block constants, in one kernel.

    Plain tensors in, as ``quantized.nf4.dequantize_4bit`` takes them from a ``QuantState``:
    ``packed`` (uint8, two codes per byte, high nibble first), ``absmax`` (float32 per block, or uint8
    indices into ``code2`` when double-quantized, with ``absmax2`` per ``blocksize2`` blocks and the
    scalar ``offset``), ``code`` (the 16 code values). The caller checks that they belong together.
    Runs on CUDA, or on CPU under TRITON_INTERPRET=1.

    Raises:
        ImportError: Triton is not installed.
        RuntimeError: the tensors are on the CPU and TRITON_INTERPRET=1 is not set.
    """
    interpret = require_triton(packed, "dequantize_4bit_triton", "quantized.nf4.dequantize_4bit")
    device = packed.device
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    n, n_bytes = out.numel(), packed.numel()
    nested = absmax2 is not None
    absmax, code = absmax.to(device), code.to(device)
    absmax2 = absmax2.to(device) if nested else absmax      # unused placeholders when not nested
    code2 = code2.to(device) if nested else code
    offset = offset.to(device).reshape(1) if nested else absmax
    grid = (-(-n_bytes // BYTES),)
    options = {} if interpret else {"enable_fp_fusion": False}
    _kernel(interpret)[grid](packed, absmax, code, absmax2, code2, offset, out, n, n_bytes,
                             HALF_BLOCK=blocksize // 2, BLOCKSIZE2=blocksize2 or 1,
                             NESTED=nested, OUT_BF16=dtype == torch.bfloat16, BYTES=BYTES, **options)
    return out
