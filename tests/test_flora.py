"""FLORA (Hao, Cao & Mou 2024) against flora-opt 0.0.3 on CPU: the optimizer (Adafactor + a first moment
compressed by resampled projections) and the compressed-accumulation step.

Tolerance: bit for bit (``torch.equal``) wherever ours is compared with flora-opt; ours uses the same
operations in the same order and regenerates the same projections from the same seeds.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flora_opt.optimizers.torch.flora import Flora as RefFlora
from flora_opt.optimizers.torch.flora import FloraAccelerator, stable_randn
from peft_from_scratch.optim.flora import (Flora, FloraAccumulationStep, down, has_compressed_moment, make_flora,
                                           next_seed, projection, split_seed, up)
from peft_from_scratch.training import BackpropStep, TrainConfig, lr_multiplier, train
from tests.helpers import one_thread, real_model  # noqa: F401  (one_thread: autouse)

VOCAB, SEQ = 64, 12
# Both orientations, a square one, a vector, a wide embedding-like matrix (ratio 18.75) and one whose
# shorter side is below the rank: with rank 4 the first three get a compressed moment, the rest not.
SHAPES = [(48, 96), (96, 48), (32, 32), (40,), (300, 16), (3, 40)]
COMPRESSED = [True, True, True, False, False, False]


def tiny(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def batches(n, size=2, seed=0):
    ids = torch.randint(0, VOCAB, (n * size, SEQ), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids.split(size)]


def same(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def run(optimizer_class, settings, steps=12, dtype=torch.float32):
    """Parameters of SHAPES after ``steps`` steps on fixed gradients (the same for every call)."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.05).to(dtype)) for s in SHAPES]
    start = [p.detach().clone() for p in params]
    opt = optimizer_class(params, **settings)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.step()
    return params, start, opt


BASE = dict(lr=1e-2, rank=4, kappa=5, beta1=0.9, seed=3)


@pytest.mark.parametrize("settings", [{}, {"weight_decay": 0.1}, {"scale_parameter": False}, {"beta1": None},
                                      {"rank": None}, {"dtype": torch.bfloat16}], ids=str)
def test_the_optimizer_equals_flora_opt_through_two_resamplings(settings):
    settings = dict(settings)
    dtype = settings.pop("dtype", torch.float32)
    ours, start, opt = run(Flora, {**BASE, **settings}, dtype=dtype)          # 12 steps, kappa 5: t = 5, 10
    theirs, _, ref = run(RefFlora, {**BASE, **settings}, dtype=dtype)
    for p, q, s, shape, compressed in zip(ours, theirs, start, SHAPES, COMPRESSED):
        assert torch.equal(p, q), f"{shape}: max |ours - flora-opt| = {(p - q).abs().max():.2e}"
        assert not torch.equal(p, s), f"{shape} did not move"
        for key, t in ref.state[q].items():             # the states too (flora-opt also keeps RMS(W))
            if torch.is_tensor(t) and key != "RMS":
                assert torch.equal(opt.state[p][key], t), f"{shape}: {key}"
        if compressed and settings.get("beta1", 0.9) and settings.get("rank", 4):
            assert opt.state[p]["exp_avg"].shape == ((4, shape[1]) if shape[0] < shape[1] else (shape[0], 4))
            assert opt.state[p]["seed"] == next_seed(next_seed(BASE["seed"] + 1 + SHAPES.index(shape)))


def test_another_seed_changes_exactly_the_compressed_matrices():
    ours, _, _ = run(Flora, BASE)
    other, _, _ = run(Flora, {**BASE, "seed": 4})
    kappa, _, _ = run(Flora, {**BASE, "kappa": 6})
    for p, q, k, shape, compressed in zip(ours, other, kappa, SHAPES, COMPRESSED):
        assert torch.equal(p, q) != compressed and torch.equal(p, k) != compressed, shape


def test_which_parameters_get_a_compressed_moment():
    for shape, rank, expected in [((64, 64), 8, True), ((64, 256), 8, True), ((256, 64), 8, True),
                                  ((64, 300), 8, False), ((8, 64), 8, False), ((16, 64), 8, True),
                                  ((7, 7), 8, False), ((64,), 8, False), ((4, 4, 4), 2, False), ((64, 64), None, False),
                                  ((49152, 576), 8, False),                          # SmolLM2's tied embedding
                                  ((576, 576), 8, True), ((192, 576), 8, True),      # q/o, k/v
                                  ((1536, 576), 8, True), ((576, 1536), 8, True)]:   # gate/up, down
        assert has_compressed_moment(shape, rank) == expected, (shape, rank)
        group = dict(rank=rank, beta1=0.9, factorize_second_moment=True)
        assert RefFlora._get_options(group, shape)[2] == expected, (shape, rank)
        assert Flora.options(group, shape) == RefFlora._get_options(group, shape)
    assert Flora.options(dict(rank=8, beta1=None, factorize_second_moment=True), (64, 64)) == (True, False, False)


def test_state_bytes_count_the_compressed_moment():
    ours, _, opt = run(Flora, BASE, steps=1)
    theirs, _, ref = run(RefFlora, BASE, steps=1)
    first = sum(4 * (4 * max(s) if c else math.prod(s)) for s, c in zip(SHAPES, COMPRESSED))
    second = sum(4 * (s[0] + s[1] if len(s) == 2 else s[0]) for s in SHAPES)
    assert opt.state_bytes() == {"first_moment": first, "second_moment": second, "total": first + second}
    ref_bytes = sum(t.numel() * t.element_size() for q in theirs for k, t in ref.state[q].items()
                    if torch.is_tensor(t) and k != "RMS")           # flora-opt also keeps RMS(W), 4 bytes each
    adamw = 2 * 4 * sum(math.prod(s) for s in SHAPES)
    assert opt.state_bytes()["total"] == ref_bytes < adamw / 3


def test_through_train_equals_flora_opt_driven_by_hand():
    config = TrainConfig(lr=1e-2, max_steps=6, warmup_ratio=0.2, max_grad_norm=0.5)   # warm-up, decay, clipping
    ours, theirs, data = tiny(), tiny(), batches(3)
    history = train(ours, data, config, step=BackpropStep(make_flora(rank=4, kappa=2)), progress=False)
    opt = RefFlora(theirs.parameters(), lr=1e-2, rank=4, kappa=2, beta1=0.9)
    warmup = math.ceil(0.2 * 6)
    for s in range(6):
        for group in opt.param_groups:
            group["lr"] = 1e-2 * lr_multiplier(s, 6, warmup)
        theirs(**data[s % 3]).loss.backward()
        torch.nn.utils.clip_grad_norm_(list(theirs.parameters()), 0.5)
        opt.step()
        opt.zero_grad()
    assert history.lr[0] == 0 and history.lr[2] == 1e-2
    assert same(ours, theirs) and not same(ours, tiny())


@pytest.fixture
def fresh_accelerate():
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def accumulate(step, k, data, steps=3, seed_model=0):
    model = tiny(seed_model)
    config = TrainConfig(lr=1e-2, max_steps=steps, grad_accum=k, warmup_ratio=0, schedule="constant",
                         max_grad_norm=None)
    history = train(model, data, config, step=step, progress=False)
    return model, history


def test_the_accumulation_step_equals_flora_accelerator(fresh_accelerate):
    data = batches(12)
    step = FloraAccumulationStep(rank=4, make_optimizer=make_flora(rank=4, kappa=2))
    ours, history = accumulate(step, 4, data)

    theirs = tiny()
    accelerator = FloraAccelerator(accumulation_compression_rank=4, gradient_accumulation_steps=4, cpu=True)
    theirs, opt = accelerator.prepare(theirs, RefFlora(theirs.parameters(), lr=1e-2, rank=4, kappa=2, beta1=0.9))
    theirs.train()
    for batch in data:                                  # 12 micro-batches: 3 optimizer steps
        with accelerator.accumulate(theirs):
            accelerator.backward(theirs(**batch).loss)
            opt.step()                                  # finds no gradients: the hooks have stepped
            opt.zero_grad()
    assert same(ours, theirs)
    assert list(step.seeds.values()) == list(accelerator.seeds.values())
    assert list(step.seeds.values())[0] == next_seed(next_seed(next_seed(0)))      # a new projection per step
    assert all(math.isfinite(n) and n > 0 for n in history.grad_norm)

    other, _ = accumulate(FloraAccumulationStep(rank=4, make_optimizer=make_flora(rank=4, kappa=2), seed=1), 4, data)
    plain, _ = accumulate(BackpropStep(make_flora(rank=4, kappa=2)), 4, data)
    assert not same(ours, other) and not same(ours, plain) and not same(ours, tiny())


def test_without_accumulation_the_step_is_flora_fused_and_nothing_is_compressed():
    data = batches(4)
    step = FloraAccumulationStep(rank=4, make_optimizer=make_flora(rank=4, kappa=2))
    fused, _ = accumulate(step, 1, data, steps=4)
    plain, _ = accumulate(BackpropStep(make_flora(rank=4, kappa=2)), 1, data, steps=4)
    assert step.seeds == {} and same(fused, plain) and not same(fused, tiny())


def test_the_buffers_hold_what_buffer_bytes_says():
    model, data, held = tiny(), batches(3), []
    step = FloraAccumulationStep(rank=4)
    step.setup(model, TrainConfig(grad_accum=3, max_grad_norm=None))

    def forward(batch):                                 # records the buffers before each micro-batch
        held.append(sum(b.numel() * b.element_size() for b in step.buffers.values()))
        return model(**batch).loss

    step(model, data, forward, 1.0)
    assert held[0] == 0 and held[1] == held[2] == step.buffer_bytes() < step.buffer_bytes(dense=True) / 3
    assert step.buffers == {} and all(p.grad is None for p in model.parameters())
    model(**data[0]).loss.backward()                    # outside a step the hooks leave gradients alone
    assert all(p.grad is not None for p in model.parameters())
    step.remove()
    assert step.handles == []


def test_one_compression_is_exact_only_in_expectation():
    g = torch.Generator().manual_seed(0)
    for shape, rank in [((12, 40), 16), ((40, 12), 12)]:         # rank >= the projected (shorter) side
        G = torch.randn(shape, generator=g)
        # our projection is flora-opt's: the same draws, the same down and up
        acc = SimpleNamespace(proj_rank=rank)
        P = projection(7, shape, rank, "cpu", torch.float32)
        assert torch.equal(P, stable_randn(P.shape, seed=7) / math.sqrt(rank))
        assert torch.equal(down(G, P), FloraAccelerator._down_project(acc, 7, G))
        assert torch.equal(up(down(G, P), P, shape), FloraAccelerator._up_project(acc, 7, G, down(G, P)))

        def rel(x):
            return float((x - G).norm() / G.norm())
        one = rel(up(down(G, P), P, shape))
        mean = sum(up(down(G, Q), Q, shape) for Q in (projection(s, shape, rank, "cpu", torch.float32)
                                                      for s in range(2000))) / 2000
        print(f"{shape}, rank {rank}: one compression rel. error {one:.2f}; mean of 2000 {rel(mean):.3f}")
        assert one > 0.3 and rel(mean) < 0.05 and rel(mean) < one / 10


def numerical_rank(x: torch.Tensor) -> int:
    s = torch.linalg.svdvals(x.double())
    return int((s > 1e-5 * s[0]).sum())


def test_lora_dynamics_one_projection_stays_rank_r_resampling_escapes_it():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(32, 32, generator=g) for _ in range(40)]
    # Algorithm 1's operator: sum_t up(down(G_t)) stays in one r-dimensional row space for a fixed seed
    fixed = sum(up(down(G, P), P, G.shape) for G in grads for P in [projection(0, G.shape, 2, "cpu", torch.float32)])
    seeds = [0]
    for _ in range(7):
        seeds.append(next_seed(seeds[-1]))
    moving = sum(up(down(G, P), P, G.shape) for t, G in enumerate(grads)
                 for P in [projection(seeds[t // 5], G.shape, 2, "cpu", torch.float32)])
    assert numerical_rank(fixed) == 2 and numerical_rank(moving) == 16      # 8 projections x rank 2

    # The optimizer: the decompressed momenta (the paper's update, Algorithm 2) add up to rank <= r with one
    # projection (kappa larger than the run), to more with resampling; flora-opt's own update also takes
    # the current u uncompressed, so its total change is full-rank either way.
    for kappa, expected in [(1000, 2), (5, 18)]:     # 40 steps, kappa 5: 9 projections
        W = torch.nn.Parameter(torch.randn(32, 32, generator=torch.Generator().manual_seed(1)) * 0.05)
        start, opt, total = W.detach().clone(), Flora([W], lr=1e-2, rank=2, kappa=kappa, beta1=0.9), 0
        for G in grads:
            W.grad = G.clone()
            opt.step()
            state = opt.state[W]
            P = projection(split_seed(state["seed"])[1], W.shape, 2, "cpu", torch.float32)   # 32 x 32: from the right
            total = total + up(state["exp_avg"], P, W.shape)
        assert numerical_rank(total) == expected and numerical_rank(W.detach() - start) == 32


def test_bad_settings_fail_and_leave_the_model_untouched():
    params = [torch.nn.Parameter(torch.zeros(4, 4))]
    for bad, match in [({"rank": 0}, "rank"), ({"rank": 2.5}, "rank"), ({"kappa": 0}, "kappa"),
                       ({"kappa": 1.5}, "kappa"), ({"beta1": 1.0}, "beta1"), ({"beta1": -0.1}, "beta1"),
                       ({"lr": -1.0}, "lr"), ({"decay_rate": 0.5}, "decay_rate"), ({"eps": (1e-30,)}, "eps"),
                       ({"clip_threshold": 0.0}, "clip_threshold"), ({"seed": 1.5}, "seed")]:
        with pytest.raises(ValueError, match=match):
            Flora(params, **bad)
        if "lr" not in bad:
            with pytest.raises(ValueError, match=match):
                make_flora(**{"rank": 8, **bad})
    with pytest.raises(TypeError, match="kapa"):
        make_flora(kapa=10)                             # a misspelt setting fails now, not at the first step
    with pytest.raises(ValueError, match="rank"):
        FloraAccumulationStep(rank=0)
    with pytest.raises(ValueError, match="seed"):
        FloraAccumulationStep(rank=4, seed="0")

    model, data = tiny(), batches(2)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="max_grad_norm=None"):
        train(model, data, TrainConfig(max_steps=1, grad_accum=2), step=FloraAccumulationStep(rank=4), progress=False)
    adamw = FloraAccumulationStep(rank=4, make_optimizer=lambda groups, config: torch.optim.AdamW(groups))
    with pytest.raises(ValueError, match="must return a Flora"):
        train(model, data, TrainConfig(max_steps=1, grad_accum=2, max_grad_norm=None), step=adamw, progress=False)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    model(**data[0]).loss.backward()                    # no hook was left behind to take the gradients
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.slow
def test_on_smollm2_weights_a_step_equals_flora_opt_and_the_tied_embedding_is_not_compressed():
    from peft_from_scratch.models import SMOLLM2
    model = real_model(SMOLLM2)
    embedding = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is embedding               # tied: one 49152 x 576 tensor
    layer = model.model.layers[0]
    named = {"embed": embedding, "q": layer.self_attn.q_proj.weight, "k": layer.self_attn.k_proj.weight,
             "up": layer.mlp.up_proj.weight, "down": layer.mlp.down_proj.weight, "norm": layer.input_layernorm.weight}
    ours = {n: torch.nn.Parameter(p.detach().clone()) for n, p in named.items()}
    theirs = {n: torch.nn.Parameter(p.detach().clone()) for n, p in named.items()}
    opts = [Flora(ours.values(), lr=1e-3, rank=8, kappa=1, beta1=0.9),          # kappa 1: resample at step 1
            RefFlora(theirs.values(), lr=1e-3, rank=8, kappa=1, beta1=0.9)]
    g = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(p.shape, generator=g) * 1e-3 for n, p in named.items()}   # synthetic, on real weights
    for params, opt in zip((ours, theirs), opts):
        for n, p in params.items():
            p.grad = grads[n].clone()
        opt.step()
    for n in named:                                     # the weights and the (compressed) momenta
        assert torch.equal(ours[n], theirs[n]) and not torch.equal(ours[n], named[n]), n
        assert torch.equal(opts[0].state[ours[n]]["exp_avg"], opts[1].state[theirs[n]]["exp_avg"]), n
    shapes = {n: tuple(opts[0].state[p]["exp_avg"].shape) for n, p in ours.items()}
    assert shapes == {"embed": (49152, 576), "q": (576, 8), "k": (8, 576), "up": (1536, 8), "down": (8, 1536),
                      "norm": (576,)}
