"""The shared machinery every method uses: register, select, inject, freeze, count, save, load, merge.

* ``registry``: every method under the name a user types (``methods()``, ``register``, ``get``).
* ``adapter``: ``AdapterLayer`` (wraps one module), ``ModelAdapter`` (acts on the whole model) and
  ``AdapterConfig``, the base of every method's config.
* ``targets``: ``target_modules`` as peft reads it (``matches``, ``find_targets``), ``set_module``.
* ``inject``: ``add_adapter``, freezing, counting, ``merge_adapter``, ``remove_adapter``.
* ``checkpoint``: ``save_adapter``/``load_adapter`` and the base model's fingerprint.
* ``step``: the training-step protocol (``Step``, ``BackpropStep``), for methods that change how the
  loop updates the weights rather than what it trains.
* ``pretrained``: where a named pretrained model's files are (for a tokenizer a method needs).

The core imports nothing else of the package: methods build on it, never the other way round.
"""
from .adapter import AdapterConfig, AdapterLayer, ModelAdapter
from .checkpoint import adapter_state_dict, base_fingerprint, load_adapter, read_saved, save_adapter
from .inject import (add_adapter, adapter_layers, count_parameters, freeze_base, is_adapter_key, merge_adapter,
                     model_adapters, print_trainable_parameters, remove_adapter, unmerge_adapter)
from .registry import FAMILIES, Method, methods, register
from .step import BackpropStep, Step, StepResult, make_adamw
from .targets import find_targets, matches, set_module

__all__ = ["AdapterConfig", "AdapterLayer", "ModelAdapter", "FAMILIES", "Method", "methods", "register",
           "add_adapter", "adapter_layers", "model_adapters", "count_parameters", "print_trainable_parameters",
           "freeze_base", "is_adapter_key", "merge_adapter", "unmerge_adapter", "remove_adapter",
           "adapter_state_dict", "base_fingerprint", "save_adapter", "load_adapter", "read_saved",
           "find_targets", "matches", "set_module", "Step", "StepResult", "BackpropStep", "make_adamw"]
