"""QLoRA: 4-bit NF4 base weights + LoRA on every linear layer + a paged optimizer (Dettmers et al. 2023).

QLoRA (arXiv 2305.14314) fine-tunes a model whose frozen weights are stored in 4 bits. Per layer
(paper, eq. 5), with the LoRA factors L1 = A^T (d_in x r) and L2 = B^T (r x d_out) and s = alpha / r:

    Y = X doubleDequant(c1, c2, W_NF4) + s X L1 L2

    doubleDequant(c1, c2, W) = dequant(dequant(c1, c2), W)   (eq. 6: W = code[q] * (code2[q2] * absmax2 + offset))

where W_NF4 holds 4-bit NormalFloat codes in blocks of 64 and c1, c2 are the double-quantized block
constants (``nf4.py`` has the storage format, bit-exact with bitsandbytes). Gradients flow *through*
the dequantized W to X, but only A and B are trained. The recipe has three parts:

1. **NF4 + double quantization** of every linear layer but the output head (``nf4.quantize_model``).
2. **LoRA on all linear layers** (section 4 of the paper: "LoRA on all linear transformer block
   layers are required to match full finetuning performance"), via ``core.add_adapter``.
3. **Paged optimizers** (section 3): the Adam states live in memory the GPU can page out to CPU RAM
   (NVIDIA unified memory in bitsandbytes), so a memory spike, e.g. a long sequence under gradient
   checkpointing, does not run out of GPU memory. ``PagedAdamW`` below does the same by hand:
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

from . import core, nf4
from .lora import LoRAConfig

__all__ = ["prepare_qlora", "is_quantized", "is_checkpointing", "peft_style_parameter_count",
           "PagedAdamW", "make_paged_adamw", "optimizer_state_bytes"]


# ----------------------------------------------------------------------------- the model

def _quantized_layers(model: nn.Module) -> list[str]:
    """Names of 4-bit layers: ours (``nf4.Linear4bit``) or bitsandbytes' (an nn.Linear with a uint8 weight)."""
    found = []
    for name, m in model.named_modules():
        weight = getattr(m, "weight", None)
        if isinstance(m, nf4.Linear4bit) or (isinstance(m, nn.Linear) and isinstance(weight, torch.Tensor)
                                             and weight.dtype == torch.uint8):
            found.append(name)
    return found


def is_quantized(model: nn.Module) -> bool:
    """True if any linear layer of ``model`` already stores 4-bit weights."""
    return bool(_quantized_layers(model))


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
                         "core.add_adapter(model, LoRAConfig(...)) directly")
    if gradient_checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing (it is not a "
                         "transformers model that does); pass gradient_checkpointing=False")
    lora_config = lora_config or LoRAConfig(r=8, alpha=16, target_modules="all-linear")

    # Keep the float layers until the adapter is in: if it does not fit (a rank too large, a target
    # name that matches nothing) or a quantization argument is bad, put them back, so that a failed call leaves the model as it was.
    float_layers = {name: model.get_submodule(name) for name in core.find_targets(model, "all-linear")}
    try:
        nf4.quantize_model(model, "all-linear", quant_type, blocksize, double_quant, compute_dtype)
        core.add_adapter(model, lora_config)   # freezes all but A and B: embeddings, norms, head, biases
    except Exception:
        for name, layer in float_layers.items():
            core._set_module(model, name, layer)
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
    trainable, total = core.count_parameters(model)
    total += sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, nf4.Linear4bit))
    return trainable, total


# ----------------------------------------------------------------------------- the paged optimizer

class PagedAdamW(torch.optim.Optimizer):
    """AdamW whose states (exp_avg m, exp_avg_sq v) live in CPU memory, paged to the GPU per parameter.

    The update is torch's AdamW (Loshchilov & Hutter 2019, Algorithm 2) with bias correction, written
    in the same operations and order as ``torch.optim.AdamW``'s single-tensor path, so the results are
    bit-identical (``foreach=False``, no amsgrad). At step t, with gradient g and parameter p:

        p <- p * (1 - lr * weight_decay)                      (decoupled weight decay)
        m <- m + (1 - beta1) (g - m)                          (= beta1 m + (1 - beta1) g, a lerp)
        v <- beta2 v + (1 - beta2) g^2
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    Paging: for each parameter in turn, m and v are copied to the parameter's device, updated there,
    and copied back (host memory is pinned when CUDA is available, so both copies are asynchronous
    DMA; one synchronisation at the end of ``step``). The device then holds the states of only one
    parameter at a time: 2 x 4 bytes x (largest parameter) instead of 2 x 4 bytes x (all trainable
    parameters), at the price of moving 16 bytes per trainable parameter over PCIe per step.

    What this is and is not. bitsandbytes' paged optimizers (what the paper uses) allocate the states
    in CUDA *unified memory*: they stay on the GPU and the driver evicts pages to CPU RAM only when
    the GPU runs out, so the usual step costs nothing extra. Ours always pages, which is simpler to
    read and has a fixed device footprint, but costs the transfer at every step. On CPU both copies
    are no-ops (the state already lives where the parameter does): there the class is plain AdamW,
    and the CPU tests prove only the numerics; the memory saving exists only on a GPU and is measured
    with ``optimizer_state_bytes(opt, on_device=True)`` and ``torch.cuda.memory_allocated``.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, pin_memory: bool | None = None):
        if not lr >= 0.0 or not eps >= 0.0 or not weight_decay >= 0.0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got lr={lr}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory

    def _host_zeros(self, p: torch.Tensor) -> torch.Tensor:
        return torch.zeros(p.shape, dtype=p.dtype, device="cpu", pin_memory=self.pin_memory)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        moved_back = False
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PagedAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:   # lazy init, as torch: a CPU float32 step counter, zero moments (on the host)
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = self._host_zeros(p)
                    state["exp_avg_sq"] = self._host_zeros(p)
                host_m, host_v = state["exp_avg"], state["exp_avg_sq"]
                m = host_m.to(p.device, non_blocking=True)    # page in (the same tensor when p is on CPU)
                v = host_v.to(p.device, non_blocking=True)
                grad = p.grad

                state["step"] += 1
                if wd != 0:
                    p.mul_(1 - lr * wd)
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step = state["step"].item()
                bias_correction1 = 1 - beta1 ** step
                bias_correction2 = 1 - beta2 ** step
                step_size = lr / bias_correction1
                denom = (v.sqrt() / bias_correction2 ** 0.5).add_(eps)
                p.addcdiv_(m, denom, value=-step_size)

                if m is not host_m:                            # page out
                    host_m.copy_(m, non_blocking=True)
                    host_v.copy_(v, non_blocking=True)
                    moved_back = True
        if moved_back and torch.cuda.is_available():
            torch.cuda.synchronize()   # the host copies must have landed before anyone reads the state
        return loss


def make_paged_adamw(params, config) -> PagedAdamW:
    """``make_optimizer(params, config)`` for ``train.train``: PagedAdamW with the config's lr, betas, eps
    and weight decay (``train(..., make_optimizer=make_paged_adamw)``)."""
    return PagedAdamW(params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, on_device: bool = False) -> int:
    """Bytes of the optimizer's state tensors; with ``on_device``, only those resident on an accelerator
    (not CPU). For ``torch.optim.AdamW`` on CUDA that is 8 bytes per trainable float32 parameter; for
    ``PagedAdamW`` it is 0 between steps (only the step counter and moments of one parameter visit the
    device during a step, and are freed after)."""
    total = 0
    for state in optimizer.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor) and (not on_device or t.device.type != "cpu"):
                total += t.numel() * t.element_size()
    return total
