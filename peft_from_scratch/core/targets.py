"""Selecting modules by name, with the meaning peft gives ``target_modules``, and swapping them.

* a list matches a module whose full name equals an entry or ends with ``"." + entry``;
* a single string is a regular expression that must match the full name;
* ``"all-linear"`` is every ``nn.Linear`` but the output head (and classifier heads), as in peft.

This is the only place that rule is written; every method, ``density_pattern`` and the peft
interop use ``matches``/``find_targets``.
"""
from __future__ import annotations

import difflib
import re

from torch import nn

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


def find_targets(model: nn.Module, target_modules: list[str] | str, require_every_entry: bool = True) -> list[str]:
    """Names of the modules ``target_modules`` selects; raises with close names if none match.

    With a list, every entry must match some module unless ``require_every_entry=False`` (peft's own
    reading, used when loading a peft adapter whose list names modules this model does not have).
    """
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
    if require_every_entry and not isinstance(target_modules, str):
        missing = [t for t in target_modules if not any(matches(n, [t]) for n in found)]
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


def check_wraps(model: nn.Module, targets: list[str], wraps: tuple[type, ...], method: str) -> None:
    """Raise ``TypeError`` naming the targets that are not of a type the method can wrap."""
    wrong = [(n, type(model.get_submodule(n)).__name__) for n in targets
             if not isinstance(model.get_submodule(n), wraps)]
    if wrong:
        raise TypeError(f"{method} can wrap {', '.join(t.__name__ for t in wraps)} modules; "
                        f"these targets are not: {', '.join(f'{n} ({t})' for n, t in wrong[:5])}")


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (a dotted path) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
