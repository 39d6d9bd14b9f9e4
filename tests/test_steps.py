"""The training-step protocol: the default step is the old loop bit for bit, and steps of other
shapes (a masked-gradient step; an update inside backward hooks; forward passes only) run through
the same ``train()`` without changing it."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peft_from_scratch.selective import MaskedGradientStep
from peft_from_scratch.training import BackpropStep, Step, StepResult, TrainConfig, lr_multiplier, train

VOCAB, SEQ = 64, 12


def tiny(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def batches(n, size=2, seed=0):
    ids = torch.randint(0, VOCAB, (n * size, SEQ), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids.split(size)]


def loss_of(model, batch):
    return model(**batch).loss


def reference_loop(model, loader, config):
    """The loop as it was before steps were pluggable: LambdaLR, AdamW, clipping, grad accumulation."""
    torch.manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": params}], lr=config.lr, betas=config.betas, eps=config.eps,
                            weight_decay=config.weight_decay)
    total = config.max_steps
    warmup = math.ceil(config.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, total, warmup, config.schedule))
    stream = iter(loader * total)
    losses, lrs, norms = [], [], []
    model.train()
    for _ in range(total):
        loss_sum = torch.zeros(())
        for _ in range(config.grad_accum):
            loss = loss_of(model, next(stream))
            (loss / config.grad_accum).backward()
            loss_sum += loss.detach().float()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)))
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss_sum.item() / config.grad_accum)
    return losses, lrs, norms


def test_default_step_is_the_old_loop_bit_for_bit():
    config = TrainConfig(lr=3e-3, max_steps=6, grad_accum=3, warmup_ratio=0.34, max_grad_norm=0.5, weight_decay=0.01)
    a, b = tiny(), tiny()
    data = batches(5)
    history = train(a, data, config, progress=False)
    losses, lrs, norms = reference_loop(b, data, config)
    assert history.loss == losses and history.lr == lrs and history.grad_norm == norms
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_a_step_is_given_alone_or_params_go_to_it():
    with pytest.raises(ValueError, match="pass params and make_optimizer to the step"):
        train(tiny(), batches(1), TrainConfig(max_steps=1), params=[], step=BackpropStep(), progress=False)
    frozen = tiny().requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        train(frozen, batches(1), TrainConfig(max_steps=1), progress=False)


def test_masked_gradient_step_scores_then_trains_only_the_mask():
    model, data = tiny(), batches(3)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    step = MaskedGradientStep(burn_in=2, density=0.1)
    history = train(model, data, TrainConfig(lr=1e-2, max_steps=5, warmup_ratio=0, max_grad_norm=None), step=step,
                    progress=False)
    assert history.lr[:2] == [0.0, 0.0] and all(lr > 0 for lr in history.lr[2:])

    # The scores are the mean squared gradient over the two burn-in steps, taken at the start weights.
    probe = tiny()
    expected = {n: torch.zeros_like(p) for n, p in probe.named_parameters()}
    for b in data[:2]:
        probe.zero_grad()
        loss_of(probe.train(), b).backward()
        for n, p in probe.named_parameters():
            expected[n] += p.grad ** 2 / 2
    for n, s in step.collector.mean_squares().items():
        torch.testing.assert_close(s, expected[n], rtol=1e-5, atol=1e-12)

    for n, p in model.named_parameters():
        mask = step.masks[n]
        assert int(mask.sum()) == math.floor(0.1 * p.numel() + 1e-6)
        moved = p.detach() != start[n]
        assert not (moved & ~mask).any(), f"{n}: an entry outside the mask moved"
    assert any(((p.detach() != start[n]) & step.masks[n]).any() for n, p in model.named_parameters())


def test_masked_gradient_step_rejects_bad_settings():
    with pytest.raises(ValueError, match="burn_in"):
        MaskedGradientStep(burn_in=0, density=0.1)
    with pytest.raises(ValueError, match="density"):
        MaskedGradientStep(burn_in=1, density=1.5)


class HookSGDStep(Step):
    """LOMO's shape: SGD applied inside the backward pass, one parameter at a time, so no full set of
    gradients is ever held (each gradient is used and freed as soon as it is accumulated)."""

    def setup(self, model, config):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.lr, self.base = 0.0, config.lr
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._update)
        return self.params

    @torch.no_grad()
    def _update(self, p):
        p.add_(p.grad, alpha=-self.lr)
        p.grad = None

    def __call__(self, model, batches, forward, lr_scale):
        self.lr = self.base * lr_scale
        loss = forward(batches[0])
        loss.backward()
        assert all(p.grad is None for p in self.params)
        return StepResult(loss.item(), float("nan"), self.lr)


def test_a_step_that_updates_inside_backward_hooks_runs_through_train():
    config = TrainConfig(lr=0.05, max_steps=4, warmup_ratio=0, max_grad_norm=None)
    a, b = tiny(), tiny()
    train(a, batches(2), config, step=HookSGDStep(), progress=False)
    sgd = BackpropStep(lambda groups, c: torch.optim.SGD(groups, lr=c.lr))
    train(b, batches(2), config, step=sgd, progress=False)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


class ForwardOnlyStep(Step):
    """MeZO's shape: a two-point (SPSA) estimate from forward passes only, z regenerated from a seed."""

    def __init__(self, eps=1e-3):
        self.eps, self.seeds, self.projected = eps, [], []

    def setup(self, model, config):
        self.params, self.base = [p for p in model.parameters() if p.requires_grad], config.lr
        return self.params

    @torch.no_grad()
    def _perturb(self, seed, scale):
        g = torch.Generator().manual_seed(seed)
        for p in self.params:
            p.add_(torch.randn(p.shape, generator=g), alpha=scale)

    @torch.no_grad()
    def __call__(self, model, batches, forward, lr_scale):
        seed = len(self.seeds)
        self._perturb(seed, self.eps)
        plus = forward(batches[0]).item()
        self._perturb(seed, -2 * self.eps)
        minus = forward(batches[0]).item()
        self._perturb(seed, self.eps)
        g = (plus - minus) / (2 * self.eps)
        self._perturb(seed, -self.base * lr_scale * g)
        self.seeds.append(seed)
        self.projected.append(g)
        return StepResult((plus + minus) / 2, abs(g), self.base * lr_scale)


def test_a_forward_only_step_runs_through_train_and_keeps_no_gradient():
    model = tiny()
    start = [p.detach().clone() for p in model.parameters()]
    step = ForwardOnlyStep()
    train(model, batches(2), TrainConfig(lr=1e-3, max_steps=3, warmup_ratio=0, schedule="constant"), step=step,
          progress=False)
    assert all(p.grad is None for p in model.parameters())
    expected = [s.clone() for s in start]                       # replay the updates from the seeds
    for seed, g in zip(step.seeds, step.projected):
        gen = torch.Generator().manual_seed(seed)
        for e in expected:
            e.add_(torch.randn(e.shape, generator=gen), alpha=-1e-3 * g)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-6)
