"""Inject, freeze, count, merge and remove: what every method gets from ``add_adapter``.

``add_adapter(model, config)`` does the same for every method:

1. select the target modules by name (``targets.find_targets``);
2. build every adapter layer first (so a bad rank fails before the model is touched), then swap
   them in (``AdapterConfig.inject``);
3. freeze everything that is not an adapter parameter (or listed in ``modules_to_save``, or
   matched by ``extra_trainable``, e.g. the layer norms Houlsby adapters train).

``remove_adapter`` undoes all three, giving back every ``requires_grad`` flag it changed.
"""
from __future__ import annotations

import re

from torch import nn

from .adapter import AdapterConfig, AdapterLayer, ModelAdapter
from .targets import set_module


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


def merge_adapter(model: nn.Module) -> None:
    """Fold every adapter layer into its base weight (raises, changing nothing, if the method cannot)."""
    config = getattr(model, "adapter_config", None)
    if config is None:
        raise ValueError("the model has no adapter to merge")
    if type(config).mergeable is not True:
        raise NotImplementedError(f"{config.method} cannot be merged: {type(config).mergeable}")
    _merge_all(list(adapter_layers(model).values()))


def _merge_all(layers: list[AdapterLayer]) -> None:
    """All or nothing: every layer is checked first; should one still fail, those merged before it
    are unmerged again and the error raised."""
    problems = {layer.merge_problem() for layer in layers} - {None}
    if problems:
        raise NotImplementedError("; ".join(sorted(problems)))
    done = []
    try:
        for layer in layers:
            layer.merge()
            done.append(layer)
    except Exception:
        for layer in reversed(done):
            layer.unmerge()
        raise


def unmerge_adapter(model: nn.Module) -> None:
    for layer in adapter_layers(model).values():
        layer.unmerge()


def remove_adapter(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put the base layers back (after folding the adapter in, if ``merge``). In place."""
    if getattr(model, "adapter_config", None) is None:
        raise ValueError("the model has no adapter to remove (add one with add_adapter(model, config))")
    if merge:
        if type(model.adapter_config).mergeable is not True:
            raise NotImplementedError(f"{model.adapter_config.method} cannot be merged: {type(model.adapter_config).mergeable}")
        _merge_all([layer for layer in adapter_layers(model).values() if not layer.merged])
    for name, layer in adapter_layers(model).items():
        if not merge and layer.merged:
            layer.unmerge()
        set_module(model, name, layer.base_layer)
    for adapter in model_adapters(model).values():
        adapter.detach(model)
    for name, p in model.named_parameters():  # give back the requires_grad flags add_adapter changed
        p.requires_grad_(model._requires_grad_before.get(name, p.requires_grad))
    model.adapter_config = None
    return model
