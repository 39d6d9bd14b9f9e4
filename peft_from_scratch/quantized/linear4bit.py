"""The 4-bit linear layer: QLoRA's frozen base, stored in NF4 (or FP4, Int4) and dequantized at every forward.

``Linear4bit`` holds the packed codes and the block constants of ``nf4.quantize_4bit`` as buffers
(bitsandbytes' layout, so the bytes are bitsandbytes' own), ``quantize_model`` swaps the linear
layers of a model for it, and ``save_quantized``/``load_quantized`` write and read a checkpoint
(safetensors + a JSON layout) without re-quantizing.

On a GPU the dequantization runs as one Triton kernel (``kernels.dequantize_4bit_triton``, fed the
layer's plain tensors); everywhere else it is ``nf4.dequantize_4bit``, the reference the kernel is
tested against.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core import find_targets, set_module
from ..core.checkpoint import read_tensors
from ..kernels import dequantize_4bit_triton, triton_available
from .nf4 import CODES, QuantState, check_state, dequantize_4bit, dynamic_code, quantize_4bit, quantized_nbytes


def dequantize_triton(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """``nf4.dequantize_4bit(packed, state)`` through the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1).

    Checks that ``packed`` and ``state`` belong together (``nf4.check_state``), then hands the kernel
    their plain tensors. Raises ImportError without Triton, RuntimeError for CPU tensors without the
    interpreter, ValueError for a state of another tensor.
    """
    check_state(packed, state, fingerprint=False)
    nested = state.nested
    return dequantize_4bit_triton(packed, state.absmax, state.code, state.shape, state.dtype, state.blocksize,
                                  state.absmax2 if nested else None, state.code2 if nested else None,
                                  state.offset if nested else None, state.blocksize2 if nested else None)


def apply_keeping_state_dtypes(module: nn.Module, apply, fn, recurse: bool = True) -> nn.Module:
    """``module._apply`` for a layer whose buffers are a quantized state: ``.to(device)`` moves them,
    but ``.half()`` or ``.to(dtype)`` must not convert (and round) them. ``apply`` is the parent's."""
    before = dict(module._buffers)
    apply(fn, recurse)
    for name, old in before.items():
        new = module._buffers[name]
        if old is not None and new.dtype != old.dtype:
            module._buffers[name] = old.to(new.device)
    return module


class Linear4bit(nn.Linear):
    """y = x W^T + b, with W stored as packed 4-bit codes and dequantized at every forward.

    A subclass of ``nn.Linear`` (as bitsandbytes' ``Linear4bit``), so ``core.find_targets(...,
    "all-linear")`` and adapters that wrap ``nn.Linear`` still find it. Buffers: ``weight`` (packed
    uint8, shape (ceil(out*in/2), 1), bnb's layout), ``absmax`` and, when double-quantized, ``absmax2``
    and ``offset``; the code books are non-persistent buffers. ``in_features``/``out_features`` give
    the logical shape; ``weight.shape`` does not. The state keeps its dtypes under ``model.half()``.

    Args:
        packed, state: from ``quantize_4bit``.
        bias: the float bias (or None); kept as a parameter.
        compute_dtype: dtype of the matmul; None = bfloat16 for CUDA inputs, float32 otherwise.
        use_triton: dequantize with the Triton kernel; None = when the input is on CUDA and Triton
            is installed.
    """

    def __init__(self, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None, use_triton: bool | None = None):
        nn.Module.__init__(self)   # not nn.Linear.__init__: there is no float weight to allocate
        if len(state.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D weight (out_features, in_features), got shape {tuple(state.shape)}")
        check_state(packed, state)
        self.out_features, self.in_features = state.shape
        self.register_buffer("weight", packed)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("absmax2", state.absmax2)
        self.register_buffer("offset", state.offset)
        self.register_buffer("code", state.code, persistent=False)
        self.register_buffer("code2", state.code2, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        self.weight_shape, self.weight_dtype = torch.Size(state.shape), state.dtype
        self.quant_type, self.blocksize = state.quant_type, state.blocksize
        self.blocksize2, self.dq_rounding, self.fingerprint = state.blocksize2, state.dq_rounding, state.fingerprint
        self.compute_dtype, self.use_triton = compute_dtype, use_triton

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                    **kwargs) -> "Linear4bit":
        """Quantize ``linear.weight`` (kwargs go to ``quantize_4bit``); the bias is copied."""
        packed, state = quantize_4bit(linear.weight.detach(), quant_type, blocksize, double_quant, **kwargs)
        return cls(packed, state, linear.bias, compute_dtype=compute_dtype)

    @property
    def quant_state(self) -> QuantState:
        return QuantState(self.absmax, self.weight_shape, self.weight_dtype, self.blocksize, self.code,
                          self.quant_type, self.offset, self.absmax2, self.code2, self.blocksize2,
                          self.dq_rounding, self.fingerprint)

    def dequantize(self) -> torch.Tensor:
        """The (out_features, in_features) weight in its original dtype."""
        use_triton = self.use_triton
        if use_triton is None:
            use_triton = self.weight.is_cuda and triton_available()
        if use_triton:
            return dequantize_triton(self.weight, self.quant_state)
        return dequantize_4bit(self.weight, self.quant_state, check=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x: (..., in_features) -> (..., out_features)
        dtype = self.compute_dtype or (torch.bfloat16 if x.is_cuda else torch.float32)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.dequantize().to(dtype), bias).to(x.dtype)

    def _apply(self, fn, recurse=True):
        return apply_keeping_state_dtypes(self, super()._apply, fn, recurse)

    def extra_repr(self) -> str:
        dq = f", double_quant(blocksize2={self.blocksize2})" if self.absmax2 is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}{dq}")


def model_nbytes(model: nn.Module) -> int:
    """Measured bytes of every ``Linear4bit`` in ``model`` (packed codes and block constants)."""
    return sum(quantized_nbytes(m.weight, m.quant_state) for m in model.modules() if isinstance(m, Linear4bit))


def quantize_model(model: nn.Module, target_modules: list[str] | str = "all-linear", quant_type: str = "nf4",
                   blocksize: int = 64, double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                   **kwargs) -> nn.Module:
    """Replace the selected ``nn.Linear`` layers by ``Linear4bit`` (in place); returns the model.

    ``target_modules`` has ``core.find_targets``' meaning: "all-linear" is every linear layer but the
    output head (QLoRA's choice), a list matches names or name suffixes, a string is a regex. Layers
    already quantized are left alone. kwargs go to ``quantize_4bit`` (``blocksize2``, ``dq_rounding``,
    ``allow_nonfinite``). Every layer is quantized before any is replaced, so an error (e.g. a weight
    with NaN or inf, named with its layer) leaves the model unchanged.
    """
    targets = find_targets(model, target_modules)
    wrong = [(n, type(model.get_submodule(n)).__name__) for n in targets
             if not isinstance(model.get_submodule(n), nn.Linear)]
    if wrong:
        raise TypeError("only nn.Linear layers can be quantized; these targets are not: "
                        + ", ".join(f"{n} ({t})" for n, t in wrong[:5]))
    new_layers = {}
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, Linear4bit):
            try:
                new_layers[name] = Linear4bit.from_linear(module, quant_type, blocksize, double_quant,
                                                          compute_dtype, **kwargs)
            except ValueError as e:
                raise ValueError(f"{name}.weight: {e}") from e
    for name, layer in new_layers.items():
        set_module(model, name, layer)
    return model


# ----------------------------------------------------------------------------- checkpoints

FORMAT = "peft_from_scratch.nf4"


def save_quantized(model: nn.Module, path: str | Path) -> Path:
    """Write every ``Linear4bit`` of ``model`` to ``path``: quantized.safetensors + quantized.json.

    The safetensors file holds ``<layer>.weight`` (packed), ``.absmax``, ``.absmax2``, ``.offset``
    and ``.bias``; the JSON holds each layer's layout (shape, dtype, quant_type, blocksize,
    double_quant, blocksize2, dq_rounding) and fingerprint. Only the quantized layers are saved: the
    rest of the model (embeddings, norms, head) comes from the base checkpoint.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    if not layers:
        raise ValueError("the model has no Linear4bit layer to save; call quantize_model(model) first")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, meta = {}, {}
    for name, m in layers.items():
        for key in ("weight", "absmax", "absmax2", "offset", "bias"):
            t = getattr(m, key)
            if t is not None:
                tensors[f"{name}.{key}"] = t.detach().reshape(-1 if key == "offset" else t.shape).cpu().contiguous()
        meta[name] = {**m.quant_state.layout(), "fingerprint": m.fingerprint, "bias": m.bias is not None}
    from safetensors.torch import save_file
    save_file(tensors, path / "quantized.safetensors")
    (path / "quantized.json").write_text(json.dumps({"format": FORMAT, "version": 1, "layers": meta}, indent=2) + "\n")
    return path


def _state_from_checkpoint(name: str, layout: dict, tensors: dict, device) -> tuple[torch.Tensor, QuantState]:
    get = lambda key: tensors[f"{name}.{key}"].to(device) if f"{name}.{key}" in tensors else None
    state = QuantState(absmax=get("absmax"), shape=torch.Size(layout["shape"]),
                       dtype=getattr(torch, layout["dtype"]), blocksize=layout["blocksize"],
                       code=CODES[layout["quant_type"]]().to(device), quant_type=layout["quant_type"],
                       fingerprint=layout["fingerprint"])
    if layout["double_quant"]:
        state.offset, state.absmax2 = get("offset").reshape(()), get("absmax2")
        state.code2, state.blocksize2, state.dq_rounding = dynamic_code().to(device), layout["blocksize2"], layout["dq_rounding"]
    packed = get("weight")
    try:
        check_state(packed, state)
    except ValueError as e:
        raise ValueError(f"layer {name} in the checkpoint is inconsistent with its layout: {e}") from e
    return packed, state


def load_quantized(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a checkpoint written by ``save_quantized`` into ``model`` (in place; returns it).

    A layer that is a plain ``nn.Linear`` of the saved shape becomes a ``Linear4bit`` with the saved
    codes (no re-quantization); a layer that is already a ``Linear4bit`` must have the saved layout.

    Raises:
        ValueError: naming the layer and the fields that differ (shape, quant_type, blocksize,
            double_quant, blocksize2, dq_rounding, dtype), or a saved layer the model does not have.
            The model is left unchanged.
    """
    path = Path(path)
    if not (path / "quantized.json").exists():
        raise FileNotFoundError(f"no quantized.json in {path}: not a folder written by save_quantized")
    meta = json.loads((path / "quantized.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path / 'quantized.json'} is not a {FORMAT} checkpoint (format {meta.get('format')!r})")
    tensors = read_tensors(path / "quantized.safetensors")
    problems, new_layers = [], {}
    for name, layout in meta["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            problems.append(f"{name}: saved, but the model has no such module")
            continue
        if isinstance(module, Linear4bit):
            mine = module.quant_state.layout()
            diff = [f"{k} saved={layout[k]!r} model={mine[k]!r}" for k in mine if layout[k] != mine[k]]
        elif isinstance(module, nn.Linear):
            mine = [module.out_features, module.in_features]
            diff = [] if mine == layout["shape"] else [f"shape saved={layout['shape']!r} model={mine!r}"]
        else:
            diff = [f"is a {type(module).__name__}, not a linear layer"]
        if diff:
            problems.append(f"{name}: " + ", ".join(diff))
            continue
        device = module.weight.device
        packed, state = _state_from_checkpoint(name, layout, tensors, device)
        bias = tensors.get(f"{name}.bias")
        new_layers[name] = (module, packed, state, None if bias is None else bias.to(device))
    if problems:
        raise ValueError(f"the quantized checkpoint in {path} does not fit the model (layout mismatch):\n  "
                         + "\n  ".join(problems))
    for name, (module, packed, state, bias) in new_layers.items():
        if isinstance(module, Linear4bit):
            compute_dtype, use_triton = module.compute_dtype, module.use_triton
        else:
            compute_dtype, use_triton = None, None
        layer = Linear4bit(packed, state, bias, compute_dtype=compute_dtype, use_triton=use_triton)
        if layer.bias is not None and module.bias is not None:
            layer.bias.requires_grad_(module.bias.requires_grad)
        set_module(model, name, layer)
    return model
