"""HyperFormer++ (additive/hyperformer.py) against the official code's equations (rabeehk/hyperformer:
``AdapterLayersOneHyperNetController``, ``TaskHyperNet``, ``MetaLayersAdapterController``), recomputed
here by hand from the raw weights: the conditioning vector, the generated adapter and its conditional
LayerNorm; what trains and what gets gradients; the task of a batch (a call's ``task=``, ``set_task``,
the errors); the parameter count; and the multi-task sampler's task frequencies. No library has
HyperFormer, so these equations are the reference.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from peft_from_scratch import core, data
from peft_from_scratch.additive import HyperFormerConfig, set_task
from peft_from_scratch.additive.hyperformer import FEED_FORWARD, SELF_ATTENTION, parameter_count
from peft_from_scratch.models import tiny_bert
from peft_from_scratch.training import TrainConfig, train
from tests.helpers import tokens

CONFIG = HyperFormerConfig(tasks=["sst2", "rte"], default_task="sst2", reduction_factor=8, task_embedding_dim=8,
                           hidden_dim=16, modules_to_save=["classifier"])


def hyperformer(config=CONFIG, seed=1):
    """A tiny BERT with the hypernetwork's tensors moved off the init (there every generated LayerNorm
    weight is ~0.08, and agreeing on a near-identity would say little)."""
    model = core.add_adapter(tiny_bert(), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.hypernet.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def by_hand(hn, task: str, layer: int, block: int, y: torch.Tensor) -> torch.Tensor:
    """The official forward, written out: I = LN(W2 relu(W1 [z; e_l; e_b] + b1) + b2) (eps 1e-6),
    D, b_D, U, b_U, γ, β = Linear(I) each, A(y) = y + LN_{γ,β}(U gelu_new(D y + b_D) + b_U) (eps 1e-5)."""
    W1, W2 = hn.task_net[0], hn.task_net[2]
    e = torch.cat([hn.task_embeddings[task], hn.layer_embeddings.weight[layer], hn.block_embeddings.weight[block]])
    h = W2.weight @ torch.relu(W1.weight @ e + W1.bias) + W2.bias
    I = (h - h.mean()) / torch.sqrt(h.var(unbiased=False) + 1e-6) * hn.norm.weight + hn.norm.bias
    gen = {k: g.weight @ I + g.bias for k, g in hn.generators.items()}
    d, m = hn.d, hn.m
    D, U = gen["down"].view(m, d), gen["up"].view(d, m)
    z = F.gelu(y @ D.T + gen["down_bias"], approximate="tanh") @ U.T + gen["up_bias"]
    zn = (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + 1e-5)
    return y + zn * gen["gamma"] + gen["beta"]


@pytest.mark.parametrize("task", ["sst2", "rte"])
@pytest.mark.parametrize("where,layer,block", [("attention.output.dense", 0, SELF_ATTENTION),
                                               ("output.dense", 1, FEED_FORWARD)])
def test_generated_adapter_is_the_official_equations(task, where, layer, block):
    model = hyperformer()
    wrapped = model.bert.encoder.layer[layer].get_submodule(where)
    assert (wrapped.layer, wrapped.block) == (layer, block)
    x = torch.randn(2, 5, wrapped.base_layer.in_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        set_task(model, task)
        ours = wrapped(x)
        ref = by_hand(model.hypernet, task, layer, block, wrapped.base_layer(x))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_tasks_condition_the_function_and_a_call_names_its_task():
    model = hyperformer()
    ids = tokens(0, 128, (2, 10))
    with torch.no_grad():
        a, b = model(input_ids=ids, task="sst2").logits, model(input_ids=ids, task="rte").logits
        assert (a - b).abs().max() > 1e-3                      # the task embedding changes every adapter
        set_task(model, "rte")
        torch.testing.assert_close(model(input_ids=ids).logits, b, rtol=0, atol=0)
        # the generators' weights at zero: nothing depends on the task any more (the "reduction" check)
        for g in model.hypernet.generators.values():
            g.weight.zero_()
        torch.testing.assert_close(model(input_ids=ids, task="sst2").logits, model(input_ids=ids, task="rte").logits,
                                   rtol=0, atol=0)


def test_gradients_reach_the_embeddings_and_the_generators_of_the_batchs_task_only():
    model = hyperformer().train()
    b = {"input_ids": tokens(0, 128, (2, 10)), "labels": torch.tensor([0, 1])}
    model(**b, task="rte").loss.backward()
    hn = model.hypernet
    assert hn.task_embeddings["rte"].grad.abs().max() > 0
    assert hn.task_embeddings["sst2"].grad is None or not hn.task_embeddings["sst2"].grad.any()
    for name, p in [("layer_embeddings", hn.layer_embeddings.weight), ("block_embeddings", hn.block_embeddings.weight),
                    *[(f"generators.{k}", g.weight) for k, g in hn.generators.items()],
                    ("task_net.0", hn.task_net[0].weight), ("norm", hn.norm.weight)]:
        assert p.grad is not None and p.grad.abs().max() > 0, name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if not n.startswith("hypernet.")} == \
        {n for n, _ in model.named_parameters() if "LayerNorm" in n or n.startswith("classifier.")}


def test_unknown_or_missing_task_is_a_clear_error_and_changes_nothing():
    model = hyperformer()
    before = copy.deepcopy(model.state_dict())
    ids = tokens(0, 128, (2, 10))
    with pytest.raises(ValueError, match=r"unknown task 'mrpc': this hypernetwork was built for \['sst2', 'rte'\]"):
        model(input_ids=ids, task="mrpc")
    with pytest.raises(ValueError, match="unknown task"):
        set_task(model, "mrpc")
    assert model.hypernet.active == "sst2"
    no_default = hyperformer(HyperFormerConfig(tasks=["sst2", "rte"], reduction_factor=8, task_embedding_dim=8,
                                               hidden_dim=16, modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match=r"needs the task of the batch: model\(\.\.\., task=name\)"):
        no_default(input_ids=ids)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="task names must be identifiers"):
        HyperFormerConfig(tasks=["sst-2"])
    with pytest.raises(ValueError, match="default_task 'mnli' is not one of the tasks"):
        HyperFormerConfig(tasks=["sst2"], default_task="mnli")


def test_parameter_count_and_what_a_task_costs():
    model = core.add_adapter(tiny_bert(), CONFIG)
    d = model.config.hidden_size
    counted = sum(p.numel() for p in model.hypernet.parameters())
    assert counted == parameter_count(d, d // 8, model.config.num_hidden_layers, tasks=2, t=8, hidden=16)
    three = core.add_adapter(tiny_bert(), HyperFormerConfig(tasks=["a", "b", "c"], reduction_factor=8,
                                                            task_embedding_dim=8, hidden_dim=16))
    assert sum(p.numel() for p in three.hypernet.parameters()) - counted == 8        # one z of t numbers


def test_multitask_batches_draw_tasks_with_temperature():
    """p_i proportional to (n_i/N)^(1/T): at T = 10 near uniform, at T = 1 proportional to size."""
    datasets = {name: [{"input_ids": [1, 2, 3], "labels": 0}] * n for name, n in (("a", 100), ("b", 400), ("c", 1600))}
    for T in (10.0, 1.0):
        batches = data.MultiTaskBatches(datasets, 4, temperature=T, seed=0, pad_token_id=0)
        p = torch.tensor([100, 400, 1600.0]) ** (1 / T)
        p /= p.sum()
        assert torch.allclose(batches.probabilities.float(), p)
        draws, it = 3000, iter(batches)
        counts = torch.zeros(3)
        for _ in range(draws):
            b = next(it)
            counts["abc".index(b["task"])] += 1
            assert b["input_ids"].shape == (4, 3)
        sigma = (draws * p * (1 - p)).sqrt()
        assert ((counts - draws * p).abs() < 4 * sigma).all(), (T, counts, draws * p)
    first = [next(iter(data.MultiTaskBatches(datasets, 4, seed=3, pad_token_id=0)))["task"] for _ in range(2)]
    assert first[0] == first[1]                                   # deterministic under the seed


def test_the_training_loop_trains_on_multitask_batches():
    model = core.add_adapter(tiny_bert(), CONFIG)
    ds = {t: [{"input_ids": tokens(i, 128, (10,)).tolist(), "labels": i % 2} for i in range(8)] for t in ("sst2", "rte")}
    before = {t: model.hypernet.task_embeddings[t].detach().clone() for t in ("sst2", "rte")}
    train(model, data.MultiTaskBatches(ds, 4, seed=0, pad_token_id=0), TrainConfig(lr=1e-2, max_steps=6), progress=False)
    moved = {t: not torch.equal(before[t], model.hypernet.task_embeddings[t]) for t in before}
    assert all(moved.values()), moved
