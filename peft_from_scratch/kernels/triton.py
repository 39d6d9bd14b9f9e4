"""Is Triton here, and may a kernel run on this tensor? The one check every kernel file shares.

Triton is optional: nothing in ``kernels/`` imports it until a kernel is called. On a machine
without a GPU, ``TRITON_INTERPRET=1`` (set before the first kernel call) runs the kernels in
Triton's slow CPU interpreter, which is how the tests run them here.
"""
from __future__ import annotations

import importlib.util
import os

import torch


def triton_available() -> bool:
    """True if Triton is installed (it may still lack a GPU; see ``interpreting``)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True if Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def require_triton(t: torch.Tensor, what: str, fallback: str) -> bool:
    """Raise unless ``what`` can run on ``t``: Triton installed, and ``t`` on CUDA or the interpreter on.
    Returns whether the interpreter runs it. ``fallback`` names the PyTorch path that needs nothing."""
    if not triton_available():
        raise ImportError(f"{what} needs Triton (pip install triton; it runs on CUDA GPUs, or on CPU with "
                          f"TRITON_INTERPRET=1). The PyTorch path {fallback} needs nothing.")
    interpret = interpreting()
    if not t.is_cuda and not interpret:
        raise RuntimeError(f"{what} runs on CUDA tensors, got a tensor on {t.device}; to run it on the CPU "
                           "(slowly, for testing) set TRITON_INTERPRET=1 before the first call")
    return interpret


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive integers: the number of blocks of size b that cover a."""
    return -(-a // b)
