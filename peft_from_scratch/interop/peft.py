"""Everything peft-specific: its configs, its tensor names, its files, and the twin of any adapter.

peft (huggingface/peft 0.21) has seven of our methods: LoRA, DoRA (``LoraConfig(use_dora=True)``),
(IA)³ (``IA3Config``), prompt tuning, P-tuning (``PromptEncoderConfig``), prefix tuning and
LLaMA-Adapter with its scalar gate (``AdaptionPromptConfig``), plus
ShiRA, which equals RoSA with r = 0 on the same masks. This module is the only place that knows how they are spelled there:

* ``peft_config(config, model)``: peft's config for one of ours (``LORA_FIELDS`` maps the names);
* ``twin(base, config)``: ours and peft's on two copies of one base, with identical adapter values,
  and the pairs of trainable tensors ``equivalence.compare`` trains side by side;
* ``save_peft_adapter`` / ``load_peft_adapter``: peft's on-disk format, both ways;
* ``shira_twin``: peft's ShiRA with a sparse-only RoSA model's masks and values.

Tensor names. In memory peft inserts the adapter name ("default"); on disk it leaves it out:

    ours                                   peft on disk                                    in memory
    model.layers.0.self_attn.q_proj.lora.A base_model.model.model.layers.0...q_proj.lora_A.weight     lora_A.default.weight
    model.layers.0.self_attn.q_proj.lora.B base_model.model.model.layers.0...q_proj.lora_B.weight     lora_B.default.weight
    ...q_proj.variant.m (DoRA)             base_model.model....q_proj.lora_magnitude_vector          lora_magnitude_vector.default.weight
    ...k_proj.l ((IA)³, flat)              base_model.model....k_proj.ia3_l (d_out x 1; 1 x d_in for  ia3_l.default
                                           the feedforward_modules, which scale their input)
    ...self_attn.prompt (LLaMA-Adapter,    base_model.model....self_attn.adaption_prompt (1 x K x d)  the same names
      K x d) and ...self_attn.gate       and ...self_attn.adaption_gate (1,)
    classifier.weight (modules_to_save)    base_model.model.classifier.weight                        classifier.modules_to_save.default.weight
    prompt_encoder.embedding.weight        prompt_embeddings (what the encoder computes, n x d)      prompt_encoder.default.embedding.weight

The prompt methods' files hold only what the encoder *computes*: the prompt P (n x d) for prompt
tuning and P-tuning, the prefix P_theta (n x 2Lw) for prefix tuning, and peft loads them in inference
mode, without the encoder. So a P-tuning adapter read from a peft file comes back as prompt tuning
with that prompt, and a prefix trained through the MLP comes back folded: the same function.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..additive.ia3 import IA3Config
from ..additive.llama_adapter import LlamaAdapterConfig
from ..additive.p_tuning import PTuningConfig
from ..additive.prefix_tuning import PrefixTuningConfig
from ..additive.prompt_tuning import PromptTuningConfig
from ..core import AdapterConfig, add_adapter, adapter_layers, adapter_state_dict, base_fingerprint, find_targets
from ..core import processes
from ..core.checkpoint import read_tensors
from ..core.targets import matches
from ..reparameterized.dora import DoRAConfig
from ..reparameterized.lora import LoRAConfig
from ..reparameterized.rosa import RoSAConfig, rosa_layers

PEFT_PREFIX = "base_model.model."
FINGERPRINT_KEY = "peft_from_scratch.base_fingerprint"   # our extra, in the safetensors metadata
TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
              "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS"}
LORA_FIELDS = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "use_rslora": "use_rslora",
               "init": "init_lora_weights", "target_modules": "target_modules", "modules_to_save": "modules_to_save"}
LORA_KEYS = {"lora.A": "lora_A.weight", "lora.B": "lora_B.weight", "variant.m": "lora_magnitude_vector"}
# LoraConfig fields we do not implement, with the value that means "not used".
PEFT_UNSUPPORTED = {"bias": "none", "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
                    "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
                    "use_qalora": False, "lora_bias": False, "layer_replication": None,
                    "target_parameters": None, "trainable_token_indices": None, "alora_invocation_tokens": None}
PROMPT_INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}
PROMPT_METHODS = (PromptTuningConfig, PTuningConfig, PrefixTuningConfig)


def task_type(model: nn.Module) -> str | None:
    """peft's task type for a transformers model class (CAUSAL_LM, SEQ_CLS, ...)."""
    name = type(model).__name__
    return next((t for suffix, t in TASK_TYPES.items() if name.endswith(suffix)), None)


# ----------------------------------------------------------------------------- configs

def peft_config(config: AdapterConfig, model: nn.Module, task: str | None = None, inference_mode: bool = False):
    """peft's config that computes what ``config`` computes on ``model``."""
    import peft
    task = task or task_type(model)
    if isinstance(config, RoSAConfig):   # RoSA with no sparse part is LoRA
        if config.d or any(config.density_pattern.values()):
            raise NotImplementedError("peft has no RoSA; with r = 0 compare with ShiRA (shira_twin), with d = 0 with LoRA")
        config = LoRAConfig(r=config.r, alpha=config.alpha, dropout=config.dropout, use_rslora=config.use_rslora,
                            init=config.init, target_modules=config.target_modules,
                            modules_to_save=config.modules_to_save)
    if isinstance(config, LoRAConfig):   # DoRAConfig too
        return peft.LoraConfig(
            r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, use_rslora=config.use_rslora,
            use_dora=isinstance(config, DoRAConfig), target_modules=config.target_modules, task_type=task,
            modules_to_save=list(config.modules_to_save) or None, inference_mode=inference_mode,
            init_lora_weights="gaussian" if config.init == "gaussian" else True)
    if isinstance(config, IA3Config):
        return peft.IA3Config(target_modules=config.target_modules, feedforward_modules=config.feedforward_modules,
                              task_type=task, modules_to_save=list(config.modules_to_save) or None,
                              inference_mode=inference_mode)
    if isinstance(config, LlamaAdapterConfig):
        if config.gate != "scalar":
            raise NotImplementedError("peft's AdaptionPromptConfig has one gate per layer, a scalar without tanh: "
                                      "LlamaAdapterConfig(gate='scalar') is that variant; the paper's per-head tanh "
                                      "gate has no peft counterpart")
        return peft.AdaptionPromptConfig(adapter_len=config.adapter_len, adapter_layers=config.adapter_layers,
                                         target_modules=config.target_modules[0], task_type=task,
                                         inference_mode=inference_mode)
    common = dict(task_type=task, num_virtual_tokens=config.num_virtual_tokens, inference_mode=inference_mode)
    if isinstance(config, PromptTuningConfig):
        if config.init not in PROMPT_INITS:
            raise NotImplementedError(f"peft has no prompt-tuning init {config.init!r} (the paper's class labels); "
                                      "twin() copies our values into peft, so any init can be compared that way")
        text = dict(prompt_tuning_init_text=config.init_text, tokenizer_name_or_path=config.tokenizer_name_or_path)
        return peft.PromptTuningConfig(prompt_tuning_init=PROMPT_INITS[config.init],
                                       **(text if config.init == "text" else {}), **common)
    if isinstance(config, PTuningConfig):
        d = model.get_input_embeddings().embedding_dim
        hidden = config.encoder_hidden_size or (d // 2 if config.encoder == "lstm" else d)
        return peft.PromptEncoderConfig(encoder_reparameterization_type=config.encoder.upper(),
                                        encoder_hidden_size=hidden, encoder_num_layers=config.encoder_num_layers,
                                        encoder_dropout=config.encoder_dropout, **common)
    if isinstance(config, PrefixTuningConfig):
        if config.positions != "after_prefix":
            raise NotImplementedError(f"peft's prefix puts the tokens after the prefix (positions='after_prefix'); "
                                      f"this one has positions={config.positions!r}, which peft cannot compute")
        return peft.PrefixTuningConfig(prefix_projection=config.prefix_projection,
                                       encoder_hidden_size=config.encoder_hidden_size, **common)
    raise NotImplementedError(f"peft has no {config.method!r} adapter (it has LoRA, DoRA, (IA)³, prompt tuning, "
                              "P-tuning and prefix tuning; for RoSA with r = 0 see shira_twin)")


# ----------------------------------------------------------------------------- tensor names

def to_peft_key(key: str) -> str:
    """Our LoRA/DoRA adapter state-dict key -> the key peft writes in adapter_model.safetensors."""
    for ours, theirs in LORA_KEYS.items():
        if key.endswith("." + ours):
            return f"{PEFT_PREFIX}{key[:-len(ours)]}{theirs}"
    return PEFT_PREFIX + key          # a modules_to_save tensor keeps its name


def from_peft_key(key: str) -> tuple[str, str]:
    """A peft on-disk LoRA key -> (our key, kind), kind being "A", "B", "m" or "saved" (modules_to_save)."""
    if not key.startswith(PEFT_PREFIX):
        raise ValueError(f"{key!r} is not a peft adapter key (they start with {PEFT_PREFIX!r})")
    key = key[len(PEFT_PREFIX):]
    for ours, theirs in LORA_KEYS.items():
        if key.endswith("." + theirs):
            return f"{key[:-len(theirs)]}{ours}", ours[-1]
    return key, "saved"


def peft_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """A LoRA, DoRA, (IA)³ or LLaMA-Adapter model's adapter tensors under peft's on-disk names and
    shapes ((IA)³'s flat vectors become peft's (d_out, 1) or (1, d_in); a prompt (K, d) becomes (1, K, d))."""
    state = adapter_state_dict(model)
    if isinstance(model.adapter_config, LlamaAdapterConfig):
        return {_adaption_key(k): v[None] if k.endswith(".prompt") else v for k, v in state.items()}
    if not isinstance(model.adapter_config, IA3Config):
        return {to_peft_key(k): v for k, v in state.items()}
    layers = {f"{n}.l": m for n, m in adapter_layers(model).items()}
    return {(_ia3_key(k) if k in layers else to_peft_key(k)):
            (v.view(1, -1) if layers[k].on_input else v.view(-1, 1)).contiguous() if k in layers else v
            for k, v in state.items()}


def _ia3_key(key: str) -> str:
    """(IA)³'s ``...k_proj.l`` -> peft's on-disk ``base_model.model....k_proj.ia3_l``."""
    return f"{PEFT_PREFIX}{key[:-len('.l')]}.ia3_l"


def _adaption_key(key: str) -> str:
    """LLaMA-Adapter's ``...self_attn.prompt`` / ``.gate`` -> peft's ``adaption_prompt`` / ``adaption_gate``
    (the same name on disk and in memory: peft's adaption prompt has no adapter-name level)."""
    module, _, param = key.rpartition(".")
    return f"{PEFT_PREFIX}{module}.adaption_{param}"


def peft_param_name(key: str, config: AdapterConfig) -> str:
    """Our adapter key -> the name of the same tensor in a peft model in memory (adapter "default")."""
    if isinstance(config, PROMPT_METHODS):
        return key.replace("prompt_encoder.", "prompt_encoder.default.", 1)
    if isinstance(config, LlamaAdapterConfig):
        return _adaption_key(key)
    if isinstance(config, IA3Config) and key.endswith(".l"):
        return f"{_ia3_key(key)}.default"
    disk = to_peft_key(key)
    for theirs in LORA_KEYS.values():
        if disk.endswith("." + theirs):
            module = disk[:-len(theirs) - 1]
            return f"{module}.{theirs.replace('.weight', '')}.default.weight"
    module, _, param = key.rpartition(".")
    return f"{PEFT_PREFIX}{module}.modules_to_save.default.{param}"


# ----------------------------------------------------------------------------- the twin in memory

def random_B(std: float, seed: int = 0) -> Callable[[nn.Module], None]:
    """A ``perturb`` for ``twin``: every LoRA B drawn from N(0, std^2) (as if trained; B = 0 at init)."""
    def perturb(model: nn.Module) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in adapter_layers(model).values():
                layer.lora.B.copy_(torch.randn(layer.lora.B.shape, generator=g) * std)
    return perturb


def twin(base: nn.Module | Callable[[], nn.Module], config: AdapterConfig, task: str | None = None,
         perturb: Callable[[nn.Module], None] | None = None):
    """``(ours, peft's, pairs)``: our adapter and peft's on two deep copies of ``base`` (or two models
    from ``base()``, when it is a function that builds a fresh one: cheaper than copying a real model).

    Ours is built first and ``perturb(ours)`` may move its values (e.g. ``random_B``); every adapter
    tensor is then copied into peft's, so both start from identical values. ``pairs`` maps each of
    our trainable tensors to peft's, ready for ``equivalence.compare``; it covers exactly the tensors
    peft trains. Both are returned in eval mode (peft leaves its new modules in training mode).
    """
    from peft import get_peft_model, set_peft_model_state_dict
    fresh = base if callable(base) and not isinstance(base, nn.Module) else (lambda: copy.deepcopy(base))
    ours = add_adapter(fresh(), config)
    if perturb is not None:
        perturb(ours)
    other = fresh()
    theirs = get_peft_model(other, peft_config(config, other, task))
    state = adapter_state_dict(ours)
    if isinstance(config, PROMPT_METHODS):
        loaded = theirs.load_state_dict({peft_param_name(k, config): v for k, v in state.items()}, strict=False)
    else:
        loaded = set_peft_model_state_dict(theirs, peft_tensors(ours))
    if loaded.unexpected_keys:
        raise RuntimeError(f"peft did not take these tensors: {loaded.unexpected_keys[:5]}")
    named = dict(theirs.named_parameters())
    pairs = {k: (p, named[peft_param_name(k, config)]) for k, p in ours.named_parameters() if p.requires_grad}
    trained = {id(p) for p in theirs.parameters() if p.requires_grad}
    if {id(b) for _, b in pairs.values()} != trained:
        raise RuntimeError("ours and peft train different sets of tensors")
    return ours.eval(), theirs.eval(), pairs


# ----------------------------------------------------------------------------- peft's files

def save_peft_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write the model's adapter in peft's format, loadable with ``PeftModel.from_pretrained``.

    LoRA and DoRA: ``adapter_config.json`` is a ``LoraConfig``, ``adapter_model.safetensors`` has
    peft's key names. Prompt tuning, P-tuning and prefix tuning: the prompt (or prefix) the encoder
    computes, as ``prompt_embeddings``, and the config in inference mode, as peft writes them. The base
    model's fingerprint goes into the safetensors metadata (peft ignores it), so ``load_peft_adapter``
    can refuse a wrong base for files we wrote.
    """
    config = getattr(model, "adapter_config", None)
    if config is None:
        raise ValueError("the model has no adapter to save; add one with add_adapter(model, config)")
    if config.extra_trainable:
        raise NotImplementedError(f"peft's format has no extra_trainable (here {config.extra_trainable}); "
                                  "save with core.save_adapter, or list whole modules in modules_to_save")
    fingerprint = base_fingerprint(model)            # raises if merged
    cfg = peft_config(config, model, inference_mode=True)
    if isinstance(config, PROMPT_METHODS):
        with torch.no_grad():
            encoder = model.prompt_encoder
            prompt = encoder.prefix() if isinstance(config, PrefixTuningConfig) else encoder.prompts()
        tensors = {"prompt_embeddings": prompt.detach().cpu().contiguous()}
    else:
        if config.target_modules == "all-linear":     # peft, too, writes the names "all-linear" selected
            cfg.target_modules = sorted(adapter_layers(model))
        tensors = peft_tensors(model)
    path = Path(path)
    cfg.base_model_name_or_path = getattr(model, "name_or_path", None) or None
    config_dict = cfg.to_dict()
    config_dict["target_modules"] = sorted(config_dict["target_modules"]) if isinstance(
        config_dict.get("target_modules"), (set, list)) else config_dict.get("target_modules")
    if processes.is_main():   # in a run of several processes (every rank calls this) rank 0 writes
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt", FINGERPRINT_KEY: fingerprint})
        (path / "adapter_config.json").write_text(json.dumps(config_dict, indent=2, default=list) + "\n")
    processes.barrier()
    return path


def load_peft_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Read a peft adapter folder onto a plain base model, as our adapter. In place.

    Everything is checked before the model is touched (so a failure leaves it unchanged): the config
    uses no option we do not implement; every tensor fits a module of this model with the right
    shape; the modules ``target_modules`` selects are exactly those the file has tensors for; and, for
    files written by ``save_peft_adapter``, the base fingerprint. A peft-written file carries no
    fingerprint, so another base with the same architecture (same names and shapes) loads without
    complaint.
    """
    path = Path(path)
    if not (path / "adapter_config.json").exists():
        raise FileNotFoundError(f"no adapter_config.json in {path}: not a peft adapter folder")
    cfg = json.loads((path / "adapter_config.json").read_text())
    if getattr(model, "adapter_config", None) is not None:
        raise RuntimeError("the model already has an adapter; load a peft adapter onto a plain base model")
    with safe_open(path / "adapter_model.safetensors", "pt") as f:
        metadata = f.metadata() or {}
    state = read_tensors(path / "adapter_model.safetensors")
    # our fingerprint, first: it leaves out what the adapter trains (modules_to_save), as when it was written
    if FINGERPRINT_KEY in metadata:
        fingerprint = base_fingerprint(model, AdapterConfig(modules_to_save=_modules_to_save(model, cfg)))
        if metadata[FINGERPRINT_KEY] != fingerprint:
            raise ValueError(f"the adapter in {path} was saved for another base model "
                             f"(fingerprint {metadata[FINGERPRINT_KEY]}, this model has {fingerprint})")
    kind = cfg.get("peft_type")
    if kind == "LORA":
        config, ours = _lora_from_peft(model, cfg, state, path)
    elif kind == "IA3":
        config, ours = _ia3_from_peft(model, cfg, state, path)
    elif kind in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"):
        config, ours = _prompt_from_peft(model, cfg, state, path)
    elif kind == "ADAPTION_PROMPT":
        config, ours = _adaption_prompt_from_peft(model, cfg, state, path)
    else:
        raise ValueError(f"{path} holds a {kind} adapter; load_peft_adapter reads LORA (and DoRA), IA3, "
                         "PROMPT_TUNING, P_TUNING, PREFIX_TUNING and ADAPTION_PROMPT")
    add_adapter(model, config)
    unexpected = model.load_state_dict(ours, strict=False).unexpected_keys
    if unexpected:   # every key was checked above, so this is a bug here, not a bad file
        raise RuntimeError(f"internal error: keys left over after the checks: {unexpected[:5]}")
    return model


def _lora_from_peft(model, cfg, state, path):
    unsupported = {k: cfg[k] for k, off in PEFT_UNSUPPORTED.items() if cfg.get(k) not in (off, None)}
    if unsupported:
        raise NotImplementedError(f"the adapter in {path} uses LoraConfig options we do not implement: {unsupported}")
    r, dora = cfg["r"], bool(cfg.get("use_dora"))
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    wanted, to_save = list(cfg.get("modules_to_save") or []), _modules_to_save(model, cfg)
    ours = {from_peft_key(k)[0]: t for k, t in state.items()}
    layers, problems = {}, []                     # layers: name -> the kinds of tensor it has
    for key, tensor in state.items():
        our_key, kind = from_peft_key(key)
        if kind == "saved":
            name = our_key.rpartition(".")[0]
            if name not in to_save:
                problems.append(f"{key}: {name!r} is not in modules_to_save {wanted}")
            elif our_key not in params or params[our_key].shape != tensor.shape:
                problems.append(f"{key}: this model has no parameter {our_key} of shape {tuple(tensor.shape)}")
            continue
        name = our_key.rsplit(".", 2)[0]
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
    targets = set(find_targets(model, target_modules, require_every_entry=False))
    if not isinstance(target_modules, str) and len(targets) < len(target_modules):
        target_modules = sorted(targets)          # our configs want every entry to match
    if not problems:
        problems += [f"target {n} has no tensors in the file" for n in sorted(targets - set(layers))]
        problems += [f"tensors for {n}, which target_modules does not select" for n in sorted(set(layers) - targets)]
    if problems:
        raise ValueError(f"the adapter in {path} does not fit this model ({len(problems)} problems): "
                         + "; ".join(problems[:5]))
    init = cfg.get("init_lora_weights", True)
    config = (DoRAConfig if dora else LoRAConfig)(
        r=r, alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0), use_rslora=cfg.get("use_rslora", False),
        init="gaussian" if init == "gaussian" else "kaiming", target_modules=target_modules, modules_to_save=to_save)
    return config, ours


def _modules_to_save(model, cfg) -> list[str]:
    """peft matches modules_to_save by name suffix, as target_modules, and adds "classifier" and
    "score" to it for SEQ_CLS; the modules of this model it names."""
    wanted = list(cfg.get("modules_to_save") or [])
    return sorted(n for n, _ in model.named_modules() if n and any(n == w or n.endswith("." + w) for w in wanted))


def _ia3_from_peft(model, cfg, state, path):
    unsupported = {k: cfg[k] for k, off in {"fan_in_fan_out": False, "exclude_modules": None}.items()
                   if cfg.get(k) not in (off, None)}
    if unsupported or cfg.get("init_ia3_weights") is False:
        raise NotImplementedError(f"the adapter in {path} uses IA3Config options we do not implement: "
                                  f"{unsupported or {'init_ia3_weights': False}}")
    targets, feedforward = cfg["target_modules"], cfg.get("feedforward_modules") or []
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    to_save = _modules_to_save(model, cfg)
    selected = set(find_targets(model, targets, require_every_entry=False))
    if not isinstance(targets, str) and len(selected) < len(targets):
        targets = sorted(selected)                # our configs want every entry to match
    config = IA3Config(target_modules=targets, feedforward_modules=feedforward, modules_to_save=to_save)
    ours, layers, problems = {}, set(), []
    for key, tensor in state.items():
        if not key.startswith(PEFT_PREFIX):
            problems.append(f"{key!r} is not a peft adapter key (they start with {PEFT_PREFIX!r})")
            continue
        name = key[len(PEFT_PREFIX):]
        if not name.endswith(".ia3_l"):           # a modules_to_save tensor keeps its name
            if name.rpartition(".")[0] not in to_save or name not in params or params[name].shape != tensor.shape:
                problems.append(f"{key}: no parameter {name} of shape {tuple(tensor.shape)} in modules_to_save {to_save}")
            ours[name] = tensor
            continue
        name = name[:-len(".ia3_l")]
        layer = modules.get(name)
        if not isinstance(layer, nn.Linear):
            problems.append(f"{key}: this model has no Linear layer {name!r}")
            continue
        on_input = matches(name, feedforward)
        expected = (1, layer.in_features) if on_input else (layer.out_features, 1)
        if tuple(tensor.shape) != expected:
            problems.append(f"{key}: shape {tuple(tensor.shape)}, but {name} "
                            f"({'feedforward, input' if on_input else 'output'} scaling) needs {expected}")
        layers.add(name)
        ours[f"{name}.l"] = tensor.flatten()
    if not problems:
        problems += [f"target {n} has no tensors in the file" for n in sorted(selected - layers)]
        problems += [f"tensors for {n}, which target_modules does not select" for n in sorted(layers - selected)]
    if problems:
        raise ValueError(f"the adapter in {path} does not fit this model ({len(problems)} problems): "
                         + "; ".join(problems[:5]))
    return config, ours


def _adaption_prompt_from_peft(model, cfg, state, path):
    """peft's AdaptionPrompt -> LLaMA-Adapter with its scalar gate; the tensors must be exactly those
    of the top ``adapter_layers`` attention modules, each prompt (1, adapter_len, d), each gate (1,)."""
    config = LlamaAdapterConfig(adapter_len=cfg["adapter_len"], adapter_layers=cfg["adapter_layers"], gate="scalar",
                                target_modules=[cfg.get("target_modules") or "self_attn"])
    names = find_targets(model, config.target_modules)
    if config.adapter_layers > len(names):
        raise ValueError(f"the adapter in {path} adapts {config.adapter_layers} layers; this model has {len(names)}")
    shapes = {"prompt": (1, config.adapter_len, model.config.hidden_size), "gate": (1,)}
    expected = {_adaption_key(f"{n}.{p}"): shape for n in names[-config.adapter_layers:] for p, shape in shapes.items()}
    problems = [f"{k}: missing" for k in sorted(set(expected) - set(state))]
    problems += [f"{k}: not a tensor of the top {config.adapter_layers} attention layers" for k in sorted(set(state) - set(expected))]
    problems += [f"{k}: shape {tuple(t.shape)}, expected {expected[k]}" for k, t in state.items()
                 if k in expected and tuple(t.shape) != expected[k]]
    if problems:
        raise ValueError(f"the adapter in {path} does not fit this model ({len(problems)} problems): "
                         + "; ".join(problems[:5]))
    ours = {}
    for key, tensor in state.items():
        module, _, param = key[len(PEFT_PREFIX):].rpartition(".")
        ours[f"{module}.{param[len('adaption_'):]}"] = tensor[0] if param == "adaption_prompt" else tensor
    return config, ours


def _prompt_from_peft(model, cfg, state, path):
    n, kind = cfg["num_virtual_tokens"], cfg["peft_type"]
    if set(state) != {"prompt_embeddings"}:
        raise ValueError(f"the {kind} adapter in {path} should hold one tensor, prompt_embeddings; it has {sorted(state)}")
    prompt = state["prompt_embeddings"]
    if kind == "PREFIX_TUNING":
        c = model.config
        heads = c.num_attention_heads
        width = (getattr(c, "num_key_value_heads", None) or heads) * (getattr(c, "head_dim", None) or c.hidden_size // heads)
        expected, config = (n, 2 * c.num_hidden_layers * width), PrefixTuningConfig(num_virtual_tokens=n)
    else:
        expected, config = (n, model.get_input_embeddings().embedding_dim), PromptTuningConfig(num_virtual_tokens=n)
    if tuple(prompt.shape) != expected:
        raise ValueError(f"the {kind} adapter in {path} has prompt_embeddings of shape {tuple(prompt.shape)}; "
                         f"{n} virtual tokens on this model need {expected}")
    return config, {"prompt_encoder.embedding.weight": prompt}


# ----------------------------------------------------------------------------- ShiRA: RoSA with r = 0

def shira_twin(model: nn.Module, base: nn.Module, task: str | None = "CAUSAL_LM"):
    """peft's ShiRA (a sparse-only adapter) on a copy of ``base``, with ``model``'s masks and values.

    ``model`` is a sparse-only RoSA model (r = 0) whose every layer has exactly r (m + n) entries, one r
    for all (``rosa.lora_budget_density``): ShiRA fixes that count, so we hand it our masks through its
    ``mask_fn`` and copy the values. ShiRA stores its indices in row-major order, which is CSR's order.
    Returns (peft model, {layer: (our values, ShiRA's weight)}) for ``equivalence.compare``.
    """
    from peft import ShiraConfig, get_peft_model
    layers = rosa_layers(model)
    if any(layer.r for layer in layers.values()):
        raise ValueError("ShiRA has no low-rank part: compare it with a RoSA model with r = 0")
    ranks = {}
    for name, layer in layers.items():
        m, n = layer.shape
        if layer.k % (m + n):
            raise ValueError(f"{name} has {layer.k} sparse entries; ShiRA needs a multiple of m + n = {m + n} "
                             "(build the RoSA config with lora_budget_density)")
        ranks[name] = layer.k // (m + n)
    if len(set(ranks.values())) != 1:
        raise ValueError(f"ShiRA has one r for all layers; these layers have budgets of ranks {sorted(set(ranks.values()))}")
    copied = copy.deepcopy(base)
    masks = {id(copied.get_submodule(n)): layer.mask() for n, layer in layers.items()}
    config = ShiraConfig(r=next(iter(ranks.values())), target_modules=list(layers), task_type=task)
    config.mask_fn = lambda base_layer, r, **kw: masks[id(base_layer)].to(base_layer.weight.dtype)
    theirs = get_peft_model(copied, config)
    pairs = {}
    with torch.no_grad():
        for name, layer in layers.items():
            shira = theirs.get_submodule(PEFT_PREFIX + name)
            rows, cols = shira.shira_indices["default"].long()
            if not (torch.equal(rows, layer.row_indices.long()) and torch.equal(cols, layer.col_indices.long())):
                raise RuntimeError(f"ShiRA's indices for {name} are not ours: peft changed its index order")
            shira.shira_weight["default"].copy_(layer.values)
            pairs[name] = (layer.values, shira.shira_weight["default"])
    return theirs, pairs
