"""The Triton NF4 dequantization kernel equals the PyTorch reference ``nf4.dequantize_4bit`` bit for bit.

Without a GPU the kernel runs in Triton's interpreter. Triton decides between compiling and
interpreting when a kernel is *defined*, and ``kernels/nf4_dequant.py`` defines its kernel at the
first call (cached per mode), not at import, and uses only Triton's core built-ins (which the
interpreter patches at run time, whenever triton was imported). So it is enough to set
TRITON_INTERPRET=1 here, before any test calls the kernel, even if triton was imported earlier
(bitsandbytes imports it at import; the full suite runs test_nf4.py first): no subprocess needed.
``setdefault`` leaves an explicit setting alone; with a GPU nothing is set and the kernel compiles.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from peft_from_scratch.quantized import linear4bit, nf4  # noqa: E402
from peft_from_scratch.kernels import triton as kt  # noqa: E402
from peft_from_scratch.quantized.linear4bit import dequantize_triton  # noqa: E402

needs_triton = pytest.mark.skipif(not kt.triton_available(), reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@needs_triton
@settings(max_examples=25, deadline=None)
@given(shape=st.one_of(st.tuples(st.integers(1, 5000)), st.tuples(st.integers(1, 80), st.integers(1, 300))),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       quant_type=st.sampled_from(nf4.QUANT_TYPES), double_quant=st.booleans(),
       blocksize=st.sampled_from([32, 64, 64, 128, 256, 4096]), seed=st.integers(0, 2 ** 31),
       scale=st.sampled_from([1.0, 1e-3, 1e3]))
def test_triton_kernel_equals_the_pytorch_reference(shape, dtype, quant_type, double_quant, blocksize, seed, scale):
    W = (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)
    W.view(-1)[: W.numel() // 3] = 0                    # some zero blocks, too
    packed, state = nf4.quantize_4bit(W.to(DEVICE), quant_type, blocksize, double_quant)
    out = dequantize_triton(packed, state)
    assert out.dtype == dtype and out.shape == W.shape
    assert torch.equal(out, nf4.dequantize_4bit(packed, state))


@needs_triton
def test_many_programs_and_a_ragged_end():
    """More than one program (1024 bytes each) and a tensor that ends mid-block and mid-byte."""
    W = torch.randn(37, 131, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    for double_quant in (True, False):
        packed, state = nf4.quantize_nf4(W, blocksize=64, double_quant=double_quant, blocksize2=256)
        assert torch.equal(dequantize_triton(packed, state), nf4.dequantize_4bit(packed, state))


@needs_triton
def test_bfloat16_output_rounds_to_nearest_even():
    """1 + 2^-8 and 1 + 3 * 2^-8 lie exactly between two bfloat16 values: ties go to the even one."""
    absmax = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8)], dtype=torch.float32)
    state = nf4.QuantState(absmax=absmax.to(DEVICE), shape=torch.Size([3 * 64]), dtype=torch.bfloat16,
                           blocksize=64, code=nf4.nf4_code().to(DEVICE))
    packed = torch.full((96, 1), 0xFF, dtype=torch.uint8, device=DEVICE)     # every value is code[15] = 1.0
    out = dequantize_triton(packed, state)
    assert torch.equal(out, nf4.dequantize_4bit(packed, state))
    assert out[[0, 64, 128]].tolist() == [1.0, 1.015625, -1.0]


@needs_triton
def test_linear4bit_with_the_kernel():
    layer = linear4bit.Linear4bit.from_linear(nn.Linear(80, 24)).to(DEVICE)
    x = torch.randn(4, 80, device=DEVICE)
    layer.use_triton = False
    reference = layer(x)
    layer.use_triton = True
    assert torch.equal(layer(x), reference)


@needs_triton
def test_the_kernel_refuses_a_state_from_another_tensor():
    packed, _ = nf4.quantize_nf4(torch.randn(8, 64, device=DEVICE))
    _, other = nf4.quantize_nf4(torch.randn(8, 32, device=DEVICE))
    with pytest.raises(ValueError, match="another tensor"):
        dequantize_triton(packed, other)


def test_a_missing_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(kt, "triton_available", lambda: False)
    packed, state = nf4.quantize_nf4(torch.randn(64))
    with pytest.raises(ImportError, match="pip install triton"):
        dequantize_triton(packed, state)


@needs_triton
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    packed, state = nf4.quantize_nf4(torch.randn(64))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dequantize_triton(packed, state)
