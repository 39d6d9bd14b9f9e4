"""RoSA against LoRA (d = 0), against peft's ShiRA (r = 0), against the dense formula, and its mask rule.

Tolerances (float32), as tests/helpers.py: ``|ours - ref| <= atol * max(1, max|ref|) + rtol * |ref|``
with rtol = 1e-5, atol = 1e-6. RoSA with d = 0 performs LoRA's float operations in LoRA's order, so
against our LoRA and peft's LoRA every difference is exactly 0. Against ShiRA the sparse term is
computed differently (ours: W0 x + SpMM(S, x); ShiRA: (W0 + dense S) x, and the value gradient is
SDDMM against a dense gradient read at the mask), which moves results by float32 rounding only:
the logits at every step and every gradient before the first step stay inside the tolerance (the
evidence), and after 5 AdamW steps all parameters but Adam's sign-noise outliers (see
helpers.compare_with_peft) in at most 0.2% of the values do too. Adam's step bound, |ours - ref| <=
2 lr steps, is checked as a sanity line only: it holds for any gradients.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from peft_from_scratch import core
from peft_from_scratch.blocks import masks
from peft_from_scratch.interop import peft as pio
from peft_from_scratch.quantized import quantize_model
from peft_from_scratch.reparameterized import rosa
from peft_from_scratch.equivalence import Diff
from peft_from_scratch.kernels import sparse as sp
from peft_from_scratch.reparameterized.lora import LoRAConfig
from peft_from_scratch.models import tiny_llama
from peft_from_scratch.reparameterized.rosa import RoSAConfig, RoSALinear
from tests.helpers import ATOL, RTOL, batches, compare_with_peft, make_pair, one_thread, tokens  # noqa: F401

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_mask(shape, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(shape[0] * shape[1], generator=g)[:k]
    mask = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
    mask[idx] = True
    return mask.view(shape)


def trained_rosa(model, seed=1, b_std=0.05, v_std=0.02):
    """Random masks, B and S away from zero: an adapter as training would leave it."""
    g = torch.Generator().manual_seed(seed)
    for i, (name, layer) in enumerate(rosa.rosa_layers(model).items()):
        if layer.k:
            layer.set_mask(random_mask(layer.shape, layer.k, seed=seed + i))
            with torch.no_grad():
                layer.values.copy_(torch.randn(layer.k, generator=g) * v_std)
        if layer.r:
            with torch.no_grad():
                layer.lora.B.copy_(torch.randn(layer.lora.B.shape, generator=g) * b_std)
    return model


def rosa_model(base=None, **kw):
    kw = {"r": 4, "alpha": 8, "d": 0.05, "target_modules": LLAMA_ALL, **kw}
    return trained_rosa(core.add_adapter(base if base is not None else tiny_llama(), RoSAConfig(**kw)))


# ----------------------------------------------------------------------------- d = 0: LoRA

def test_without_sparse_part_equals_peft_lora():
    ours, theirs = make_pair(tiny_llama(), RoSAConfig(r=4, alpha=8, d=0, target_modules=LLAMA_ALL),
                             task_type="CAUSAL_LM")
    assert all(isinstance(m, RoSALinear) and m.values is None for m in core.adapter_layers(ours).values())
    diffs = compare_with_peft(ours, theirs, batches(5), rtol=0, atol=0)      # bit for bit
    print({k: str(v) for k, v in diffs.items()})


def test_without_sparse_part_equals_our_lora():
    base = tiny_llama()
    ours = core.add_adapter(copy.deepcopy(base), RoSAConfig(r=4, alpha=8, d=0, use_rslora=True, target_modules=LLAMA_ALL))
    lora = core.add_adapter(copy.deepcopy(base), LoRAConfig(r=4, alpha=8, use_rslora=True, target_modules=LLAMA_ALL))
    torch.manual_seed(3)
    for layer in core.adapter_layers(ours).values():
        layer.lora.B.data.normal_(std=0.05)
    assert core.adapter_state_dict(ours).keys() == core.adapter_state_dict(lora).keys()
    lora.load_state_dict(core.adapter_state_dict(ours), strict=False)
    batch = batches(1)[0]
    a, b = ours(**batch), lora(**batch)
    assert torch.equal(a.logits, b.logits)
    a.loss.backward(), b.loss.backward()
    for (n, p), (_, q) in zip(ours.named_parameters(), lora.named_parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), n


# ----------------------------------------------------------------------------- r = 0: peft's ShiRA

def test_sparse_only_equals_peft_shira():
    r_shira = 2
    base = tiny_llama()
    # One density per projection (q: 64 x 64, k, v: 32 x 64, gate, up: 128 x 64, ...): r (m + n) entries each.
    pattern = rosa.lora_budget_density(base, LLAMA_ALL, r_shira)
    ours = core.add_adapter(copy.deepcopy(base), RoSAConfig(r=0, d=0, density_pattern=pattern, target_modules=LLAMA_ALL))
    layers = rosa.rosa_layers(ours)
    for name, layer in layers.items():
        m, n = layer.shape
        assert layer.k == r_shira * (m + n), name                       # the same budget per layer
    # The masks come from our own rule (top-k of mean squared gradients), the values from a "training".
    rosa.set_masks(ours, rosa.select_masks(rosa.accumulate_fisher(ours, batches(2, seed=7)), ours.adapter_config))
    g = torch.Generator().manual_seed(0)
    for layer in layers.values():
        layer.values.data.copy_(torch.randn(layer.k, generator=g) * 0.05)
    theirs, pairs = pio.shira_twin(ours, base)
    assert {id(q) for _, q in pairs.values()} == {id(p) for p in theirs.parameters() if p.requires_grad}
    ours.eval(), theirs.eval()

    diffs = {"logits": Diff(), "grads": Diff(), "params": Diff()}
    opt_ours = torch.optim.AdamW([p for p, _ in pairs.values()], lr=1e-3)
    opt_theirs = torch.optim.AdamW([q for _, q in pairs.values()], lr=1e-3)
    data = batches(5)
    for step, batch in enumerate(data):
        a, b = ours(**batch), theirs(**batch)
        diffs["logits"].update(a.logits, b.logits, RTOL, ATOL)
        a.loss.backward(), b.loss.backward()
        if step == 0:
            for p, q in pairs.values():
                diffs["grads"].update(p.grad, q.grad, RTOL, ATOL)
        opt_ours.step(), opt_theirs.step()
        opt_ours.zero_grad(), opt_theirs.zero_grad()
    for p, q in pairs.values():
        diffs["params"].update(p, q, RTOL, ATOL)
        assert (p - q).abs().max() <= 2 * 1e-3 * len(data)              # Adam's step bound: sanity only
    print({k: str(v) for k, v in diffs.items()})
    # the evidence: every logit at every step, every gradient before the first step, and all but
    # 0.2% of the parameters after 5 steps, within RTOL/ATOL of ShiRA's
    assert diffs["logits"].outside == 0 and diffs["grads"].outside == 0, diffs
    assert diffs["params"].outside <= 2e-3 * diffs["params"].total, diffs


def test_shira_twin_refuses_what_shira_cannot_express():
    base = tiny_llama()
    with pytest.raises(ValueError, match="no low-rank part"):
        pio.shira_twin(rosa_model(copy.deepcopy(base)), base)
    uneven = rosa_model(copy.deepcopy(base), r=0, d=0.05)
    with pytest.raises(ValueError, match="multiple of m \\+ n"):
        pio.shira_twin(uneven, base)
    with pytest.raises(ValueError, match="more than a dense update"):
        rosa.lora_budget_density(base, LLAMA_ALL, 40)


# ----------------------------------------------------------------------------- the layer against the formula

def dense_forward(layer: RoSALinear, x):
    """y = (W0 + s B A + S) x + b with S scattered from the values (autograd through the scatter)."""
    S = torch.zeros(layer.shape).index_put((layer.row_indices.long(), layer.col_indices.long()), layer.values)
    W = layer.base_layer.weight + layer.lora.scaling * layer.lora.B @ layer.lora.A + S
    return F.linear(x, W, layer.base_layer.bias)


def test_forward_and_all_gradients_equal_the_dense_formula():
    torch.manual_seed(0)
    layer = RoSALinear(nn.Linear(48, 40), r=4, alpha=8, d=0.1)
    layer.set_mask(random_mask((40, 48), layer.k))
    with torch.no_grad():
        layer.lora.B.normal_(std=0.1), layer.values.normal_(std=0.1)
    x = torch.randn(3, 5, 48, requires_grad=True)
    g = torch.randn(3, 5, 40)
    grads = []
    for fn in (layer, lambda x: dense_forward(layer, x)):
        for p in (x, layer.lora.A, layer.lora.B, layer.values):
            p.grad = None
        y = fn(x)
        (y * g).sum().backward()
        grads.append([y.detach()] + [p.grad.clone() for p in (x, layer.lora.A, layer.lora.B, layer.values)])
    for what, a, b in zip(["y", "x", "A", "B", "values"], *grads):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL * max(1, b.abs().max().item()), msg=what)


def test_sparse_part_is_inactive_until_a_mask_is_set_and_starts_at_zero():
    base = tiny_llama()
    x = tokens()
    ref = base(x).logits
    model = core.add_adapter(copy.deepcopy(base), RoSAConfig(r=4, d=0.05, target_modules=LLAMA_ALL))
    layer = model.model.layers[0].self_attn.q_proj
    assert not layer.has_mask and not layer.mask().any()
    model(input_ids=x, labels=x).loss.backward()
    assert layer.values.grad is None and layer.lora.B.grad.abs().max() > 0   # LoRA alone (A.grad = 0: B = 0)
    layer.set_mask(random_mask(layer.shape, layer.k))
    assert layer.has_mask and layer.mask().sum() == layer.k and not layer.values.any()
    torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=0)     # B = 0, S = 0: the base model
    trainable, _ = core.count_parameters(model)
    assert trainable == sum(l.lora.A.numel() + l.lora.B.numel() + l.k for l in rosa.rosa_layers(model).values())


def test_dropout_acts_on_the_lora_branch_only():
    """y = W0 x + s B A dropout(x) + S x in training mode: the dropped input feeds the LoRA branch and
    nothing else (S and W0 see x, as in the authors' code), with the same dropout draw; in eval mode
    dropout is off. Checked on a layer with both parts non-zero, against the formula with the draw
    reproduced from the same seed."""
    torch.manual_seed(0)
    layer = RoSALinear(nn.Linear(48, 40), r=4, alpha=8, d=0.1, dropout=0.5)
    layer.set_mask(random_mask((40, 48), layer.k))
    with torch.no_grad():
        layer.lora.B.normal_(std=0.1), layer.values.normal_(std=0.1)
    x = torch.randn(3, 5, 48)
    base, lora = layer.base_layer(x), layer.lora
    sparse = F.linear(x, layer.sparse_weight())
    layer.train()
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    x_d = F.dropout(x, 0.5, training=True)                          # the same draw
    torch.testing.assert_close(y, base + lora.product(x_d) + sparse, rtol=RTOL, atol=ATOL)
    no_dropout = base + lora.product(x) + sparse
    assert (y - no_dropout).abs().max() > 0.1 * no_dropout.abs().max()   # dropout did act
    layer.eval()
    torch.testing.assert_close(layer(x), no_dropout, rtol=RTOL, atol=ATOL)
    # sparse only (r = 0): dropout has nothing to act on, training mode changes nothing
    model = rosa_model(r=0, d=0.05, dropout=0.5)
    ids = tokens()
    ref = model.eval()(ids).logits
    torch.testing.assert_close(model.train()(ids).logits, ref, rtol=0, atol=0)


# ----------------------------------------------------------------------------- the mask

def brute_force_fisher(model, data, per_example=True):
    """W0.requires_grad, one backward per example, mean of W0.grad^2: the paper's statistic, plainly."""
    model = copy.deepcopy(model).train()
    layers = rosa.rosa_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        layer.base_layer.weight.requires_grad_(True)
    sums = {n: torch.zeros(layer.shape) for n, layer in layers.items()}
    count = 0
    for batch in data:
        for part in [{k: v[i:i + 1] for k, v in batch.items()} for i in range(len(batch["input_ids"]))] \
                if per_example else [batch]:
            model.zero_grad()
            model(**part).loss.backward()
            for n, layer in layers.items():
                sums[n] += layer.base_layer.weight.grad ** 2
            count += 1
    return {n: s / count for n, s in sums.items()}


def test_mask_is_the_top_k_of_the_brute_force_fisher():
    model = rosa_model(d=0.05)                       # LoRA warmed up (B != 0) and a sparse part set
    data = batches(2, shape=(3, 10))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fisher = rosa.accumulate_fisher(model, data, per_example=True)
    assert all(p.grad is None for p in model.parameters())            # the collector leaves .grad alone
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    reference = brute_force_fisher(model, data)
    masks = rosa.select_masks(fisher, 0.05)
    for name, layer in rosa.rosa_layers(model).items():
        torch.testing.assert_close(fisher[name], reference[name], rtol=1e-5, atol=1e-12)
        flat = reference[name].flatten()
        top = torch.argsort(-flat, stable=True)[: layer.k]              # brute-force top-k, ties to the lower index
        expected = torch.zeros_like(flat, dtype=torch.bool)
        expected[top] = True
        assert torch.equal(masks[name], expected.view(layer.shape)), name
        assert masks[name].sum() == layer.k == int(0.05 * flat.numel())


def test_fisher_collection_without_a_low_rank_part():
    """r = 0 before any mask: nothing in the layers requires grad; the tap's dummy still gets the
    backward to every layer (the paper's sparse-only baseline chooses its mask this way)."""
    model = core.add_adapter(tiny_llama(), RoSAConfig(r=0, d=0.05, target_modules=["q_proj", "down_proj"]))
    data = batches(2)
    fisher = rosa.accumulate_fisher(model, data)                       # one sample per batch
    reference = brute_force_fisher(model, data, per_example=False)
    assert set(fisher) == set(reference) == set(rosa.rosa_layers(model))
    for name in fisher:
        torch.testing.assert_close(fisher[name], reference[name], rtol=1e-5, atol=1e-12)


def test_ties_are_broken_by_position():
    scores = torch.tensor([[1.0, 3.0, 3.0], [3.0, 0.5, 3.0]])
    assert masks.top_k_mask(scores, 2).tolist() == [[False, True, True], [False, False, False]]
    assert masks.top_k_mask(scores, 4).tolist() == [[False, True, True], [True, False, True]]
    assert masks.top_k_mask(torch.ones(2, 3), 4).flatten().tolist() == [True] * 4 + [False] * 2
    assert not masks.top_k_mask(scores, 0).any() and masks.top_k_mask(scores, 6).all()
    with pytest.raises(ValueError, match="NaN or inf"):
        masks.top_k_mask(torch.tensor([1.0, float("nan")]), 1)


def test_the_schedule_warms_up_chooses_restarts_and_trains():
    from peft_from_scratch.training import TrainConfig, train
    model = tiny_llama()
    config = RoSAConfig(r=4, alpha=8, d=0.02, target_modules=LLAMA_ALL, lr_lora=2e-3, lr_sparse=5e-4)
    loader = batches(4)
    cfg = TrainConfig(lr=1e-3, max_steps=4, warmup_ratio=0.0, max_grad_norm=None)
    seen = {}

    def warmup_fn(m):
        seen["A0"] = {n: l.lora.A.detach().clone() for n, l in rosa.rosa_layers(m).items()}
        history = train(m, loader, cfg, params=rosa.param_groups(m), progress=False)
        layers = rosa.rosa_layers(m)
        assert all(not l.has_mask and not l.values.any() for l in layers.values())   # LoRA alone
        assert any(l.lora.B.abs().max() > 0 for l in layers.values())
        return history

    def train_fn(m):
        layers = rosa.rosa_layers(m)
        for n, l in layers.items():                     # the restart: S = 0 on the new mask, LoRA as at init
            assert l.has_mask and not l.values.any() and not l.lora.B.any() and torch.equal(l.lora.A, seen["A0"][n])
        groups = rosa.param_groups(m)
        assert [g.get("lr") for g in groups] == [2e-3, 5e-4]
        history = train(m, loader, cfg, params=groups, progress=False)
        assert all(l.values.abs().max() > 0 for l in layers.values())
        return history

    run = rosa.train_rosa(model, config, train_fn, fisher_batches=batches(2, seed=10), warmup_fn=warmup_fn,
                          per_example=True)
    assert set(run.masks) == set(rosa.rosa_layers(model)) and run.warmup.step == [1, 2, 3, 4]
    for name, layer in rosa.rosa_layers(model).items():
        assert torch.equal(layer.mask(), run.masks[name])


# ----------------------------------------------------------------------------- merge, save, load

# (merge/unmerge and the save/load round trip are the contract test's; here what is RoSA's own.)

def test_the_merged_weight_is_w0_plus_sba_plus_s():
    base = tiny_llama()
    model = rosa_model(copy.deepcopy(base))
    core.merge_adapter(model)
    for name, layer in rosa.rosa_layers(model).items():
        expected = base.get_submodule(name).weight + layer.lora.scaling * layer.lora.B @ layer.lora.A + layer.sparse_weight()
        torch.testing.assert_close(layer.base_layer.weight, expected, rtol=0, atol=1e-6)


def test_loading_saves_the_mask_and_rebuilds_what_the_backward_needs(tmp_path):
    model = rosa_model(r=2, d=0.03, density_pattern={"down_proj": 0.01})
    batch = batches(1)[0]
    core.save_adapter(model, tmp_path)
    saved = load_file(tmp_path / "adapter.safetensors")
    assert {k.rsplit(".", 1)[1] for k in saved} == {"A", "B", "values", "crow_indices", "col_indices"}
    fresh = core.load_adapter(tiny_llama(), tmp_path)
    for name, layer in rosa.rosa_layers(fresh).items():
        assert layer.has_mask and torch.equal(layer.mask(), rosa.rosa_layers(model)[name].mask())
    a, b = model(**batch), fresh(**batch)
    a.loss.backward(), b.loss.backward()                  # the caches of the backward were rebuilt on load
    for (n, p), (_, q) in zip(core.adapter_layers(model).items(), core.adapter_layers(fresh).items()):
        assert torch.equal(p.values.grad, q.values.grad), n


def test_loading_values_without_their_mask_fails(tmp_path):
    model = rosa_model()
    core.save_adapter(model, tmp_path)
    state = load_file(tmp_path / "adapter.safetensors")
    values_only = {k: v for k, v in state.items() if not k.endswith(("crow_indices", "col_indices"))}
    save_file(values_only, tmp_path / "adapter.safetensors")
    fresh = tiny_llama()
    with pytest.raises(ValueError, match="sparse values without their mask"):
        core.load_adapter(fresh, tmp_path)
    assert not core.adapter_layers(fresh)
    # The same mistake in memory: a state dict of the parameters only (buffers left out).
    other = core.add_adapter(tiny_llama(), model.adapter_config)
    params = {k: v for k, v in model.named_parameters() if v.requires_grad}
    with pytest.raises(ValueError, match="sparse values without their mask"):
        other.load_state_dict(params, strict=False)


def test_loading_a_mask_of_another_shape_fails(tmp_path):
    model = rosa_model()
    core.save_adapter(model, tmp_path)
    state = load_file(tmp_path / "adapter.safetensors")
    q, k = "model.layers.0.self_attn.q_proj.", "model.layers.0.self_attn.k_proj."   # 64x64 and 32x64
    for part in ("crow_indices", "col_indices", "values"):
        state[q + part] = state[k + part].clone()
    save_file(state, tmp_path / "adapter.safetensors")
    with pytest.raises(ValueError, match="does not fit this layer's 64 x 64 weight"):
        core.load_adapter(tiny_llama(), tmp_path)
    layer = rosa.rosa_layers(model)["model.layers.0.self_attn.q_proj"]
    bad = {q + "crow_indices": layer.crow_indices.flip(0), q + "col_indices": layer.col_indices,
           q + "values": layer.values.detach()}
    with pytest.raises(ValueError, match="crow_indices must start at 0"):
        model.load_state_dict(bad, strict=False)


def test_rosa_onto_the_wrong_base_is_refused(tmp_path):
    """Beyond the contract test's other-seed base: a base of other shapes, the float base of an
    adapter trained on its NF4 copy (and back; the adapter learned against the quantized weights),
    and masks chosen on another model. Each error names the problem; nothing changes."""
    core.save_adapter(rosa_model(quantize_model(tiny_llama())), tmp_path / "qrosa")
    core.save_adapter(rosa_model(), tmp_path / "rosa")
    for folder, base in [("rosa", tiny_llama(hidden_size=96)), ("qrosa", tiny_llama()),
                         ("rosa", quantize_model(tiny_llama()))]:
        before = {k: v.clone() for k, v in base.state_dict().items()}
        with pytest.raises(ValueError, match="saved for another base model"):
            core.load_adapter(base, tmp_path / folder)
        assert not core.adapter_layers(base) and base.state_dict().keys() == before.keys()
        assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    core.load_adapter(quantize_model(tiny_llama()), tmp_path / "qrosa")      # the right base loads
    small, big = rosa_model(), rosa_model(tiny_llama(hidden_size=96))
    layer = rosa.rosa_layers(big)["model.layers.0.self_attn.q_proj"]
    kept = layer.mask().clone()
    with pytest.raises(ValueError, match=r"mask of shape \(64, 64\) does not fit model.layers.0.self_attn.q_proj, "
                                         r"whose weight is \(96, 96\)"):
        rosa.set_masks(big, {n: l.mask() for n, l in rosa.rosa_layers(small).items()})
    assert torch.equal(layer.mask(), kept)


# ----------------------------------------------------------------------------- QRoSA

def test_qrosa_on_an_nf4_base_equals_rosa_on_the_dequantized_base():
    quantized = quantize_model(tiny_llama())
    dequantized = copy.deepcopy(quantized)
    for name in core.find_targets(dequantized, "all-linear"):
        q = dequantized.get_submodule(name)
        linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
        linear.weight.data.copy_(q.dequantize())
        core.set_module(dequantized, name, linear)
    config = RoSAConfig(r=2, d=0.05, target_modules=LLAMA_ALL)
    ours = trained_rosa(core.add_adapter(quantized, config))
    ref = core.add_adapter(dequantized, config)
    ref.load_state_dict(core.adapter_state_dict(ours), strict=False)
    batch = batches(1)[0]
    a, b = ours(**batch), ref(**batch)
    torch.testing.assert_close(a.logits, b.logits, rtol=RTOL, atol=ATOL)
    a.loss.backward(), b.loss.backward()
    ref_params = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        if p.requires_grad:
            q = ref_params[n]
            torch.testing.assert_close(p.grad, q.grad, rtol=RTOL, atol=ATOL * max(1, q.grad.abs().max().item()), msg=n)
    fa, fb = rosa.accumulate_fisher(ours, [batch]), rosa.accumulate_fisher(ref, [batch])
    for n in fa:                                        # the mask needs no float W0
        torch.testing.assert_close(fa[n], fb[n], rtol=1e-4, atol=1e-12)
    with pytest.raises(NotImplementedError, match="quantized"):
        core.merge_adapter(ours)


def test_lora_budget_density_on_a_4bit_base():
    """It read weight.shape, which a 4-bit layer packs (n/2 x 1): the density came out wrong or failed."""
    quantized = quantize_model(tiny_llama())
    density = rosa.lora_budget_density(quantized, LLAMA_ALL, r=2)
    assert density == rosa.lora_budget_density(tiny_llama(), LLAMA_ALL, r=2)
    model = core.add_adapter(quantized, RoSAConfig(r=0, d=0, density_pattern=density, target_modules=LLAMA_ALL))
    for name, layer in rosa.rosa_layers(model).items():
        assert layer.k == 2 * sum(layer.shape)


# ----------------------------------------------------------------------------- errors

def test_errors_in_the_config_and_the_layer():
    for d in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
            RoSAConfig(d=d)
    with pytest.raises(ValueError, match=r"density_pattern\['q_proj'\]=2"):
        RoSAConfig(density_pattern={"q_proj": 2})
    with pytest.raises(ValueError, match="trains nothing"):
        RoSAConfig(r=0, d=0)
    with pytest.raises(ValueError, match="non-negative integer"):
        RoSAConfig(r=-1)
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"r=33 does not fit layer model.layers.0.self_attn.k_proj .*32"):
        core.add_adapter(model, RoSAConfig(r=33, target_modules=["q_proj", "k_proj"]))
    with pytest.raises(ValueError, match="keeps no entry of layer model.layers.0.self_attn.q_proj"):
        core.add_adapter(model, RoSAConfig(r=2, d=1e-4, target_modules=["q_proj"]))        # 4096 weights
    with pytest.raises(ValueError, match="did you mean 'q_proj'"):
        core.add_adapter(model, RoSAConfig(target_modules=["q_prj"]))
    assert not core.adapter_layers(model)


def test_errors_for_masks():
    model = rosa_model()
    layer = rosa.rosa_layers(model)["model.layers.0.self_attn.k_proj"]          # 32 x 64
    with pytest.raises(ValueError, match=r"shape \(64, 64\) does not fit .*k_proj.*\(32, 64\)"):
        layer.set_mask(torch.ones(64, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match=f"has 10 entries, but d=0.05 keeps k={layer.k}"):
        layer.set_mask(random_mask((32, 64), 10))
    with pytest.raises(ValueError, match="strictly ascending"):
        layer.set_mask((layer.crow_indices, layer.col_indices.flip(0)))
    with pytest.raises(ValueError, match="did you mean"):
        rosa.set_masks(model, {"model.layers.0.self_attn.k_prj": layer.mask()})
    with pytest.raises(ValueError, match="no mask for"):
        rosa.set_masks(model, {"model.layers.0.self_attn.k_proj": layer.mask()})
    lora_only = core.add_adapter(tiny_llama(), RoSAConfig(r=2, d=0, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no sparse part"):
        rosa.rosa_layers(lora_only)["model.layers.0.self_attn.q_proj"].set_mask(torch.ones(64, 64))
    with pytest.raises(ValueError, match="no RoSA layers"):
        rosa.accumulate_fisher(tiny_llama(), [])


def test_csr_helpers():
    mask = random_mask((9, 13), 40, seed=3)
    mask[4] = False                                                       # an empty row
    crow, col = sp.csr_from_mask(mask)
    values = torch.randn(int(mask.sum()))
    dense = sp.csr_to_dense(values, crow, col, (9, 13))
    assert torch.equal(dense != 0, mask) and torch.equal(dense[mask], values)
    crow_t, col_t, perm = sp.csr_transpose(crow, col, (9, 13))
    assert torch.equal(sp.csr_to_dense(values[perm], crow_t, col_t, (13, 9)), dense.T)
    sp.check_csr(crow_t, col_t, (13, 9))
