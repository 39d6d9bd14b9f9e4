"""MeZO (``optim.mezo.MeZOStep``) against a plain re-derivation of the official algorithm.

There is no maintained MeZO package. The reference is ``official_mezo`` below: Algorithm 1 of Malladi et
al. (2023) written the way princeton-nlp/MeZO's ``large_models/trainer.py`` computes it (``zo_step``, then
``zo_update``). It resets the global generator with ``torch.manual_seed(s)``, makes one ``torch.normal``
per trainable parameter in ``named_parameters`` order, updates ``.data`` out of place with the same
float expressions, and applies the official no-decay rule by name. It replays the seeds our step drew
(``MeZOStep.seeds``); ``test_seeds_come_from_the_training_seed`` shows how those seeds are drawn.

Tolerances (float32): ours equals the reference exactly (``torch.equal``, max difference 0.0) for
full-parameter training, on LoRA, with weight decay and with micro-batches. Two things are not exact.
The n > 1 average has no official counterpart and is held to rtol 1e-6, atol 1e-9 (measured max
2.4e-7, two ulps of the norm weights' 1.0). The perturb-perturb-restore drift is measured in
``test_two_perturbations_restore_theta_up_to_rounding``.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from peft_from_scratch import core
from peft_from_scratch.core import registry
from peft_from_scratch.models import SMOLLM2
from peft_from_scratch.optim.mezo import OFFICIAL_NO_DECAY, MeZOStep, official_mezo
from peft_from_scratch.reparameterized.lora import LoRAConfig
from peft_from_scratch.training import TrainConfig, train
from tests.helpers import one_thread, real_model  # noqa: F401  (one_thread: autouse)
from tests.helpers import batches as real_batches

VOCAB, SEQ, EPS, LR = 64, 12, 1e-3, 1e-3


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        **overrides))


def tiny_lora(seed=0):
    model = tiny(seed)   # add_adapter draws A from the generator tiny() just seeded: the same A every call
    return core.add_adapter(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))


def batches(n, size=2, seed=0):
    ids = torch.randint(0, VOCAB, (n * size, SEQ), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids.split(size)]


def config(**kw):
    return TrainConfig(**{"lr": LR, "warmup_ratio": 0.0, "schedule": "constant", **kw})


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def moved(model, start) -> bool:
    return any(not torch.equal(p, start[n]) for n, p in model.named_parameters())


# ----------------------------------------------------------------------------- the official algorithm

@pytest.mark.parametrize("make", [tiny, tiny_lora], ids=["full", "lora"])
def test_equals_the_official_algorithm_bit_for_bit(make):
    ours, theirs, data, steps = make(), make(), batches(3), 6
    assert max_diff(ours, theirs) == 0.0
    start = {n: p.detach().clone() for n, p in ours.named_parameters()}
    step = MeZOStep(eps=EPS)
    history = train(ours, data, config(max_steps=steps), step=step, progress=False)
    ref = official_mezo(theirs, step.seeds, [[data[t % 3]] for t in range(steps)], LR, EPS)

    print(make.__name__, "max |ours - official| =", max_diff(ours, theirs))
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), theirs.parameters()))
    assert step.projected_grads == [g for _, _, g in ref]
    assert history.grad_norm == [abs(g) for _, _, g in ref]                       # |projected_grad|
    assert history.loss == [(torch.tensor(lp) + torch.tensor(lm)).div(2).item() for lp, lm, _ in ref]
    assert moved(ours, start) and all(p.grad is None for p in ours.parameters())

    other = make()                                    # other seeds: not the same run
    official_mezo(other, [s + 1 for s in step.seeds], [[data[t % 3]] for t in range(steps)], LR, EPS)
    assert max_diff(other, ours) > 1e-5


def test_only_the_trainable_parameters_are_perturbed_and_updated():
    model = tiny_lora()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    seen = []

    def forward(batch):                               # every forward sees the frozen base unchanged
        seen.append(all(torch.equal(model.get_parameter(n), start[n]) for n in frozen))
        return model(**batch).loss

    step = MeZOStep(eps=1e-2)
    step.setup(model, config())
    for b in batches(4):
        step(model, [b], forward, 1.0)
    assert len(seen) == 8 and all(seen)
    assert frozen and all(torch.equal(model.get_parameter(n), start[n]) for n in frozen)
    adapter = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {n for n in adapter if not torch.equal(model.get_parameter(n), start[n])} == set(adapter)


def test_weight_decay_skips_biases_and_norms():
    data = batches(2)
    ours, theirs = tiny(), tiny()
    step = MeZOStep(eps=EPS, no_decay=OFFICIAL_NO_DECAY)                           # the official name rule
    train(ours, data, config(max_steps=4, weight_decay=0.1), step=step, progress=False)
    official_mezo(theirs, step.seeds, [[data[t % 2]] for t in range(4)], LR, EPS, weight_decay=0.1)
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), theirs.parameters()))

    # Our default also spares Llama's final "model.norm", which the official (OPT) rule decays: after
    # one step the two differ there, and only there, by the decay term lr · λ · θ.
    default, official, step = tiny(), tiny(), MeZOStep(eps=EPS)
    train(default, data, config(max_steps=1, weight_decay=0.1), step=step, progress=False)
    official_mezo(official, step.seeds, [data[:1]], LR, EPS, weight_decay=0.1)
    differ = {n for (n, p), q in zip(default.named_parameters(), official.parameters()) if not torch.equal(p, q)}
    assert differ == {"model.norm.weight"}
    gap = default.model.norm.weight - official.model.norm.weight
    # (the gap, 1e-4, is the difference of two numbers near 1: it is known to one ulp of 1, 1.2e-7)
    torch.testing.assert_close(gap, LR * 0.1 * tiny().model.norm.weight, rtol=0, atol=2.5e-7)


def test_micro_batches_average_their_losses_with_one_z():
    data = batches(4)
    ours, theirs = tiny(), tiny()
    step = MeZOStep(eps=EPS)
    history = train(ours, data, config(max_steps=2, grad_accum=2), step=step, progress=False)
    ref = official_mezo(theirs, step.seeds, [data[0:2], data[2:4]], LR, EPS)
    assert len(step.seeds) == 2                        # one z per optimizer step, not per micro-batch
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), theirs.parameters()))
    assert history.grad_norm == [abs(g) for _, _, g in ref]


def test_n_directions_average_n_estimates_at_the_same_theta():
    data, n = batches(1), 3
    ours, expected = tiny(), tiny()
    step = MeZOStep(eps=EPS, n=n)
    step.setup(ours, config())
    result = step(ours, data, lambda b: ours(**b).loss, 1.0)
    assert len(step.seeds) == n and len(set(step.seeds)) == n

    # Each estimate is the official one at the start θ; the update is θ − lr · mean_j(g_j z_j).
    # (replayed in sequence with lr 0, so that each sees the same restore drift as ours: see below)
    grads = [g for _, _, g in official_mezo(tiny(), step.seeds, [data] * n, 0.0, EPS)]
    assert step.projected_grads == grads
    assert result.grad_norm == pytest.approx(sum(abs(g) for g in grads) / n, rel=1e-12)
    with torch.no_grad():
        helper = MeZOStep(eps=EPS)
        helper.setup(expected, config())
        mean_update = {name: torch.zeros_like(p) for name, p in expected.named_parameters()}
        for s, g in zip(step.seeds, grads):
            for name, _, z in helper.directions(s):
                mean_update[name] += g * z / n
        for name, p in expected.named_parameters():
            p -= LR * mean_update[name]
    # Not bit-exact: ours applies the n updates one after another, after n restore drifts (see below).
    print("n=3: max |ours - (θ − lr · mean(g z))| =", max_diff(ours, expected))
    for p, q in zip(ours.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9)
    assert max_diff(ours, tiny()) > 1e-5


# ----------------------------------------------------------------------------- the seed trick

def test_the_seed_regenerates_the_z_that_perturbed_theta():
    model = tiny()
    step = MeZOStep(eps=EPS)
    step.setup(model, config())
    theta0 = [p.detach().clone() for p in model.parameters()]
    seen = []

    def forward(batch):
        seen.append([p.detach().clone() for p in model.parameters()])
        return model(**batch).loss

    step(model, batches(1), forward, 1.0)
    seed, g = step.seeds[0], step.projected_grads[0]
    z = [z for _, _, z in step.directions(seed)]
    assert all(torch.equal(a, b) for a, b in zip(z, [z for _, _, z in step.directions(seed)]))
    torch.manual_seed(seed)                            # the official generation gives the same numbers
    assert all(torch.equal(zi, torch.normal(mean=0, std=1, size=zi.shape)) for zi in z)
    assert not any(torch.equal(a, b) for a, b in zip(z, [z for _, _, z in step.directions(seed + 1)]))

    plus, minus = seen                                  # θ + εz, then θ − εz: built from this very z
    assert all(torch.equal(tp, t + zi * EPS) for tp, t, zi in zip(plus, theta0, z))
    assert all(torch.equal(tm, tp + zi * (-2 * EPS)) for tm, tp, zi in zip(minus, plus, z))
    restored = [tm + zi * EPS for tm, zi in zip(minus, z)]
    assert all(torch.equal(p, t - LR * (g * zi)) for p, t, zi in zip(model.parameters(), restored, z))


def test_seeds_come_from_the_training_seed():
    def run(seed):
        model, step = tiny(), MeZOStep(eps=EPS)
        train(model, batches(2), config(max_steps=3, seed=seed), step=step, progress=False)
        return model, step.seeds

    (a, seeds_a), (b, seeds_b), (c, seeds_c) = run(0), run(0), run(1)
    source = torch.Generator().manual_seed(0)
    assert seeds_a == [int(torch.randint(0, 10**9, (1,), generator=source)) for _ in range(3)]
    assert seeds_a == seeds_b and max_diff(a, b) == 0.0          # a run is deterministic
    assert seeds_c != seeds_a and max_diff(a, c) > 1e-5


def test_two_perturbations_restore_theta_up_to_rounding():
    """θ + εz − 2εz + εz rounds three times, each time by at most u = 2⁻²⁴ (float32) times the number
    rounded, so θ comes back to within 3u (|θ| + 2ε|z|) per entry. Measured on this tiny Llama
    (ε = 1e-3, one step with lr 0): 54.6% of the entries come back bit for bit, the worst is off by
    2.0 u (|θ| + 2ε|z|), and the largest |Δθ| is 1.2e-7, one ulp of the norm weights' 1.0. The
    logits then differ by at most 9e-8. Not restoring at all would leave an error of ε|z|, about 1e-3."""
    model, data = tiny(), batches(1)
    step = MeZOStep(eps=EPS)
    step.setup(model, config(lr=0.0))
    theta0 = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        logits0 = model.eval()(**data[0]).logits
    step(model, data, lambda b: model(**b).loss, 1.0)
    z = [z for _, _, z in step.directions(step.seeds[0])]
    u = 2.0 ** -24
    exact = sum(int((p == t).sum()) for p, t in zip(model.parameters(), theta0)) / sum(t.numel() for t in theta0)
    units = max(((p - t).abs() / (u * (t.abs() + 2 * EPS * zi.abs()))).max().item()
                for p, t, zi in zip(model.parameters(), theta0, z))
    absolute = max((p - t).abs().max().item() for p, t in zip(model.parameters(), theta0))
    with torch.no_grad():
        logits = model(**data[0]).logits
    print(f"restore: {exact:.1%} bit-exact, max {units:.2f} u(|θ| + 2ε|z|), max |Δθ| {absolute:.2e}, "
          f"max |Δlogits| {(logits - logits0).abs().max().item():.2e}")
    assert units <= 3.0 and absolute <= 2.5e-7 and 0.3 < exact < 1.0
    torch.testing.assert_close(logits, logits0, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- the estimate and training

class MLP(nn.Module):
    """A 2-layer float64 regression network, small enough to average many estimates quickly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()

    def forward(self, x, y):
        return {"loss": ((self.net(x) - y) ** 2).mean()}


def test_the_estimate_is_unbiased():
    """mean_i g_i z_i over N seeds → ∇L: its relative error falls like sqrt(d / N) (here d = 21)."""
    model, gen = MLP(), torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    batch = {"x": x, "y": torch.sin(x.sum(1, keepdim=True))}
    model(**batch)["loss"].backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)

    step = MeZOStep(eps=1e-4)
    step.setup(model, config(lr=0.0, seed=0))
    total, errors, wrong = torch.zeros_like(grad), {}, torch.zeros_like(grad)
    for i in range(1, 2001):
        step(model, [batch], lambda b: model(**b)["loss"], 1.0)
        z = torch.cat([z.flatten() for _, _, z in step.directions(step.seeds[-1])])
        total += step.projected_grads[-1] * z
        if i in (100, 2000):
            errors[i] = ((total / i - grad).norm() / grad.norm()).item()
        if i <= 100:                                  # a z the estimate was not made with: no signal
            wrong += step.projected_grads[-1] * torch.cat([z.flatten() for _, _, z in step.directions(i)])
    mean = total / 2000
    cosine = torch.nn.functional.cosine_similarity(mean, grad, dim=0).item()
    cosine_wrong = torch.nn.functional.cosine_similarity(wrong, grad, dim=0).item()
    print(f"unbiased: cosine {cosine:.4f}, relative error {errors}, cosine with unrelated z {cosine_wrong:.3f}")
    assert cosine > 0.9 and errors[2000] < 0.25 and errors[2000] < errors[100] / 2
    assert abs(cosine_wrong) < 0.5
    assert all(p.grad is None for p in model.parameters())


def test_train_lowers_the_loss_on_an_easy_task():
    """Memorize one batch, full-parameter, 150 steps: MeZO is slow but the loss clearly falls."""
    model = tiny()
    history = train(model, batches(1), config(lr=3e-3, max_steps=150), step=MeZOStep(eps=EPS), progress=False)
    first, last = sum(history.loss[:10]) / 10, sum(history.loss[-10:]) / 10
    print(f"loss {first:.3f} -> {last:.3f}")
    assert last < first - 0.3 and all(math.isfinite(v) for v in history.loss)
    assert model.training                              # train() left it in train mode, and we restored it


def test_forward_passes_run_in_eval_mode_and_the_modes_come_back():
    model = tiny(attention_dropout=0.5).train()
    model.model.layers[0].eval()                       # a mixed state must come back as it was
    before = [m.training for m in model.modules()]
    modes = []

    def forward(batch):
        modes.append(any(m.training for m in model.modules()))
        return model(**batch).loss

    step = MeZOStep(eps=EPS)
    step.setup(model, config())
    step(model, batches(1), forward, 1.0)
    assert modes == [False, False] and [m.training for m in model.modules()] == before


@pytest.mark.slow
def test_lora_on_smollm2_moves_the_adapter_only():
    model = core.add_adapter(real_model(SMOLLM2), LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    history = train(model, real_batches(2, vocab=49152, shape=(1, 16)), config(lr=1e-3, max_steps=2),
                    step=MeZOStep(eps=1e-2), progress=False)
    assert all(math.isfinite(v) and v > 0 for v in history.loss + history.grad_norm)
    assert all(torch.equal(model.get_parameter(n), v) for n, v in frozen.items())
    assert any(not torch.equal(model.get_parameter(n), v) for n, v in adapter.items())


# ----------------------------------------------------------------------------- registry and bad input

def test_registered_as_a_step():
    method = registry.get("mezo")
    assert method.obj is MeZOStep and method.kind == "step" and method.family == "optimizers"
    assert method.paper == "malladi2023finetuning"


@pytest.mark.parametrize("kwargs,match", [
    (dict(eps=0.0), "eps"), (dict(eps=-1e-3), "eps"), (dict(eps=float("nan")), "eps"),
    (dict(eps=float("inf")), "eps"), (dict(eps="1e-3"), "eps"),
    (dict(n=0), "n "), (dict(n=1.5), "n "), (dict(no_decay="bias"), "no_decay"), (dict(no_decay=None), "no_decay"),
])
def test_bad_settings_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MeZOStep(**kwargs)


def test_nothing_to_train_fails_and_leaves_the_model_untouched():
    model = tiny().requires_grad_(False).train()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="nothing to train"):
        train(model, batches(1), config(max_steps=1), step=MeZOStep(), progress=False)
    assert all(torch.equal(p, start[n]) and not p.requires_grad for n, p in model.named_parameters())
    assert model.training
    with pytest.raises(RuntimeError, match="setup"):
        MeZOStep()(model, batches(1), lambda b: model(**b).loss, 1.0)
