"""Compacter (additive/compacter.py) against the paper's equations, computed here from the raw weights:
a PHM weight is the sum of n Kronecker products of the shared C_i with rank-r B_i = L_i R_i (Eq. 3-5),
one C for the whole model (stored and saved once), the parameter count O(k + d) per layer, the
near-identity init, and the errors. Its equality with AdapterHub's ``CompacterConfig`` /
``CompacterPlusPlusConfig`` on identical weights is in tests/test_adapterhub.py.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from peft_from_scratch import core
from peft_from_scratch.additive.compacter import CompacterConfig, PHMLinear, parameter_count
from peft_from_scratch.models import tiny_bert, tiny_llama
from tests.helpers import tokens


def perturb(model, seed=1, std=0.3):
    """Adapter tensors far from the init (there C ~ 1e-4 makes every branch almost zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter." in name or name.startswith("phm_rule"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def kron_by_hand(A, B):
    """A (x) B entry by entry: block (i, j) of the result is A[i, j] * B."""
    (p, q), (r, s) = A.shape, B.shape
    out = torch.zeros(p * r, q * s)
    for i in range(p):
        for j in range(q):
            out[i * r:(i + 1) * r, j * s:(j + 1) * s] = A[i, j] * B
    return out


def phm_weight_by_hand(layer: PHMLinear) -> torch.Tensor:
    """H = sum_i C_i (x) (L_i R_i), the paper's Eq. 3 with Eq. 5's low-rank B_i (row-vector layout)."""
    C = layer.rule[0].C
    return sum(kron_by_hand(C[i], layer.W_left[i] @ layer.W_right[i]) for i in range(C.shape[0]))


def test_phm_weight_is_the_sum_of_kronecker_products():
    model = core.add_adapter(tiny_bert(), CompacterConfig(reduction_factor=2, phm_dim=4, rank=2))
    perturb(model)
    layer = model.bert.encoder.layer[0].output.dense.adapter
    for phm in (layer.down, layer.up):
        H = phm.weight()
        torch.testing.assert_close(H, phm_weight_by_hand(phm), rtol=1e-5, atol=1e-6)
        # B_i = L_i R_i has rank <= r = 2 while H itself is full rank: the Kronecker sum lifts it
        assert all(torch.linalg.matrix_rank(phm.W_left[i] @ phm.W_right[i]) <= 2 for i in range(4))
        assert torch.linalg.matrix_rank(H) == min(H.shape)
    def branch(h):                                              # up(f(down(h))) with the hand-built H's
        return F.gelu(h @ phm_weight_by_hand(layer.down) + layer.down.b) @ phm_weight_by_hand(layer.up) + layer.up.b
    h = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(layer(h), branch(h), rtol=1e-5, atol=1e-5)
    dense = model.bert.encoder.layer[0].output.dense            # the wrapped layer: h + adapter(h), h = W a + b
    a = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(4))
    base = dense.base_layer(a)
    torch.testing.assert_close(dense(a), base + branch(base), rtol=1e-5, atol=1e-5)


def test_one_shared_rule_stored_and_saved_once(tmp_path):
    model = core.add_adapter(tiny_bert(), CompacterConfig(reduction_factor=4, phm_dim=2,
                                                          modules_to_save=["classifier"]))
    layers = core.adapter_layers(model)
    assert len(layers) == 4                                     # two per layer (Compacter = Houlsby's places)
    rules = {id(p.rule[0].C) for layer in layers.values() for p in (layer.adapter.down, layer.adapter.up)}
    assert rules == {id(model.phm_rule.C)}
    assert [n for n, _ in model.named_parameters() if "phm_rule" in n] == ["phm_rule.C"]
    perturb(model)
    x = tokens()
    out = model(input_ids=x).logits
    out.sum().backward()                                        # C gets the gradient of all 8 projections
    assert model.phm_rule.C.grad is not None and model.phm_rule.C.grad.abs().sum() > 0
    path = core.save_adapter(model, tmp_path / "compacter")
    fresh = core.add_adapter(tiny_bert(), CompacterConfig(reduction_factor=4, phm_dim=2,
                                                          modules_to_save=["classifier"]))
    core.load_adapter(fresh, path)
    torch.testing.assert_close(fresh(input_ids=x).logits, out.detach(), rtol=0, atol=0)
    assert fresh.bert.encoder.layer[1].attention.output.dense.adapter.up.rule[0] is fresh.phm_rule


@pytest.mark.parametrize("placement, per_layer", [("houlsby", 2), ("pfeiffer", 1)])
def test_parameter_count_is_linear_in_d(placement, per_layer):
    d, L, n = 64, 2, 4
    m = d // 8
    model = core.add_adapter(tiny_bert(hidden_size=d, num_hidden_layers=L),
                             CompacterConfig(reduction_factor=8, phm_dim=n, placement=placement,
                                             train_layer_norms=False))
    assert core.count_parameters(model)[0] == parameter_count(d, m, adapters=L * per_layer, n=n)
    # each adapter: 2 (d + m) rank-one weights + biases, vs Houlsby's 2 d m + d + m
    assert parameter_count(d, m, 1, n) - n ** 3 == 2 * (d + m) + d + m < 2 * d * m + d + m
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(".adapter." in name or name == "phm_rule.C" for name in trainable)


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama])
def test_near_identity_at_init(make):
    base = make()
    x = tokens()
    plain = base(input_ids=x).logits
    model = core.add_adapter(copy.deepcopy(base), CompacterConfig(reduction_factor=4, phm_dim=2,
                                                                  train_layer_norms=False))
    diff = (model(input_ids=x).logits - plain).abs().max().item()
    assert 0 < diff < 1e-3 * plain.abs().max().item()
    C = model.phm_rule.C
    assert C.shape == (2, 2, 2) and C.abs().max() < 1e-3 and C.std() > 0


def test_errors_leave_the_model_untouched():
    for bad in ({"phm_dim": 0}, {"reduction_factor": 1.5}, {"placement": "parallel"}, {"non_linearity": "softmax"}):
        with pytest.raises(ValueError):
            CompacterConfig(**bad)
    model = tiny_bert()                                         # d = 64
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = {n: type(m) for n, m in model.named_modules()}
    for config, message in [(CompacterConfig(reduction_factor=4, phm_dim=3), r"phm_dim=3 dividing both d and m"),
                            (CompacterConfig(reduction_factor=128, phm_dim=2), r"m=0.5"),
                            (CompacterConfig(reduction_factor=4, phm_dim=32), r"phm_dim=32")]:
        with pytest.raises(ValueError, match=message):
            core.add_adapter(model, config)
        assert getattr(model, "adapter_config", None) is None and not hasattr(model, "phm_rule")
        assert modules == {n: type(m) for n, m in model.named_modules()}
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    core.add_adapter(model, CompacterConfig(reduction_factor=4, phm_dim=2))
    with pytest.raises(RuntimeError, match="already has a compacter adapter"):
        core.add_adapter(model, CompacterConfig(reduction_factor=4, phm_dim=2))
    core.remove_adapter(model)                                  # the shared rule leaves with its layers
    assert not hasattr(model, "phm_rule") and not core.adapter_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
