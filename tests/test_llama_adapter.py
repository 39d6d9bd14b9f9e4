"""LLaMA-Adapter: our layer against the official code's equations (concatenated keys, two softmaxes,
the per-head tanh gate) recomputed here on a real layer; peft's scalar-gate variant against peft's
AdaptionPromptConfig (logits, gradients, k AdamW steps, greedy generation with the KV cache, files
both ways); where the two variants meet and where they part; bad input.

Tolerances: rtol 1e-5 (atol 1e-6 x the tensor's largest entry) against peft (our layer does peft's
float operations in peft's order, so the differences are in practice 0); 1e-5 against the
hand-written equations."""
import math

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel

from peft_from_scratch import core, equivalence
from peft_from_scratch.additive import LlamaAdapterConfig
from peft_from_scratch.additive.llama_adapter import rotate_half
from peft_from_scratch.interop import peft as peft_io
from peft_from_scratch.models import SMOLLM2, tiny_llama
from tests.helpers import one_thread, real_model  # noqa: F401  (one_thread: autouse)

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])


def set_gates(model, values):
    with torch.no_grad():
        for layer in core.adapter_layers(model).values():
            layer.gate.copy_(torch.as_tensor(values, dtype=layer.gate.dtype).expand_as(layer.gate))


def official(attn, x, cos, sin):
    """alpaca_finetuning_v1/llama/model.py's Attention.forward with an adapter, in its own steps:
    the prompt's keys and values put in front of the tokens', one score matrix, a softmax over each
    part, the prompt's part times tanh(gate), then W_o (grouped key/value heads repeated)."""
    base, B, T = attn.base_layer, x.shape[0], x.shape[1]
    H, Hkv, C, K = attn.num_heads, attn.kv_heads, attn.head_dim, len(attn.prompt)
    q = base.q_proj(x).view(B, T, H, C).transpose(1, 2)
    k = base.k_proj(x).view(B, T, Hkv, C).transpose(1, 2)
    v = base.v_proj(x).view(B, T, Hkv, C).transpose(1, 2)
    q, k = q * cos[:, None] + rotate_half(q) * sin[:, None], k * cos[:, None] + rotate_half(k) * sin[:, None]
    k_p = base.k_proj(attn.prompt).view(1, K, Hkv, C).transpose(1, 2).expand(B, -1, -1, -1)
    v_p = base.v_proj(attn.prompt).view(1, K, Hkv, C).transpose(1, 2).expand(B, -1, -1, -1)
    keys = torch.cat([k_p, k], 2).repeat_interleave(H // Hkv, 1)
    values = torch.cat([v_p, v], 2).repeat_interleave(H // Hkv, 1)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(C)
    causal = torch.full((T, T), float("-inf")).triu(1)
    scores = scores + torch.cat([torch.zeros(T, K), causal], 1)              # the prompt is visible to every query
    gate = attn.gate.tanh().view(1, -1, 1, 1)
    scores = torch.cat([gate * F.softmax(scores[..., :K], -1), F.softmax(scores[..., K:], -1)], -1)
    return base.o_proj((scores @ values).transpose(1, 2).reshape(B, T, -1))


def test_the_layer_is_the_official_equations_on_a_real_layer():
    model = core.add_adapter(tiny_llama(num_hidden_layers=3), LlamaAdapterConfig(adapter_len=5, adapter_layers=2))
    set_gates(model, torch.linspace(-1.5, 2.0, 4))                         # a different gate on each head
    attn = model.model.layers[-1].self_attn
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(1))
    cos, sin = model.model.rotary_emb(x, torch.arange(7)[None].expand(2, -1))
    with torch.no_grad():
        ours, _ = attn(x, position_embeddings=(cos, sin), attention_mask=None)
        assert torch.allclose(ours, official(attn, x, cos, sin), rtol=1e-5, atol=1e-6)


def test_only_the_top_layers_are_adapted_and_a_fresh_adapter_is_the_base_model():
    base = tiny_llama(num_hidden_layers=4)
    with torch.no_grad():
        expected = base(input_ids=IDS, attention_mask=MASK).logits
    model = core.add_adapter(base, LlamaAdapterConfig(adapter_len=3, adapter_layers=2))
    assert sorted(core.adapter_layers(model)) == ["model.layers.2.self_attn", "model.layers.3.self_attn"]
    assert core.count_parameters(model)[0] == 2 * (3 * 64 + 4)              # K x d + one gate per head, per layer
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS, attention_mask=MASK).logits, expected)


@pytest.mark.parametrize("make", [lambda: tiny_llama(num_hidden_layers=3), lambda: real_model(SMOLLM2)],
                         ids=["tiny_llama", "smollm2"])
def test_the_scalar_gate_matches_peft_logits_grads_steps_and_generation(make):
    base = make()
    config = LlamaAdapterConfig(adapter_len=4, adapter_layers=2, gate="scalar")
    ours, theirs, pairs = peft_io.twin(base, config, perturb=lambda m: set_gates(m, 0.3))   # the gate moved off 0
    ids = IDS % base.config.vocab_size
    report = equivalence.compare(ours, theirs, pairs, [{"input_ids": ids, "attention_mask": MASK, "labels": ids}],
                                 steps=3, lr=1e-2)
    assert report.passed, report.table()
    with torch.no_grad():
        a, b = (m.generate(input_ids=ids[:1], max_new_tokens=5, min_new_tokens=5, do_sample=False) for m in (ours, theirs))
    assert torch.equal(a, b)


def test_ours_loads_in_peft_and_peft_in_ours(tmp_path):
    base = tiny_llama(num_hidden_layers=3)
    ours, theirs, _ = peft_io.twin(base, LlamaAdapterConfig(adapter_len=4, adapter_layers=2, gate="scalar"),
                                   perturb=lambda m: set_gates(m, -0.4))
    peft_io.save_peft_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        in_peft = PeftModel.from_pretrained(tiny_llama(num_hidden_layers=3), tmp_path / "ours").eval()
        in_ours = peft_io.load_peft_adapter(tiny_llama(num_hidden_layers=3), tmp_path / "peft").eval()
        assert torch.allclose(in_peft(input_ids=IDS).logits, ours(input_ids=IDS).logits, atol=1e-6)
        assert torch.allclose(in_ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, atol=1e-6)
    assert in_ours.adapter_config.gate == "scalar"


def test_the_variants_meet_when_every_head_has_the_same_gate_and_part_when_they_differ():
    base = tiny_llama(num_hidden_layers=3)
    paper = core.add_adapter(tiny_llama(num_hidden_layers=3), LlamaAdapterConfig(adapter_len=4, adapter_layers=2))
    scalar = core.add_adapter(base, LlamaAdapterConfig(adapter_len=4, adapter_layers=2, gate="scalar"))
    scalar.load_state_dict({k: v for k, v in core.adapter_state_dict(paper).items() if k.endswith(".prompt")}, strict=False)
    set_gates(paper, 0.5)
    set_gates(scalar, math.tanh(0.5))                                       # peft's g = the paper's tanh(g)
    with torch.no_grad():
        assert torch.allclose(paper(input_ids=IDS).logits, scalar(input_ids=IDS).logits, atol=1e-5)
        set_gates(paper, torch.tensor([0.5, -0.5, 1.0, 0.0]))
        assert not torch.allclose(paper(input_ids=IDS).logits, scalar(input_ids=IDS).logits, atol=1e-3)


def test_bad_input_is_refused_and_the_model_untouched(tmp_path):
    model = tiny_llama(num_hidden_layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="adapter_layers = 3, but the model has 2"):
        core.add_adapter(model, LlamaAdapterConfig(adapter_layers=3))
    with pytest.raises(ValueError, match="no q_proj"):
        core.add_adapter(model, LlamaAdapterConfig(adapter_layers=1, target_modules=["mlp"]))
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(NotImplementedError, match="per-head tanh gate has no peft counterpart"):
        peft_io.twin(model, LlamaAdapterConfig(adapter_layers=1))
    ours, theirs, _ = peft_io.twin(model, LlamaAdapterConfig(adapter_len=2, adapter_layers=2, gate="scalar"))
    peft_io.save_peft_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    with pytest.raises(ValueError, match="saved for another base model"):         # our files carry the base's fingerprint
        peft_io.load_peft_adapter(tiny_llama(num_hidden_layers=2, hidden_size=32), tmp_path / "ours")
    narrow = tiny_llama(num_hidden_layers=2, hidden_size=32)
    with pytest.raises(ValueError, match=r"does not fit this model .*expected \(1, 2, 32\)"):
        peft_io.load_peft_adapter(narrow, tmp_path / "peft")
    assert getattr(narrow, "adapter_config", None) is None
    with pytest.raises(ValueError, match="adapts 2 layers; this model has 1"):
        peft_io.load_peft_adapter(tiny_llama(num_hidden_layers=1), tmp_path / "peft")
