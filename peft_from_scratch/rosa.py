"""RoSA: Robust Adaptation (Nikdan, Tabesh, Crnčević, Alistarh, ICML 2024, arXiv 2401.04679).

Robust PCA writes a matrix as low-rank plus sparse. RoSA writes the fine-tuning update of a frozen
linear layer W0 (d_out x d_in) the same way, a LoRA factor pair plus a sparse matrix S:

    y = W0 x + s B A x + S x,        s = alpha / r,   A: r x d_in,  B: d_out x r,
                                      S: d_out x d_in with k = floor(d * d_out * d_in) nonzeros

A, B are LoRA's (``lora.py``: Kaiming-uniform A, zero B, dropout on the LoRA branch's input). S is
stored in CSR: its positions (``crow_indices``, ``col_indices``, buffers) are fixed, its ``values``
(an nn.Parameter of k entries) are trained and start at zero, so the adapted model starts at W0.
r = 0 leaves the sparse part alone ("SpA" in the paper), d = 0 leaves plain LoRA.

Forward and backward of the sparse term never form a d_out x d_in matrix (``kernels/sparse.py``):

    forward    S x                        SpMM   (sparse x dense)
    backward   grad_x = S^T grad_out      SpMM with the transposed CSR, computed once per mask
               grad_values[k] = sum_n grad_out[n, row_k] x[n, col_k]
                                          SDDMM: the dense gradient grad_out^T x, sampled at the mask

Which entries S may use is chosen from gradients, as in the paper and the authors' peft-rosa fork:

1. train the low-rank part alone for a short warm-up (the authors: 64 steps);
2. collect the gradient of each adapted layer's full weight, G = grad_out^T x (from forward and
   backward hooks, so W0 never needs ``requires_grad``, and a 4-bit W0 works too), over some batches,
   as a running mean of G^2 (the empirical diagonal Fisher; the authors' ``mean_squared``);
3. keep, per layer, the k = floor(d * numel) entries with the largest mean G^2;
4. restart: S = 0 on the new mask, LoRA back to its initial values, and train both parts.

``train_rosa`` runs the whole schedule around any training function (e.g. ``train.train``).

Details the paper leaves open, decided as the authors' code does or said here: a gradient sample is
one backward pass (the authors use micro-batches of one example; ``per_example=True`` does the same
with larger batches); equal scores at the top-k boundary go to the earlier entry in row-major order
(``torch.topk`` promises no order); the restart restores LoRA's initial A (the authors restart their
script under the same seed, which draws the same A); S is not scaled by alpha/r and sees x without
LoRA's dropout (peft-rosa's SpMM path). k is fixed by d and the layer's shape, so a checkpoint's shapes
follow from its config; ``density_pattern`` gives a layer its own d.

QRoSA: the base layer may be our NF4 ``nf4.Linear4bit`` (a subclass of nn.Linear): the adapter then
lives in float32 and the Fisher hooks need no float W0. Merging into a 4-bit base is refused.
"""
from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from .core import AdapterConfig, AdapterLayer, add_adapter, adapter_layers, matches
from .kernels import sparse as sp
from .lora import adapter_like, init_lora_, lora_scaling, low_rank_product

TRITON_ENV = "PFS_ROSA_TRITON"   # "1": use the Triton kernels even on CPU tensors (with TRITON_INTERPRET=1)


def n_entries(d: float, d_out: int, d_in: int) -> int:
    """k = floor(d * d_out * d_in), the authors' ``int(d * numel)``; the 1e-6 keeps a density given as
    a ratio k / numel from rounding down to k - 1."""
    return math.floor(d * d_out * d_in + 1e-6)


# ----------------------------------------------------------------------------- the sparse product

class CSR(NamedTuple):
    """S's positions, with what the backward pass needs, computed once per mask."""
    crow: torch.Tensor      # (d_out + 1,) int32
    col: torch.Tensor       # (nnz,) int32
    row: torch.Tensor       # (nnz,) int32, the row of each entry (for SDDMM)
    crow_t: torch.Tensor    # CSR of S^T: (d_in + 1,)
    col_t: torch.Tensor     # (nnz,)
    perm: torch.Tensor      # values of S^T = values[perm]
    shape: tuple[int, int]  # (d_out, d_in)


class SparseLinearFunction(torch.autograd.Function):
    """x -> x S^T for 2-D x (N, d_in); gradients for x (SpMM with S^T) and for S's values (SDDMM)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, values: torch.Tensor, csr: CSR, use_triton: bool) -> torch.Tensor:
        ctx.save_for_backward(x, values)
        ctx.csr, ctx.use_triton = csr, use_triton
        if use_triton:
            return sp.spmm_triton(x, values, csr.crow, csr.col, csr.shape)
        return sp.spmm_torch(x, values, csr.crow, csr.col, csr.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, values = ctx.saved_tensors
        csr, triton = ctx.csr, ctx.use_triton
        grad_out = grad_out.contiguous()
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:      # grad_x = grad_out S = grad_out (S^T)^T: SpMM with S^T's CSR
            shape_t = (csr.shape[1], csr.shape[0])
            spmm = sp.spmm_triton if triton else sp.spmm_torch
            grad_x = spmm(grad_out, values[csr.perm], csr.crow_t, csr.col_t, shape_t)
        if ctx.needs_input_grad[1]:      # (grad_out^T x) at the mask only: SDDMM
            if triton:
                grad_values = sp.sddmm_triton(grad_out, x, csr.row, csr.col)
            else:
                grad_values = sp.sddmm_torch(grad_out, x, csr.crow, csr.col, csr.shape)
            grad_values = grad_values.to(values.dtype)
        return grad_x, grad_values, None, None


# ----------------------------------------------------------------------------- the layer

class RoSALinear(AdapterLayer):
    """x -> W0 x + (alpha/r) B A dropout(x) + S x, around a frozen ``nn.Linear`` (or ``nf4.Linear4bit``).

    Args:
        base_layer: the frozen linear layer W0 (d_in -> d_out).
        r: LoRA rank, 0 <= r <= min(d_in, d_out); 0 means no low-rank part.
        alpha: LoRA scaling numerator (alpha/r, or alpha/sqrt(r) with ``use_rslora``). S is not scaled.
        d: density of S in [0, 1); 0 means no sparse part. S has k = floor(d * d_out * d_in) entries.
        dropout: dropout on the LoRA branch's input only (S sees x, as in the authors' code).
        use_rslora, init: as ``LoRALinear`` ("kaiming" or "gaussian" A; B = 0).
    Raises:
        ValueError: r out of range, d out of [0, 1), d > 0 giving no entry for this layer, or r = d = 0.

    The mask is set with ``set_mask``; until then S is inactive (the warm-up trains LoRA alone).
    ``use_triton``: None picks the Triton kernels for CUDA tensors (or everywhere when the environment
    variable PFS_ROSA_TRITON=1), True/False forces the choice.
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, d: float, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming", name: str = ""):
        super().__init__(base_layer)
        d_out, d_in = base_layer.out_features, base_layer.in_features   # a 4-bit base packs its weight
        where = f"layer {name or 'Linear'} ({d_in} -> {d_out})"
        if not 0 <= r <= min(d_in, d_out):
            raise ValueError(f"RoSA rank r={r} does not fit {where}: r must be between 0 and "
                             f"min(d_in, d_out) = {min(d_in, d_out)}")
        if not 0 <= d < 1:
            raise ValueError(f"RoSA density d={d} for {where} must be in [0, 1): d=0 means no sparse part, "
                             "d=1 would be a dense update (full fine-tuning)")
        self.k = n_entries(d, d_out, d_in)
        if d > 0 and self.k == 0:
            raise ValueError(f"RoSA density d={d} keeps no entry of {where}, which has {d_out * d_in} weights: "
                             f"use d >= 1/{d_out * d_in} = {1 / (d_out * d_in):.2e}, or d=0 for no sparse part")
        if r == 0 and self.k == 0:
            raise ValueError(f"RoSA with r=0 and d=0 trains nothing in {where}")
        if init not in ("kaiming", "gaussian"):
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got {init!r}")
        self.name, self.r, self.alpha, self.d = name, r, alpha, d
        self.shape = (d_out, d_in)
        self.scaling = lora_scaling(r, alpha, use_rslora) if r else 0.0
        self.init = init
        like = adapter_like(base_layer)            # float32 on a quantized base (QRoSA)
        # The low-rank part, built by LoRALinear's own pieces (so RoSA with d=0 is LoRA).
        self.A = nn.Parameter(torch.empty(r, d_in, **like)) if r else None
        self.B = nn.Parameter(torch.zeros(d_out, r, **like)) if r else None
        self.reset_lora()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # The sparse part: k values (trained) and their positions (saved, not trained).
        if self.k:
            self.values = nn.Parameter(torch.zeros(self.k, **like))
            self.register_buffer("crow_indices", torch.zeros(d_out + 1, dtype=torch.int32, device=like["device"]))
            self.register_buffer("col_indices", torch.zeros(self.k, dtype=torch.int32, device=like["device"]))
            for cache in ("row_indices", "crow_t", "col_t", "perm"):   # derived from the mask, not saved
                self.register_buffer(cache, None, persistent=False)
        else:
            self.values = None
        self.has_mask = False
        self.use_triton: bool | None = None
        self.train(base_layer.training)

    # -------------------------------------------------------------- parameters

    def reset_lora(self) -> None:
        """A fresh LoRA: A from Kaiming-uniform (a = sqrt(5)) or N(0, 1/r^2), B = 0."""
        if self.r:
            init_lora_(self.A, self.B, self.init)

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> None:
        """Fix S's positions and set S = 0 (old values belong to the old positions).

        ``mask``: a boolean (d_out, d_in) tensor, or ``(crow_indices, col_indices)``. It must hold
        exactly k entries. Raises ValueError for another shape, another count, or a broken CSR.
        """
        if not self.k:
            raise ValueError(f"{self.name or 'this layer'} has no sparse part (d=0); it takes no mask")
        if isinstance(mask, torch.Tensor):
            if tuple(mask.shape) != self.shape:
                raise ValueError(f"a mask of shape {tuple(mask.shape)} does not fit {self.name or 'this layer'}, "
                                 f"whose weight is {self.shape} (d_out, d_in)")
            crow, col = sp.csr_from_mask(mask.bool())
        else:
            crow, col = mask
        sp.check_csr(crow, col, self.shape, what=f"the mask for {self.name or 'this layer'}")
        if col.numel() != self.k:
            raise ValueError(f"the mask for {self.name or 'this layer'} has {col.numel()} entries, but d={self.d} "
                             f"keeps k={self.k} of its {self.shape[0] * self.shape[1]} weights")
        self.crow_indices.copy_(crow)
        self.col_indices.copy_(col)
        self.values.zero_()
        self._refresh()

    @torch.no_grad()
    def _refresh(self) -> None:
        """Recompute what the backward needs from the saved positions (after set_mask or loading)."""
        self.has_mask = bool(self.k) and int(self.crow_indices[-1]) == self.k
        if self.has_mask:
            self.row_indices = sp.csr_row_indices(self.crow_indices)
            self.crow_t, self.col_t, self.perm = sp.csr_transpose(self.crow_indices, self.col_indices, self.shape)

    def mask(self) -> torch.Tensor:
        """S's positions as a boolean (d_out, d_in) tensor (all False before ``set_mask``)."""
        out = torch.zeros(self.shape, dtype=torch.bool, device=self.crow_indices.device if self.k else None)
        if self.has_mask:
            out[self.row_indices.long(), self.col_indices.long()] = True
        return out

    def sparse_weight(self) -> torch.Tensor:
        """S as a dense (d_out, d_in) tensor (zeros before ``set_mask``)."""
        if not self.has_mask:
            like = self.A if self.r else self.values
            return torch.zeros(self.shape, dtype=like.dtype, device=like.device)
        return sp.csr_to_dense(self.values, self.crow_indices, self.col_indices, self.shape)

    # -------------------------------------------------------------- forward

    def lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha/r) B A x, two thin matmuls, as LoRALinear. No dropout here."""
        return low_rank_product(x, self.A, self.B, self.scaling)

    def _triton(self, x: torch.Tensor) -> bool:
        if self.use_triton is not None:
            return self.use_triton
        return x.is_cuda and sp.triton_available() or os.environ.get(TRITON_ENV) == "1"

    def sparse_branch(self, x: torch.Tensor) -> torch.Tensor:
        """S x through SpMM (backward: SpMM with S^T and SDDMM). x: (..., d_in) -> (..., d_out)."""
        csr = CSR(self.crow_indices, self.col_indices, self.row_indices, self.crow_t, self.col_t, self.perm,
                  self.shape)
        y = SparseLinearFunction.apply(x.reshape(-1, self.shape[1]), self.values, csr, self._triton(x))
        return y.reshape(*x.shape[:-1], self.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x: (..., d_in) -> (..., d_out)
        result = self.base_layer(x)
        if self.merged:
            return result
        if self.r:
            result = result + self.lora_branch(self.dropout(x)).to(result.dtype)
        if self.has_mask:
            result = result + self.sparse_branch(x).to(result.dtype)
        return result

    # -------------------------------------------------------------- merge, save, load

    def delta_weight(self) -> torch.Tensor:
        """Delta W = (alpha/r) B A + S, the update merge() adds to W0."""
        delta = self.sparse_weight()
        if self.r:
            delta = delta + (self.B @ self.A) * self.scaling
        return delta

    def _merge(self) -> None:
        if not self.base_layer.weight.dtype.is_floating_point:
            raise NotImplementedError(f"cannot merge RoSA into the 4-bit weights of {self.name or 'this layer'}: "
                                      "dequantize the base first (QRoSA keeps the adapter separate)")
        super()._merge()

    def state_problems(self, state: dict[str, torch.Tensor], prefix: str) -> list[str]:
        """Sparse values are meaningless without their positions: both must come together and fit."""
        if not self.k:
            return []
        keys = {n: prefix + n for n in ("values", "crow_indices", "col_indices")}
        present = {n for n, key in keys.items() if key in state}
        where = prefix[:-1] or "this layer"
        if present == {"values"}:
            return [f"{where}: sparse values without their mask (crow_indices, col_indices); "
                    "save the whole adapter state (core.save_adapter does), not only its parameters"]
        if present and present != set(keys):
            return [f"{where}: the mask and the sparse values must be loaded together, got only {sorted(present)}"]
        if not present:
            return []
        crow, col, values = (state[keys[n]] for n in ("crow_indices", "col_indices", "values"))
        if col.numel() != self.k or values.numel() != self.k or crow.numel() != self.shape[0] + 1:
            return [f"{where}: a mask with {col.numel()} entries and {crow.numel() - 1} rows does not fit this "
                    f"layer's {self.shape[0]} x {self.shape[1]} weight with k={self.k} entries (d={self.d})"]
        if not crow.any():                       # saved before any mask was set: S must still be zero
            return [f"{where}: sparse values without a mask"] if values.any() else []
        try:
            sp.check_csr(crow, col, self.shape, what=f"{where}'s mask")
        except ValueError as e:
            return [str(e)]
        return []

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        problems = self.state_problems(state_dict, prefix)
        if problems:
            raise ValueError("; ".join(problems))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.k:
            self._refresh()

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, d={self.d}, k={self.k}, "
                f"mask={'set' if self.has_mask else 'not set'}")


# ----------------------------------------------------------------------------- the config

@dataclass
class RoSAConfig(AdapterConfig):
    """RoSA hyper-parameters (names as the authors' ``RosaConfig`` where one exists).

    ``d`` is the density of S in every adapted layer; ``density_pattern`` overrides it per layer
    ({name or name suffix: density}, matched as a ``target_modules`` list), as peft's ``rank_pattern``
    does for r. ``lr_lora`` / ``lr_sparse``: separate learning rates (the authors' scripts: 7e-4 for
    LoRA, 2e-4 for S); None uses the optimizer's lr. ``param_groups(model)`` turns them into groups.
    """
    r: int = 8
    alpha: float = 8.0
    d: float = 0.003
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"
    density_pattern: dict[str, float] = field(default_factory=dict)
    lr_lora: float | None = None
    lr_sparse: float | None = None

    method: ClassVar[str] = "rosa"
    wraps: ClassVar[tuple] = (nn.Linear,)

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 0:
            raise ValueError(f"RoSA rank r must be a non-negative integer (0: no low-rank part), got {self.r!r}")
        for where, d in [("d", self.d), *((f"density_pattern[{k!r}]", v) for k, v in self.density_pattern.items())]:
            if not 0 <= d < 1:
                raise ValueError(f"RoSA density {where}={d} must be in [0, 1): 0 means no sparse part, "
                                 "1 would be a dense update (full fine-tuning)")
        if self.r == 0 and self.d == 0 and not any(self.density_pattern.values()):
            raise ValueError("RoSA with r=0 and d=0 trains nothing: give a rank, a density, or both")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("lr_lora", "lr_sparse"):
            lr = getattr(self, name)
            if lr is not None and not lr > 0:
                raise ValueError(f"{name} must be positive or None, got {lr}")

    def density_for(self, name: str) -> float:
        """The density of layer ``name``: the first ``density_pattern`` key it matches, else ``d``."""
        return next((v for k, v in self.density_pattern.items() if matches(name, [k])), self.d)

    def make_layer(self, name: str, module: nn.Linear) -> RoSALinear:
        return RoSALinear(module, self.r, self.alpha, self.density_for(name), self.dropout, self.use_rslora,
                          self.init, name=name)


def rosa_layers(model: nn.Module) -> dict[str, RoSALinear]:
    return {n: m for n, m in adapter_layers(model).items() if isinstance(m, RoSALinear)}


def lora_budget_density(model: nn.Module, target_modules: list[str] | str, r: int) -> dict[str, float]:
    """{layer: d} giving S exactly r (d_in + d_out) entries in each targeted Linear: LoRA rank r's
    parameter count, layer by layer (ShiRA's rule). As ``density_pattern`` it makes RoSA(r1) + these
    densities for r2 cost exactly LoRA r1 + r2, and RoSA(r=0) a sparse-only adapter at LoRA r's budget."""
    from .core import find_targets
    out = {}
    for name in find_targets(model, target_modules):
        m, n = model.get_submodule(name).weight.shape
        if r * (m + n) >= m * n:
            raise ValueError(f"rank {r} needs {r * (m + n)} entries in {name} ({m} x {n}): more than a dense update")
        out[name] = r * (m + n) / (m * n)
    return out


def param_groups(model: nn.Module, lr_lora: float | None = None, lr_sparse: float | None = None) -> list[dict]:
    """Optimizer groups: LoRA factors, sparse values, anything else trainable (``modules_to_save``).

    The learning rates default to the model's RoSAConfig; a group without "lr" takes the optimizer's
    (``train.train(..., params=param_groups(model))`` accepts these). Empty groups are left out.
    """
    config = model.adapter_config
    lr_lora = lr_lora if lr_lora is not None else config.lr_lora
    lr_sparse = lr_sparse if lr_sparse is not None else config.lr_sparse
    lora, sparse = [], []
    for layer in rosa_layers(model).values():
        lora += [p for p in (layer.A, layer.B) if p is not None and p.requires_grad]
        sparse += [layer.values] if layer.values is not None and layer.values.requires_grad else []
    seen = {id(p) for p in lora + sparse}
    other = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    groups = []
    for params, lr in ((lora, lr_lora), (sparse, lr_sparse), (other, None)):
        if params:
            groups.append({"params": params, **({"lr": lr} if lr is not None else {})})
    return groups


# ----------------------------------------------------------------------------- choosing the mask

class _GradTap(torch.autograd.Function):
    """Identity in forward; in backward hands grad_out to ``callback`` (the layer's G = grad_out^T x).

    ``dummy`` is a scalar that requires grad, so the backward reaches every tap even when nothing else
    in the layer does (r = 0, before any mask: the paper's pure sparse baseline)."""

    @staticmethod
    def forward(ctx, out, dummy, x, callback):
        ctx.x, ctx.callback = x.detach(), callback
        return out.clone()          # a new tensor, not a view: later in-place ops on it stay legal

    @staticmethod
    def backward(ctx, grad_out):
        ctx.callback(grad_out, ctx.x)
        return (grad_out if ctx.needs_input_grad[0] else None), None, None, None


class FisherCollector:
    """Context manager: while open, every backward pass through a RoSA layer adds G^2, G = grad_out^T x
    (the gradient of the layer's full weight), to a per-layer sum. ``fisher()`` gives the mean G^2 per
    backward pass: the empirical diagonal Fisher of each weight when each pass is one example.

    ``backward(loss)`` back-propagates only into the taps (``inputs=[dummy]``), so the adapter's
    ``.grad`` fields are left as they were. ``device``: where the sums live (default: each layer's).
    """

    def __init__(self, model: nn.Module, device: torch.device | str | None = None):
        self.layers = rosa_layers(model)
        if not self.layers:
            raise ValueError("the model has no RoSA layers: add_adapter(model, RoSAConfig(...)) first")
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {name: 0 for name in self.layers}
        self.dummy = torch.zeros((), requires_grad=True)
        self._handles = []

    def _accumulate(self, name: str, grad_out: torch.Tensor, x: torch.Tensor) -> None:
        with torch.no_grad():
            g = grad_out.reshape(-1, grad_out.shape[-1]).float()
            G = g.T @ x.reshape(-1, x.shape[-1]).float()               # (d_out, d_in): the weight's gradient
            G = G.to(self.device) if self.device is not None else G
            if name in self.sums:
                self.sums[name].addcmul_(G, G)
            else:
                self.sums[name] = G * G
            self.counts[name] += 1

    def __enter__(self) -> "FisherCollector":
        for name, layer in self.layers.items():
            def hook(module, args, out, name=name):
                callback = lambda g, x: self._accumulate(name, g, x)   # noqa: E731
                return _GradTap.apply(out, self.dummy.to(out.device), args[0], callback)
            self._handles.append(layer.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def backward(self, loss: torch.Tensor) -> None:
        torch.autograd.backward(loss, inputs=[self.dummy])

    def fisher(self) -> dict[str, torch.Tensor]:
        missing = [n for n, c in self.counts.items() if c == 0]
        if missing:
            raise RuntimeError(f"no gradient reached {len(missing)} RoSA layers (e.g. {missing[0]}): "
                               "run forward and backward passes inside the collector first")
        return {n: s / self.counts[n] for n, s in self.sums.items()}


def _default_loss(model: nn.Module, batch: Mapping) -> torch.Tensor:
    out = model(**batch)
    return out["loss"] if isinstance(out, Mapping) else out.loss


def accumulate_fisher(model: nn.Module, batches: Iterable[Mapping],
                      loss_fn: Callable[[nn.Module, Mapping], torch.Tensor] | None = None,
                      per_example: bool = False, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Mean G^2 per RoSA layer over ``batches`` (dicts of tensors): {layer name: (d_out, d_in) float32}.

    ``loss_fn(model, batch)`` defaults to ``model(**batch).loss``. Each batch is one gradient sample;
    ``per_example=True`` splits every batch into single examples first (the authors' scripts: micro-batch
    1, 32 examples). Runs the model in training mode (dropout on, as during training) and restores its
    mode; the adapter's ``.grad`` fields are not touched.
    """
    loss_fn = loss_fn or _default_loss
    was_training = model.training
    model.train()
    try:
        with FisherCollector(model, device) as collector:
            for batch in batches:
                size = next(len(v) for v in batch.values() if torch.is_tensor(v))
                parts = [{k: v[i:i + 1] if torch.is_tensor(v) else v for k, v in batch.items()}
                         for i in range(size)] if per_example else [batch]
                for part in parts:
                    collector.backward(loss_fn(model, part))
    finally:
        model.train(was_training)
    return collector.fisher()


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of ``scores``; among equal scores the earlier entry in
    row-major order wins, so the choice is deterministic (``torch.topk`` does not promise an order)."""
    if not torch.isfinite(scores).all():
        raise ValueError("the scores contain NaN or inf: the accumulated gradients overflowed or diverged")
    flat = scores.flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k <= 0:
        return mask.view_as(scores)
    threshold = torch.topk(flat, k, sorted=False).values.min()     # the k-th largest value
    mask = flat > threshold
    ties = (flat == threshold).nonzero().squeeze(1)[: k - int(mask.sum())]
    mask[ties] = True
    return mask.view_as(scores)


def select_masks(fisher: Mapping[str, torch.Tensor], density: float | Mapping[str, float] | RoSAConfig
                 ) -> dict[str, torch.Tensor]:
    """Per layer, the top k = floor(d * numel) entries of the accumulated G^2: {name: bool mask}.

    ``density``: one d for all layers, {name: d}, or a RoSAConfig (its ``density_for``). Layers
    with d = 0 get no mask.
    """
    masks = {}
    for name, scores in fisher.items():
        if isinstance(density, RoSAConfig):
            d = density.density_for(name)
        elif isinstance(density, Mapping):
            d = density[name]
        else:
            d = density
        k = n_entries(d, *scores.shape)
        if k:
            masks[name] = top_k_mask(scores, k)
    return masks


def set_masks(model: nn.Module, masks: Mapping[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
              strict: bool = True) -> None:
    """``layer.set_mask(masks[name])`` for every RoSA layer (S = 0 on its new positions).

    Raises ValueError, before changing anything, for a name that is no RoSA layer (naming close ones)
    and, if ``strict``, for a RoSA layer with a sparse part but no mask. Each layer checks its mask's
    shape and count.
    """
    layers = rosa_layers(model)
    unknown = [n for n in masks if n not in layers]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(layers), n=3)
        raise ValueError(f"masks for layers the model has no RoSA layer at: {unknown[:3]}"
                         + (f"; did you mean {close}?" if close else ""))
    missing = [n for n, layer in layers.items() if layer.k and n not in masks]
    if strict and missing:
        raise ValueError(f"no mask for {len(missing)} RoSA layers with a sparse part, e.g. {missing[:3]} "
                         "(strict=False leaves them LoRA-only)")
    for name, mask in masks.items():
        layers[name].set_mask(mask)


# ----------------------------------------------------------------------------- the schedule

@dataclass
class RoSARun:
    """What ``train_rosa`` returns: the masks it chose and what the two training calls returned."""
    masks: dict[str, torch.Tensor]
    warmup: Any = None
    train: Any = None


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every RoSA layer's A and B, to ``restart`` from."""
    return {f"{n}.{p}": getattr(layer, p).detach().clone()
            for n, layer in rosa_layers(model).items() if layer.r for p in ("A", "B")}


@torch.no_grad()
def restart(model: nn.Module, lora: Mapping[str, torch.Tensor] | None = None) -> None:
    """Back to the start, keeping the masks: S = 0, and LoRA set to ``lora`` (from ``lora_state``)
    or, if None, freshly drawn (``reset_lora``)."""
    for name, layer in rosa_layers(model).items():
        if layer.values is not None:
            layer.values.zero_()
        if layer.r and lora is not None:
            layer.A.copy_(lora[f"{name}.A"])
            layer.B.copy_(lora[f"{name}.B"])
        elif layer.r:
            layer.reset_lora()


def train_rosa(model: nn.Module, config: RoSAConfig, train_fn: Callable[[nn.Module], Any],
               fisher_batches: Iterable[Mapping], warmup_fn: Callable[[nn.Module], Any] | None = None,
               loss_fn: Callable[[nn.Module, Mapping], torch.Tensor] | None = None,
               per_example: bool = False) -> RoSARun:
    """The full RoSA schedule on ``model`` (in place): warm-up -> mask -> restart -> train.

    1. ``add_adapter(model, config)`` (unless it already has this RoSA adapter); remember LoRA's
       initial A, B.
    2. ``warmup_fn(model)``: train the low-rank part alone (no mask yet, so S is inactive and its
       values get no gradient), e.g. ``lambda m: train(m, loader, TrainConfig(max_steps=64, ...))``.
       Skipped if None or r = 0.
    3. ``accumulate_fisher(model, fisher_batches, loss_fn, per_example)``, ``select_masks``.
    4. ``restart``: S = 0 on the new masks; LoRA back to its initial A, B, as the authors' restarted
       run (same seed) draws them; then ``train_fn(model)`` trains both parts, e.g.
       ``lambda m: train(m, loader, cfg, params=param_groups(m))``.
    """
    current = getattr(model, "adapter_config", None)
    if current is None:
        add_adapter(model, config)
    elif current.to_dict() != config.to_dict():
        raise ValueError(f"the model already has a {current.method} adapter with another config; "
                         "call core.remove_adapter(model) first, or pass that adapter's config")
    initial = lora_state(model)
    warmup = warmup_fn(model) if warmup_fn is not None and config.r else None
    masks = select_masks(accumulate_fisher(model, fisher_batches, loss_fn, per_example), config)
    restart(model, initial)
    set_masks(model, masks)
    return RoSARun(masks, warmup, train_fn(model))


# ----------------------------------------------------------------------------- the reference: peft's ShiRA

def peft_shira_twin(model: nn.Module, base: nn.Module, task_type: str | None = "CAUSAL_LM"):
    """peft's ShiRA (a sparse-only adapter) on a copy of ``base``, with ``model``'s masks and values.

    ``model`` is a sparse-only RoSA model (r = 0) whose every layer has exactly r (m + n) entries, one r
    for all (``lora_budget_density``): ShiRA fixes that count, so we hand it our masks through its ``mask_fn``
    and copy the values. ShiRA stores its indices in row-major order, which is CSR's order.
    Returns (peft model, {layer: (our values, ShiRA's weight)}) for ``equivalence.compare``.
    """
    import copy
    from peft import ShiraConfig, get_peft_model
    layers = rosa_layers(model)
    if any(layer.r for layer in layers.values()):
        raise ValueError("ShiRA has no low-rank part: compare it with a RoSA model with r = 0")
    ranks = {}
    for name, layer in layers.items():
        m, n = layer.shape
        if layer.k % (m + n):
            raise ValueError(f"{name} has {layer.k} sparse entries; ShiRA needs a multiple of m + n = {m + n} "
                             "(build the RoSA config with lora_budget_density)")
        ranks[name] = layer.k // (m + n)
    if len(set(ranks.values())) != 1:
        raise ValueError(f"ShiRA has one r for all layers; these layers have budgets of ranks {sorted(set(ranks.values()))}")
    twin = copy.deepcopy(base)
    masks = {id(twin.get_submodule(n)): layer.mask() for n, layer in layers.items()}
    config = ShiraConfig(r=next(iter(ranks.values())), target_modules=list(layers), task_type=task_type)
    config.mask_fn = lambda base_layer, r, **kw: masks[id(base_layer)].to(base_layer.weight.dtype)
    theirs = get_peft_model(twin, config)
    pairs = {}
    with torch.no_grad():
        for name, layer in layers.items():
            shira = theirs.get_submodule("base_model.model." + name)
            rows, cols = shira.shira_indices["default"].long()
            if not (torch.equal(rows, layer.row_indices.long()) and torch.equal(cols, layer.col_indices.long())):
                raise RuntimeError(f"ShiRA's indices for {name} are not ours: peft changed its index order")
            shira.shira_weight["default"].copy_(layer.values)
            pairs[name] = (layer.values, shira.shira_weight["default"])
    return theirs, pairs
