"""Triton kernels, each beside the plain PyTorch reference it is tested against.

Kernels take plain tensors and import no method: the method that uses one (a 4-bit layer, RoSA's
sparse part) checks its own state and calls the kernel. ``triton.py`` says whether Triton is here
and whether a kernel may run on a tensor; nothing imports Triton until a kernel is called.

* ``nf4_dequant.dequantize_4bit_triton``: NF4/FP4/Int4 dequantization with double-quantized
  constants; reference ``quantized.nf4.dequantize_4bit``.
* ``sparse``: RoSA's sparse products, SpMM (forward, and the input gradient through the transposed
  CSR) and SDDMM (the gradient of the sparse values), as Triton kernels (``spmm_triton``,
  ``sddmm_triton``) beside PyTorch's sparse ops (``*_torch``, the CPU path) and dense masked
  references (``*_reference``).
"""
from .nf4_dequant import dequantize_4bit_triton
from .triton import interpreting, require_triton, triton_available

__all__ = ["dequantize_4bit_triton", "triton_available", "interpreting", "require_triton"]
