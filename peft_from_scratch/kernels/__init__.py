"""Triton kernels, each beside the plain PyTorch reference it is tested against.

Triton is optional: nothing here imports it until a kernel is called, so the package imports (and
every PyTorch path works) without it. On a machine without a GPU, set ``TRITON_INTERPRET=1`` in the
environment before the first kernel call to run the kernels in Triton's (slow) CPU interpreter.

* ``dequantize_nf4_triton``: NF4/FP4/Int4 dequantization with double-quantized constants;
  reference ``peft_from_scratch.nf4.dequantize_4bit``.
* ``sparse``: RoSA's sparse products, SpMM (forward, and the input gradient through the transposed
  CSR) and SDDMM (the gradient of the sparse values), as Triton kernels (``spmm_triton``,
  ``sddmm_triton``) beside PyTorch's sparse ops (``*_torch``, the CPU path) and dense masked
  references (``*_reference``).
"""
from .nf4_dequant import dequantize_nf4_triton, triton_available

__all__ = ["dequantize_nf4_triton", "triton_available"]
