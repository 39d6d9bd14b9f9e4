"""LOMO and AdaLomo as training steps (``optim.lomo``, ``optim.adalomo``): equal to the reference
(``lomo_optim``) and to the unfused optimizers they fuse, no full set of gradients ever held, and
failures that leave the model untouched or say exactly what was updated."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from lomo_optim import AdaLomo, Lomo
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.optimization import Adafactor

from peft_from_scratch.models import SMOLLM2
from peft_from_scratch.optim.adalomo import AdaLomoReference, AdaLomoStep
from peft_from_scratch.optim.lomo import LomoStep
from peft_from_scratch.training import BackpropStep, TrainConfig, train
from tests.helpers import one_thread, real_model  # noqa: F401  (one_thread: autouse)

VOCAB, SEQ, K = 64, 12, 3


def tiny(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64)).to(dtype)


def batches(n, size=2, seed=0, vocab=VOCAB, seq=SEQ):
    ids = torch.randint(0, vocab, (n * size, seq), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids.split(size)]


def config(**kw):
    return TrainConfig(**{"lr": 0.05, "warmup_ratio": 0, "schedule": "constant", "max_steps": K, **kw})


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def max_diff(a, b):
    """Largest |a - b| over all parameters, relative to the largest |b| of the same tensor."""
    a, b = dict(a.named_parameters()), dict(b.named_parameters())
    return max(float((a[n] - b[n]).detach().abs().max() / b[n].detach().abs().max()) for n in b)


def moved(model, start):
    return sum(not torch.equal(p, start[n]) for n, p in model.named_parameters())


def drive_lomo(model, data, lr, clip=None, **kw):
    """The reference by its own API: grad_norm (clipping's first pass), then fused_backward."""
    opt = Lomo(model, lr=lr, clip_grad_norm=clip, **kw)
    model.train()
    for b in data:
        loss = model(**b).loss
        if clip is not None:
            opt.grad_norm(loss)
        opt.fused_backward(loss, lr)


# --- LOMO against lomo_optim.Lomo and against torch.optim.SGD
@pytest.mark.parametrize("clip, wd, value, dtype", [(None, 0.0, None, torch.float32), (0.5, 0.1, None, torch.float32),
                                                    (0.5, 0.0, 0.01, torch.float32), (0.5, 0.1, None, torch.bfloat16)])
def test_lomo_matches_lomo_optim(clip, wd, value, dtype):
    """Same weights and batches, K steps: bit-identical in float32 and bfloat16 (measured 0)."""
    ours, theirs, data = tiny(dtype=dtype), tiny(dtype=dtype), batches(K)
    start = snapshot(ours)
    step = LomoStep(clip_grad_value=value)
    history = train(ours, data, config(max_grad_norm=clip, weight_decay=wd), step=step, progress=False)
    assert step.scaler is None                                # bf16, like float32, needs no loss scaling
    drive_lomo(theirs, data, 0.05, clip, weight_decay=wd, clip_grad_value=value)
    assert moved(ours, start) == len(start)
    assert max_diff(ours, theirs) == 0.0
    if clip is None:
        assert all(math.isnan(g) for g in history.grad_norm)
    else:
        assert min(history.grad_norm) > clip                  # the clipping did act
        other = tiny(dtype=dtype)
        drive_lomo(other, data, 0.05, None, weight_decay=wd, clip_grad_value=value)
        assert max_diff(ours, other) > 1e-3                   # and unclipped is not the same


@pytest.mark.parametrize("clip, wd", [(None, 0.0), (0.5, 0.1)])
def test_lomo_is_sgd(clip, wd):
    """LOMO == torch.optim.SGD (+ clip_grad_norm_) through BackpropStep: with no momentum, decoupled
    and L2 weight decay are one update. Tolerance 1e-6 relative (a different order of float ops)."""
    ours, theirs, data = tiny(), tiny(), batches(K)
    h1 = train(ours, data, config(max_grad_norm=clip, weight_decay=wd), step=LomoStep(), progress=False)
    sgd = BackpropStep(lambda groups, c: torch.optim.SGD(groups, lr=c.lr, weight_decay=c.weight_decay))
    h2 = train(theirs, data, config(max_grad_norm=clip, weight_decay=wd), step=sgd, progress=False)
    assert max_diff(ours, theirs) < 1e-6
    assert h1.loss == pytest.approx(h2.loss, rel=1e-6)
    if clip is not None:
        assert h1.grad_norm == pytest.approx(h2.grad_norm, rel=1e-6)
    adam = tiny()
    train(adam, data, config(lr=1e-3, max_grad_norm=clip, weight_decay=wd), progress=False)
    assert max_diff(ours, adam) > 1e-2                       # a different optimizer does not match


@pytest.mark.slow
def test_lomo_matches_lomo_optim_on_smollm2():
    """Two clipped steps with weight decay on SmolLM2-135M (tied embeddings): bit-identical."""
    ours, theirs = real_model(SMOLLM2), real_model(SMOLLM2)
    start, data = snapshot(ours), batches(2, size=1, vocab=49152, seq=16)
    train(ours, data, config(lr=1e-3, max_steps=2, max_grad_norm=1.0, weight_decay=0.01), step=LomoStep(),
          progress=False)
    drive_lomo(theirs, data, 1e-3, 1.0, weight_decay=0.01)
    assert moved(ours, start) == len(start)
    assert max_diff(ours, theirs) == 0.0


# --- memory: no full set of gradients, hooks that go away
@pytest.mark.parametrize("clip", [None, 1.0])
def test_no_full_set_of_gradients_is_ever_stored(clip):
    """A probe hook, run before LOMO's, counts the parameters holding a gradient at each moment of
    backward: always exactly one (the one just accumulated); with BackpropStep, all of them."""
    def probe(model):
        params, counts = list(model.parameters()), []
        for p in params:
            p.register_post_accumulate_grad_hook(lambda _: counts.append(sum(q.grad is not None for q in params)))
        return params, counts

    model = tiny()
    params, counts = probe(model)
    train(model, batches(K), config(max_grad_norm=clip), step=LomoStep(), progress=False)
    passes = 1 if clip is None else 2
    assert len(counts) == passes * K * len(params) and set(counts) == {1}
    assert all(p.grad is None for p in params)

    model = tiny()
    params, counts = probe(model)
    train(model, batches(1), config(max_steps=1), progress=False)
    assert max(counts) == len(params)


def test_hooks_are_idle_outside_the_step_and_close_removes_them():
    """After LomoStep (closed or not) a model trains with BackpropStep exactly as a fresh one."""
    data = batches(K)
    sgd = lambda: BackpropStep(lambda g, c: torch.optim.SGD(g, lr=c.lr))  # noqa: E731
    for close in (False, True):
        model = tiny()
        step = LomoStep()
        train(model, data, config(), step=step, progress=False)
        if close:
            step.close()
            assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
        twin = copy.deepcopy(model)
        for p in twin.parameters():
            p._post_accumulate_grad_hooks = None              # a twin with no hooks at all
        train(model, data, config(), step=sgd(), progress=False)
        train(twin, data, config(), step=sgd(), progress=False)
        assert max_diff(model, twin) == 0.0
    with LomoStep() as step:
        step.setup(model, config())
        assert all(len(p._post_accumulate_grad_hooks) == 1 for p in model.parameters())
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


# --- AdaLomo
def test_adalomo_fused_equals_the_unfused_reference():
    """The fused step (row/column means, in backward hooks, two-pass clipping) against
    AdaLomoReference (the sums form, a full backward, BackpropStep's clip_grad_norm_): K steps,
    tolerance 1e-6 relative (a different but equal formula for V̂ and the float ops around it)."""
    data = batches(K)
    for clip, wd in ((None, 0.0), (0.5, 0.1)):
        ours, theirs = tiny(), tiny()
        start = snapshot(ours)
        train(ours, data, config(lr=0.02, max_grad_norm=clip, weight_decay=wd), step=AdaLomoStep(), progress=False)
        ref = BackpropStep(lambda g, c: AdaLomoReference(g, lr=c.lr, weight_decay=c.weight_decay))
        train(theirs, data, config(lr=0.02, max_grad_norm=clip, weight_decay=wd), step=ref, progress=False)
        assert moved(ours, start) == len(start)
        assert max_diff(ours, theirs) < 1e-6, (clip, wd, max_diff(ours, theirs))
    other = tiny()                                            # another decay rate does not match
    train(other, data, config(lr=0.02, max_grad_norm=0.5, weight_decay=0.1), step=AdaLomoStep(decay_rate=-0.5),
          progress=False)
    assert max_diff(other, theirs) > 1e-4


def test_adalomo_second_moment_is_adafactors():
    """With no clipping AdaLomo is Adafactor without a first moment (beta1=None, scale_parameter,
    no relative step): same row/column EMAs and vector EMAs, same parameters; tolerance 1e-6 relative
    on the parameters, 1e-5 on the states (the two round ``p - lr u`` differently, and the step-2 and
    step-3 gradients are taken at those slightly different weights)."""
    data = batches(K)
    ours, theirs = tiny(), tiny()
    step = AdaLomoStep()
    train(ours, data, config(lr=0.02, max_grad_norm=None, weight_decay=0.1), step=step, progress=False)
    make = lambda g, c: Adafactor(g, lr=c.lr, beta1=None, weight_decay=c.weight_decay, scale_parameter=True,  # noqa: E731
                                  relative_step=False, warmup_init=False)
    ref = BackpropStep(make)
    train(theirs, data, config(lr=0.02, max_grad_norm=None, weight_decay=0.1), step=ref, progress=False)
    assert max_diff(ours, theirs) < 1e-6
    for name, p in theirs.named_parameters():
        s, a = step.state[name], ref.optimizer.state[p]
        pairs = [(s["row"], a["exp_avg_sq_row"]), (s["col"], a["exp_avg_sq_col"])] if p.dim() == 2 else \
            [(s["v"], a["exp_avg_sq"])]
        for x, y in pairs:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=0)
    m, n = ours.model.layers[0].mlp.down_proj.weight.shape    # the state of an m x n matrix is m + n floats
    assert step.state["model.layers.0.mlp.down_proj.weight"]["row"].numel() == m and \
        step.state["model.layers.0.mlp.down_proj.weight"]["col"].numel() == n


def test_adalomo_matches_lomo_optim_adalomo(monkeypatch):
    """lomo_optim.AdaLomo allocates its states with .cuda(); with that made the identity it runs on
    CPU unchanged and matches the fused step: K clipped steps with weight decay, bit-identical."""
    data = batches(K)
    ours, theirs = tiny(), tiny()
    train(ours, data, config(lr=0.02, max_grad_norm=0.5, weight_decay=0.1), step=AdaLomoStep(), progress=False)
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
        opt = AdaLomo(theirs, lr=0.02, clip_grad_norm=0.5, weight_decay=0.1)
    theirs.train()
    for b in data:
        loss = theirs(**b).loss
        opt.grad_norm(loss)
        opt.fused_backward(loss, 0.02)
    assert max_diff(ours, theirs) == 0.0


# --- bad input and failures
class WithNaN(nn.Module):
    """The tiny Llama with w = layer 0's down_proj (late in backward), w[0, 0] = 0, and a loss plus
    0 * sqrt(w[0, 0]): finite, and every gradient but w's is finite. Or, with ``raise_in_backward``,
    the plain loss and a hook that raises when backward reaches w."""

    def __init__(self, raise_in_backward=False):
        super().__init__()
        self.llama = tiny()
        self.raise_in_backward = raise_in_backward
        w = self.llama.model.layers[0].mlp.down_proj.weight
        with torch.no_grad():
            w[0, 0] = 0.0
        if raise_in_backward:
            w.register_hook(self.boom)

    @staticmethod
    def boom(grad):
        raise ValueError("boom")

    def forward(self, **batch):
        loss = self.llama(**batch).loss
        if not self.raise_in_backward:
            loss = loss + 0.0 * self.llama.model.layers[0].mlp.down_proj.weight[0, 0].sqrt()
        return {"loss": loss}


@pytest.mark.parametrize("make", [LomoStep, AdaLomoStep])
@pytest.mark.parametrize("case", ["frozen", "grad_accum", "float64", "precision", "max_grad_norm"])
def test_bad_input_fails_in_setup_and_changes_nothing(make, case):
    model = tiny(dtype=torch.float64 if case == "float64" else torch.float32)
    if case == "frozen":
        model.requires_grad_(False)
    start = snapshot(model)
    kw = {"grad_accum": dict(grad_accum=2), "precision": dict(precision="fp16"),
          "max_grad_norm": dict(max_grad_norm=0.0)}.get(case, {})
    match = {"frozen": "nothing to train", "grad_accum": "grad_accum=1, got 2: each gradient is applied and freed",
             "float64": "float32, bfloat16 or float16.*torch.float64", "precision": "precision must be",
             "max_grad_norm": "max_grad_norm must be > 0"}[case]
    step = make()
    with pytest.raises(ValueError, match=match):
        step.setup(model, config(**kw))
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


def test_bad_constructor_arguments():
    for bad in (dict(clip_grad_value=0.0), dict(init_scale=0.5), dict(scale_window=0)):
        with pytest.raises(ValueError):
            LomoStep(**bad)
    for bad in (dict(clip_threshold=0.0), dict(decay_rate=0.8), dict(eps=(1e-30,))):
        with pytest.raises(ValueError, match="clip_threshold > 0, decay_rate < 0"):
            AdaLomoStep(**bad)


@pytest.mark.parametrize("make", [LomoStep, AdaLomoStep])
def test_non_finite_gradient_with_a_norm_pass_updates_nothing(make):
    model = WithNaN()
    start = snapshot(model)
    with pytest.raises(FloatingPointError, match=r"non-finite gradient in \['llama.model.layers.0.mlp.down_proj"
                                                 r".weight'\]; no parameter was updated"):
        train(model, batches(1), config(max_grad_norm=1.0), step=make(), progress=False)
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    if make is LomoStep:                                      # the reference: every parameter turns NaN
        reference = WithNaN()
        opt = Lomo(reference, lr=0.05, clip_grad_norm=1.0)
        loss = reference(**batches(1)[0])["loss"]
        opt.grad_norm(loss)
        opt.fused_backward(loss, 0.05)
        assert all(torch.isnan(p).all() for p in reference.parameters())


@pytest.mark.parametrize("raise_in_backward", [False, True])
def test_failure_without_a_norm_pass_names_exactly_the_updated_parameters(raise_in_backward):
    """Without clipping there is one pass: a non-finite gradient (or an exception) stops the updates,
    and the error lists exactly the parameters that moved (those backward reached first)."""
    model = WithNaN(raise_in_backward)
    start = snapshot(model)
    error = RuntimeError if raise_in_backward else FloatingPointError
    step = LomoStep()
    with pytest.raises(error, match="parameters were already updated this step") as info:
        train(model, batches(1), config(max_grad_norm=None), step=step, progress=False)
    changed = sorted(n for n, p in model.named_parameters() if not torch.equal(p, start[n]))
    assert f"{len(changed)} of {len(start)} parameters were already updated this step: {step.updated}" in str(info.value)
    assert sorted(step.updated) == changed and 0 < len(changed) < len(start)
    assert "llama.lm_head.weight" in changed and "llama.model.embed_tokens.weight" not in changed
    assert all(p.grad is None for p in model.parameters())
    if raise_in_backward:
        assert isinstance(info.value.__cause__, ValueError)
    again = WithNaN(raise_in_backward)                        # with a norm pass: nothing moves
    start = snapshot(again)
    with pytest.raises(error, match="no parameter was updated"):
        train(again, batches(1), config(max_grad_norm=1.0), step=LomoStep(), progress=False)
    assert all(torch.equal(p, start[n]) for n, p in again.named_parameters())


def test_fp16_overflow_skips_the_step_and_halves_the_scale():
    """fp16 parameters: dynamic loss scaling. A scale that overflows fp16 skips the step, leaves the
    model untouched and halves the scale; with a scale that fits, the steps update (every matrix
    moves; the RMSNorm weights, 1.0 in fp16, may not: lr * g is below their rounding step)."""
    model = tiny(dtype=torch.float16)
    start = snapshot(model)
    step = LomoStep(init_scale=2.0 ** 40)
    history = train(model, batches(1), config(max_steps=1, max_grad_norm=None), step=step, progress=False)
    assert step.skipped_steps == 1 and step.scaler.scale == 2.0 ** 39 and history.grad_norm == [math.inf]
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())
    step = LomoStep(init_scale=2.0 ** 8)
    history = train(model, batches(2), config(max_steps=2, max_grad_norm=None), step=step, progress=False)
    assert step.skipped_steps == 0 and all(math.isfinite(g) for g in history.grad_norm)
    assert all(not torch.equal(p, start[n]) for n, p in model.named_parameters() if p.dim() == 2)
