"""Saving and loading adapters: only the adapter's tensors, its config, and a fingerprint of the base.

A folder written by ``save_adapter`` holds

* ``adapter.safetensors``: the adapter's tensors (and those of ``modules_to_save``/``extra_trainable``);
* ``adapter.json``: ``{"format": 2, "config": {"method": <registered name>, ...}, "base_fingerprint": ...}``.

``load_adapter`` checks everything before it changes the model, so a wrong base model, a
mismatched config or tensors that do not fit raise and leave the model as it was. Folders written
by the first release (no ``format``; the method stored as its file name, e.g. ``"adapters"``) load
too: the registry's aliases map the name, the config's ``renames_v1`` the tensor names.

In a run of several processes (``training.distributed``) ``save_adapter`` is collective: every rank
calls it, the tensors of an FSDP-sharded model are gathered, rank 0 writes, and all ranks wait for
the files before going on.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import processes, registry
from .adapter import AdapterConfig
from .inject import adapter_layers, add_adapter, is_adapter_key, remove_adapter

FORMAT = 2


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
        t = _whole(t).detach().to("cpu", torch.float64)
        h.update(f"{key.replace('.base_layer', '')}|{tuple(t.shape)}|"
                 f"{t.sum().item():.6e}|{t.abs().sum().item():.6e}\n".encode())
    return h.hexdigest()[:16]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: _whole(v).detach().cpu().contiguous() for k, v in model.state_dict().items()
            if is_adapter_key(model, k)}


def _whole(t: torch.Tensor) -> torch.Tensor:
    return processes.full_tensor(t)   # an FSDP shard gathered (a collective); any other tensor as it is


def _write_atomically(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path``: a crash mid-write never leaves a broken file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write ``adapter.safetensors`` and ``adapter.json`` (config + base fingerprint) to ``path``."""
    config = getattr(model, "adapter_config", None)
    if config is None:
        raise ValueError("the model has no adapter to save; add one with add_adapter(model, config)")
    path = Path(path)
    meta = {"format": FORMAT, "config": config.to_dict(), "base_fingerprint": base_fingerprint(model)}
    state = adapter_state_dict(model)
    if processes.is_main():   # in a parallel run rank 0 writes, the others wait for it below
        path.mkdir(parents=True, exist_ok=True)
        _write_atomically(path / "adapter.safetensors", lambda tmp: save_file(state, tmp))
        _write_atomically(path / "adapter.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
    processes.barrier()
    return path


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """``load_file(path)``, with an error that names the file when it is truncated or not safetensors."""
    try:
        return load_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: the adapter folder is incomplete") from None
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is corrupt or truncated (safetensors says: {e}); save the adapter again") from e


def read_saved(path: str | Path) -> tuple[AdapterConfig, dict[str, torch.Tensor], str]:
    """(config, tensors under today's names, base fingerprint) of a folder written by ``save_adapter``."""
    path = Path(path)
    if not (path / "adapter.json").exists():
        raise FileNotFoundError(f"no adapter.json in {path}: not a folder written by save_adapter")
    try:
        meta = json.loads((path / "adapter.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / 'adapter.json'} is not valid JSON ({e}): the file is corrupt") from e
    version = meta.get("format", 1)
    if version > FORMAT:
        raise ValueError(f"{path} was written in adapter format {version}; this version reads up to {FORMAT}")
    config = registry.config_from_dict(meta["config"])
    state = read_tensors(path / "adapter.safetensors")
    if version == 1:
        state = type(config).upgrade_v1_keys(state)
    return config, state, meta["base_fingerprint"]


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a saved adapter onto ``model`` (its base, or the same adapter already added). In place.

    Raises, leaving the model unchanged, if the base model's fingerprint differs, if the model
    carries an adapter with another config, or if the saved tensors do not fit.
    """
    saved, state, saved_fingerprint = read_saved(path)
    fingerprint = base_fingerprint(model, saved)
    if fingerprint != saved_fingerprint:
        raise ValueError(f"the adapter in {path} was saved for another base model "
                         f"(fingerprint {saved_fingerprint}, this model has {fingerprint})")
    current = getattr(model, "adapter_config", None)
    if current is not None and current.to_dict() != saved.to_dict():
        mine = current.to_dict()
        diff = {k: (v, mine.get(k)) for k, v in saved.to_dict().items() if mine.get(k) != v}
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
