"""Group-wise asymmetric INT-b quantization (``quantized/intn.py``): GPTQ's round-to-nearest quantizer
recomputed group by group as its ``Quantizer.find_params(sym=False)`` + ``quantize`` do, the packing,
the error bound, and the zero-point shift QA-LoRA's merge relies on."""
import pytest
import torch

from peft_from_scratch.quantized import intn


def gptq_rtn(W: torch.Tensor, bits: int, group_size: int):
    """GPTQ's asymmetric quantizer applied to each group of columns on its own (per channel = per row)."""
    maxq = 2 ** bits - 1
    out = torch.empty_like(W)
    for start in range(0, W.shape[1], group_size):
        x = W[:, start:start + group_size]
        xmin = torch.minimum(x.min(1)[0], torch.zeros(x.shape[0]))
        xmax = torch.maximum(x.max(1)[0], torch.zeros(x.shape[0]))
        both = (xmin == 0) & (xmax == 0)
        xmin[both], xmax[both] = -1, +1
        scale = ((xmax - xmin) / maxq)[:, None]
        zero = torch.round(-xmin / scale[:, 0])[:, None]
        q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
        out[:, start:start + group_size] = scale * (q - zero)
    return out


@pytest.mark.parametrize("bits", intn.BITS)
def test_pack_and_unpack_are_inverse(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (7, 45), generator=g)
    packed = intn.pack(codes, bits)
    assert packed.dtype == torch.int32 and packed.numel() == -(-codes.numel() // (32 // bits))
    assert torch.equal(intn.unpack(packed, bits, codes.numel()).view(7, 45), codes)


@pytest.mark.parametrize("bits, group_size", [(4, 32), (3, 32), (2, 16), (8, 64), (4, 128)])
def test_quantization_is_gptqs_rtn_and_within_half_a_step(bits, group_size):
    W = torch.randn(48, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    W[3, :group_size] = 0.0                                   # an all-zero group
    W[5, :group_size] = W[5, :group_size].abs() + 0.01        # a group with no negative weight: 0 joins its range
    state = intn.quantize_groupwise(W, bits, group_size)
    W_hat = intn.dequantize_groupwise(state)
    torch.testing.assert_close(W_hat, gptq_rtn(W, bits, group_size), rtol=0, atol=1e-7)
    step = state.scales.repeat_interleave(group_size, 1)
    assert ((W - W_hat).abs() <= step / 2 + 1e-7).all()
    q = intn.codes(state)
    assert q.min() >= 0 and q.max() <= 2 ** bits - 1
    assert torch.equal(state.zeros, state.zeros.round()) and (0 <= state.zeros).all() and (state.zeros <= 2 ** bits - 1).all()
    assert torch.equal(W_hat[3, :group_size], torch.zeros(group_size))
    assert (W_hat == 0).sum() > 0                              # 0 is on the grid


def test_fewer_bits_lose_more():
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    errors = [(intn.dequantize_groupwise(intn.quantize_groupwise(W, b, 32)) - W).pow(2).mean().item() for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3 * errors[0]   # about ((2^2 - 1) / (2^8 - 1))^2


def test_a_group_constant_update_moves_only_the_zeros():
    W = torch.randn(16, 128, generator=torch.Generator().manual_seed(2))
    state = intn.quantize_groupwise(W, 4, 32)
    delta = torch.randn(16, 4, generator=torch.Generator().manual_seed(3)) * 0.1
    moved = intn.shift_zeros(state, delta)
    assert moved.packed is state.packed and moved.scales is state.scales
    torch.testing.assert_close(intn.dequantize_groupwise(moved),
                               intn.dequantize_groupwise(state) + delta.repeat_interleave(32, 1), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"one value per \(row, group\), shape \(16, 4\)"):
        intn.shift_zeros(state, torch.zeros(16, 128))


def test_storage_per_weight():
    assert intn.bits_per_weight(4, 32) == 4 + 2 * 32 / 32
    assert intn.bits_per_weight(4, 128, scale_bits=16) == 4.25
    assert intn.bits_per_weight(3, 64, scale_bits=16) == pytest.approx(3.2 + 0.5)


def test_bad_input_names_the_problem():
    W = torch.randn(8, 96)
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 3, 4, 8\)"):
        intn.quantize_groupwise(W, bits=5)
    with pytest.raises(ValueError, match="group_size=64 must be a positive integer dividing the input width d_in=96"):
        intn.quantize_groupwise(W, group_size=64)
    with pytest.raises(ValueError, match="2-D weight"):
        intn.quantize_groupwise(torch.randn(96), group_size=32)
    W[0, 0] = float("nan")
    with pytest.raises(ValueError, match="inf or NaN"):
        intn.quantize_groupwise(W, group_size=32)


def test_the_int_layer_keeps_its_state_under_half_and_computes_its_weight():
    linear = torch.nn.Linear(64, 8)
    layer = intn.LinearIntN.from_linear(linear, 3, 16)
    x = torch.randn(2, 64)
    want = torch.nn.functional.linear(x, intn.dequantize_groupwise(intn.quantize_groupwise(linear.weight, 3, 16)), linear.bias)
    torch.testing.assert_close(layer(x), want, rtol=1e-6, atol=1e-6)
    zeros = layer.zeros.clone()
    layer.half()
    assert layer.packed.dtype == torch.int32 and layer.zeros.dtype == torch.float32 and torch.equal(layer.zeros, zeros)
    assert layer.bias.dtype == torch.float16
