"""Triton kernels, each beside the plain PyTorch reference it is tested against.

Triton is optional: nothing here imports it until a kernel is called, so the package imports (and
every PyTorch path works) without it. On a machine without a GPU, set ``TRITON_INTERPRET=1`` in the
environment before the first kernel call to run the kernels in Triton's (slow) CPU interpreter.

* ``dequantize_nf4_triton``: NF4/FP4/Int4 dequantization with double-quantized constants;
  reference ``peft_from_scratch.nf4.dequantize_4bit``.
"""
from .nf4_dequant import dequantize_nf4_triton, triton_available

__all__ = ["dequantize_nf4_triton", "triton_available"]
