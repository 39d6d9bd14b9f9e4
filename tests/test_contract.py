"""The contract every registered adapter method keeps, tested once for all of them.

A method gets these tests by registering (``core.register``) and listing ``examples()``: small
configs for the tiny test models. For each method and each of its examples:

1. a fresh adapter leaves the outputs unchanged where the method promises it (``identity_at_init``),
   or the method says why not;
2. only adapter parameters require grad, and one optimizer step changes only them;
3. merge then unmerge gives the base weights back (1e-6) and the merged model computes what the
   adapter model does, where the method merges (``mergeable``), or the method says why not;
4. save then load onto a fresh copy of the base is bit-exact;
5. loading onto another base, or onto a model carrying another config of the method, raises and
   changes nothing;
6. remove gives back every module and every ``requires_grad`` flag;
7. each of ``invalid_examples()`` fails at construction.
"""
from __future__ import annotations

import copy

import pytest
import torch

from peft_from_scratch import core
from peft_from_scratch.core import registry
from peft_from_scratch.models import tiny_bert, tiny_llama

METHODS = registry.methods(kind="adapter")
CASES = [(m.name, i) for m in METHODS for i in range(len(m.obj.examples()))]
TINY = {"llama": tiny_llama, "bert": tiny_bert}


def case(name: str, i: int):
    arch, config = registry.config_class(name).examples()[i]
    return arch, config


def batch(arch: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (2, 10), generator=g)
    labels = ids.clone() if arch == "llama" else torch.randint(0, 2, (2,), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def snapshot(model) -> dict[str, torch.Tensor]:
    """Every tensor of the base, under the plain model's names."""
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in model.state_dict().items()
            if not core.is_adapter_key(model, k)}


def trained(name: str, i: int, seed: int = 0):
    """A tiny base and the same base with the example adapter, moved off its initial values."""
    arch, config = case(name, i)
    model = core.add_adapter(TINY[arch](), config)
    config.simulate_training(model, torch.Generator().manual_seed(seed + 1))
    return arch, config, model.eval()


@torch.no_grad()
def logits(model, b):
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def test_every_method_lists_examples_and_two_for_one_model():
    assert {m.name for m in METHODS} >= {"lora", "dora", "houlsby", "prompt_tuning", "p_tuning", "prefix_tuning", "rosa"}
    for m in METHODS:
        examples = m.obj.examples()
        assert len(examples) >= 2 and examples[0][0] == examples[1][0], m.name
        assert examples[0][1].to_dict() != examples[1][1].to_dict(), m.name


@pytest.mark.parametrize("name,i", CASES)
def test_config_round_trips_through_the_registry(name, i):
    _, config = case(name, i)
    assert config.to_dict()["method"] == name
    assert registry.config_from_dict(config.to_dict()).to_dict() == config.to_dict()


@pytest.mark.parametrize("name,i", CASES)
def test_fresh_adapter_keeps_the_outputs_where_promised(name, i):
    arch, config = case(name, i)
    base = TINY[arch]()
    b = batch(arch)
    ref = logits(base, b)
    model = core.add_adapter(copy.deepcopy(base), config).eval()
    promise = type(config).identity_at_init
    if promise is True:
        torch.testing.assert_close(logits(model, b), ref, rtol=1e-6, atol=1e-6)
    else:
        assert isinstance(promise, str) and promise, f"{name}: say why a fresh adapter changes the outputs"


@pytest.mark.parametrize("name,i", CASES)
def test_only_adapter_parameters_train_and_one_step_changes_only_them(name, i):
    arch, config, model = trained(name, i)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and names == {n for n, _ in model.named_parameters() if core.is_adapter_key(model, n)}
    base_before = snapshot(model)
    adapter_before = {k: v.clone() for k, v in core.adapter_state_dict(model).items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(**batch(arch)).loss.backward()
    opt.step()
    assert all(torch.equal(v, base_before[k]) for k, v in snapshot(model).items()), f"{name} changed the base"
    after = core.adapter_state_dict(model)
    assert any(not torch.equal(after[k], v) for k, v in adapter_before.items()), f"{name}: the step changed nothing"


@pytest.mark.parametrize("name,i", CASES)
def test_merge_then_unmerge_restores_the_base(name, i):
    arch, config, model = trained(name, i)
    promise = type(config).mergeable
    if promise is not True:
        assert isinstance(promise, str) and promise, f"{name}: say why it cannot be merged"
        with pytest.raises(NotImplementedError):
            core.merge_adapter(model)
        return
    b = batch(arch)
    before, out = snapshot(model), logits(model, b)
    core.merge_adapter(model)
    torch.testing.assert_close(logits(model, b), out, rtol=1e-5, atol=1e-5)
    core.unmerge_adapter(model)
    for k, v in snapshot(model).items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6, msg=lambda m: f"{name} {k}: {m}")


@pytest.mark.parametrize("name,i", CASES)
def test_save_then_load_on_a_fresh_base_is_bit_exact(name, i, tmp_path):
    arch, config, model = trained(name, i)
    core.save_adapter(model, tmp_path)
    fresh = core.load_adapter(TINY[arch](), tmp_path).eval()
    b = batch(arch)
    assert torch.equal(logits(fresh, b), logits(model, b))
    mine, theirs = core.adapter_state_dict(fresh), core.adapter_state_dict(model)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert fresh.adapter_config.to_dict() == config.to_dict()


@pytest.mark.parametrize("name,i", CASES)
def test_loading_onto_another_base_or_config_raises_and_changes_nothing(name, i, tmp_path):
    arch, config, model = trained(name, i)
    core.save_adapter(model, tmp_path)
    other = TINY[arch](seed=1)
    before, flags = snapshot(other), {n: p.requires_grad for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match="another base model"):
        core.load_adapter(other, tmp_path)
    assert getattr(other, "adapter_config", None) is None and not core.adapter_layers(other)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(other).items())
    assert flags == {n: p.requires_grad for n, p in other.named_parameters()}

    # Another config of the same method on the same base (examples 0 and 1 always have one).
    others = [c for a, c in type(config).examples() if a == arch and c.to_dict() != config.to_dict()]
    if i < 2:
        assert others
    if not others:
        return
    holder = core.add_adapter(TINY[arch](), others[0])
    state = {k: v.clone() for k, v in holder.state_dict().items()}
    with pytest.raises(ValueError, match="another config"):
        core.load_adapter(holder, tmp_path)
    assert holder.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in holder.state_dict().items())


@pytest.mark.parametrize("name,i", CASES)
def test_remove_gives_back_modules_and_requires_grad(name, i):
    arch, config = case(name, i)
    base = TINY[arch]()
    for n, p in list(base.named_parameters())[::3]:   # a pattern add_adapter will overwrite
        p.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    modules = {n: type(m) for n, m in base.named_modules()}
    b = batch(arch)
    ref = logits(base, b)
    core.add_adapter(base, config)
    core.remove_adapter(base)
    assert flags == {n: p.requires_grad for n, p in base.named_parameters()}
    assert modules == {n: type(m) for n, m in base.named_modules()}
    assert torch.equal(logits(base.eval(), b), ref)
    assert getattr(base, "adapter_config", None) is None


@pytest.mark.parametrize("name", [m.name for m in METHODS])
def test_bad_hyper_parameters_fail_at_construction(name):
    cls = registry.config_class(name)
    assert cls.invalid_examples(), f"{name}: list invalid_examples() for the contract test"
    base = cls.examples()[0][1].to_dict()
    base.pop("method")
    for bad in cls.invalid_examples():
        with pytest.raises((ValueError, TypeError, NotImplementedError)):
            cls(**{**base, **bad})
