"""GaLore (optim/galore.py) against galore_torch.GaLoreAdamW, and the property that defines it.

Tolerance: bit-exact (``torch.equal``). Both optimizers call ``torch.linalg.svd`` on the same float32
gradient, so the singular vectors come out with the same signs, and the Adam arithmetic is done in
the same operations and order; nothing is left to rounding. The rank checks use
``matrix_rank(rtol=1e-4)``: the accumulated updates' nonzero singular values are >= 0.17 of the
largest, the float32 rounding of W_k - W_0 leaves < 5e-7 of it.
"""
from __future__ import annotations

import copy
import math
import re

import warnings

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from peft_from_scratch.models import SMOLLM2
from peft_from_scratch.optim.galore import GaLoreAdamW, make_galore
from peft_from_scratch.training import TrainConfig, lr_multiplier, train
from tests.helpers import one_thread, real_model  # noqa: F401  (one_thread: autouse)

with warnings.catch_warnings():     # galore_torch imports bitsandbytes, whose torch.jit use warns 14 times
    warnings.simplefilter("ignore", DeprecationWarning)
    from galore_torch import GaLoreAdamW as ReferenceGaLoreAdamW

VOCAB, SEQ = 64, 12


def tiny(seed=0):
    """Matrices of every kind: q/o_proj 32 x 32 (m = n), k/v_proj 16 x 32 and down_proj 32 x 64 (m < n),
    gate/up_proj 64 x 32 (m > n)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def batches(n, size=2, vocab=VOCAB, seq=SEQ, seed=0):
    ids = torch.randint(0, vocab, (n * size, seq), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids.split(size)]


def is_target(name):
    return name.endswith("_proj.weight")


def groups(model, rank=4, is_target=is_target, **settings):
    """By hand, as the reference's README: [plain AdamW params, GaLore matrices with their settings]."""
    named = list(model.named_parameters())
    settings = {"update_proj_gap": 2, "scale": 0.25, "proj_type": "std", **settings}
    return [{"params": [p for n, p in named if not is_target(n)]},
            {"params": [p for n, p in named if is_target(n)], "rank": rank, **settings}]


def reference(groups, **kw):
    return ReferenceGaLoreAdamW(groups, no_deprecation_warning=True, **kw)


def run(model, optimizer, data):
    for batch in data:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def assert_same(a, b, what):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{what}: {n} differs by {(p - q).abs().max().item():.3g}"


# ----------------------------------------------------------------------------- equal to the reference

@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_matches_galore_torch_after_every_step(proj_type):
    """T = 2, 5 steps: SVDs at steps 0, 2, 4; weight decay on; plain AdamW params beside."""
    ours_model, ref_model, start = tiny(), tiny(), tiny()
    kw = dict(lr=1e-2, weight_decay=0.1)
    ours = GaLoreAdamW(groups(ours_model, proj_type=proj_type), **kw)
    ref = reference(groups(ref_model, proj_type=proj_type), **kw)
    k_proj = dict(ours_model.named_parameters())["model.layers.0.self_attn.k_proj.weight"]
    projectors = []
    for step, batch in enumerate(batches(5)):
        run(ours_model, ours, [batch])
        run(ref_model, ref, [batch])
        assert_same(ours_model, ref_model, f"{proj_type}, after step {step}")
        projectors.append(ours.state[k_proj]["P"].clone())
    print(proj_type, "max |ours - reference| over 5 steps:", max_diff(ours_model, ref_model))
    # the subspace is kept for T = 2 steps, then a new SVD replaces it: k > T exercised the refresh
    assert torch.equal(projectors[0], projectors[1]) and not torch.equal(projectors[1], projectors[2])
    for (n, p), p0 in zip(ours_model.named_parameters(), start.parameters()):
        assert not torch.equal(p, p0), f"{n} did not move"

    # the sides the reference picks (std): left (P = U_r, m x r) for m < n, right (P = V_r^T, r x n) for m >= n
    if proj_type == "std":
        named = dict(ours_model.named_parameters())
        ref_named = dict(ref_model.named_parameters())
        for name, shape in [("self_attn.k_proj", (16, 4)), ("mlp.down_proj", (32, 4)),
                            ("mlp.gate_proj", (4, 32)), ("self_attn.q_proj", (4, 32))]:
            p = named[f"model.layers.1.{name}.weight"]
            assert tuple(ours.state[p]["P"].shape) == shape
            assert torch.equal(ours.state[p]["P"], ref.state[ref_named[f"model.layers.1.{name}.weight"]]
                               ["projector"].ortho_matrix)


@pytest.mark.parametrize("ours_settings,ref_settings", [
    ({"update_proj_gap": 3}, {"update_proj_gap": 2}),        # a different T
    ({"scale": 0.5}, {"scale": 0.25}),                       # a different alpha
    ({"proj_type": "reverse_std"}, {"proj_type": "std"}),    # the other side
])
def test_a_different_setting_does_not_match(ours_settings, ref_settings):
    ours_model, ref_model = tiny(), tiny()
    ours = GaLoreAdamW(groups(ours_model, **ours_settings), lr=1e-2)
    ref = reference(groups(ref_model, **ref_settings), lr=1e-2)
    data = batches(4)
    run(ours_model, ours, data)
    run(ref_model, ref, data)
    assert max_diff(ours_model, ref_model) > 1e-4


def test_train_loop_with_make_galore_matches_the_reference_driven_by_hand():
    """train() with BackpropStep(make_galore): warm-up + linear decay, clipping, weight decay; the
    reference gets the same lr per step, the same clipping and the same batches."""
    config = TrainConfig(lr=1e-2, max_steps=5, warmup_ratio=0.2, max_grad_norm=1.0, weight_decay=0.01, eps=1e-6)
    data = batches(5)
    ours_model, ref_model, start = tiny(), tiny(), tiny()
    make = make_galore(ours_model, rank=4, update_proj_gap=2, scale=0.25)      # "all-linear": the 14 *_proj
    history = train(ours_model, data, config, make_optimizer=make, progress=False)

    ref_groups = groups(ref_model)
    ref = reference(ref_groups, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)
    params = [p for g in ref_groups for p in g["params"]]
    base, warmup, losses = [g["lr"] for g in ref.param_groups], math.ceil(0.2 * 5), []
    ref_model.train()
    for s, batch in enumerate(data):
        for group, lr in zip(ref.param_groups, base):
            group["lr"] = lr * lr_multiplier(s, 5, warmup, "linear")
        loss = ref_model(**batch).loss
        loss.backward()
        losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        ref.step()
        ref.zero_grad(set_to_none=True)
    assert history.loss == losses
    assert_same(ours_model, ref_model, "train() vs the reference by hand")
    assert max_diff(ours_model, start) > 1e-3
    print("train() vs reference: max |diff|", max_diff(ours_model, ref_model))


# ----------------------------------------------------------------------------- the low-rank property

def deltas(model, start):
    return {n: (p - dict(start.named_parameters())[n]).detach() for n, p in model.named_parameters() if is_target(n)}


def test_the_update_has_rank_at_most_r_within_a_period_and_more_across_a_refresh():
    r, T = 2, 3
    model, start = tiny(), tiny()
    optimizer = GaLoreAdamW(groups(model, rank=r, update_proj_gap=T), lr=1e-2)   # no weight decay: it is full rank
    data = batches(2 * T)
    run(model, optimizer, data[:T])                               # steps 0..T-1: one subspace
    within = {n: int(torch.linalg.matrix_rank(d, rtol=1e-4)) for n, d in deltas(model, start).items()}
    assert all(1 <= rank <= r for rank in within.values()), within

    plain, plain_start = tiny(), tiny()                           # the same T steps of AdamW: full rank
    run(plain, GaLoreAdamW(plain.parameters(), lr=1e-2), data[:T])
    assert all(torch.linalg.matrix_rank(d, rtol=1e-4) > r for d in deltas(plain, plain_start).values())

    run(model, optimizer, data[T:])                               # step T: a new SVD, a new subspace
    across = {n: int(torch.linalg.matrix_rank(d, rtol=1e-4)) for n, d in deltas(model, start).items()}
    assert all(r < rank <= 2 * r for rank in across.values()), across


# ----------------------------------------------------------------------------- memory

@pytest.mark.parametrize("compact", [False, True])
def test_state_bytes_are_the_projected_moments_and_the_projectors(compact):
    """What the state holds: the reference's P is a slice of the SVD factor (min(m, n)^2 floats stay
    alive); the compact P holds its r x min(m, n) floats and nothing else."""
    torch.manual_seed(0)
    wide, tall = nn.Parameter(torch.randn(12, 40)), nn.Parameter(torch.randn(40, 12))
    bias = nn.Parameter(torch.zeros(7))
    r = 3
    optimizer = GaLoreAdamW([{"params": [bias]}, {"params": [wide, tall], "rank": r}], compact_projector=compact)
    assert optimizer.state_bytes()["total"] == 0                  # the state is built at the first step
    loss = (wide @ tall).square().sum() + bias.sum()
    loss.backward()
    optimizer.step()
    f32 = 4
    # wide 12 x 40 (m < n): M, V are r x 40, P is 12 x r; tall 40 x 12 (m >= n): M, V are 40 x r, P is r x 12
    moments = 2 * (r * 40 + 40 * r) * f32 + 2 * 7 * f32
    projectors = (12 * r + r * 12) * f32 if compact else (12 * 12 + 12 * 12) * f32   # U 12 x 12, V^T 12 x 12
    adamw = 2 * (12 * 40 + 40 * 12 + 7) * f32
    assert optimizer.state_bytes() == {"moments": moments, "projectors": projectors, "total": moments + projectors,
                                       "adamw": adamw}
    torch_adamw = torch.optim.AdamW([wide, tall, bias])
    torch_adamw.step()
    assert sum(s["exp_avg"].nbytes + s["exp_avg_sq"].nbytes for s in torch_adamw.state.values()) == adamw


def test_compact_projector_changes_only_the_last_bits():
    """compact_projector copies P out of the SVD factor: the same subspace and updates, other memory
    layout, so the matmuls may round differently (never by more than a few float32 ulps here)."""
    torch.manual_seed(0)
    data = batches(4)
    models = [tiny(), tiny()]
    for model, compact in zip(models, (False, True)):
        train(model, data, TrainConfig(lr=1e-2, max_steps=4, warmup_ratio=0.0, eps=1e-6), progress=False,
              make_optimizer=make_galore(model, rank=4, update_proj_gap=2, compact_projector=compact))
    for (n, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), f"{n} differs by {(p - q).abs().max().item():.3g}"


# ----------------------------------------------------------------------------- bad input

def untouched(model):
    saved = copy.deepcopy(model.state_dict())
    flags = [p.requires_grad for p in model.parameters()]

    def check():
        assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
        assert [p.requires_grad for p in model.parameters()] == flags
        assert all(p.grad is None for p in model.parameters())
    return check


@pytest.mark.parametrize("settings,message", [
    ({"rank": 0}, "rank must be an integer >= 1, got 0"),
    ({"rank": 17}, r"rank 17 is larger than the smaller side of model.layers.0.self_attn.k_proj.weight "
                   r"\(shape 16 x 32\); GaLore needs rank <= 16"),
    ({"rank": 4, "update_proj_gap": 0}, "update_proj_gap .* must be an integer >= 1, got 0"),
    ({"rank": 4, "proj_type": "svd"}, "proj_type must be one of .*'std'.*, got 'svd'"),
    ({"rank": 4, "scale": -1.0}, r"scale \(alpha\) must be a positive number, got -1.0"),
    ({"rank": 4, "target_modules": ["qkv"]}, "target_modules \\['qkv'\\] matched no module"),
])
def test_make_galore_rejects_bad_settings_and_leaves_the_model_alone(settings, message):
    model = tiny()
    check = untouched(model)
    with pytest.raises(ValueError, match=message):
        make_galore(model, **settings)
    check()


def test_the_optimizer_rejects_bad_groups_and_builds_nothing():
    model = tiny()
    check = untouched(model)
    named = dict(model.named_parameters())
    k_proj, norm = "model.layers.0.self_attn.k_proj.weight", "model.norm.weight"
    bad = [({"params": [(k_proj, named[k_proj])], "rank": 17},
            f"larger than the smaller side of {k_proj} .shape 16 x 32."),
           ({"params": [named[k_proj]], "rank": 17}, r"params\[0\] of group 0 \(shape 16 x 32\)"),
           ({"params": [(norm, named[norm])], "rank": 2}, f"GaLore projects matrices; {norm} has shape .32,."),
           ({"params": [named[k_proj]], "rank": 2.5}, "rank must be an integer"),
           ({"params": [named[k_proj]], "rank": 2, "proj_type": "random"}, "proj_type must be one of")]
    for group, message in bad:
        with pytest.raises(ValueError, match=message):
            GaLoreAdamW([group])
    # through train(): setup fails before any step, and the model is as it was
    with pytest.raises(ValueError, match="larger than the smaller side"):
        train(model, batches(1), TrainConfig(max_steps=1), params=[{"params": [named[k_proj]], "rank": 17}],
              make_optimizer=lambda g, c: GaLoreAdamW(g, lr=c.lr), progress=False)
    check()


# ----------------------------------------------------------------------------- the real model

@pytest.mark.slow
def test_matches_galore_torch_on_smollm2():
    """SmolLM2-135M with its first and last blocks trained: GaLore (r = 16, T = 2) on the seven
    matrices of block 0 (576 x 576, 192 x 576, 1536 x 576, 576 x 1536), AdamW on the rest of both
    blocks; 2 steps through train() against the reference by hand, bit-exact."""
    blocks, target = r"model\.layers\.(0|29)\..*", r"model\.layers\.0\.(self_attn|mlp)\.\w+_proj"
    ours_model, ref_model = real_model(SMOLLM2), real_model(SMOLLM2)
    for model in (ours_model, ref_model):
        for n, p in model.named_parameters():
            p.requires_grad_(re.fullmatch(blocks, n) is not None)
    trained = [n for n, p in ours_model.named_parameters() if p.requires_grad]
    start = [p.detach().clone() for p in ours_model.parameters() if p.requires_grad]
    config = TrainConfig(lr=1e-4, max_steps=2, warmup_ratio=0, schedule="constant", max_grad_norm=None, eps=1e-6)
    data = batches(2, size=1, vocab=49152, seq=16)
    make = make_galore(ours_model, rank=16, update_proj_gap=2, target_modules=target)
    train(ours_model, data, config, make_optimizer=make, progress=False)

    named = dict(ref_model.named_parameters())
    ref = reference([{"params": [named[n] for n in trained if not re.fullmatch(target + r"\.weight", n)]},
                     {"params": [named[n] for n in trained if re.fullmatch(target + r"\.weight", n)], "rank": 16,
                      "update_proj_gap": 2, "scale": 0.25, "proj_type": "std"}], lr=config.lr, eps=config.eps)
    assert [len(g["params"]) for g in ref.param_groups] == [11, 7]
    ref_model.train()
    run(ref_model, ref, data)
    assert_same(ours_model, ref_model, "SmolLM2")
    moved = [not torch.equal(p, s) for p, s in zip([p for p in ours_model.parameters() if p.requires_grad], start)]
    assert all(moved), f"{moved.count(False)} trained tensors did not move"
