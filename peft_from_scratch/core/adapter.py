"""The two shapes an adapter takes, and the config every method's config extends.

* ``AdapterLayer`` wraps one frozen module (``self.base_layer``) and adds the method's parameters
  (LoRA, DoRA, RoSA, bottleneck adapters). Everything under the layer that is not under
  ``base_layer`` is adapter state.
* ``ModelAdapter`` acts on the whole model instead (soft prompts, prefixes): it is attached as one
  submodule and hooks into the model's forward. Everything under it is adapter state.

``AdapterConfig`` holds what every method has (which modules, what else to train) and what the
contract test needs to know about the method (``identity_at_init``, ``mergeable``, ``examples``).
A method file subclasses it, adds its hyper-parameters, implements ``make_layer`` (or ``inject``)
and registers the class under its name (``core.registry.register``).
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from .targets import check_wraps, find_targets, set_module


class AdapterLayer(nn.Module):
    """A module that wraps ``base_layer`` (frozen) and adds trainable adapter parameters.

    Subclasses implement ``forward`` and, if the method folds into the base weight, ``delta_weight()``
    (then ``merge``/``unmerge`` are W <- W +/- delta) or their own ``_merge``/``_unmerge`` (DoRA's
    rescaling is not additive).
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

    def merge_problem(self) -> str | None:
        """Why this layer cannot be merged now, or None. Checked for every layer before any merges."""
        weight = getattr(self.base_layer, "weight", None)
        if weight is None or not weight.dtype.is_floating_point:
            return (f"cannot merge {type(self).__name__} into a {getattr(weight, 'dtype', 'missing')} (quantized) base "
                    "weight: the update is a float matrix. Keep the adapter separate, or merge on the float model "
                    "(load it without quantization, add the adapter, load_adapter, then merge)")
        return None

    def _merge(self) -> None:
        weight = self.base_layer.weight
        weight.data += self.delta_weight().to(weight.dtype)

    def _unmerge(self) -> None:
        weight = self.base_layer.weight
        weight.data -= self.delta_weight().to(weight.dtype)

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

    ``attach(model)`` registers it as the submodule ``model.<attr>`` and, where the class defines
    ``pre_forward(model, args, kwargs)``, registers that as a forward pre-hook of the model (with
    keyword arguments: it may rewrite them, as a soft prompt does, or pop its own, as HyperFormer's
    ``task``); ``detach(model)`` undoes both.
    """
    attr: ClassVar[str] = "prompt_encoder"
    pre_forward = None

    def attach(self, model: nn.Module) -> None:
        setattr(model, self.attr, self)
        if self.pre_forward is not None:
            self._hook = model.register_forward_pre_hook(self.pre_forward, with_kwargs=True)

    def detach(self, model: nn.Module) -> None:
        hook = self.__dict__.pop("_hook", None)
        if hook is not None:
            hook.remove()
        delattr(model, self.attr)


@dataclass
class AdapterConfig:
    """What every method's config has. Subclasses add their hyper-parameters and ``make_layer``.

    Class attributes a method sets (the contract test reads them):

    * ``method``: its registered name (set by ``register``).
    * ``wraps``: the module types ``make_layer`` accepts.
    * ``identity_at_init``: True if a fresh adapter leaves the model's outputs unchanged, else the
      reason it does not (a string).
    * ``mergeable``: True if ``merge`` folds it into the base weights, else the reason it cannot.
    * ``renames_v1``: (regex, replacement) pairs that turn the keys of an adapter saved by the first
      release (before ``adapter.json`` had a format number) into today's.
    """
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] = field(default_factory=list)  # trained fully, e.g. ["classifier"]
    extra_trainable: list[str] = field(default_factory=list)  # regexes of parameter names trained too

    method: ClassVar[str] = ""
    wraps: ClassVar[tuple[type, ...]] = (nn.Linear,)
    identity_at_init: ClassVar[bool | str] = True
    mergeable: ClassVar[bool | str] = True
    renames_v1: ClassVar[tuple[tuple[str, str], ...]] = ()

    def make_layer(self, name: str, module: nn.Module) -> AdapterLayer:
        raise NotImplementedError

    def inject(self, model: nn.Module) -> None:
        """Put the adapter into ``model``, raising before any change if it does not fit.

        The default wraps every target module with ``make_layer``; model-level methods override
        this to attach a ``ModelAdapter``.
        """
        targets = find_targets(model, self.target_modules)
        check_wraps(model, targets, self.wraps, self.method)
        # Build all layers before touching the model, so a bad hyper-parameter changes nothing.
        install(model, {n: self.make_layer(n, model.get_submodule(n)) for n in targets})

    def to_dict(self) -> dict:
        """JSON-ready (tuples become lists), so a saved config compares equal to a live one."""
        return json.loads(json.dumps({"method": self.method, **dataclasses.asdict(self)}))

    @classmethod
    def upgrade_v1_keys(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors saved by the first release, renamed with ``renames_v1``."""
        out = {}
        for key, tensor in state.items():
            for pattern, replacement in cls.renames_v1:
                key = re.sub(pattern, replacement, key)
            out[key] = tensor
        return out

    @classmethod
    def examples(cls) -> list[tuple[str, AdapterConfig]]:
        """At least two different small configs, each with the tiny test model it fits ("llama" or
        "bert", ``models.tiny_llama``/``tiny_bert``): what the contract test runs, and a start for a reader.
        The first two are for the same tiny model."""
        raise NotImplementedError(f"{cls.__name__} must list examples() for the contract test")

    def simulate_training(self, model: nn.Module, generator: torch.Generator) -> None:
        """Move a fresh adapter off its initial values, as training would (B != 0, ...), so that a
        check of merging, saving or loading compares something non-trivial. Adds small noise to every
        trainable tensor; a method whose state is more than its parameters (RoSA's mask) extends it."""
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=generator).to(p))

    @classmethod
    def invalid_examples(cls) -> list[dict]:
        """Keyword arguments each of which must make the constructor raise (the contract test checks)."""
        return []


def install(model: nn.Module, layers: dict[str, AdapterLayer], shared: ModelAdapter | None = None) -> None:
    """Put layers built beforehand into ``model`` (name -> layer) and attach the model-level part they
    share, if any (Compacter's rule, HyperFormer's hypernetwork). A clash of ``shared``'s attribute
    with one of the model's is refused before anything changes."""
    if shared is not None and hasattr(model, shared.attr):
        raise ValueError(f"the model already has a submodule named {shared.attr!r}, where {type(shared).__name__} "
                         "would live; remove the adapter there first")
    for name, layer in layers.items():
        set_module(model, name, layer)
    if shared is not None:
        shared.attach(model)
