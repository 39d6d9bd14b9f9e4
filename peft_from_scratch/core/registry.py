"""The method registry: every method under the name a user types, with its family and its paper.

A method file registers its config class (or, for methods that are not adapters, its class or
function) once, where it is defined::

    @register("lora", family="reparameterized", paper="hu2021lora")
    @dataclass
    class LoRAConfig(AdapterConfig): ...

``adapter.json`` stores that name, and loading finds the class through this table, never by
importing a file named after the method: files can move without breaking what users saved. Names
that earlier releases wrote are kept in ``ALIASES``.

Kinds of method: ``"adapter"`` (an ``AdapterConfig``: added to a model, saved, merged; every one
passes the contract test in ``tests/test_contract.py``), ``"quantization"`` (a storage format for
the frozen base), ``"optimizer"`` and ``"step"`` (how the training loop updates the weights), and
``"recipe"`` (a combination of those: QLoRA is an NF4 base + LoRA + a paged optimizer).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from .adapter import AdapterConfig

FAMILIES = {
    "additive": "new modules or inputs beside the frozen network (adapters, soft prompts, prefixes)",
    "selective": "a chosen subset of the network's own weights (biases, masks)",
    "reparameterized": "a new parameterisation of the update ΔW of existing weights (low-rank, sparse)",
    "quantized": "a compressed storage format for the frozen base, and adapters built on it",
    "optimizers": "how full parameters are updated within a small memory (optimizers, training steps)",
}
KINDS = ("adapter", "quantization", "optimizer", "step", "recipe")

# Names written to adapter.json by earlier releases (before the registry, the file name was stored).
ALIASES = {
    "adapters": "houlsby",
    "prompts:prompt_tuning": "prompt_tuning",
    "prompts:p_tuning": "p_tuning",
    "prompts:prefix_tuning": "prefix_tuning",
}


@dataclass(frozen=True)
class Method:
    """One registered method."""
    name: str            # what the user types and adapter.json stores
    family: str          # a key of FAMILIES
    kind: str            # one of KINDS
    paper: str           # its BibTeX key in references/peft_from_scratch.bib
    obj: object          # the AdapterConfig subclass, or the class / function of other kinds
    parent: str | tuple[str, ...] | None   # the method(s) this one is a declared variant of ("dora" -> "lora"),
                                           # or composes (MAM: a parallel adapter and a prefix)

    @property
    def parents(self) -> tuple[str, ...]:
        return () if self.parent is None else (self.parent,) if isinstance(self.parent, str) else tuple(self.parent)

    @property
    def module(self) -> str:
        """Where it is defined, e.g. ``peft_from_scratch.reparameterized.lora``."""
        return self.obj.__module__

    @property
    def file(self) -> str:
        """Its file relative to the repository, e.g. ``peft_from_scratch/reparameterized/lora.py``."""
        return self.module.replace(".", "/") + ".py"


_METHODS: dict[str, Method] = {}


def register(name: str, *, family: str, paper: str, kind: str = "adapter", parent: str | tuple[str, ...] | None = None):
    """Class or function decorator: register ``name``. An adapter config gets ``method = name``."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if name in ALIASES:
        raise ValueError(f"{name!r} is an alias of {ALIASES[name]!r}, kept so that old adapters load")
    for p in () if parent is None else (parent,) if isinstance(parent, str) else parent:
        if p not in _METHODS:
            raise ValueError(f"{name!r} declares parent {p!r}, which is not registered (register the parent first)")

    def decorate(obj):
        if name in _METHODS and _METHODS[name].obj is not obj:
            raise ValueError(f"method name {name!r} is already taken by {_METHODS[name].module}")
        if kind == "adapter":
            if not (isinstance(obj, type) and issubclass(obj, AdapterConfig)):
                raise TypeError(f"an adapter method registers its AdapterConfig subclass, got {obj!r}")
            obj.method = name
        _METHODS[name] = Method(name, family, kind, paper, obj, parent)
        return obj

    return decorate


def resolve(name: str) -> str:
    """The registered name for ``name`` or one of its aliases."""
    return ALIASES.get(name, name)


def get(name: str) -> Method:
    """The method called ``name`` (or an alias of it); an unknown name fails with the close ones."""
    method = _METHODS.get(resolve(name))
    if method is None:
        close = difflib.get_close_matches(name, list(_METHODS) + list(ALIASES), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown method {name!r}.{hint} Registered: {', '.join(sorted(_METHODS))}")
    return method


def config_class(name: str) -> type[AdapterConfig]:
    """The ``AdapterConfig`` subclass of the adapter method ``name``."""
    method = get(name)
    if method.kind != "adapter":
        raise ValueError(f"{name!r} is a {method.kind}, not an adapter method")
    return method.obj


def config_from_dict(d: dict) -> AdapterConfig:
    """Rebuild a config from ``AdapterConfig.to_dict()`` (what adapter.json holds)."""
    d = dict(d)
    return config_class(d.pop("method"))(**d)


def methods(kind: str | None = None, family: str | None = None) -> list[Method]:
    """Every registered method (of one kind or family), in family order then name."""
    order = list(FAMILIES)
    return sorted((m for m in _METHODS.values() if (kind is None or m.kind == kind)
                   and (family is None or m.family == family)),
                  key=lambda m: (order.index(m.family), m.name))
