"""The shared core: target selection, injection, freezing, counting, and its errors.

What every method must do (identity at init, merge, save/load round trips, remove) is checked once
for all of them in test_contract.py; here are the core's own rules, with LoRA as the example."""
import json

import pytest
import torch
from torch import nn

from peft_from_scratch import core
from peft_from_scratch.reparameterized.lora import LoRAConfig, LoRALinear
from peft_from_scratch.models import tiny_bert, tiny_llama


def tokens(seed=0, vocab=128, shape=(2, 12)):
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(seed))


def base_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- selection

def test_list_targets_match_exact_names_and_suffixes():
    model = tiny_llama()
    found = core.find_targets(model, ["q_proj", "model.layers.0.self_attn.v_proj"])
    assert found == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                     "model.layers.1.self_attn.q_proj"]


def test_string_target_is_a_full_match_regex():
    model = tiny_llama()
    assert core.find_targets(model, r".*\.1\.mlp\.(up|down)_proj") == [
        "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(ValueError):  # a partial match is not a match
        core.find_targets(model, r"up_proj")


def test_all_linear_skips_the_output_head():
    llama, bert = tiny_llama(), tiny_bert()
    names = core.find_targets(llama, "all-linear")
    assert len(names) == 2 * 7 and "lm_head" not in names
    bert_names = core.find_targets(bert, "all-linear")
    assert "classifier" not in bert_names and "bert.pooler.dense" in bert_names  # as peft does


def test_unknown_target_names_close_names():
    with pytest.raises(ValueError, match=r"q_projj.*did you mean 'q_proj'"):
        core.find_targets(tiny_llama(), ["q_projj"])
    with pytest.raises(ValueError, match="'querry'.*'query'"):
        core.find_targets(tiny_bert(), ["querry", "value"])


# ----------------------------------------------------------------------------- inject, freeze, count

def test_add_adapter_replaces_targets_and_freezes_the_rest():
    model = tiny_llama()
    before = base_state(model)
    x = tokens()
    ref = model(x).logits
    core.add_adapter(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    layers = core.adapter_layers(model)
    assert len(layers) == 4 and all(isinstance(m, LoRALinear) for m in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora.{w}" for n in layers for w in ("A", "B")}
    torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=0)  # B = 0: unchanged at init
    for k, v in model.state_dict().items():  # base tensors untouched
        if not core.is_adapter_key(model, k):
            assert torch.equal(v, before[k.replace(".base_layer", "")])


def test_parameter_count_matches_the_formula_and_peft_format():
    model = tiny_llama(hidden_size=64)
    total = sum(p.numel() for p in model.parameters())
    core.add_adapter(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    d, kv = 64, 64 // 4 * 2  # v_proj maps 64 -> num_kv_heads * head_dim = 32
    expected = 2 * (4 * (d + d) + 4 * (d + kv))
    trainable, all_params = core.count_parameters(model)
    assert (trainable, all_params) == (expected, total + expected)
    line = core.print_trainable_parameters(model)
    assert line == f"trainable params: {expected:,d} || all params: {total + expected:,d} || " \
                   f"trainable%: {100 * expected / (total + expected):.4f}"


def test_modules_to_save_are_trained_and_saved():
    model = tiny_bert()
    core.add_adapter(model, LoRAConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]))
    assert model.classifier.weight.requires_grad
    assert "classifier.weight" in core.adapter_state_dict(model)


def test_bad_inputs_fail_before_touching_the_model():
    model = tiny_llama()
    before = base_state(model)
    with pytest.raises(ValueError, match="positive integer"):
        LoRAConfig(r=0)
    with pytest.raises(ValueError, match=r"r=65 does not fit layer model.layers.0.self_attn.q_proj .*64"):
        core.add_adapter(model, LoRAConfig(r=65, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="can wrap Linear.*embed_tokens \\(Embedding\\)"):
        core.add_adapter(model, LoRAConfig(r=2, target_modules=["embed_tokens"]))
    assert getattr(model, "adapter_config", None) is None
    assert not core.adapter_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    core.add_adapter(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(RuntimeError, match="already has a lora adapter"):
        core.add_adapter(model, LoRAConfig(r=2, target_modules=["k_proj"]))


# ----------------------------------------------------------------------------- merge, save, load: the core's own errors

def trained_lora(seed=0, **cfg):
    model = tiny_llama(seed=seed)
    core.add_adapter(model, LoRAConfig(**{"r": 4, "alpha": 8, "target_modules": "all-linear", **cfg}))
    torch.manual_seed(seed + 1)
    for layer in core.adapter_layers(model).values():
        nn.init.normal_(layer.lora.B, std=0.05)  # as if trained
    return model


def test_merging_twice_or_unmerging_an_unmerged_model_is_refused():
    model = trained_lora()
    core.merge_adapter(model)
    with pytest.raises(RuntimeError, match="already merged"):
        core.merge_adapter(model)
    core.unmerge_adapter(model)
    with pytest.raises(RuntimeError, match="not merged"):
        core.unmerge_adapter(model)


def test_merge_is_all_or_nothing():
    """A layer that cannot merge (here: a 4-bit base) leaves every other layer unmerged, weights as they were."""
    from peft_from_scratch.quantized import Linear4bit
    model = trained_lora(target_modules=["q_proj", "v_proj"])
    before = base_state(model)
    last = "model.layers.1.self_attn.v_proj"
    layer = model.get_submodule(last)
    layer.base_layer = Linear4bit.from_linear(layer.base_layer)
    with pytest.raises(NotImplementedError, match="quantized.*base weight"):
        core.merge_adapter(model)
    assert not any(l.merged for l in core.adapter_layers(model).values())
    for k, v in model.state_dict().items():
        if k in before and not k.startswith(last):
            assert torch.equal(v, before[k]), k


def test_remove_adapter_with_merge_gives_a_plain_model():
    model = trained_lora()
    x = tokens()
    out = model(x).logits
    core.remove_adapter(model, merge=True)
    assert not core.adapter_layers(model) and isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    torch.testing.assert_close(model(x).logits, out, rtol=1e-5, atol=1e-5)


def test_remove_or_save_without_an_adapter_says_so(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="no adapter to remove"):   # was an AttributeError
        core.remove_adapter(model)
    with pytest.raises(ValueError, match="no adapter to save"):
        core.save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="no adapter to merge"):
        core.merge_adapter(model)


def test_save_writes_the_format_and_the_registered_name(tmp_path):
    core.save_adapter(trained_lora(), tmp_path)
    meta = json.loads((tmp_path / "adapter.json").read_text())
    assert meta["format"] == 2 and meta["config"]["method"] == "lora" and meta["config"]["r"] == 4
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_tensors_fail_cleanly(tmp_path):
    from safetensors.torch import load_file, save_file
    core.save_adapter(trained_lora(), tmp_path)
    state = load_file(tmp_path / "adapter.safetensors")
    state.pop(next(iter(state)))
    save_file(state, tmp_path / "adapter.safetensors")
    model = tiny_llama(seed=0)
    with pytest.raises(ValueError, match="do not fit the adapter"):
        core.load_adapter(model, tmp_path)
    assert getattr(model, "adapter_config", None) is None and not core.adapter_layers(model)
    assert all(p.requires_grad for p in model.parameters())


def test_saving_a_merged_adapter_is_refused(tmp_path):
    model = trained_lora()
    core.merge_adapter(model)
    with pytest.raises(RuntimeError, match="merged"):
        core.save_adapter(model, tmp_path)
    assert not (tmp_path / "adapter.json").exists()


def test_truncated_or_corrupt_files_name_the_file(tmp_path):
    core.save_adapter(trained_lora(), tmp_path)
    data = (tmp_path / "adapter.safetensors").read_bytes()
    (tmp_path / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    model = tiny_llama(seed=0)
    with pytest.raises(ValueError, match=r"adapter.safetensors is corrupt or truncated"):
        core.load_adapter(model, tmp_path)
    assert getattr(model, "adapter_config", None) is None
    (tmp_path / "adapter.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter.json is not valid JSON"):
        core.load_adapter(model, tmp_path)
