"""DoRA against peft (LoraConfig(use_dora=True)) and against the paper's formula.

Tolerances (float32), in tests/helpers.py: every compared tensor passes
``assert_close(ours, peft, rtol=1e-5, atol=1e-6 * max(1, max|peft|))``; the real-model tests
below say where and why they allow more.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from peft_from_scratch import core
from peft_from_scratch.reparameterized.dora import DoRA, DoRAConfig
from peft_from_scratch.reparameterized.lora import LoRALinear
from peft_from_scratch.interop.peft import load_peft_adapter, save_peft_adapter
from peft_from_scratch.models import MINILM, SMOLLM2, tiny_bert, tiny_llama
from tests.helpers import (ATOL, RTOL, batches, compare_with_peft, make_pair, one_thread, perturb,  # noqa: F401
                           real_model, tokens)

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def DoRALinear(base_layer, r, alpha, **kw):
    """A LoRA layer with the DoRA variant, as DoRAConfig builds it."""
    return LoRALinear(base_layer, r, alpha, variant=DoRA, **kw)


def dora_layer(d_in=48, d_out=32, r=4, alpha=8.0, bias=True, seed=0, b_std=0.1, **kw):
    torch.manual_seed(seed)
    layer = DoRALinear(nn.Linear(d_in, d_out, bias=bias), r, alpha, **kw)
    with torch.no_grad():
        layer.lora.B.normal_(std=b_std)
        layer.variant.m.mul_(1 + 0.1 * torch.randn_like(layer.variant.m))
    return layer


def paper_forward(layer, x, detach_norm=True):
    """Eq. 5 as written: build W' = m (W0 + sBA) / ||W0 + sBA||_c, then x W'^T + b."""
    V = layer.base_layer.weight + layer.lora.scaling * layer.lora.B @ layer.lora.A
    norm = torch.linalg.norm(V, dim=1)
    if detach_norm:
        norm = norm.detach()
    return F.linear(x, (layer.variant.m / norm)[:, None] * V, layer.base_layer.bias)


# ----------------------------------------------------------------------------- the method itself

def test_magnitude_starts_at_row_norms_and_the_output_at_the_base_output():
    base = tiny_llama()
    x = tokens()
    ref = base(x).logits
    model = core.add_adapter(copy.deepcopy(base), DoRAConfig(r=4, target_modules="all-linear"))
    for name, layer in core.adapter_layers(model).items():
        torch.testing.assert_close(layer.variant.m, base.get_submodule(name).weight.norm(dim=1), rtol=0, atol=0)
    torch.testing.assert_close(model(x).logits, ref, rtol=RTOL, atol=ATOL)  # m / ||W0|| = 1 up to rounding
    trainable, _ = core.count_parameters(model)
    lora = sum(l.lora.A.numel() + l.lora.B.numel() for l in core.adapter_layers(model).values())
    assert trainable == lora + sum(l.variant.m.numel() for l in core.adapter_layers(model).values())  # LoRA + d_out


def test_forward_equals_the_papers_formula_with_and_without_bias():
    for bias in (True, False):
        layer = dora_layer(bias=bias)
        x = torch.randn(3, 5, 48)
        torch.testing.assert_close(layer(x), paper_forward(layer, x), rtol=RTOL, atol=ATOL)


def test_the_norm_is_a_constant_in_backward():
    """Section 4.3: ||W0 + sBA||_c is detached. Our grads equal the detached formula's, and differ
    from what the full gradient (through the norm) would give, so the detach is really there."""
    layer = dora_layer()
    assert not layer.variant.weight_norm(layer).requires_grad
    x, g = torch.randn(6, 48), torch.randn(6, 32)

    def grads(fn):
        for p in (layer.lora.A, layer.lora.B, layer.variant.m):
            p.grad = None
        (fn(x) * g).sum().backward()
        return [p.grad.clone() for p in (layer.lora.A, layer.lora.B, layer.variant.m)]

    ours = grads(layer)
    detached = grads(lambda x: paper_forward(layer, x, detach_norm=True))
    full = grads(lambda x: paper_forward(layer, x, detach_norm=False))
    for a, b in zip(ours, detached):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    assert not torch.allclose(ours[0], full[0], rtol=1e-3) and not torch.allclose(ours[1], full[1], rtol=1e-3)
    torch.testing.assert_close(ours[2], full[2], rtol=RTOL, atol=ATOL)  # m's gradient never involves the norm's


def test_cheap_norm_equals_the_direct_norm():
    for b_std in (0.0, 0.01, 0.1, 1.0):
        layer = dora_layer(d_in=96, d_out=80, r=8, b_std=b_std)
        ref = torch.linalg.norm(layer.base_layer.weight.double()
                                + layer.lora.scaling * layer.lora.B.double() @ layer.lora.A.double(), dim=1)
        for norm in (layer.variant.weight_norm(layer), layer.variant.weight_norm_direct(layer)):
            assert ((norm.double() - ref).abs() / ref).max() < 1e-6


def test_cancelling_rows_fall_back_to_the_direct_norm():
    """If sBA cancels most of a row, the expansion ||W0||^2 + 2s<W0, BA> + s^2||BA||^2 loses digits
    (error ~ eps ||W0||^2 / ||W0 + sBA||^2); such rows are recomputed from W0 + sBA."""
    torch.manual_seed(0)
    d_out, d_in, r = 16, 256, 8
    layer = DoRALinear(nn.Linear(d_in, d_out, bias=False), r, alpha=2 * r)
    A = layer.lora.A.detach()
    Q, _ = torch.linalg.qr(A.T)                                 # a basis of A's row space
    with torch.no_grad():                                       # rows of W0 mostly inside that space
        W = torch.randn(d_out, d_in) * 0.05
        layer.base_layer.weight.copy_(W @ Q @ Q.T * 20 + W * 0.01)
        P = layer.base_layer.weight @ Q @ Q.T
        keep = torch.linspace(0.001, 1.0, d_out)[:, None]       # row i keeps this fraction of P
        layer.lora.B.copy_(-(1 - keep) * P @ torch.linalg.pinv(A) / layer.lora.scaling)
    W0, B, s = layer.base_layer.weight.detach(), layer.lora.B.detach(), layer.lora.scaling
    ref = torch.linalg.norm(W0.double() + s * B.double() @ A.double(), dim=1)
    assert (ref / W0.double().norm(dim=1)).min() < 0.01                # some rows lost 99% of their norm
    expansion = (W0.double().pow(2).sum(1) + 2 * s * ((W0 @ A.T) * B).sum(1).double()
                 + s * s * ((B @ (A @ A.T)) * B).sum(1).double()).clamp_min(0).sqrt()
    assert ((expansion - ref).abs() / ref).max() > 1e-4                # the expansion alone would be off
    rel = ((layer.variant.weight_norm(layer).double() - ref).abs() / ref).max().item()
    assert rel < 5e-6, rel                                             # with the fallback it is not


@pytest.mark.slow
def test_cheap_norm_on_smollm2_weights():
    """Real weights, updates from ||sBA|| = 0.1% to 100% of ||W0||: the expansion is as accurate as
    the direct float32 formula (both ~1e-7 against float64)."""
    model = real_model(SMOLLM2)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    worst = {"cheap": 0.0, "direct": 0.0}
    for i, name in enumerate(f"model.layers.{k}.{p}" for k in (0, 15, 29) for p in
                             ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.down_proj")):
        layer = DoRALinear(model.get_submodule(name), r=16, alpha=32)
        W0 = layer.base_layer.weight
        with torch.no_grad():
            layer.lora.B.copy_(torch.randn(layer.lora.B.shape, generator=g))
            ratio = 10.0 ** (-3 + i % 4)                    # ||sBA||_F / ||W0||_F
            layer.lora.B.mul_(ratio * W0.norm() / layer.delta_weight().norm())
        ref = torch.linalg.norm(W0.double() + layer.lora.scaling * layer.lora.B.double() @ layer.lora.A.double(), dim=1)
        for key, norm in (("cheap", layer.variant.weight_norm(layer)), ("direct", layer.variant.weight_norm_direct(layer))):
            worst[key] = max(worst[key], ((norm.double() - ref).abs() / ref).max().item())
    print("SmolLM2 relative error of ||W0 + sBA||_c vs float64:", worst)
    assert worst["cheap"] < 1e-6 and worst["direct"] < 1e-6


def test_the_cached_row_norms_follow_new_base_weights():
    layer = dora_layer()
    layer.variant.weight_norm(layer)
    with torch.no_grad():
        layer.base_layer.weight.mul_(2)       # in place, as load_state_dict does
    torch.testing.assert_close(layer.variant.weight_norm(layer), layer.variant.weight_norm_direct(layer), rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- equivalence with peft

@pytest.mark.parametrize("make,targets,seq_cls", [
    (tiny_llama, LLAMA_ALL, False),
    (tiny_bert, ["query", "value"], True),
])
def test_matches_peft_logits_grads_and_training(make, targets, seq_cls):
    saved = ["classifier"] if seq_cls else []
    ours, theirs = make_pair(make(), DoRAConfig(r=4, alpha=8, target_modules=targets, modules_to_save=saved),
                             task_type="SEQ_CLS" if seq_cls else "CAUSAL_LM")
    diffs = compare_with_peft(ours, theirs, batches(5, seq_cls=seq_cls))
    print(make.__name__, {k: str(v) for k, v in diffs.items()})


# On the real models DoRA differs from peft by float32 rounding (our c * (W0 x + sBAx) + b against
# peft's base(x) + (c - 1) W0 x + c sBAx, our expanded norm against peft's direct one), ~1e-7 per
# layer. Through SmolLM2's 30 layers that grows to ~2e-6 of the logits' scale at step 0, and after
# 5 AdamW steps to ~1e-5 with ~0.1% of the adapter entries off by up to a few lr (Adam's sign
# amplification, see helpers.compare_with_peft). That is float32's noise floor: peft against itself,
# run on 1 thread and on 2, differs by as much (logits 5e-6, grads 3e-5 relative, 0.05% of
# the entries after 5 steps, up to 8e-4). Hence the looser logits atol and the Adam outliers here.
REAL = dict(b_std=0.01, m_noise=0.01)   # a gentler "trained" adapter for pretrained weights


@pytest.mark.slow
def test_matches_peft_on_smollm2():
    ours, theirs = make_pair(lambda: real_model(SMOLLM2), DoRAConfig(r=8, alpha=16, target_modules=LLAMA_ALL),
                             task_type="CAUSAL_LM", **REAL)
    diffs = compare_with_peft(ours, theirs, batches(5, vocab=49152, shape=(1, 16)), atol=2e-5, adam_outliers=2e-3)
    print("smollm2", {k: str(v) for k, v in diffs.items()})


@pytest.mark.slow
def test_matches_peft_on_minilm_seq_cls():
    config = DoRAConfig(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
    ours, theirs = make_pair(lambda: real_model(MINILM), config, task_type="SEQ_CLS", **REAL)
    diffs = compare_with_peft(ours, theirs, batches(5, vocab=30522, shape=(2, 16), seq_cls=True), adam_outliers=2e-3)
    print("minilm", {k: str(v) for k, v in diffs.items()})


def test_dropout_follows_peft_in_eval_and_in_training():
    """Eval: no dropout. Training: peft's convention, y = base(x) + (c-1) W0 x_d + c s B A x_d with
    x_d = dropout(x); the same seed draws the same masks in both."""
    ours, theirs = make_pair(tiny_llama(), DoRAConfig(r=4, alpha=8, dropout=0.3, use_rslora=True,
                                                      target_modules=LLAMA_ALL))
    x = tokens()
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=RTOL, atol=ATOL)
    ours.train(), theirs.train()
    torch.manual_seed(0)
    a = ours(x).logits
    torch.manual_seed(0)
    b = theirs(x).logits
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    torch.manual_seed(1)
    assert (ours(x).logits - a).abs().max() > 1e-3


# ----------------------------------------------------------------------------- merge

def test_the_merged_weight_equals_peft_merged_weight():
    """(merge/unmerge round trips are the contract test's; here: W' is the paper's, as peft merges it)"""
    ours, theirs = make_pair(tiny_llama(), DoRAConfig(r=4, alpha=8, target_modules=LLAMA_ALL))
    core.merge_adapter(ours)
    merged_peft = theirs.merge_and_unload()
    for name, layer in core.adapter_layers(ours).items():   # W' = m (W0 + sBA) / ||W0 + sBA||_c, as peft
        torch.testing.assert_close(layer.base_layer.weight, merged_peft.get_submodule(name).weight,
                                   rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- formats and errors

@pytest.mark.parametrize("make,config", [
    (tiny_llama, DoRAConfig(r=4, alpha=8, target_modules=LLAMA_ALL)),
    (tiny_bert, DoRAConfig(r=2, alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"])),
])
def test_peft_format_round_trips(tmp_path, make, config):
    task = "SEQ_CLS" if make is tiny_bert else "CAUSAL_LM"
    x = tokens()
    ours = core.add_adapter(make(), config)
    perturb(ours)
    save_peft_adapter(ours, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(make(), tmp_path / "ours")
    assert theirs.peft_config["default"].use_dora
    torch.testing.assert_close(theirs(x).logits, ours(x).logits, rtol=RTOL, atol=ATOL)

    _, theirs = make_pair(make(), config, task_type=task, seed=7)
    theirs.save_pretrained(tmp_path / "peft")
    loaded = load_peft_adapter(make(), tmp_path / "peft")
    assert loaded.adapter_config.method == "dora"
    assert all(isinstance(m.variant, DoRA) for m in core.adapter_layers(loaded).values())
    torch.testing.assert_close(loaded(x).logits, theirs(x).logits, rtol=RTOL, atol=ATOL)


def test_a_lora_file_is_not_loaded_as_dora(tmp_path):
    from peft_from_scratch.reparameterized.lora import LoRAConfig
    model = core.add_adapter(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj"]))
    save_peft_adapter(model, tmp_path)
    cfg = (tmp_path / "adapter_config.json").read_text().replace('"use_dora": false', '"use_dora": true')
    (tmp_path / "adapter_config.json").write_text(cfg)
    with pytest.raises(ValueError, match="expected \\['A', 'B', 'm'\\]"):
        load_peft_adapter(tiny_llama(), tmp_path)


def test_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="positive integer"):
        DoRAConfig(r=0)
    with pytest.raises(ValueError, match="r=65 does not fit"):
        core.add_adapter(model, DoRAConfig(r=65, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="matched no module"):
        core.add_adapter(model, DoRAConfig(r=2, target_modules=["qproj"]))
    assert not core.adapter_layers(model)
    layer = dora_layer()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    with pytest.raises(RuntimeError, match="merged"):
        layer.variant.weight_norm(layer)
