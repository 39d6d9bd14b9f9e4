"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021, arXiv 2106.09685).

A frozen linear layer W0 (d_out x d_in) gets a trainable low-rank update (paper, eq. 3):

    h = W0 x + (alpha / r) * B A x,        A: r x d_in,  B: d_out x r,  r << min(d_in, d_out)

B starts at zero, so the adapted model starts identical to the base. The paper draws A from a
Gaussian; peft and microsoft/loralib use Kaiming-uniform (a = sqrt(5)), the nn.Linear default,
i.e. A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), which we follow (the same distribution, not the same
draws: peft first builds A and B as nn.Linear layers, which use up random numbers). rsLoRA
(Kalajdzievski 2023) scales by alpha / sqrt(r) instead, which keeps the update's size stable as r
grows. Dropout acts on the
input of the LoRA branch only. Because BA has the shape of W0, it can be merged: W = W0 + (alpha/r) BA.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .core import (AdapterConfig, AdapterLayer, add_adapter, adapter_layers, adapter_state_dict, base_fingerprint,
                   find_targets, matches)


# The pieces of a LoRA branch, shared with every method that carries one (RoSA).

def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def adapter_like(base_layer: nn.Module) -> dict:
    """dtype and device for an adapter's tensors: the base weight's, float32 for a quantized base."""
    dtype = base_layer.weight.dtype
    return dict(dtype=dtype if dtype.is_floating_point else torch.float32, device=base_layer.weight.device)


@torch.no_grad()
def init_lora_(A: torch.Tensor, B: torch.Tensor, init: str = "kaiming") -> None:
    """A from Kaiming-uniform (a = sqrt(5), peft's default) or N(0, 1/r^2) ("gaussian"); B = 0."""
    if init == "kaiming":
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    elif init == "gaussian":
        nn.init.normal_(A, std=1 / A.shape[0])
    else:
        raise ValueError(f"init must be 'kaiming' or 'gaussian', got {init!r}")
    B.zero_()


def low_rank_product(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """s B A x as two thin matmuls (never forming BA)."""
    return F.linear(F.linear(x.to(A.dtype), A), B) * scaling


class LoRALinear(AdapterLayer):
    """x -> W0 x + (alpha/r) B A dropout(x), around a frozen ``nn.Linear``.

    Args:
        base_layer: the frozen linear layer W0 (d_in -> d_out).
        r: the rank, 1 <= r <= min(d_in, d_out).
        alpha: the scaling numerator; the update is multiplied by alpha/r (or alpha/sqrt(r)).
        dropout: dropout probability on the LoRA branch's input.
        use_rslora: scale by alpha/sqrt(r) (rank-stabilised LoRA).
        init: "kaiming" (peft's default) or "gaussian" (A ~ N(0, 1/r^2), peft's "gaussian").
    Raises:
        ValueError: if r is not in [1, min(d_in, d_out)].
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming", name: str = ""):
        super().__init__(base_layer)
        d_out, d_in = base_layer.out_features, base_layer.in_features  # not weight.shape: a 4-bit base packs it
        if not 1 <= r <= min(d_in, d_out):
            raise ValueError(f"LoRA rank r={r} does not fit layer {name or 'Linear'} ({d_in} -> {d_out}): "
                             f"r must be between 1 and min(d_in, d_out) = {min(d_in, d_out)}")
        self.r, self.alpha = r, alpha
        self.scaling = lora_scaling(r, alpha, use_rslora)
        like = adapter_like(base_layer)
        self.A = nn.Parameter(torch.empty(r, d_in, **like))
        self.B = nn.Parameter(torch.zeros(d_out, r, **like))
        init_lora_(self.A, self.B, init)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.train(base_layer.training)  # new modules start in training mode; follow the wrapped layer

    def lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha/r) B A x, computed as two thin matmuls (never forming BA). No dropout here."""
        return low_rank_product(x, self.A, self.B, self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x: (..., d_in) -> (..., d_out)
        result = self.base_layer(x)
        if self.merged:
            return result
        return result + self.lora_branch(self.dropout(x)).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """Delta W = (alpha/r) B A, the update merge() adds to W0."""
        return (self.B @ self.A) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA hyper-parameters, named as in peft's ``LoraConfig`` where they exist there."""
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"

    method: ClassVar[str] = "lora"
    wraps: ClassVar[tuple] = (nn.Linear,)

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def make_layer(self, name: str, module: nn.Linear) -> LoRALinear:
        return LoRALinear(module, self.r, self.alpha, self.dropout, self.use_rslora, self.init, name=name)


# ----------------------------------------------------------------------------- peft's on-disk format
#
# A peft LoRA/DoRA adapter folder holds ``adapter_config.json`` (a ``LoraConfig``) and
# ``adapter_model.safetensors``. Its tensor names are the module's path inside a ``PeftModel``
# (``base_model.model.`` + our module name) followed by peft's parameter name; the adapter name
# ("default") that peft has in memory is left out on disk:
#
#     ours                                  peft on disk
#     model.layers.0.self_attn.q_proj.A     base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
#     model.layers.0.self_attn.q_proj.B     base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight
#     model.layers.0.self_attn.q_proj.m     base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector
#     classifier.weight                     base_model.model.classifier.weight   (modules_to_save)
#
# PEFT_NAMES and the two functions below are the only place that knows this mapping.

PEFT_PREFIX = "base_model.model."
PEFT_NAMES = {"A": "lora_A.weight", "B": "lora_B.weight", "m": "lora_magnitude_vector"}
FINGERPRINT_KEY = "peft_from_scratch.base_fingerprint"   # our extra, in the safetensors metadata
TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
              "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS"}
# LoraConfig fields we do not implement, with the value that means "not used".
PEFT_UNSUPPORTED = {"bias": "none", "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
                    "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
                    "use_qalora": False, "lora_bias": False, "layer_replication": None,
                    "target_parameters": None, "trainable_token_indices": None, "alora_invocation_tokens": None}


def to_peft_key(key: str) -> str:
    """Our adapter state-dict key -> the key peft writes in adapter_model.safetensors."""
    module, _, param = key.rpartition(".")
    if param in PEFT_NAMES:
        return f"{PEFT_PREFIX}{module}.{PEFT_NAMES[param]}"
    return PEFT_PREFIX + key          # a modules_to_save tensor keeps its name


def from_peft_key(key: str) -> tuple[str, str]:
    """A peft on-disk key -> (our key, kind), kind being "A", "B", "m" or "saved" (modules_to_save)."""
    if not key.startswith(PEFT_PREFIX):
        raise ValueError(f"{key!r} is not a peft adapter key (they start with {PEFT_PREFIX!r})")
    key = key[len(PEFT_PREFIX):]
    for ours, theirs in PEFT_NAMES.items():
        if key.endswith("." + theirs):
            return f"{key[:-len(theirs) - 1]}.{ours}", ours
    return key, "saved"


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    return next((t for suffix, t in TASK_TYPES.items() if name.endswith(suffix)), None)


def save_peft_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write a LoRA or DoRA adapter in peft's format, loadable with ``PeftModel.from_pretrained``.

    ``adapter_config.json`` is a peft ``LoraConfig``; ``adapter_model.safetensors`` has peft's key
    names. The base model's fingerprint goes into the safetensors metadata (peft ignores it), so
    ``load_peft_adapter`` can refuse a wrong base for files we wrote.
    """
    config = getattr(model, "adapter_config", None)
    if not isinstance(config, LoRAConfig):
        raise ValueError(f"save_peft_adapter writes LoRA and DoRA adapters; the model has "
                         f"{'no adapter' if config is None else config.method}")
    if any(layer.merged for layer in adapter_layers(model).values()):
        raise RuntimeError("the adapter is merged into the base weights; call unmerge_adapter(model) first")
    targets = config.target_modules
    if targets == "all-linear":       # peft, too, writes the names "all-linear" selected
        targets = list(adapter_layers(model))
    peft_config = {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "r": config.r,
        "lora_alpha": int(config.alpha) if float(config.alpha).is_integer() else config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "use_dora": config.method == "dora",
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "target_modules": targets if isinstance(targets, str) else list(targets),
        "modules_to_save": list(config.modules_to_save) or None,
        "inference_mode": True,
        "revision": None,
        **PEFT_UNSUPPORTED,
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {to_peft_key(k): v for k, v in adapter_state_dict(model).items()}
    save_file(tensors, path / "adapter_model.safetensors",
              metadata={"format": "pt", FINGERPRINT_KEY: base_fingerprint(model)})
    (path / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")
    return path


def load_peft_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Read a peft LoRA/DoRA adapter folder onto a plain base model, as our LoRA/DoRA layers. In place.

    Checks, all before the model is touched (so a failure leaves it unchanged):

    * the config is a peft LoRA config that uses no option we do not implement (bias training,
      rank/alpha patterns, layer selection, fan_in_fan_out, ...);
    * every tensor maps to a module of this model: an ``nn.Linear`` for lora_A/lora_B/magnitude,
      a parameter of the same shape for a modules_to_save tensor;
    * shapes: lora_A is r x d_in, lora_B is d_out x r, the magnitude has d_out entries, for this
      model's layer sizes;
    * the modules ``target_modules`` selects on this model are exactly those the file has tensors
      for (a deeper or differently named model fails here);
    * if the file was written by ``save_peft_adapter``, the base fingerprint in its metadata.

    What it cannot detect: a peft-written file carries no fingerprint, so a base model with the same
    architecture (same module names and shapes) but other weights, e.g. another fine-tune of the
    same model, loads without complaint.
    """
    path = Path(path)
    if not (path / "adapter_config.json").exists():
        raise FileNotFoundError(f"no adapter_config.json in {path}: not a peft adapter folder")
    cfg = json.loads((path / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path} holds a {cfg.get('peft_type')} adapter; load_peft_adapter reads LORA (and DoRA)")
    unsupported = {k: cfg[k] for k, off in PEFT_UNSUPPORTED.items() if cfg.get(k) not in (off, None)}
    if unsupported:
        raise NotImplementedError(f"the adapter in {path} uses LoraConfig options we do not implement: {unsupported}")
    if getattr(model, "adapter_config", None) is not None:
        raise RuntimeError("the model already has an adapter; load a peft adapter onto a plain base model")

    with safe_open(path / "adapter_model.safetensors", "pt") as f:
        metadata = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if FINGERPRINT_KEY in metadata and metadata[FINGERPRINT_KEY] != base_fingerprint(model):
        raise ValueError(f"the adapter in {path} was saved for another base model "
                         f"(fingerprint {metadata[FINGERPRINT_KEY]}, this model has {base_fingerprint(model)})")

    r, dora = cfg["r"], bool(cfg.get("use_dora"))
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    # peft matches modules_to_save by name suffix, as target_modules, and adds "classifier" and
    # "score" to it for SEQ_CLS; we keep the modules of this model it names.
    wanted = list(cfg.get("modules_to_save") or [])
    to_save = sorted(n for n in modules if n and any(n == w or n.endswith("." + w) for w in wanted))
    ours = {from_peft_key(k)[0]: t for k, t in state.items()}
    layers, problems = {}, []                     # layers: name -> the kinds of tensor it has
    for key, tensor in state.items():
        our_key, kind = from_peft_key(key)
        name = our_key.rpartition(".")[0]
        if kind == "saved":
            if name not in to_save:
                problems.append(f"{key}: {name!r} is not in modules_to_save {wanted}")
            elif our_key not in params or params[our_key].shape != tensor.shape:
                problems.append(f"{key}: this model has no parameter {our_key} of shape {tuple(tensor.shape)}")
            continue
        layer = modules.get(name)
        if not isinstance(layer, nn.Linear):
            problems.append(f"{key}: this model has no Linear layer {name!r}")
            continue
        layers.setdefault(name, set()).add(kind)
        d_out, d_in = layer.out_features, layer.in_features
        expected = {"A": (r, d_in), "B": (d_out, r), "m": (d_out,)}[kind]
        if tuple(tensor.shape) != expected:
            problems.append(f"{key}: shape {tuple(tensor.shape)}, but this model's {name} needs {expected}")
    needed = {"A", "B", "m"} if dora else {"A", "B"}
    problems += [f"{n} has tensors {sorted(k)}, expected {sorted(needed)} (use_dora={dora})"
                 for n, k in layers.items() if k != needed]
    # target_modules as peft reads it: a regex, or a list of which some entries may match nothing.
    target_modules = cfg["target_modules"]
    if isinstance(target_modules, str):
        targets = set(find_targets(model, target_modules))
    else:
        targets = {n for n in modules if n and matches(n, target_modules)}
        if not targets:
            find_targets(model, target_modules)  # raises, naming close module names
        if any(not any(matches(n, [t]) for n in targets) for t in target_modules):
            target_modules = sorted(targets)      # core's find_targets wants every entry to match
    if not problems:
        problems += [f"target {n} has no tensors in the file" for n in sorted(targets - set(layers))]
        problems += [f"tensors for {n}, which target_modules does not select" for n in sorted(set(layers) - targets)]
    if problems:
        raise ValueError(f"the adapter in {path} does not fit this model ({len(problems)} problems): "
                         + "; ".join(problems[:5]))

    config_class = LoRAConfig
    if dora:
        from .dora import DoRAConfig
        config_class = DoRAConfig
    init = cfg.get("init_lora_weights", True)
    config = config_class(r=r, alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0),
                          use_rslora=cfg.get("use_rslora", False), init="gaussian" if init == "gaussian" else "kaiming",
                          target_modules=target_modules, modules_to_save=to_save)
    add_adapter(model, config)
    unexpected = model.load_state_dict(ours, strict=False).unexpected_keys
    assert not unexpected, unexpected   # every key was checked above
    return model


# ----------------------------------------------------------------------------- peft in memory, side by side

def peft_twin(base: nn.Module, config: LoRAConfig, task_type: str | None = None, b_std: float = 0.0, seed: int = 0):
    """``(ours, peft's, pairs)``: our adapter and peft's ``LoraConfig`` twin on two deep copies of ``base``.

    Ours is built first (B optionally drawn from N(0, b_std^2), as if trained); every adapter tensor is
    then copied into peft through ``to_peft_key``, so both start from identical values. ``pairs`` maps
    each of our trainable tensors to peft's, ready for ``equivalence.compare``. Both are returned in
    eval mode (peft leaves its new modules in training mode).
    """
    import copy
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    ours = add_adapter(copy.deepcopy(base), config)
    if b_std:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in adapter_layers(ours).values():
                layer.B.copy_(torch.randn(layer.B.shape, generator=g) * b_std)
    task_type = task_type or _task_type(base)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, use_rslora=config.use_rslora,
        use_dora=config.method == "dora", target_modules=config.target_modules, task_type=task_type,
        modules_to_save=list(config.modules_to_save) or None,
        init_lora_weights="gaussian" if config.init == "gaussian" else True))
    loaded = set_peft_model_state_dict(theirs, {to_peft_key(k): v for k, v in adapter_state_dict(ours).items()})
    if loaded.unexpected_keys:
        raise RuntimeError(f"peft did not take these tensors: {loaded.unexpected_keys[:5]}")
    peft_params = dict(theirs.named_parameters())

    def peft_name(key: str) -> str:   # our key -> peft's in-memory parameter name (adapter "default")
        module, _, param = key.rpartition(".")
        if param in PEFT_NAMES:
            return f"{PEFT_PREFIX}{module}.{PEFT_NAMES[param].replace('.weight', '')}.default.weight"
        return f"{PEFT_PREFIX}{module}.modules_to_save.default.{param}"

    pairs = {k: (p, peft_params[peft_name(k)]) for k, p in ours.named_parameters() if p.requires_grad}
    return ours.eval(), theirs.eval(), pairs
