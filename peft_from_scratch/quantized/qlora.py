"""QLoRA: 4-bit NF4 base weights + LoRA on every linear layer + a paged optimizer (Dettmers et al. 2023).

QLoRA (arXiv 2305.14314) fine-tunes a model whose frozen weights are stored in 4 bits. Per layer
(paper, eq. 5), with the LoRA factors L1 = A^T (d_in x r) and L2 = B^T (r x d_out) and s = alpha / r:

    Y = X doubleDequant(c1, c2, W_NF4) + s X L1 L2

    doubleDequant(c1, c2, W) = dequant(dequant(c1, c2), W)   (eq. 6: W = code[q] * (code2[q2] * absmax2 + offset))

where W_NF4 holds 4-bit NormalFloat codes in blocks of 64 and c1, c2 are the double-quantized block
constants (``nf4.py`` has the storage format, bit-exact with bitsandbytes). Gradients flow *through*
the dequantized W to X, but only A and B are trained. The recipe has three parts:

1. **NF4 + double quantization** of every linear layer but the output head (``linear4bit.quantize_model``).
2. **LoRA on all linear layers** (section 4 of the paper: "LoRA on all linear transformer block
   layers are required to match full finetuning performance"), via ``core.add_adapter``.
3. **Paged optimizers** (section 3): the Adam states live in memory the GPU can page out to CPU RAM
   (NVIDIA unified memory in bitsandbytes), so a memory spike, e.g. a long sequence under gradient
   checkpointing, does not run out of GPU memory. ``optim.PagedAdamW`` does the same by hand:
   the states sit in (pinned) CPU memory and visit the GPU one parameter at a time.

Gradient checkpointing (Chen et al. 2016) is part of the recipe too: the paper's memory budget
(Figure 6) assumes it, and ``prepare_qlora`` turns it on.

``prepare_qlora`` against peft's ``prepare_model_for_kbit_training`` (peft 0.21), which the QLoRA
reference script calls on a bitsandbytes model before ``get_peft_model``:

* peft freezes every parameter, then **upcasts every float16/bfloat16 parameter that is not 8-bit to
  float32** (embeddings, norms, the head), for stability. We leave their dtype as the model has it:
  with a float32 model (as on CPU here) the two agree; with a bfloat16 model peft keeps fp32 norms
  and embeddings (more memory, different rounding) and we do not.
* peft enables gradient checkpointing with ``use_reentrant=True`` by default, and then must call
  ``model.enable_input_require_grads()``: the re-entrant implementation computes no gradient for
  a checkpointed segment whose inputs do not require grad, and the embeddings (the first segment's
  input) are frozen. We use the non-re-entrant implementation (``use_reentrant=False``, what torch
  recommends), which does not need that; with ``use_reentrant=True`` we call the same hook.
* peft does not quantize: bitsandbytes did at load time (``BitsAndBytesConfig``). We quantize here,
  from the float weights, to the same bytes (``tests/test_qlora.py``).
"""
from __future__ import annotations

import torch
from torch import nn

from ..core import add_adapter, count_parameters, find_targets, register, set_module
from ..reparameterized.lora import LoRAConfig
from .linear4bit import Linear4bit, quantize_model

__all__ = ["prepare_qlora", "is_quantized", "is_checkpointing", "peft_style_parameter_count"]


# ----------------------------------------------------------------------------- the model

def _quantized_layers(model: nn.Module) -> list[str]:
    """Names of 4-bit layers: ours (``Linear4bit``) or bitsandbytes' (an nn.Linear with a uint8 weight)."""
    found = []
    for name, m in model.named_modules():
        weight = getattr(m, "weight", None)
        if isinstance(m, Linear4bit) or (isinstance(m, nn.Linear) and isinstance(weight, torch.Tensor)
                                             and weight.dtype == torch.uint8):
            found.append(name)
    return found


def is_quantized(model: nn.Module) -> bool:
    """True if any linear layer of ``model`` already stores 4-bit weights."""
    return bool(_quantized_layers(model))


@register("qlora", family="quantized", kind="recipe", paper="dettmers2023qlora", parent="lora")
def prepare_qlora(model: nn.Module, lora_config: LoRAConfig | None = None, blocksize: int = 64,
                  double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                  gradient_checkpointing: bool = True, use_reentrant: bool = False,
                  quant_type: str = "nf4") -> nn.Module:
    """Turn a float model into a QLoRA model, in place: NF4 (+ double quantization) base, LoRA on all
    linear layers, everything else frozen, gradient checkpointing on. Returns the model.

    Args:
        model: a float model (e.g. ``AutoModelForCausalLM``); its linear layers are quantized from
            their current weights.
        lora_config: the adapter; default ``LoRAConfig(r=8, alpha=16, target_modules="all-linear")``.
            Its targets are chosen after quantization, so "all-linear" finds the ``Linear4bit`` layers
            (a subclass of nn.Linear); the output head stays float and without an adapter.
        blocksize: values per NF4 block (64 in the paper). double_quant: quantize the block
            constants again (8 bit, blocks of 256), as the paper does.
        compute_dtype: dtype of the 4-bit layers' matmul; None = bfloat16 on CUDA (the paper's
            choice), float32 on CPU.
        gradient_checkpointing: recompute activations in the backward pass (a transformers model's
            ``activation_checkpointing_enable``, formerly ``gradient_checkpointing_enable``).
        use_reentrant: torch's older checkpoint implementation; it needs the inputs to require grad,
            so we then hook the embeddings' output as peft does (``enable_input_require_grads``).
        quant_type: "nf4" (the paper) or "fp4"/"int4" for its ablations.

    Raises:
        ValueError: the model already has 4-bit layers (quantizing twice would quantize the codes),
            or ``gradient_checkpointing`` on a model that does not support it.
        RuntimeError: the model already carries an adapter (QLoRA quantizes the *base* weights).
        And whatever ``core.add_adapter`` raises for a ``lora_config`` that does not fit the model.
    Nothing is changed when it raises.
    """
    if getattr(model, "adapter_config", None) is not None:
        raise RuntimeError(f"the model already has a {model.adapter_config.method} adapter: prepare_qlora "
                           "quantizes the base model and then adds LoRA. Call core.remove_adapter(model) first "
                           "(merge=True to keep what it learned), or start from the plain model")
    already = _quantized_layers(model)
    if already:
        raise ValueError(f"the model is already quantized ({len(already)} 4-bit layers, e.g. {already[0]!r}): "
                         "prepare_qlora quantizes float weights itself. Load the float model (no "
                         "BitsAndBytesConfig) or, for one quantized with nf4.quantize_model, call "
                         "add_adapter(model, LoRAConfig(...)) directly")
    if gradient_checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing (it is not a "
                         "transformers model that does); pass gradient_checkpointing=False")
    lora_config = lora_config or LoRAConfig(r=8, alpha=16, target_modules="all-linear")

    # Keep the float layers until the adapter is in: if it does not fit (a rank too large, a target
    # name that matches nothing) or a quantization argument is bad, put them back, so that a failed call leaves the model as it was.
    float_layers = {name: model.get_submodule(name) for name in find_targets(model, "all-linear")}
    try:
        quantize_model(model, "all-linear", quant_type, blocksize, double_quant, compute_dtype)
        add_adapter(model, lora_config)   # freezes all but A and B: embeddings, norms, head, biases
    except Exception:
        for name, layer in float_layers.items():
            set_module(model, name, layer)
        raise
    del float_layers
    if gradient_checkpointing:
        kwargs = {"use_reentrant": use_reentrant}
        if hasattr(model, "activation_checkpointing_enable"):   # transformers >= 5.x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if use_reentrant:
            model.enable_input_require_grads()
        if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
            model.config.use_cache = False  # a KV cache is useless in training and conflicts with checkpointing
    return model


def is_checkpointing(model: nn.Module) -> bool:
    """True if some submodule of ``model`` recomputes its activations (transformers' flag)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def peft_style_parameter_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters counted as peft's ``get_nb_trainable_parameters`` counts a 4-bit model.

    bitsandbytes keeps the packed weight as a uint8 *parameter* of n/2 elements and peft doubles it
    back to n; ours is a buffer, so we add out_features * in_features per ``Linear4bit``.
    """
    trainable, total = count_parameters(model)
    total += sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, Linear4bit))
    return trainable, total
