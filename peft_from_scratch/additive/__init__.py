"""Additive methods: new modules or inputs beside the frozen network.

* ``ia3``: learned vectors rescaling keys, values and the FFN's intermediate activation (Liu et al. 2022),
  ``IA3Config``.
* ``llama_adapter``: prompts read by the top layers' attention through a zero-init gate (Zhang et al. 2023),
  ``LlamaAdapterConfig``.
* ``houlsby``: bottleneck adapters after (or beside) sub-layers (Houlsby et al. 2019), ``HoulsbyConfig``;
  built from ``bottleneck.Bottleneck``.
* ``compacter``: Houlsby adapters whose projections are sums of Kronecker products with shared factors
  (Karimi Mahabadi et al. 2021), ``CompacterConfig``; Compacter++ is its "pfeiffer" placement.
* ``prompt_tuning``: a trained prompt before the input embeddings (Lester et al. 2021), ``PromptTuningConfig``.
* ``p_tuning``: the prompt from a BiLSTM encoder (Liu et al. 2021), ``PTuningConfig``.
* ``prefix_tuning``: trained keys and values in every layer (Li & Liang 2021), ``PrefixTuningConfig``.
  The three share ``soft_prompt``'s forward hook.
"""
from .compacter import CompacterConfig
from .houlsby import HoulsbyConfig
from .ia3 import IA3Config
from .llama_adapter import LlamaAdapterConfig
from .p_tuning import PTuningConfig
from .prefix_tuning import PrefixTuningConfig, fold_prefix
from .prompt_tuning import PromptTuningConfig

__all__ = ["CompacterConfig", "HoulsbyConfig", "IA3Config", "LlamaAdapterConfig", "PromptTuningConfig", "PTuningConfig", "PrefixTuningConfig", "fold_prefix"]
