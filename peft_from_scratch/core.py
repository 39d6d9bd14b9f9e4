"""The shared machinery every method uses: select, inject, freeze, count, save, load, merge.

A method file (``lora.py``, ``dora.py`` ...) defines two things and nothing else of this:

* an ``AdapterLayer`` subclass that wraps one base module (``self.base_layer``) and adds the
  method's parameters, and
* an ``AdapterConfig`` subclass: the method's hyper-parameters plus ``make_layer(name, module)``.

``add_adapter(model, config)`` then does the rest, the same way for every method:

1. select the target modules by name, with the meaning peft gives ``target_modules``: a list
   matches a module whose full name equals an entry or ends with ``"." + entry``; a single string
   is a regular expression that must match the full name; ``"all-linear"`` is every ``nn.Linear``
   but the output head;
2. build every adapter layer first (so a bad rank fails before the model is touched), then swap
   them in;
3. freeze everything that is not an adapter parameter (or listed in ``modules_to_save``, or
   matched by ``extra_trainable``, e.g. the layer norms Houlsby adapters train).

Methods that act on the whole model rather than on single modules (prompt tuning, P-tuning, prefix
tuning) override ``AdapterConfig.inject``: they attach one ``ModelAdapter`` submodule to the model,
which hooks into the model's forward. Its parameters are adapter parameters like any other, so
freezing, counting, save/load and remove come from this file unchanged.

Adapters are saved as ``adapter.safetensors`` (only the adapter tensors) plus ``adapter.json``
(the config and a fingerprint of the base model). ``load_adapter`` checks both before it changes
anything, so a wrong base model or a mismatched config raises and leaves the model as it was.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from safetensors.torch import load_file, save_file


# ----------------------------------------------------------------------------- the two base classes

class AdapterLayer(nn.Module):
    """A module that wraps ``base_layer`` (frozen) and adds trainable adapter parameters.

    Subclasses implement ``forward`` and, if the method can be folded into the base weight,
    ``delta_weight()`` (then ``merge``/``unmerge`` work as W <- W +/- delta) or their own
    ``_merge``/``_unmerge`` (DoRA's rescaling is not additive).
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weights")

    def state_problems(self, state: dict[str, torch.Tensor], prefix: str) -> list[str]:
        """Why the saved tensors ``state[prefix + name]`` cannot be loaded into this layer, beyond the
        missing keys and shapes ``load_adapter`` checks itself (RoSA: values without their mask)."""
        return []

    def _merge(self) -> None:
        self.base_layer.weight.data += self.delta_weight().to(self.base_layer.weight.dtype)

    def _unmerge(self) -> None:
        self.base_layer.weight.data -= self.delta_weight().to(self.base_layer.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise RuntimeError(f"{type(self).__name__} is already merged; call unmerge() first")
        self._merge()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__} is not merged; there is nothing to unmerge")
        self._unmerge()
        self.merged = False


class ModelAdapter(nn.Module):
    """An adapter that acts on the whole model instead of wrapping one module (prompts, prefixes).

    ``attach(model)`` registers it as the submodule ``model.<attr>`` and hooks it into the model's
    forward; ``detach(model)`` undoes both. Everything under ``model.<attr>`` counts as adapter
    state (trainable, saved, left out of the base fingerprint).
    """
    attr: ClassVar[str] = "prompt_encoder"

    def attach(self, model: nn.Module) -> None:
        setattr(model, self.attr, self)

    def detach(self, model: nn.Module) -> None:
        delattr(model, self.attr)


@dataclass
class AdapterConfig:
    """What every method's config has. Subclasses add their hyper-parameters and ``make_layer``."""
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] = field(default_factory=list)  # trained fully, e.g. ["classifier"]
    extra_trainable: list[str] = field(default_factory=list)  # regexes of parameter names trained too

    method: ClassVar[str] = ""                               # the module name: "lora", "dora", ...
    wraps: ClassVar[tuple[type, ...]] = (nn.Linear,)         # module types make_layer accepts

    def make_layer(self, name: str, module: nn.Module) -> AdapterLayer:
        raise NotImplementedError

    def inject(self, model: nn.Module) -> None:
        """Put the adapter into ``model``, raising before any change if it does not fit.

        The default wraps every target module with ``make_layer``; model-level methods override
        this to attach a ``ModelAdapter``.
        """
        targets = find_targets(model, self.target_modules)
        wrong = [(n, type(model.get_submodule(n)).__name__) for n in targets
                 if not isinstance(model.get_submodule(n), self.wraps)]
        if wrong:
            raise TypeError(f"{self.method} can wrap {', '.join(t.__name__ for t in self.wraps)} modules; "
                            f"these targets are not: {', '.join(f'{n} ({t})' for n, t in wrong[:5])}")
        # Build all layers before touching the model, so a bad hyper-parameter changes nothing.
        layers = {n: self.make_layer(n, model.get_submodule(n)) for n in targets}
        for name, layer in layers.items():
            _set_module(model, name, layer)

    def to_dict(self) -> dict:
        """JSON-ready (tuples become lists), so a saved config compares equal to a live one."""
        return json.loads(json.dumps({"method": self.method, **dataclasses.asdict(self)}))

    @staticmethod
    def from_dict(d: dict) -> "AdapterConfig":
        d = dict(d)
        cls = _config_class(d.pop("method"))
        return cls(**d)


def _config_class(method: str) -> type[AdapterConfig]:
    """Import ``peft_from_scratch.<module>`` and return its AdapterConfig subclass for ``method``.

    The module is the method's name, or the part before a colon when one file holds several
    methods ("prompts:prefix_tuning" lives in ``prompts.py``).
    """
    name = method.split(":")[0]
    try:
        module = importlib.import_module(f"peft_from_scratch.{name}")
    except ModuleNotFoundError as e:
        raise ValueError(f"unknown adapter method {method!r}: no module peft_from_scratch.{name}") from e
    for obj in vars(module).values():
        if isinstance(obj, type) and issubclass(obj, AdapterConfig) and obj.method == method:
            return obj
    raise ValueError(f"peft_from_scratch.{name} defines no AdapterConfig with method={method!r}")


# ----------------------------------------------------------------------------- selecting targets

CLASSIFIER_HEADS = ("classifier", "score")  # peft's SEQ_CLS head names


def _output_heads(model: nn.Module) -> set[str]:
    """What "all-linear" leaves out, as peft does: the output embedding and classifier heads."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n for n, m in model.named_modules() if (out is not None and m is out) or n.split(".")[0] in CLASSIFIER_HEADS}


def matches(name: str, target_modules: list[str] | str) -> bool:
    """peft's rule: a string is a full-match regex; a list matches exact names or name suffixes."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def find_targets(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Names of the modules ``target_modules`` selects; raises with close names if none match."""
    names = [n for n, _ in model.named_modules() if n]
    if target_modules == "all-linear":
        heads = _output_heads(model)
        found = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in heads]
    else:
        if isinstance(target_modules, (list, tuple)) and not target_modules:
            raise ValueError("target_modules is empty: name at least one module")
        found = [n for n in names if matches(n, target_modules)]
    if not found:
        raise ValueError(_no_match_message(target_modules, names))
    if not isinstance(target_modules, str):  # every listed name must match something
        missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in found)]
        if missing:
            raise ValueError(_no_match_message(missing, names))
    return found


def _no_match_message(targets, names: list[str]) -> str:
    suffixes = sorted({n.split(".")[-1] for n in names})
    wanted = [targets] if isinstance(targets, str) else list(targets)
    lines = [f"target_modules {targets!r} matched no module of the model."]
    for t in wanted:
        close = difflib.get_close_matches(t.split(".")[-1], suffixes, n=3, cutoff=0.5)
        if close:
            lines.append(f"  {t!r}: did you mean {', '.join(map(repr, close))}?")
    lines.append(f"Module names end in: {', '.join(suffixes[:40])}{' ...' if len(suffixes) > 40 else ''}")
    return "\n".join(lines)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


# ----------------------------------------------------------------------------- inject and freeze

def add_adapter(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Replace the selected modules with ``config``'s adapter layers and freeze the rest. In place."""
    if getattr(model, "adapter_config", None) is not None:
        raise RuntimeError(f"the model already has a {model.adapter_config.method} adapter; "
                           "call remove_adapter(model) first")
    for name in config.modules_to_save:
        model.get_submodule(name)  # raises AttributeError naming the missing module
    for pattern in config.extra_trainable:
        if not any(re.fullmatch(pattern, n) for n, _ in model.named_parameters()):
            raise ValueError(f"extra_trainable pattern {pattern!r} matches no parameter of the model")
    requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
    config.inject(model)  # raises, leaving the model unchanged, if the adapter does not fit
    model._requires_grad_before = requires_grad_before
    model.adapter_config = config
    freeze_base(model)
    return model


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def model_adapters(model: nn.Module) -> dict[str, ModelAdapter]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ModelAdapter)}


def is_adapter_key(model: nn.Module, key: str, config: AdapterConfig | None = None) -> bool:
    """True for state-dict keys that belong to the adapter (not to a wrapped base layer).

    ``config`` (default: the model's) decides which base tensors are trained too: ``modules_to_save``
    and ``extra_trainable``.
    """
    config = config or getattr(model, "adapter_config", None)
    if config and any(key == m or key.startswith(m + ".") for m in config.modules_to_save):
        return True
    if config and any(re.fullmatch(p, key.replace(".base_layer", "")) for p in config.extra_trainable):
        return True
    if any(key.startswith(n + ".") for n in model_adapters(model)):
        return True
    return any(key.startswith(n + ".") and not key.startswith(n + ".base_layer.") for n in adapter_layers(model))


def freeze_base(model: nn.Module) -> None:
    """requires_grad only for adapter parameters and ``modules_to_save``."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_key(model, name))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), counting shared (tied) parameters once."""
    params = list(model.parameters())  # parameters() already skips duplicates of tied weights
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable_parameters(model: nn.Module) -> str:
    """The same line peft's ``print_trainable_parameters`` prints; also returned."""
    trainable, total = count_parameters(model)
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    print(line)
    return line


# ----------------------------------------------------------------------------- merge and remove

def merge_adapter(model: nn.Module) -> None:
    for layer in adapter_layers(model).values():
        layer.merge()


def unmerge_adapter(model: nn.Module) -> None:
    for layer in adapter_layers(model).values():
        layer.unmerge()


def remove_adapter(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put the base layers back (after folding the adapter in, if ``merge``). In place."""
    for name, layer in adapter_layers(model).items():
        if merge and not layer.merged:
            layer.merge()
        if not merge and layer.merged:
            layer.unmerge()
        _set_module(model, name, layer.base_layer)
    for adapter in model_adapters(model).values():
        adapter.detach(model)
    for name, p in model.named_parameters():  # give back the requires_grad flags add_adapter changed
        p.requires_grad_(model._requires_grad_before.get(name, p.requires_grad))
    model.adapter_config = None
    return model


# ----------------------------------------------------------------------------- save and load

def base_fingerprint(model: nn.Module, config: AdapterConfig | None = None) -> str:
    """A hash of the base model's tensors (names, shapes and values), ignoring any adapter.

    Names are taken as the plain model has them (``.base_layer`` dropped), so the fingerprint of an
    adapted model equals that of its base. Values enter through float64 sums, rounded so that the
    same weights give the same hash on any machine. Tensors the adapter trains (``modules_to_save``,
    ``extra_trainable`` of ``config``, default the model's) are left out, so a plain model and the
    same model with the adapter added have the same fingerprint.
    """
    if any(layer.merged for layer in adapter_layers(model).values()):
        raise RuntimeError("the adapter is merged into the base weights; call unmerge_adapter(model) first")
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        if is_adapter_key(model, key, config):
            continue
        t = t.detach().to("cpu", torch.float64)
        h.update(f"{key.replace('.base_layer', '')}|{tuple(t.shape)}|"
                 f"{t.sum().item():.6e}|{t.abs().sum().item():.6e}\n".encode())
    return h.hexdigest()[:16]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if is_adapter_key(model, k)}


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write ``adapter.safetensors`` and ``adapter.json`` (config + base fingerprint) to ``path``."""
    config = getattr(model, "adapter_config", None)
    if config is None:
        raise ValueError("the model has no adapter to save; add one with add_adapter(model, config)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"config": config.to_dict(), "base_fingerprint": base_fingerprint(model)}
    save_file(adapter_state_dict(model), path / "adapter.safetensors")
    (path / "adapter.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a saved adapter onto ``model`` (its base, or the same adapter already added). In place.

    Raises, leaving the model unchanged, if the base model's fingerprint differs, if the model
    carries an adapter with another config, or if the saved tensors do not fit.
    """
    path = Path(path)
    if not (path / "adapter.json").exists():
        raise FileNotFoundError(f"no adapter.json in {path}: not a folder written by save_adapter")
    meta = json.loads((path / "adapter.json").read_text())
    state = load_file(path / "adapter.safetensors")
    saved = AdapterConfig.from_dict(meta["config"])
    fingerprint = base_fingerprint(model, saved)
    if fingerprint != meta["base_fingerprint"]:
        raise ValueError(f"the adapter in {path} was saved for another base model "
                         f"(fingerprint {meta['base_fingerprint']}, this model has {fingerprint})")
    current = getattr(model, "adapter_config", None)
    if current is not None and current.to_dict() != saved.to_dict():
        diff = {k: (v, current.to_dict().get(k)) for k, v in saved.to_dict().items() if current.to_dict().get(k) != v}
        raise ValueError(f"the adapter in {path} has another config than the model's; "
                         f"(saved, model) differ in: {diff}")
    added = current is None
    if added:
        add_adapter(model, saved)
    own = adapter_state_dict(model)
    problems = [p for name, layer in adapter_layers(model).items() for p in layer.state_problems(state, name + ".")]
    problems += sorted(set(own) ^ set(state)) + [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if problems:
        if added:
            remove_adapter(model)
        raise ValueError(f"the tensors in {path} do not fit the adapter: {problems[:5]}")
    model.load_state_dict(state, strict=False)
    return model
