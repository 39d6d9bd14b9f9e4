"""Cached generation with an adapter: greedy tokens with the KV cache equal those without it, those of
the merged model (where the method merges) and those of peft (LoRA, DoRA), on a batch with one
left-padded row; and a QLoRA model generates with ``use_cache`` switched back on after training.

Why it can break: a cached step feeds the adapter one token at a time, with position ids and a mask
that grow; an adapter layer that kept state between calls, reshaped by the wrong length, or a model
left with ``use_cache=False`` (QLoRA's training setting) would show here. (Soft prompts and prefixes,
whose cache bookkeeping is their own, are tested in tests/test_prompts.py.)

Tolerance: tokens must be equal; the logits of every generated step agree within
``rtol=1e-5, atol=1e-5 x max|logits|`` (float32; a cached step sums over the same keys in another
blocking than a full pass, so they agree to rounding, not bit for bit).
"""
from __future__ import annotations

import copy

import pytest
import torch

from peft_from_scratch import core
from peft_from_scratch.additive.houlsby import HoulsbyConfig
from peft_from_scratch.interop import peft as pio
from peft_from_scratch.models import tiny_llama
from peft_from_scratch.reparameterized.dora import DoRAConfig
from peft_from_scratch.reparameterized.lora import LoRAConfig
from peft_from_scratch.reparameterized.rosa import RoSAConfig
from tests.helpers import one_thread, tokens  # noqa: F401  (one_thread: autouse)

NEW = 8
CONFIGS = {
    "lora": LoRAConfig(r=4, alpha=8, target_modules="all-linear"),
    "dora": DoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rosa": RoSAConfig(r=2, alpha=4, d=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]),
    "houlsby": HoulsbyConfig(m=8),
}


def prompt_batch():
    """Two prompts of 9 tokens, the first left-padded by 3 (pad id 0)."""
    x = tokens(5, shape=(2, 9))
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    return x.masked_fill(mask == 0, 0), mask


@torch.no_grad()
def greedy(model, x, mask, use_cache):
    out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                         use_cache=use_cache, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits, 1)


def assert_same_generation(a, b, what):
    (seq_a, logits_a), (seq_b, logits_b) = a, b
    assert torch.equal(seq_a, seq_b), f"{what}: tokens differ\n{seq_a}\n{seq_b}"
    torch.testing.assert_close(logits_a, logits_b, rtol=1e-5, atol=1e-5 * logits_b.abs().max().item(),
                               msg=lambda m: f"{what}: {m}")


def adapted(name, seed=0):
    """tiny_llama with the adapter moved off its init (B != 0, masks set: ``simulate_training``)."""
    config = CONFIGS[name]
    model = core.add_adapter(tiny_llama(), config)
    g = torch.Generator().manual_seed(seed + 1)
    config.simulate_training(model, g)
    if name != "houlsby":                      # a larger B, so the adapter changes which tokens win
        with torch.no_grad():
            for layer in core.adapter_layers(model).values():
                if layer.lora is not None:
                    layer.lora.B.copy_(torch.randn(layer.lora.B.shape, generator=g) * 0.2)
    return model.eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_generation_equals_uncached_and_the_merged_model(name):
    model = adapted(name)
    x, mask = prompt_batch()
    cached = greedy(model, x, mask, use_cache=True)
    assert_same_generation(cached, greedy(model, x, mask, use_cache=False), f"{name}: cache vs no cache")
    base = greedy(tiny_llama(), x, mask, use_cache=True)
    assert not torch.equal(cached[0], base[0]), f"{name}: the adapter does not change the tokens; the test is vacuous"
    if type(model.adapter_config).mergeable is True:
        merged = copy.deepcopy(model)
        core.merge_adapter(merged)
        assert_same_generation(greedy(merged, x, mask, use_cache=True), cached, f"{name}: merged vs adapter")


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_cached_generation_equals_peft(name):
    def perturb(model):
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for layer in core.adapter_layers(model).values():
                layer.lora.B.copy_(torch.randn(layer.lora.B.shape, generator=g) * 0.2)
    ours, theirs, _ = pio.twin(tiny_llama(), CONFIGS[name], "CAUSAL_LM", perturb=perturb)
    x, mask = prompt_batch()
    assert_same_generation(greedy(ours, x, mask, True), greedy(theirs, x, mask, True), f"{name}: ours vs peft")


def test_houlsby_generation_equals_full_forward_passes():
    """Houlsby does not merge, so its cached tokens are checked against argmax of full forward passes
    over the growing text (no padding: a full pass without position ids counts from 0)."""
    model = adapted("houlsby")
    x = tokens(6, shape=(2, 7))
    seq, _ = greedy(model, x, torch.ones_like(x), use_cache=True)
    text = x
    with torch.no_grad():
        for _ in range(NEW):
            text = torch.cat([text, model(input_ids=text).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(seq, text)


def test_qlora_generates_with_the_cache_switched_back_on_after_training():
    """``prepare_qlora`` turns the cache off for training (with gradient checkpointing); switched back
    on for inference, cached greedy generation equals uncached, after real training steps."""
    from peft_from_scratch.quantized.qlora import is_checkpointing, prepare_qlora
    from peft_from_scratch.training import TrainConfig, train
    model = prepare_qlora(tiny_llama().train(), LoRAConfig(r=4, alpha=8))
    assert model.config.use_cache is False and is_checkpointing(model)
    data = [{"input_ids": t, "labels": t} for t in (tokens(i, shape=(2, 12)) for i in range(4))]
    before = {k: v.clone() for k, v in core.adapter_state_dict(model).items()}
    train(model, data, TrainConfig(lr=5e-2, max_steps=4, warmup_ratio=0.0), progress=False)
    assert any(not torch.equal(v, before[k]) for k, v in core.adapter_state_dict(model).items())
    model.eval()
    model.config.use_cache = True
    x, mask = prompt_batch()
    cached = greedy(model, x, mask, use_cache=True)
    assert_same_generation(cached, greedy(model, x, mask, use_cache=False), "qlora: cache vs no cache")
    with torch.no_grad():   # the cache really was used: the first cached step returns one
        out = model(input_ids=x, attention_mask=mask, use_cache=True)
    assert out.past_key_values is not None and out.past_key_values.get_seq_length() == x.shape[1]
