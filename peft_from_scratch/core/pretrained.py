"""Where a pretrained model's files are, for the few methods that need more than the model itself.

Prompt tuning's text and class-label inits tokenize words, so they need a tokenizer, named in the
config by ``tokenizer_name_or_path``. A name may be a folder, a hub id, or one of the project's
offline models (``models.py`` registers the resolver that maps those to their local folders), and
the method asks ``pretrained_path`` instead of importing the model loader.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

_RESOLVERS: list[Callable[[str], Path | str | None]] = []


def register_resolver(resolver: Callable[[str], Path | str | None]) -> None:
    """``resolver(name)`` returns a local folder for ``name``, or None if it does not know it."""
    if resolver not in _RESOLVERS:
        _RESOLVERS.append(resolver)


def pretrained_path(name: str) -> str:
    """The local folder a registered resolver knows for ``name``, else ``name`` unchanged."""
    for resolver in _RESOLVERS:
        found = resolver(name)
        if found is not None:
            return str(found)
    return name


def load_tokenizer(name: str):
    """``AutoTokenizer.from_pretrained`` on ``pretrained_path(name)``."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(pretrained_path(name))
