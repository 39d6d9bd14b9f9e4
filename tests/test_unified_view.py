"""The unified view (additive/unified_view.py) against the paper's equations, computed here by hand:
prefix tuning's attention equals the gated parallel adapter of Eqs. 7-8 (on random heads and on a
real Llama layer reading our prefix), the (scaled) parallel adapter h + s * f(x W_down) W_up on the
feed-forward and attention blocks, the LoRA init (exactly the identity), MAM = prefix + scaled PA,
and the errors. Equality with AdapterHub's ``ParBnConfig`` on identical weights is in
tests/test_adapterhub.py (cases ``tiny-scaled-pa``, ``tiny-pa-learned-attn``, ``minilm-scaled-pa-default``).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from peft_from_scratch import core
from peft_from_scratch.additive import MAMConfig, ParallelAdapterConfig, PrefixTuningConfig, gated_prefix_attention
from peft_from_scratch.models import tiny_bert, tiny_llama
from tests.helpers import tokens


def perturb(model, seed=1, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def test_gated_form_equals_attention_over_the_concatenation():
    """Eq. 7: softmax(q [P_k; K]^T)[P_v; V] = (1 - λ) Attn + λ softmax(q P_k^T) P_v, for every query head
    of a grouped-query attention (8 query heads on 2 key/value heads), causal over the context."""
    g = torch.Generator().manual_seed(0)
    B, H, KV, T, l, hd = 2, 8, 2, 7, 5, 16
    q, k, v = (torch.randn(B, h, T, hd, generator=g, dtype=torch.float64) for h in (H, KV, KV))
    p_k, p_v = (torch.randn(KV, l, hd, generator=g, dtype=torch.float64) for _ in range(2))
    out = gated_prefix_attention(q, k, v, p_k, p_v)
    rep = lambda t: t.repeat_interleave(H // KV, dim=-3)                             # noqa: E731
    keys = torch.cat([rep(p_k).expand(B, -1, -1, -1), rep(k)], dim=-2)               # (B, H, l + T, hd)
    values = torch.cat([rep(p_v).expand(B, -1, -1, -1), rep(v)], dim=-2)
    mask = torch.cat([torch.zeros(T, l, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).triu(1)], dim=1)
    scores = (q @ keys.transpose(-1, -2) / hd ** 0.5).masked_fill(mask, float("-inf"))
    torch.testing.assert_close(out.head, scores.softmax(-1) @ values, rtol=1e-12, atol=1e-12)
    # the gate is the prefix's share of the attention mass (Eq. 8), strictly between 0 and 1
    mass = scores.softmax(-1)[..., :l].sum(-1)
    torch.testing.assert_close(out.gate, mass, rtol=1e-12, atol=1e-12)
    assert (out.gate > 0).all() and (out.gate < 1).all()
    # and both branches matter: neither the frozen attention nor Δh alone is the head
    assert (out.head - out.attn).abs().max() > 1e-2 and (out.head - out.delta).abs().max() > 1e-2


def test_gated_form_equals_a_llama_layer_reading_our_prefix():
    """A real (tiny) Llama with our prefix tuning: the first layer's heads, before o_proj, equal Eq. 7
    computed from that layer's own q, k, v (RoPE at positions n..n+T-1, the prefix after n tokens) and
    the prefix rows of layer 0."""
    model = core.add_adapter(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=4))
    perturb(model)
    attn = model.model.layers[0].self_attn
    seen = {}
    h1 = model.model.layers[0].input_layernorm.register_forward_hook(lambda m, i, o: seen.update(x=o))
    h2 = attn.o_proj.register_forward_pre_hook(lambda m, i: seen.update(heads=i[0]))
    ids = tokens(0, 128, (2, 9))
    with torch.no_grad():
        model(input_ids=ids)
        h1.remove(), h2.remove()
        x, (B, T, _) = seen["x"], seen["x"].shape
        hd, n = attn.head_dim, 4
        split = lambda t: t.view(B, T, -1, hd).transpose(1, 2)                       # noqa: E731
        q, k, v = split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x))
        cos, sin = model.model.rotary_emb(x, torch.arange(n, n + T).expand(B, -1))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        cache = model.prompt_encoder.prefix_cache(1)
        p_k, p_v = cache.layers[0].keys[0], cache.layers[0].values[0]                # (kv_heads, n, hd)
        mine = gated_prefix_attention(q, k, v, p_k, p_v).head.transpose(1, 2).reshape(B, T, -1)
    torch.testing.assert_close(mine, seen["heads"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", ["ffn", "attn"])
def test_parallel_adapter_on_llama_is_h_plus_s_times_the_bottleneck_of_x(position):
    """Table 1: h <- h + s * (ReLU(x W_down + b_down) W_up + b_up), x the sub-layer's input (the normalised
    stream in Llama), h its output."""
    model = core.add_adapter(tiny_llama(), ParallelAdapterConfig(m=8, scaling=4.0, position=position))
    perturb(model)
    layer = model.model.layers[1]
    wrapped = layer.mlp if position == "ffn" else layer.self_attn
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        if position == "ffn":
            got, h = wrapped(x), wrapped.base_layer(x)
        else:
            pos = model.model.rotary_emb(x, torch.arange(5).expand(2, -1))
            got, h = wrapped(x, position_embeddings=pos, attention_mask=None)[0], \
                wrapped.base_layer(x, position_embeddings=pos, attention_mask=None)[0]
        a = wrapped.adapter
        by_hand = h + 4.0 * (F.relu(x @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias)
    torch.testing.assert_close(got, by_hand, rtol=1e-5, atol=1e-5)


def test_parallel_adapter_on_bert_joins_before_the_residual_and_layer_norm():
    """BERT (post-norm): LN(dropout(W_2 a) + s * PA(x) + x), x the feed-forward block's input."""
    model = core.add_adapter(tiny_bert(), ParallelAdapterConfig(m=8, scaling=2.5, modules_to_save=["classifier"]))
    perturb(model)
    out = model.bert.encoder.layer[0].output
    g = torch.Generator().manual_seed(4)
    hidden, x = torch.randn(2, 5, 128, generator=g), torch.randn(2, 5, 64, generator=g)
    with torch.no_grad():
        b, a = out.base_layer, out.adapter
        by_hand = b.LayerNorm(b.dense(hidden) + 2.5 * (F.relu(x @ a.down.weight.T + a.down.bias) @ a.up.weight.T
                                                       + a.up.bias) + x)
        torch.testing.assert_close(out(hidden, x), by_hand, rtol=1e-5, atol=1e-5)


def test_lora_init_is_exactly_the_identity_and_the_learned_scale_trains():
    base = tiny_llama()
    ids = tokens(0, 128, (2, 9))
    model = core.add_adapter(copy.deepcopy(base), ParallelAdapterConfig(m=8, scaling="learned"))
    a = model.model.layers[0].mlp.adapter
    assert a.down.weight.abs().min() > 0 and not a.up.weight.any() and not a.up.bias.any() and not a.down.bias.any()
    assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.layers.0.mlp.scaling" in trainable and len(trainable) == 2 * 5      # 2 layers x (4 + s)
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.layers[0].mlp.adapter.up.weight.grad.abs().max() > 0           # W_up = 0 still learns
    # a count a reader can check: L (2dm + d + m + 1)
    assert core.count_parameters(model)[0] == 2 * (2 * 64 * 8 + 64 + 8 + 1)


def test_mam_is_a_prefix_plus_a_scaled_parallel_adapter():
    """MAM with the PA at its LoRA init computes exactly what the same prefix alone computes; once W_up
    moves it differs; its trainable tensors are the prefix's and the PA's."""
    ids = tokens(0, 128, (2, 9))
    mam = core.add_adapter(tiny_llama(), MAMConfig(num_virtual_tokens=3, prefix_projection=False,
                                                   encoder_hidden_size=None, m=8))
    prefix = core.add_adapter(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=3))
    prefix.prompt_encoder.load_state_dict(mam.prompt_encoder.state_dict())
    with torch.no_grad():
        assert torch.equal(mam(input_ids=ids).logits, prefix(input_ids=ids).logits)
        mam.model.layers[1].mlp.adapter.up.weight.normal_(0, 0.3)
        assert (mam(input_ids=ids).logits - prefix(input_ids=ids).logits).abs().max() > 1e-3
    n_prefix = core.count_parameters(prefix)[0]
    assert n_prefix == 3 * 2 * 2 * (2 * 16)                                        # l x L x (k, v) x kv width
    assert core.count_parameters(mam)[0] == n_prefix + 2 * (2 * 64 * 8 + 64 + 8)


def test_errors_name_the_problem_and_leave_the_model_untouched():
    bert = tiny_bert()
    before = copy.deepcopy(bert.state_dict())
    with pytest.raises(NotImplementedError, match="prefix tuning supports decoder models"):
        core.add_adapter(bert, MAMConfig(m=8, encoder_hidden_size=8, modules_to_save=["classifier"]))
    assert not hasattr(bert, "prompt_encoder") and not core.adapter_layers(bert)
    assert all(torch.equal(before[k], v) for k, v in bert.state_dict().items())
    with pytest.raises(TypeError, match="wraps a whole sub-layer"):
        core.add_adapter(tiny_llama(), ParallelAdapterConfig(m=4, target_modules=["down_proj"]))
    with pytest.raises(ValueError, match="m=100 does not fit"):
        core.add_adapter(tiny_llama(), ParallelAdapterConfig(m=100))
    with pytest.raises(ValueError, match="scaling must be a positive number or 'learned'"):
        ParallelAdapterConfig(scaling="fixed")
