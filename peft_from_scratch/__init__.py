"""peft_from_scratch: parameter-efficient fine-tuning methods built from scratch, one file per method.

The package is laid out as the surveys in the reading list sort the methods (Ding et al. 2022,
Lialin et al. 2023, Han et al. 2024). The placement rule: **a method lives where its trainable
delta lives.**

* ``additive/``: new modules or inputs beside the frozen network (bottleneck adapters, soft
  prompts, prefixes);
* ``selective/``: a chosen subset of the network's own weights (gradient masks);
* ``reparameterized/``: a new parameterisation of the update ΔW of existing weights (LoRA, DoRA,
  RoSA);
* ``quantized/``: a compressed storage format for the frozen base, and the recipes built on it
  (NF4, QLoRA);
* ``optim/``: how full parameters are updated within a small memory (paged AdamW; the training
  step protocol is ``core.step``).

Around them: ``core/`` (registry, injection, freezing, counting, saving, loading, merging),
``blocks/`` (pieces several methods share: the low-rank branch, gradient scores and masks),
``kernels/`` (Triton, each kernel beside its PyTorch reference), ``interop/`` (peft and
AdapterHub: names, files, twins) and ``training/`` (the one loop and its pluggable steps), with
``models``, ``data``, ``evaluate``, ``equivalence``, ``notebook`` and ``bib`` for the notebooks.

Imports only go one way: ``kernels`` imports nothing of the package; ``core`` only itself;
``blocks`` the core and the kernels; a method the core, the blocks, the kernels, the shared
(non-method) files of its own family and, for a declared variant, its parent; ``interop`` and the
rest may import methods, never the reverse (``tests/test_imports.py`` checks it).

Every method registers under the name a user types (``methods()`` lists them)::

    import peft_from_scratch as pfs
    model = pfs.add_adapter(model, pfs.LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    pfs.train(model, loader, pfs.TrainConfig(lr=2e-4))
    pfs.save_adapter(model, "my-adapter")          # adapter.json stores "lora"
"""
import logging
import warnings

# In a Jupyter kernel without ipywidgets, tqdm.auto (imported by datasets, transformers and peft) warns
# that it falls back to the text bar; the text bar is what the notebooks want. Import this package
# before peft or datasets in a notebook, so the filter is in place when they import tqdm.auto.
warnings.filterwarnings("ignore", message="IProgress not found")
# peft imports bitsandbytes, whose CPU backend then tries to fetch an optional compiled 4-bit matmul
# ("kernels-community" on the Hugging Face hub); offline that fails and it logs "Failed to load CPU
# gemm_4bit_forward" before falling back to its own C++ path. Drop that one record, nothing else.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward"))

from . import additive, optim, quantized, reparameterized, selective  # noqa: E402,F401 (each registers its methods)
from . import data, equivalence, evaluate, models  # noqa: E402,F401
from .additive import CompacterConfig, HoulsbyConfig, IA3Config, LlamaAdapterConfig, PrefixTuningConfig, PromptTuningConfig, PTuningConfig, fold_prefix
from .core import (add_adapter, adapter_layers, count_parameters, load_adapter, merge_adapter, methods,
                   print_trainable_parameters, remove_adapter, save_adapter, unmerge_adapter)
from .optim import PagedAdamW
from .quantized import Linear4bit, prepare_qlora, quantize_model
from .reparameterized import DoRAConfig, LoRAConfig, RoSAConfig
from .selective import MaskedGradientStep
from .training import BackpropStep, TrainConfig, evaluate_loss, train

__all__ = ["methods", "add_adapter", "remove_adapter", "save_adapter", "load_adapter", "merge_adapter",
           "unmerge_adapter", "adapter_layers", "count_parameters", "print_trainable_parameters",
           "LoRAConfig", "DoRAConfig", "RoSAConfig", "CompacterConfig", "HoulsbyConfig", "IA3Config", "LlamaAdapterConfig", "PromptTuningConfig", "PTuningConfig",
           "PrefixTuningConfig", "fold_prefix", "Linear4bit", "quantize_model", "prepare_qlora", "PagedAdamW",
           "train", "TrainConfig", "evaluate_loss", "BackpropStep", "MaskedGradientStep"]
