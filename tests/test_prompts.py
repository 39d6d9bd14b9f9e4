"""Prompt tuning, P-tuning and prefix tuning against peft, on identical parameters.

Each test builds ours (``core.add_adapter``) and peft's (``get_peft_model``) on deep copies of one
base model, copies our adapter tensors into peft (our ``prompt_encoder.X`` is peft's
``prompt_encoder.default.X``), then compares logits and loss, every adapter gradient, the adapter
parameters after 5 AdamW steps on the same batches, and greedy generation.

Tolerance: assert_close(rtol=1e-5, atol=1e-6 x the reference tensor's largest entry). Observed:
bit-identical (0.0) logits, gradients and parameters for prefix, prompt tuning and P-tuning, on
tiny_llama and SmolLM2, on full and on left- or right-padded batches; prefix with projection on tiny_llama differs by at most 3e-7 (logits),
4e-7 (gradients) and 1e-6 (parameters after 5 steps), relative to the largest entry (peft runs the
MLP on a batch of identical rows, we run it once and expand, so sums are taken in another order).
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from peft import PeftModel
from peft import PromptTuningConfig as PeftPromptTuning
from peft import get_peft_model

from peft_from_scratch import core
from peft_from_scratch.models import SMOLLM2, tiny_bert, tiny_llama
from peft_from_scratch.additive import (PrefixTuningConfig, PromptTuningConfig, PTuningConfig, fold_prefix,
                                       prompt_tuning)
from peft_from_scratch.interop import peft as pio

RTOL, ATOL = 1e-5, 1e-6
STEPS, LR = 5, 1e-2


from tests.helpers import one_thread  # noqa: E402,F401  (autouse, module scope: these tests run on one thread)


def tokens(seed=0, vocab=128, shape=(2, 10)):
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(seed))


def batches(n, vocab=128, shape=(2, 10)):
    out = []
    for i in range(n):
        x = tokens(i, vocab, shape)
        out.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()})
    return out


@functools.lru_cache(maxsize=None)
def smollm2():
    from peft_from_scratch.models import ModelNotAvailable, load_model
    try:
        model, _ = load_model(SMOLLM2)
    except ModelNotAvailable as e:
        pytest.skip(str(e))
    return model.eval()


def configs(n=4, hidden=None):
    """Our configs for the four set-ups we compare with peft (``interop.peft.peft_config`` makes peft's)."""
    return {
        "prefix": PrefixTuningConfig(num_virtual_tokens=n),
        "prefix-projection": PrefixTuningConfig(num_virtual_tokens=n, prefix_projection=True, encoder_hidden_size=hidden),
        "prompt": PromptTuningConfig(num_virtual_tokens=n),
        "p-tuning-lstm": PTuningConfig(num_virtual_tokens=n, encoder="lstm", encoder_hidden_size=hidden),
    }


def make_pair(base, config, seed=1):
    """``interop.peft.twin`` with "trained" values: every prompt tensor drawn from N(0, 0.1^2)."""
    def perturb(model):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.prompt_encoder.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ours, theirs, pairs = pio.twin(base, config, perturb=perturb)
    return ours, theirs, pairs


def compare(ours, theirs, pairs, data, rtol=RTOL, atol=ATOL, param_outliers=0.0):
    """Asserts equality within the tolerance; returns the largest relative differences seen.

    The logits at step 0 and every gradient are always held to RTOL/ATOL (the function and its
    backward); ``rtol``/``atol`` may relax the later logits and the parameters, and ``param_outliers``
    lets that fraction of the parameters differ by more: Adam's sign-noise outliers (tests/helpers.py,
    ``compare_with_peft``), which appear only when the gradients differ by rounding."""
    diffs = {"logits": 0.0, "grads": 0.0, "params": 0.0}

    def check(a, b, what, rtol=rtol, atol=atol):
        scale = max(b.abs().max().item(), 1e-30)
        diffs[what.split()[0]] = max(diffs[what.split()[0]], (a - b).abs().max().item() / scale)
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(scale, 1.0), msg=lambda m: f"{what}: {m}")

    mine = {k: a for k, (a, _) in pairs.items()}
    other = {k: b for k, (_, b) in pairs.items()}
    opt_a, opt_b = torch.optim.AdamW(mine.values(), lr=LR), torch.optim.AdamW(other.values(), lr=LR)
    for step in range(STEPS):
        a, b = ours(**data[step % len(data)]), theirs(**data[step % len(data)])
        tol = dict(rtol=RTOL, atol=ATOL) if step == 0 else {}
        check(a.logits, b.logits, f"logits at step {step}", **tol)
        check(a.loss, b.loss, f"logits (loss) at step {step}", **tol)
        a.loss.backward(), b.loss.backward()
        if step == 0:
            for k in mine:
                check(mine[k].grad, other[k].grad, f"grads of {k}", rtol=RTOL, atol=ATOL)
        opt_a.step(), opt_b.step(), opt_a.zero_grad(), opt_b.zero_grad()
    outside = total = 0
    for k in mine:
        a, b = mine[k].detach(), other[k].detach()
        if not param_outliers:
            check(a, b, f"params {k} after {STEPS} steps")
            continue
        diffs["params"] = max(diffs["params"], ((a - b).abs().max() / b.abs().max()).item())
        outside += int(((a - b).abs() > atol * max(b.abs().max().item(), 1.0) + rtol * b.abs()).sum())
        total += b.numel()
    assert outside <= param_outliers * total, f"{outside} of {total} parameters differ after {STEPS} steps"
    return diffs


def padded_batches(side, n=STEPS, shape=(3, 10)):
    """Batches of 3 rows with 0, 3 and 6 pad tokens (id 0) on ``side``; no loss on the padding."""
    out = []
    for i in range(n):
        x = tokens(i, shape=shape)
        mask = torch.ones_like(x)
        for row, pad in ((1, 3), (2, 6)):
            if side == "left":
                mask[row, :pad] = 0
            else:
                mask[row, shape[1] - pad:] = 0
        x = x.masked_fill(mask == 0, 0)
        out.append({"input_ids": x, "attention_mask": mask, "labels": x.masked_fill(mask == 0, -100)})
    return out


def greedy(model, x, n=6):
    with torch.no_grad():
        return model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                              min_new_tokens=n)


# ----------------------------------------------------------------------------- against peft

@pytest.mark.parametrize("name", list(configs()))
def test_matches_peft_on_tiny_llama(name):
    ours, theirs, pairs = make_pair(tiny_llama(), configs(hidden=24)[name])
    print(name, compare(ours, theirs, pairs, batches(STEPS)))
    x = tokens(9, shape=(1, 7))
    assert torch.equal(greedy(ours, x), greedy(theirs, x))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", list(configs()))
def test_matches_peft_on_padded_batches(name, side):
    """Rows of 10, 7 and 4 real tokens, padded left or right, with the mask saying so. Observed:
    bit-identical logits, gradients and parameters after 5 steps for prefix, prompt tuning and
    P-tuning, and this test keeps them so (0.0 is asserted, not a tolerance). The projected prefix
    differs by float32 rounding (its MLP sums in another order, see the module docstring): its
    logits at step 0 and its gradients are held to the usual tolerance; 5 Adam steps at lr 1e-2 turn
    rounding into sign-noise outliers (one of 768 weights off by 1.6e-4 here), so after them the logits
    and parameters are held to 1e-4 relative, with at most 0.5% of the parameters outside."""
    ours, theirs, pairs = make_pair(tiny_llama(), configs(hidden=24)[name])
    if name == "prefix-projection":
        diffs = compare(ours, theirs, pairs, padded_batches(side), rtol=1e-4, atol=1e-4, param_outliers=5e-3)
        assert max(diffs.values()) > 0        # if it becomes exact, tighten this to 0.0 like the others
    else:
        diffs = compare(ours, theirs, pairs, padded_batches(side))
        assert diffs == {"logits": 0.0, "grads": 0.0, "params": 0.0}, diffs


def generate_logits(model, x, mask, n=6):
    """Greedy tokens and the raw logits at every generation step (batch, n, vocab)."""
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("name", list(configs()))
def test_left_padded_batched_generation(name):
    """A batch of two prompts, the first left-padded by 3, generated greedily (``generate`` builds
    position ids from the mask). Ours equals peft exactly, tokens and logits. What the padding does to
    positions (``soft_prompt``'s docstring): prefix tuning shifts the given position ids by n, so the
    padded row gets the positions it has alone and its logits equal those of the row alone (to float32
    rounding); prompt tuning and P-tuning drop position ids, as peft does, so positions run 0..n+T-1
    over the pad slots too and the padded row's logits move (observed: by 2e-3 (P-tuning) and 4e-3
    (prompt tuning), logits of ~0.5) -- in ours and in peft alike. The unpadded row is unaffected."""
    ours, theirs, _ = make_pair(tiny_llama(), configs(hidden=24)[name])
    x = tokens(9, shape=(2, 8))
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    x = x.masked_fill(mask == 0, 0)
    seq, logits = generate_logits(ours, x, mask)
    seq_peft, logits_peft = generate_logits(theirs, x, mask)
    assert torch.equal(seq, seq_peft) and torch.equal(logits, logits_peft)
    scale = logits.abs().max().item()
    _, alone = generate_logits(ours, x[:1, 3:], mask[:1, 3:])
    _, alone_peft = generate_logits(theirs, x[:1, 3:], mask[:1, 3:])
    _, full = generate_logits(ours, x[1:], mask[1:])
    torch.testing.assert_close(logits[1], full[0], rtol=0, atol=1e-6 * scale)
    shift, shift_peft = (logits[0] - alone[0]).abs().max().item(), (logits_peft[0] - alone_peft[0]).abs().max().item()
    if name.startswith("prefix"):
        assert shift <= 1e-6 * scale and shift_peft <= 1e-6 * scale, (shift, shift_peft)
    else:
        assert 1e-4 * scale < shift < 1e-1 * scale, f"padded row moved by {shift / scale:.1e} of the logits"
        assert shift == shift_peft


@pytest.mark.slow
@pytest.mark.parametrize("name", list(configs()))
def test_matches_peft_on_smollm2(name):
    ours, theirs, pairs = make_pair(smollm2(), configs(n=3, hidden=32)[name])
    print(name, compare(ours, theirs, pairs, batches(STEPS, vocab=49152, shape=(1, 6))))
    x = tokens(9, vocab=49152, shape=(1, 5))
    assert torch.equal(greedy(ours, x, 3), greedy(theirs, x, 3))


def test_generate_with_a_prompt_continues_like_one_forward_pass():
    """The cache bookkeeping: greedy tokens equal argmax of full forward passes over the growing text."""
    for config in (PromptTuningConfig(num_virtual_tokens=3), PrefixTuningConfig(num_virtual_tokens=3)):
        model = core.add_adapter(tiny_llama(), config)
        x = tokens(3, shape=(1, 5))
        out = greedy(model, x, 4)
        text = x
        for _ in range(4):
            with torch.no_grad():
                nxt = model(input_ids=text).logits[:, -1].argmax(-1, keepdim=True)
            text = torch.cat([text, nxt], 1)
        assert torch.equal(out, text)


# ----------------------------------------------------------------------------- structure, counts, save/load

def test_parameter_counts_match_the_formulas():
    d, L, kv = 64, 2, 32        # tiny_llama: 4 heads of 16, 2 key/value heads -> keys 32 wide
    for config, expected in [
        (PromptTuningConfig(num_virtual_tokens=10), 10 * d),
        (PrefixTuningConfig(num_virtual_tokens=10), 10 * L * 2 * kv),
        (PrefixTuningConfig(num_virtual_tokens=10, prefix_projection=True, encoder_hidden_size=48),
         10 * kv + (kv * 48 + 48) + (48 * 2 * L * kv + 2 * L * kv)),
        (PTuningConfig(num_virtual_tokens=10), None),
    ]:
        model = tiny_llama()
        total = sum(p.numel() for p in model.parameters())
        core.add_adapter(model, config)
        trainable, all_params = core.count_parameters(model)
        if expected is None:   # P-tuning, h = d/2: LSTM layers 1 and 2 (both directions), then d -> d -> d
            h = d // 2
            lstm = 2 * (4 * h * d + 4 * h * h + 8 * h) + 2 * (4 * h * 2 * h + 4 * h * h + 8 * h)
            expected = 10 * d + lstm + (d * d + d) * 2
        assert (trainable, all_params) == (expected, total + expected)
        assert all(n.startswith("prompt_encoder.") for n, p in model.named_parameters() if p.requires_grad)


def test_text_and_label_inits(monkeypatch):
    class Tok:   # a stand-in tokenizer: one id per character
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(c) % 128 for c in text]}
    monkeypatch.setattr(prompt_tuning, "load_tokenizer", lambda name: Tok())
    model = tiny_llama()
    words = model.get_input_embeddings().weight.detach()
    core.add_adapter(model, PromptTuningConfig(num_virtual_tokens=5, init="text", init_text="ab",
                                               tokenizer_name_or_path="x"))
    ids = [97, 98, 97, 98, 97]          # repeated to fill n (peft's rule)
    assert torch.equal(model.prompt_encoder.embedding.weight, words[ids])
    model = tiny_llama()
    core.add_adapter(model, PromptTuningConfig(num_virtual_tokens=2, init="text", init_text="abcd",
                                               tokenizer_name_or_path="x"))
    assert torch.equal(model.prompt_encoder.embedding.weight, words[[97, 98]])   # truncated, as peft
    model = tiny_llama()
    core.add_adapter(model, PromptTuningConfig(num_virtual_tokens=4, init="labels", label_words=["ab", "c"],
                                               tokenizer_name_or_path="x"))
    p = model.prompt_encoder.embedding.weight
    torch.testing.assert_close(p[0], words[[97, 98]].mean(0))
    torch.testing.assert_close(p[1], words[99])
    vocab = core.add_adapter(tiny_llama(), PromptTuningConfig(num_virtual_tokens=6, init="vocab"))
    rows = vocab.prompt_encoder.embedding.weight
    assert all((words == r).all(1).any() for r in rows)   # every row is some token's embedding


@pytest.mark.slow
def test_text_init_with_the_real_tokenizer_equals_peft():
    from peft_from_scratch.models import local_path
    path = str(local_path(SMOLLM2))
    base = smollm2()
    ours = core.add_adapter(copy.deepcopy(base), PromptTuningConfig(
        num_virtual_tokens=7, init="text", init_text="Classify:", tokenizer_name_or_path=SMOLLM2))
    theirs = get_peft_model(copy.deepcopy(base), PeftPromptTuning(
        task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT", prompt_tuning_init_text="Classify:",
        tokenizer_name_or_path=path))
    assert torch.equal(ours.prompt_encoder.embedding.weight, theirs.prompt_encoder["default"].embedding.weight)


def test_fold_prefix_keeps_outputs_and_drops_the_mlp(tmp_path):
    model = core.add_adapter(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True))
    x = tokens()
    before = model(input_ids=x).logits
    n_before = core.count_parameters(model)[0]
    fold_prefix(model)
    assert not hasattr(model.prompt_encoder, "transform")
    assert core.count_parameters(model)[0] == 4 * 2 * 2 * 32 < n_before
    torch.testing.assert_close(model(input_ids=x).logits, before, rtol=0, atol=1e-6)
    core.save_adapter(model, tmp_path)   # the folded prefix saves and loads as a plain prefix
    fresh = core.load_adapter(tiny_llama(), tmp_path)
    assert fresh.adapter_config.prefix_projection is False
    torch.testing.assert_close(fresh(input_ids=x).logits, before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(configs()))
def test_peft_files_both_ways(tmp_path, name):
    """Ours saved in peft's format loads with PeftModel.from_pretrained, peft's loads into ours, and
    both compute the same logits; peft's file holds the prompt the encoder computes, so P-tuning
    comes back as prompt tuning and a projected prefix comes back folded."""
    base = tiny_llama()
    ours, theirs, _ = make_pair(base, configs(hidden=24)[name])
    x = tokens()
    pio.save_peft_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    in_peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    in_ours = pio.load_peft_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        ref = ours(input_ids=x).logits
        torch.testing.assert_close(in_peft(input_ids=x).logits, ref, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(in_ours(input_ids=x).logits, theirs(input_ids=x).logits, rtol=RTOL, atol=ATOL)
    assert in_ours.adapter_config.method == ("prefix_tuning" if name.startswith("prefix") else "prompt_tuning")
    with pytest.raises(ValueError, match="another base model"):        # our file names its base
        pio.load_peft_adapter(tiny_llama(seed=5), tmp_path / "ours")
    with pytest.raises(ValueError, match="virtual tokens on this model need"):
        pio.load_peft_adapter(tiny_llama(hidden_size=32), tmp_path / "peft")


# ----------------------------------------------------------------------------- errors

def test_errors():
    with pytest.raises(ValueError, match="positive integer"):
        PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="init_text"):
        PromptTuningConfig(init="text")
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        PromptTuningConfig(init="labels", label_words=["yes"])
    with pytest.raises(ValueError, match="3 label words do not fit 2"):
        PromptTuningConfig(num_virtual_tokens=2, init="labels", label_words=["a", "b", "c"], tokenizer_name_or_path="x")
    with pytest.raises(ValueError, match="'lstm'"):
        PTuningConfig(encoder="gru")
    model = tiny_llama()   # max_position_embeddings=256
    with pytest.raises(ValueError, match="max_position_embeddings is 256"):
        core.add_adapter(model, PrefixTuningConfig(num_virtual_tokens=256))
    assert getattr(model, "adapter_config", None) is None and not hasattr(model, "prompt_encoder")
    core.add_adapter(model, PromptTuningConfig(num_virtual_tokens=250))
    with pytest.raises(ValueError, match="250 virtual tokens \\+ 10 input tokens = 260 .*256"):
        model(input_ids=tokens())
    with pytest.raises(NotImplementedError, match="model type 'bert' is not supported"):
        core.add_adapter(tiny_bert(), PrefixTuningConfig(num_virtual_tokens=2))


def test_prefix_positions_from_zero_is_adapterhubs_convention():
    """positions="from_zero" keeps the real tokens at 0..T-1 (AdapterHub's); the default puts them after the
    prefix, at n..n+T-1 (peft's). The first equals the default called with position_ids shifted back by n;
    the two differ (the prefix keys are not rotated); and generation continues the positions."""
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    after = core.add_adapter(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=3))
    zero = core.add_adapter(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=3, positions="from_zero"))
    zero.prompt_encoder.load_state_dict(after.prompt_encoder.state_dict())
    with torch.no_grad():
        z = zero(input_ids=ids).logits
        shifted = after(input_ids=ids, position_ids=torch.arange(-3, 6).expand(2, -1)).logits
        torch.testing.assert_close(z, shifted, rtol=1e-5, atol=1e-5)
        assert (z - after(input_ids=ids).logits).abs().max() > 1e-3
        out = zero.generate(input_ids=ids[:, :6], max_new_tokens=3, do_sample=False, output_logits=True,
                            return_dict_in_generate=True)
        full = zero(input_ids=out.sequences[:, :-1]).logits[:, 5:]
        torch.testing.assert_close(torch.stack(out.logits, 1), full, rtol=1e-4, atol=1e-4)
    with pytest.raises(NotImplementedError, match="positions='after_prefix'"):
        pio.peft_config(zero.adapter_config, zero)
