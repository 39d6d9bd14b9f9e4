"""(IA)³ against peft's IA3Config: same logits, same gradients, same vectors after k AdamW steps, the
same merged weights; the paper's defaults on Llama and BERT and a custom map; the errors.

Tolerance: ``assert_close(rtol=1e-5, atol=1e-6 * max(1, max|peft|))``, as the LoRA tests. Our layer
does peft's float operations in peft's order, so the differences are in practice exactly 0.
"""
import copy

import pytest
import torch
from peft import IA3Config as PeftIA3Config
from peft import get_peft_model

from peft_from_scratch import core
from peft_from_scratch.additive.ia3 import DEFAULT_TARGETS, IA3Config, IA3Linear
from peft_from_scratch.models import MINILM, SMOLLM2, tiny_bert, tiny_llama
from tests.helpers import batches, one_thread, real_model  # noqa: F401  (one_thread: autouse)

RTOL, ATOL, STEPS, LR = 1e-5, 1e-6, 4, 1e-2


def twin(base, targets, feedforward, task_type=None, seed=1):
    """Ours and peft's (IA)³ on two copies of ``base``, ours moved off 1 (as training would), copied to peft."""
    ours = core.add_adapter(copy.deepcopy(base), IA3Config(target_modules=targets, feedforward_modules=feedforward,
                                                           modules_to_save=["classifier"] if task_type else []))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in core.adapter_layers(ours).values():
            layer.l.mul_(1 + 0.1 * torch.randn(layer.l.shape, generator=g))
    theirs = get_peft_model(copy.deepcopy(base), PeftIA3Config(target_modules=targets, feedforward_modules=feedforward,
                                                                task_type=task_type))
    pairs = {}
    for name, layer in core.adapter_layers(ours).items():
        peft_l = theirs.base_model.model.get_submodule(name).ia3_l["default"]
        assert peft_l.numel() == layer.l.numel() and (peft_l.shape[0] == 1) == layer.on_input
        with torch.no_grad():
            peft_l.copy_(layer.l.view_as(peft_l))
        pairs[name] = (layer.l, peft_l)
    if task_type:   # the classification head: trained by both, copied across
        head = dict(theirs.named_parameters())
        for n, p in ours.classifier.named_parameters():
            q = head[f"base_model.model.classifier.modules_to_save.default.{n}"]
            with torch.no_grad():
                q.copy_(p)
            pairs[f"classifier.{n}"] = (p, q)
    assert {id(b) for _, b in pairs.values()} == {id(p) for p in theirs.parameters() if p.requires_grad}
    return ours.eval(), theirs.eval(), pairs


def close(a, b, what):
    torch.testing.assert_close(a.reshape(b.shape), b, rtol=RTOL, atol=ATOL * max(1.0, b.abs().max().item()),
                               msg=lambda m: f"{what}: {m}")


def train_side_by_side(ours, theirs, pairs, data):
    opt_a = torch.optim.AdamW([a for a, _ in pairs.values()], lr=LR)
    opt_b = torch.optim.AdamW([b for _, b in pairs.values()], lr=LR)
    for step in range(STEPS):
        out_a, out_b = ours(**data[step % len(data)]), theirs(**data[step % len(data)])
        close(out_a.logits, out_b.logits, f"logits at step {step}")
        out_a.loss.backward(), out_b.loss.backward()
        if step == 0:
            for name, (a, b) in pairs.items():
                close(a.grad, b.grad, f"gradient of {name}")
        opt_a.step(), opt_b.step()
        opt_a.zero_grad(), opt_b.zero_grad()
    for name, (a, b) in pairs.items():
        close(a, b, f"{name} after {STEPS} steps")
        assert not torch.allclose(a, torch.ones_like(a)) or name.startswith("classifier")


def check_merge(ours, theirs, batch):
    before = ours(**batch).logits
    core.merge_adapter(ours)
    theirs.merge_adapter()
    close(ours(**batch).logits, before, "merged vs unmerged")
    for name, layer in core.adapter_layers(ours).items():
        base = theirs.base_model.model.get_submodule(name).base_layer
        close(layer.base_layer.weight, base.weight, f"merged weight of {name}")
        if base.bias is not None:
            close(layer.base_layer.bias, base.bias, f"merged bias of {name}")


@pytest.mark.parametrize("model, targets, task", [
    ("llama", DEFAULT_TARGETS["llama"], None),
    ("llama", (["q_proj", "o_proj", "up_proj", "down_proj"], ["up_proj", "down_proj"]), None),   # a custom map
    ("bert", DEFAULT_TARGETS["bert"], "SEQ_CLS"),
])
def test_matches_peft_logits_grads_training_and_merge(model, targets, task):
    base = tiny_llama() if model == "llama" else tiny_bert()
    ours, theirs, pairs = twin(base, *targets, task_type=task)
    data = batches(STEPS, seq_cls=task is not None)
    train_side_by_side(ours, theirs, pairs, data)
    check_merge(ours, theirs, data[0])


@pytest.mark.slow
def test_matches_peft_on_smollm2():
    ours, theirs, pairs = twin(real_model(SMOLLM2), *DEFAULT_TARGETS["llama"])
    data = batches(STEPS, vocab=49152, shape=(1, 16))
    train_side_by_side(ours, theirs, pairs, data)
    check_merge(ours, theirs, data[0])


@pytest.mark.slow
def test_matches_peft_on_minilm_seq_cls():
    ours, theirs, pairs = twin(real_model(MINILM), *DEFAULT_TARGETS["bert"], task_type="SEQ_CLS")
    data = batches(STEPS, vocab=30522, shape=(2, 16), seq_cls=True)
    train_side_by_side(ours, theirs, pairs, data)
    check_merge(ours, theirs, data[0])


def test_the_vectors_act_where_the_paper_puts_them():
    """k, v: output scaling (d_out entries, rows of W); down_proj: input scaling (d_ff entries, columns)."""
    model = core.add_adapter(tiny_llama(), IA3Config())
    mlp, attn = model.model.layers[0].mlp, model.model.layers[0].self_attn
    assert isinstance(mlp.down_proj, IA3Linear) and mlp.down_proj.on_input
    assert mlp.down_proj.l.shape == (mlp.down_proj.base_layer.in_features,)
    assert not attn.k_proj.on_input and attn.k_proj.l.shape == (attn.k_proj.base_layer.out_features,)
    x = torch.randn(3, attn.k_proj.base_layer.in_features)
    with torch.no_grad():
        attn.k_proj.l.fill_(2.0)
    torch.testing.assert_close(attn.k_proj(x), 2 * attn.k_proj.base_layer(x))


def test_feedforward_outside_the_targets_is_refused_and_the_model_untouched():
    with pytest.raises(ValueError, match="feedforward_modules \\['down_proj'\\] are not in target_modules"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="which target_modules does not"):
        core.add_adapter(model, IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=r".*mlp\.down_proj"))
    assert not core.adapter_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unmerge_with_a_zero_entry_is_refused_and_leaves_the_merged_weight():
    model = core.add_adapter(tiny_llama(), IA3Config())
    layer = model.model.layers[0].self_attn.k_proj
    with torch.no_grad():
        layer.l[3] = 0.0
    core.merge_adapter(model)
    merged = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="1 entries of l are 0"):
        layer.unmerge()
    assert layer.merged and torch.equal(layer.base_layer.weight, merged)


def test_merge_then_unmerge_gives_back_the_base_weights():
    model = core.add_adapter(tiny_llama(), IA3Config())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in core.adapter_layers(model).values():
            layer.l.mul_(1 + 0.3 * torch.randn(layer.l.shape, generator=g))
    base = {n: l.base_layer.weight.detach().clone() for n, l in core.adapter_layers(model).items()}
    core.merge_adapter(model)
    core.unmerge_adapter(model)
    for n, layer in core.adapter_layers(model).items():
        torch.testing.assert_close(layer.base_layer.weight, base[n], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- peft's files, both ways

FILE_CASES = {"llama default": (tiny_llama, *DEFAULT_TARGETS["llama"], None),
              "llama custom": (tiny_llama, ["q_proj", "up_proj", "down_proj"], ["down_proj"], None),
              "bert seq-cls": (tiny_bert, *DEFAULT_TARGETS["bert"], "SEQ_CLS")}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_ours_saved_in_peft_format_loads_in_peft_and_back(case, tmp_path):
    """save_peft_adapter -> PeftModel.from_pretrained computes what ours does; load_peft_adapter
    gives back our tensors bit for bit (and the same config)."""
    from peft import PeftModel
    from peft_from_scratch.interop import peft as pio
    make, targets, feedforward, task = FILE_CASES[case]
    ours, _, _ = twin(make(), targets, feedforward, task)
    pio.save_peft_adapter(ours, tmp_path)
    theirs = PeftModel.from_pretrained(make(), tmp_path).eval()
    data = batches(1, shape=(2, 10), seq_cls=task is not None)[0]
    with torch.no_grad():
        close(ours(**data).logits, theirs(**data).logits, "logits of peft loading our file")
    back = pio.load_peft_adapter(make(), tmp_path)
    assert back.adapter_config.feedforward_modules == ours.adapter_config.feedforward_modules
    mine, loaded = core.adapter_state_dict(ours), core.adapter_state_dict(back)
    assert mine.keys() == loaded.keys() and all(torch.equal(mine[k], loaded[k]) for k in mine)


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_peft_saved_loads_in_ours(case, tmp_path):
    from peft_from_scratch.interop import peft as pio
    make, targets, feedforward, task = FILE_CASES[case]
    ours, theirs, _ = twin(make(), targets, feedforward, task)
    theirs.save_pretrained(tmp_path)
    loaded = pio.load_peft_adapter(make(), tmp_path).eval()
    data = batches(1, shape=(2, 10), seq_cls=task is not None)[0]
    with torch.no_grad():
        close(loaded(**data).logits, theirs(**data).logits, "logits of ours loading peft's file")


def test_a_peft_file_that_does_not_fit_is_refused_and_the_model_untouched(tmp_path):
    from safetensors.torch import load_file, save_file
    from peft_from_scratch.interop import peft as pio
    _, theirs, _ = twin(tiny_llama(), *DEFAULT_TARGETS["llama"])
    theirs.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in state if k.endswith("k_proj.ia3_l"))
    state[key] = state[key].view(1, -1)                   # an output vector stored as an input one
    save_file(state, tmp_path / "adapter_model.safetensors")
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"k_proj \(output scaling\) needs \(32, 1\)"):
        pio.load_peft_adapter(model, tmp_path)
    assert not core.adapter_layers(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_peft_twin_pairs_our_flat_vectors_with_peft_shaped_ones_and_compare_passes():
    from peft_from_scratch import equivalence
    from peft_from_scratch.interop import peft as peft_io

    def perturb(model):
        with torch.no_grad():
            for layer in core.adapter_layers(model).values():
                layer.l.mul_(1 + 0.1 * torch.randn(layer.l.shape, generator=torch.Generator().manual_seed(3)))
    model = tiny_llama()
    ours, theirs, pairs = peft_io.twin(model, IA3Config(), perturb=perturb)
    assert {tuple(b.shape) for _, b in pairs.values()} != {tuple(a.shape) for a, _ in pairs.values()}
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    report = equivalence.compare(ours, theirs, pairs, [{"input_ids": ids, "labels": ids}], steps=3, lr=1e-2)
    assert report.passed
    with torch.no_grad():
        next(iter(pairs.values()))[1].mul_(1.01)                      # the two no longer start equal
    with pytest.raises(ValueError, match="do not start from equal values"):
        equivalence.compare(ours, theirs, pairs, [{"input_ids": ids, "labels": ids}], steps=1)
