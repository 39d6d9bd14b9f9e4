"""The method registry: stable names, aliases for names earlier releases wrote, and old adapters loading."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import peft_from_scratch as pfs
from peft_from_scratch import bib, core
from peft_from_scratch.core import registry
from peft_from_scratch.models import tiny_bert, tiny_llama

V1 = Path(__file__).parent / "fixtures" / "adapters_v1"
NAMES = {"lora", "dora", "rosa", "houlsby", "compacter", "ia3", "llama_adapter", "prompt_tuning", "p_tuning", "prefix_tuning",
         "parallel_adapter", "mam", "hyperformer",
         "nf4", "qlora", "qa_lora", "paged_adamw", "masked_gradient",
         "lomo", "adalomo", "galore", "flora", "flora_accumulation", "mezo"}


def test_registry_lists_every_method_with_family_kind_and_paper():
    listed = {m.name: m for m in pfs.methods()}
    assert NAMES <= set(listed)
    keys = set(bib.load_bib())
    for m in listed.values():
        assert m.family in registry.FAMILIES and m.kind in registry.KINDS
        assert m.paper in keys, f"{m.name}: paper key {m.paper!r} is not in the bibliography"
        assert Path(pfs.__file__).parent.parent.joinpath(m.file).exists(), m.file
    assert listed["dora"].parent == "lora" and listed["qlora"].parent == "lora"
    assert [m.name for m in pfs.methods(kind="adapter", family="additive")] == \
        ["compacter", "houlsby", "hyperformer", "ia3", "llama_adapter", "llm_adapter", "mam", "p_tuning", "parallel_adapter", "prefix_tuning",
             "prompt_tuning"]


def test_saved_adapters_name_the_registered_method(tmp_path):
    model = core.add_adapter(tiny_llama(), pfs.PrefixTuningConfig(num_virtual_tokens=2))
    meta = json.loads((core.save_adapter(model, tmp_path) / "adapter.json").read_text())
    assert meta["format"] == 2 and meta["config"]["method"] == "prefix_tuning"


def test_unknown_names_fail_with_the_close_ones():
    with pytest.raises(ValueError, match=r"unknown method 'lorra'.*'lora'"):
        registry.get("lorra")
    with pytest.raises(ValueError, match="is a quantization, not an adapter"):
        registry.config_class("nf4")
    assert registry.get("adapters").name == "houlsby"           # an alias the first release wrote


def test_names_are_taken_once():
    with pytest.raises(ValueError, match="already taken"):
        registry.register("lora", family="reparameterized", paper="hu2021lora")(type("X", (core.AdapterConfig,), {}))
    with pytest.raises(ValueError, match="alias"):
        registry.register("adapters", family="additive", paper="houlsby2019parameterefficient")
    with pytest.raises(ValueError, match="family"):
        registry.register("x", family="magic", paper="hu2021lora")
    with pytest.raises(ValueError, match="parent 'nothing'"):
        registry.register("x", family="additive", paper="hu2021lora", parent="nothing")
    assert registry.get("lora").obj is pfs.LoRAConfig


@pytest.mark.parametrize("folder", sorted(p.name for p in V1.iterdir() if p.is_dir()))
def test_adapters_saved_by_the_first_release_still_load(folder):
    path = V1 / folder
    meta = json.loads((path / "adapter.json").read_text())
    assert "format" not in meta                           # written before the registry
    expected = torch.load(path / "expected.pt")
    model = tiny_bert() if "bert" in folder else tiny_llama()
    core.load_adapter(model, path)
    assert model.adapter_config.method == registry.resolve(meta["config"]["method"])
    _, saved, _ = core.checkpoint.read_saved(path)          # the file's tensors under today's names
    loaded = core.checkpoint.adapter_state_dict(model)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    with torch.no_grad():
        logits = model.eval()(input_ids=expected["input_ids"]).logits
    # the logits the first release computed, to float32 rounding: bit for bit on the machine that
    # wrote them, while another CPU's matmul kernels may round the last bit differently (1.8e-7 seen)
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-6)
