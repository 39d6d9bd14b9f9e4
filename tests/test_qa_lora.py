"""QA-LoRA (``quantized/qa_lora.py``) against the official code's equations (yuhuixu1993/qa-lora:
``peft_utils.py``'s forward, ``lora_B(lora_A(dropout(AvgPool1d(L)(x)))) * scale`` beside the quantized
layer, and ``merge.py``'s ``qzeros -= (B A)^T * scale / L / scales``), recomputed here; peft's pooled
factor (``LoraConfig(use_qalora=True)``, GPTQ layers only, which need gptqmodel and a GPU, so it is
checked against its equation: the pooled mean times d_in / L); the merge that keeps the model INT-b;
the errors. Tolerances: float32, rtol 1e-5."""
import copy

import pytest
import torch

from peft_from_scratch import core
from peft_from_scratch.models import tiny_llama
from peft_from_scratch.quantized import intn
from peft_from_scratch.quantized.qa_lora import QALoRAConfig, QALoRALinear, export_intn
from tests.helpers import batches, one_thread  # noqa: F401  (one_thread: autouse)


def trained_layer(pool_scale="official", bits=4, L=16):
    base = torch.nn.Linear(64, 48)
    layer = QALoRALinear(copy.deepcopy(base), r=4, alpha=8, bits=bits, group_size=L, pool_scale=pool_scale)
    with torch.no_grad():
        layer.B.normal_(0, 0.1)
    return base, layer


@pytest.mark.parametrize("pool_scale", ["official", "peft"])
def test_the_layer_is_the_official_forward(pool_scale):
    base, layer = trained_layer(pool_scale)
    x = torch.randn(3, 5, 64)
    W_hat = intn.dequantize_groupwise(intn.quantize_groupwise(base.weight, 4, 16))
    pooled = torch.nn.AvgPool1d(16)(x)                           # the official qa_pool, over the last dimension
    if pool_scale == "peft":
        pooled = pooled * (64 // 16)                              # peft: x_pooled * pooled_features
    want = torch.nn.functional.linear(x, W_hat, base.bias) + (pooled @ layer.A.T @ layer.B.T) * (8 / 4)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pool_scale", ["official", "peft"])
def test_the_merge_is_the_official_zero_shift_and_keeps_codes_and_scales(pool_scale):
    _, layer = trained_layer(pool_scale)
    x = torch.randn(4, 64)
    packed, scales, zeros, out = layer.packed.clone(), layer.scales.clone(), layer.zeros.clone(), layer(x)
    factor = 64 // 16 if pool_scale == "peft" else 1
    official = zeros - (layer.B @ layer.A).detach() * layer.scaling / 16 / scales * factor    # merge.py, untransposed
    layer.merge()
    assert torch.equal(layer.packed, packed) and torch.equal(layer.scales, scales)
    torch.testing.assert_close(layer.zeros, official, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), out, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.zeros, zeros, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_export_gives_an_int_model_equal_to_the_adapted_one(bits):
    config = QALoRAConfig(r=2, alpha=4, bits=bits, group_size=16, target_modules="all-linear")
    model = core.add_adapter(tiny_llama(), config)
    config.simulate_training(model, torch.Generator().manual_seed(0))
    codes_before = {n: intn.codes(layer.state).clone() for n, layer in core.adapter_layers(model).items()}
    b = batches(1)[0]
    with torch.no_grad():
        want = model(input_ids=b["input_ids"]).logits
        export_intn(model)
        got = model(input_ids=b["input_ids"]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, intn.LinearIntN)}
    assert layers.keys() == codes_before.keys() and not core.adapter_layers(model)
    assert not any(isinstance(m, torch.nn.Linear) and n in layers for n, m in model.named_modules())
    for name, layer in layers.items():                            # every weight still on the b-bit grid it had
        assert torch.equal(intn.codes(layer.state), codes_before[name]) and layer.bits == bits


def test_a_fresh_adapter_computes_the_int_base_and_adds_nothing():
    base = tiny_llama()
    model = core.add_adapter(copy.deepcopy(base), QALoRAConfig(r=2, alpha=4, group_size=16, target_modules=["q_proj"]))
    ids = batches(1)[0]["input_ids"]
    quantized = copy.deepcopy(base)
    for layer in quantized.model.layers:
        layer.self_attn.q_proj = intn.LinearIntN.from_linear(layer.self_attn.q_proj, 4, 16)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, quantized(input_ids=ids).logits)
        assert not torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_bad_input_names_the_problem_and_leaves_the_model_alone():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="group_size=48 must be a positive integer dividing the input width d_in=64"):
        core.add_adapter(model, QALoRAConfig(group_size=48, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"A reads its 2 pooled groups, so r must be an integer between 1 and"):
        core.add_adapter(model, QALoRAConfig(r=4, group_size=32, target_modules=["q_proj"]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not core.adapter_layers(model)
    with pytest.raises(ValueError, match="needs a model whose adapter is QA-LoRA"):
        export_intn(model)
