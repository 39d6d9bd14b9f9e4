"""Houlsby bottleneck adapters. peft has no bottleneck adapters, so the reference is the paper's
equations written out here from the raw weights (one BERT layer recomputed by hand), plus the
near-identity init, the parameter count 2 x (2dm + d + m) per layer + layer norms, the train/freeze
sets and the save/load round trip. (The AdapterHub ``adapters`` comparison needs transformers 4.57 in
a side environment; it is in tests/test_adapterhub.py, through peft_from_scratch/adapterhub.py.)
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from peft_from_scratch import core
from peft_from_scratch.additive.bottleneck import Bottleneck
from peft_from_scratch.additive.bottleneck import parameter_count as adapter_parameter_count
from peft_from_scratch.additive.houlsby import HoulsbyConfig
from peft_from_scratch.models import MINILM, tiny_bert, tiny_llama
from tests.helpers import real_model


def tokens(seed=0, vocab=128, shape=(2, 12)):
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(seed))


def perturb(model, seed=1, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def adapter_by_hand(h, a: Bottleneck):
    """A(h) = h + W_up gelu(W_down h + b_down) + b_up (Houlsby et al. 2019, Figure 2)."""
    return h + F.gelu(h @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias


def bert_layer_by_hand(x, layer, heads, eps):
    """One post-norm BERT layer with two Houlsby adapters, from the raw weights."""
    att = layer.attention
    B, T, d = x.shape
    hd = d // heads

    def split(t):
        return t.view(B, T, heads, hd).transpose(1, 2)
    q, k, v = (split(x @ m.weight.T + m.bias) for m in (att.self.query, att.self.key, att.self.value))
    ctx = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v
    ctx = ctx.transpose(1, 2).reshape(B, T, d)
    dense = att.output.dense                     # a HoulsbyAdapterLinear
    a = ctx @ dense.base_layer.weight.T + dense.base_layer.bias
    h1 = F.layer_norm(adapter_by_hand(a, dense.adapter) + x, (d,), att.output.LayerNorm.weight,
                      att.output.LayerNorm.bias, eps)
    f = F.gelu(h1 @ layer.intermediate.dense.weight.T + layer.intermediate.dense.bias)
    out = layer.output.dense
    o = f @ out.base_layer.weight.T + out.base_layer.bias
    return F.layer_norm(adapter_by_hand(o, out.adapter) + h1, (d,), layer.output.LayerNorm.weight,
                        layer.output.LayerNorm.bias, eps)


def test_bert_layer_equals_the_papers_equations():
    model = core.add_adapter(tiny_bert(), HoulsbyConfig(m=8))
    perturb(model)
    x = model.bert.embeddings(input_ids=tokens())
    layer = model.bert.encoder.layer[0]
    ours = layer(x)
    ours = ours[0] if isinstance(ours, tuple) else ours
    ref = bert_layer_by_hand(x, layer, model.config.num_attention_heads, model.config.layer_norm_eps)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_llama_adapters_act_before_the_residual_add():
    model = core.add_adapter(tiny_llama(), HoulsbyConfig(m=4))
    perturb(model)
    layer = model.model.layers[0]
    o = layer.self_attn.o_proj
    h = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(o(h), adapter_by_hand(o.base_layer(h), o.adapter))
    down = layer.mlp.down_proj
    y = torch.randn(1, 5, 128, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(down(y), adapter_by_hand(down.base_layer(y), down.adapter))
    assert set(core.adapter_layers(model)) == {f"model.layers.{i}.{n}" for i in (0, 1)
                                               for n in ("self_attn.o_proj", "mlp.down_proj")}


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama])
def test_near_identity_at_init(make):
    base = make()
    x = tokens()
    plain = base(input_ids=x).logits
    model = core.add_adapter(copy.deepcopy(base), HoulsbyConfig(m=8, init_std=1e-3))
    diff = (model(input_ids=x).logits - plain).abs().max().item()
    assert 0 < diff < 1e-3 * plain.abs().max().item()   # close to the base, not exactly it
    for layer in core.adapter_layers(model).values():
        w = layer.adapter.down.weight
        assert w.abs().max() <= 2e-3 and layer.adapter.down.bias.abs().max() == 0   # truncated at 2 std


def test_parameter_count_and_train_freeze_sets():
    d, m, L = 64, 8, 2
    model = tiny_bert(hidden_size=d, num_hidden_layers=L)
    total = sum(p.numel() for p in model.parameters())
    core.add_adapter(model, HoulsbyConfig(m=m, modules_to_save=["classifier"]))
    layer_norms = (1 + 2 * L) * 2 * d                       # embeddings' + two per layer, weight and bias
    head = d * 2 + 2
    expected = L * adapter_parameter_count(d, m, adapters=2) + layer_norms + head
    assert L * 2 * (2 * d * m + d + m) == L * adapter_parameter_count(d, m, 2)
    assert core.count_parameters(model) == (expected, total + L * 2 * (2 * d * m + d + m))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".adapter." in n or "LayerNorm" in n or n.startswith("classifier") for n in trainable)
    assert not any("query" in n or "intermediate" in n or "word_embeddings" in n for n in trainable)

    llama = core.add_adapter(tiny_llama(), HoulsbyConfig(m=m, placement="pfeiffer", train_layer_norms=False))
    assert core.count_parameters(llama)[0] == 2 * adapter_parameter_count(64, m, 1)
    llama = core.add_adapter(tiny_llama(), HoulsbyConfig(m=m))
    norms = {n for n, p in llama.named_parameters() if p.requires_grad and ".adapter." not in n}
    assert norms == {"model.norm.weight"} | {f"model.layers.{i}.{n}.weight" for i in (0, 1)
                                             for n in ("input_layernorm", "post_attention_layernorm")}


def test_parallel_placement():
    for make, wrapped in [(tiny_llama, "model.layers.0.mlp"), (tiny_bert, "bert.encoder.layer.0.output")]:
        model = core.add_adapter(make(), HoulsbyConfig(m=4, placement="parallel"))
        assert wrapped in core.adapter_layers(model)
        perturb(model)
        x = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(0))
        layer = model.get_submodule(wrapped)
        if make is tiny_llama:
            expected = layer.base_layer(x) + adapter_by_hand(x, layer.adapter) - x
            torch.testing.assert_close(layer(x), expected)
        else:
            a = torch.randn(1, 3, 128, generator=torch.Generator().manual_seed(1))
            b = layer.base_layer
            expected = b.LayerNorm(b.dense(a) + adapter_by_hand(x, layer.adapter))
            torch.testing.assert_close(layer(a, x), expected)


@pytest.mark.slow
def test_real_minilm_near_identity_and_count():
    """MiniLM's (random) classifier logits are ~2e-2 in size, so the bound is relative to them: the
    observed change at init_std=1e-3 is ~8e-7, i.e. ~4e-5 of the logits; an adapter drawn 50x too
    large (std 5e-2) moves them by ~1e-1 of their size and fails. And not exactly 0 (near, not exact)."""
    base = real_model(MINILM)
    x = tokens(vocab=30522, shape=(1, 8))
    with torch.no_grad():
        plain = base(input_ids=x).logits
        model = core.add_adapter(base, HoulsbyConfig(m=16, init_std=1e-3, train_layer_norms=False))
        diff = (model(input_ids=x).logits - plain).abs().max().item()
    assert 0 < diff < 1e-3 * plain.abs().max().item(), f"{diff:.1e} vs logits of {plain.abs().max().item():.1e}"
    assert core.count_parameters(model)[0] == 6 * adapter_parameter_count(384, 16, 2)


def test_errors():
    with pytest.raises(ValueError, match="positive integer"):
        HoulsbyConfig(m=0)
    with pytest.raises(ValueError, match="placement"):
        HoulsbyConfig(placement="middle")
    with pytest.raises(ValueError, match="non_linearity"):
        HoulsbyConfig(non_linearity="softmax")
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="m=65 does not fit model.layers.0.self_attn.o_proj of width d=64"):
        core.add_adapter(model, HoulsbyConfig(m=65))
    assert getattr(model, "adapter_config", None) is None and not core.adapter_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="wraps a whole feed-forward block"):
        core.add_adapter(tiny_llama(), HoulsbyConfig(m=4, placement="parallel", target_modules=["down_proj"]))
    with pytest.raises(ValueError, match="matches no parameter"):
        core.add_adapter(tiny_llama(), HoulsbyConfig(m=4, extra_trainable=[r".*LayerNorm\.bias"]))



def test_a_target_that_matches_nothing_names_the_close_names_and_changes_nothing():
    for make, target, close in [(tiny_llama, ["o_prj"], "o_proj"), (tiny_bert, ["output.dens"], "dense")]:
        model = make()
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        modules = {n: type(m) for n, m in model.named_modules()}
        with pytest.raises(ValueError, match=rf"(?s){target[0]}.*did you mean.*{close}"):
            core.add_adapter(model, HoulsbyConfig(m=4, target_modules=target))
        assert getattr(model, "adapter_config", None) is None and not core.adapter_layers(model)
        assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
        assert modules == {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"matched no module|did you mean|matches no"):
        core.add_adapter(tiny_llama(), HoulsbyConfig(m=4, target_modules=r".*\.nowhere"))


def test_a_model_without_a_default_placement_is_told_to_name_its_targets():
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    with pytest.raises(ValueError, match="no default adapter placement for model type 'gpt2'.*pass target_modules"):
        core.add_adapter(gpt2, HoulsbyConfig(m=4, train_layer_norms=False))
    # GPT-2's norms are ln_1, ln_2, ln_f: the layer-norm pattern finds none, and says so first
    with pytest.raises(ValueError, match=r"extra_trainable pattern '\.\*\[Nn\]orm.* matches no parameter"):
        core.add_adapter(gpt2, HoulsbyConfig(m=4, target_modules=["c_proj"]))
    assert not core.adapter_layers(gpt2)
