"""RoSA: Robust Adaptation (Nikdan, Tabesh, Crnčević, Alistarh, ICML 2024, arXiv 2401.04679).

Robust PCA writes a matrix as low-rank plus sparse. RoSA writes the fine-tuning update of a frozen
linear layer W0 (d_out x d_in) the same way, a LoRA factor pair plus a sparse matrix S:

    y = W0 x + s B A x + S x,        s = alpha / r,   A: r x d_in,  B: d_out x r,
                                      S: d_out x d_in with k = floor(d * d_out * d_in) nonzeros

A, B are LoRA's: the layer holds a ``blocks.lowrank.LowRank`` as ``lora`` (Kaiming-uniform A, zero B,
dropout on the LoRA branch's input), so RoSA with d = 0 is LoRA by construction. S is
stored in CSR: its positions (``crow_indices``, ``col_indices``, buffers) are fixed, its ``values``
(an nn.Parameter of k entries) are trained and start at zero, so the adapted model starts at W0.
r = 0 leaves the sparse part alone ("SpA" in the paper), d = 0 leaves plain LoRA.

Forward and backward of the sparse term never form a d_out x d_in matrix (``kernels.sparse.sparse_linear``):

    forward    S x                        SpMM   (sparse x dense)
    backward   grad_x = S^T grad_out      SpMM with the transposed CSR, computed once per mask
               grad_values[k] = sum_n grad_out[n, row_k] x[n, col_k]
                                          SDDMM: the dense gradient grad_out^T x, sampled at the mask

Which entries S may use is chosen from gradients (``blocks.masks``), as in the paper and the authors'
peft-rosa fork:

1. train the low-rank part alone for a short warm-up (the authors: 64 steps);
2. collect the gradient of each adapted layer's full weight, G = grad_out^T x (from forward and
   backward hooks, so W0 never needs ``requires_grad``, and a 4-bit W0 works too), over some batches,
   as a running mean of G^2 (the empirical diagonal Fisher; the authors' ``mean_squared``);
3. keep, per layer, the k = floor(d * numel) entries with the largest mean G^2;
4. restart: S = 0 on the new mask, LoRA back to its initial values, and train both parts.

``train_rosa`` runs the whole schedule around any training function (e.g. ``training.train``).

Details the paper leaves open, decided as the authors' code does or said here: a gradient sample is
one backward pass (the authors use micro-batches of one example; ``per_example=True`` does the same
with larger batches); equal scores at the top-k boundary go to the earlier entry in row-major order
(``torch.topk`` promises no order); the restart restores LoRA's initial A (the authors restart their
script under the same seed, which draws the same A); S is not scaled by alpha/r and sees x without
LoRA's dropout (peft-rosa's SpMM path). k is fixed by d and the layer's shape, so a checkpoint's shapes
follow from its config; ``density_pattern`` gives a layer its own d.

QRoSA: the base layer may be our NF4 ``quantized.Linear4bit`` (a subclass of nn.Linear): the adapter then
lives in float32 and the Fisher hooks need no float W0. Merging into a 4-bit base is refused.
"""
from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..blocks import masks as mk
from ..blocks.lowrank import LowRank, adapter_like, check_init
from ..core import AdapterConfig, AdapterLayer, add_adapter, adapter_layers, find_targets, matches, register
from ..kernels import sparse as sp
from ..kernels.triton import triton_available

TRITON_ENV = "PFS_ROSA_TRITON"   # "1": use the Triton kernels even on CPU tensors (with TRITON_INTERPRET=1)


def n_entries(d: float, d_out: int, d_in: int) -> int:
    """k = floor(d * d_out * d_in), the authors' ``int(d * numel)`` (``blocks.masks.n_entries``)."""
    return mk.n_entries(d, d_out * d_in)


# ----------------------------------------------------------------------------- the layer

class RoSALinear(AdapterLayer):
    """x -> W0 x + (alpha/r) B A dropout(x) + S x, around a frozen ``nn.Linear`` (or a 4-bit ``Linear4bit``).

    Args:
        base_layer: the frozen linear layer W0 (d_in -> d_out).
        r: LoRA rank, 0 <= r <= min(d_in, d_out); 0 means no low-rank part.
        alpha: LoRA scaling numerator (alpha/r, or alpha/sqrt(r) with ``use_rslora``). S is not scaled.
        d: density of S in [0, 1); 0 means no sparse part. S has k = floor(d * d_out * d_in) entries.
        dropout: dropout on the LoRA branch's input only (S sees x, as in the authors' code).
        use_rslora, init: as LoRA's ("kaiming" or "gaussian" A; B = 0).
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
        check_init(init)
        self.name, self.r, self.d = name, r, d
        self.shape = (d_out, d_in)
        like = adapter_like(base_layer)            # float32 on a quantized base (QRoSA)
        # The low-rank part is LoRA's own piece, so RoSA with d=0 is LoRA.
        self.lora = LowRank(d_in, d_out, r, alpha, dropout, use_rslora, init, name=name, **like) if r else None
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

    # -------------------------------------------------------------- the mask

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
            csr = sp.CSR.from_positions(self.crow_indices, self.col_indices, self.shape)
            self.row_indices, self.crow_t, self.col_t, self.perm = csr.row, csr.crow_t, csr.col_t, csr.perm

    def mask(self) -> torch.Tensor:
        """S's positions as a boolean (d_out, d_in) tensor (all False before ``set_mask``)."""
        out = torch.zeros(self.shape, dtype=torch.bool, device=self.crow_indices.device if self.k else None)
        if self.has_mask:
            out[self.row_indices.long(), self.col_indices.long()] = True
        return out

    def sparse_weight(self) -> torch.Tensor:
        """S as a dense (d_out, d_in) tensor (zeros before ``set_mask``)."""
        if not self.has_mask:
            like = self.lora.A if self.r else self.values
            return torch.zeros(self.shape, dtype=like.dtype, device=like.device)
        return sp.csr_to_dense(self.values, self.crow_indices, self.col_indices, self.shape)

    # -------------------------------------------------------------- forward

    def _triton(self, x: torch.Tensor) -> bool:
        if self.use_triton is not None:
            return self.use_triton
        return x.is_cuda and triton_available() or os.environ.get(TRITON_ENV) == "1"

    def sparse_branch(self, x: torch.Tensor) -> torch.Tensor:
        """S x through SpMM (backward: SpMM with S^T and SDDMM). x: (..., d_in) -> (..., d_out)."""
        csr = sp.CSR(self.crow_indices, self.col_indices, self.row_indices, self.crow_t, self.col_t, self.perm,
                     self.shape)
        return sp.sparse_linear(x, self.values, csr, self._triton(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x: (..., d_in) -> (..., d_out)
        result = self.base_layer(x)
        if self.merged:
            return result
        if self.r:
            result = (result + self.lora(x)).to(result.dtype)    # add in the adapter's dtype, round once
        if self.has_mask:
            result = (result + self.sparse_branch(x)).to(result.dtype)
        return result

    # -------------------------------------------------------------- merge, save, load

    def delta_weight(self) -> torch.Tensor:
        """Delta W = (alpha/r) B A + S, the update merge() adds to W0."""
        delta = self.sparse_weight()
        if self.r:
            delta = delta + self.lora.delta()
        return delta

    def state_problems(self, state: dict[str, torch.Tensor], prefix: str) -> list[str]:
        """Sparse values are meaningless without their positions: both must come together and fit."""
        if not self.k:
            return []
        names = ("crow_indices", "col_indices", "values")
        saved = {n: state[prefix + n] for n in names if prefix + n in state}
        return sp.saved_csr_problems(saved, self.shape, self.k, where=prefix[:-1] or "this layer")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        problems = self.state_problems(state_dict, prefix)
        if problems:
            raise ValueError("; ".join(problems))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.k:
            self._refresh()

    def extra_repr(self) -> str:
        return f"d={self.d}, k={self.k}, mask={'set' if self.has_mask else 'not set'}"


# ----------------------------------------------------------------------------- the config

@register("rosa", family="reparameterized", paper="nikdan2024rosa")
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

    renames_v1: ClassVar = ((r"\.A$", ".lora.A"), (r"\.B$", ".lora.B"))

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
        check_init(self.init)
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

    def simulate_training(self, model: nn.Module, generator: torch.Generator) -> None:
        """A random mask of k entries in every layer with a sparse part, then noise on every value."""
        for layer in rosa_layers(model).values():
            if layer.k:
                scores = torch.rand(layer.shape, generator=generator)
                layer.set_mask(mk.top_k_mask(scores, layer.k).to(layer.crow_indices.device))
        super().simulate_training(model, generator)

    @classmethod
    def examples(cls):
        return [("llama", cls(r=2, alpha=4, d=0.05, target_modules=["q_proj", "down_proj"])),
                ("llama", cls(r=0, d=0.02, target_modules="all-linear")),
                ("bert", cls(r=4, alpha=8, d=0.01, target_modules=["query", "value"], modules_to_save=["classifier"]))]

    @classmethod
    def invalid_examples(cls):
        return [{"r": -1}, {"d": 1.0}, {"r": 0, "d": 0.0}, {"dropout": 1.0}, {"lr_lora": 0.0}]


def rosa_layers(model: nn.Module) -> dict[str, RoSALinear]:
    return {n: m for n, m in adapter_layers(model).items() if isinstance(m, RoSALinear)}


def lora_budget_density(model: nn.Module, target_modules: list[str] | str, r: int) -> dict[str, float]:
    """{layer: d} giving S exactly r (d_in + d_out) entries in each targeted Linear: LoRA rank r's
    parameter count, layer by layer (ShiRA's rule). As ``density_pattern`` it makes RoSA(r1) + these
    densities for r2 cost exactly LoRA r1 + r2, and RoSA(r=0) a sparse-only adapter at LoRA r's budget."""
    out = {}
    for name in find_targets(model, target_modules):
        layer = model.get_submodule(name)
        m, n = layer.out_features, layer.in_features    # not weight.shape: a 4-bit base packs its weight
        if r * (m + n) >= m * n:
            raise ValueError(f"rank {r} needs {r * (m + n)} entries in {name} ({m} x {n}): more than a dense update")
        out[name] = r * (m + n) / (m * n)
    return out


def param_groups(model: nn.Module, lr_lora: float | None = None, lr_sparse: float | None = None) -> list[dict]:
    """Optimizer groups: LoRA factors, sparse values, anything else trainable (``modules_to_save``).

    The learning rates default to the model's RoSAConfig; a group without "lr" takes the optimizer's
    (``train(..., params=param_groups(model))`` accepts these). Empty groups are left out.
    """
    config = model.adapter_config
    lr_lora = lr_lora if lr_lora is not None else config.lr_lora
    lr_sparse = lr_sparse if lr_sparse is not None else config.lr_sparse
    lora, sparse = [], []
    for layer in rosa_layers(model).values():
        lora += [p for p in (layer.lora.parameters() if layer.r else ()) if p.requires_grad]
        sparse += [layer.values] if layer.values is not None and layer.values.requires_grad else []
    seen = {id(p) for p in lora + sparse}
    other = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    groups = []
    for params, lr in ((lora, lr_lora), (sparse, lr_sparse), (other, None)):
        if params:
            groups.append({"params": params, **({"lr": lr} if lr is not None else {})})
    return groups


# ----------------------------------------------------------------------------- choosing the mask

def accumulate_fisher(model: nn.Module, batches: Iterable[Mapping],
                      loss_fn: Callable[[nn.Module, Mapping], torch.Tensor] | None = None,
                      per_example: bool = False, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Mean G^2 per RoSA layer over ``batches``: {layer name: (d_out, d_in) float32}.

    ``blocks.masks.weight_gradient_mean_squares`` on the model's RoSA layers: each batch is one
    gradient sample (``per_example=True``: each example, the authors' micro-batches of one).
    """
    layers = rosa_layers(model)
    if not layers:
        raise ValueError("the model has no RoSA layers: add_adapter(model, RoSAConfig(...)) first")
    return mk.weight_gradient_mean_squares(model, layers, batches, loss_fn, per_example, device)


def select_masks(fisher: Mapping[str, torch.Tensor], density: float | Mapping[str, float] | RoSAConfig
                 ) -> dict[str, torch.Tensor]:
    """Per layer, the top k = floor(d * numel) entries of the accumulated G^2: {name: bool mask}.

    ``density``: one d for all layers, {name: d}, or a RoSAConfig (its ``density_for``).
    """
    return mk.select_masks(fisher, density.density_for if isinstance(density, RoSAConfig) else density)


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
    return {f"{n}.{p}": getattr(layer.lora, p).detach().clone()
            for n, layer in rosa_layers(model).items() if layer.r for p in ("A", "B")}


@torch.no_grad()
def restart(model: nn.Module, lora: Mapping[str, torch.Tensor] | None = None) -> None:
    """Back to the start, keeping the masks: S = 0, and LoRA set to ``lora`` (from ``lora_state``)
    or, if None, freshly drawn (``LowRank.reset``)."""
    for name, layer in rosa_layers(model).items():
        if layer.values is not None:
            layer.values.zero_()
        if layer.r and lora is not None:
            layer.lora.A.copy_(lora[f"{name}.A"])
            layer.lora.B.copy_(lora[f"{name}.B"])
        elif layer.r:
            layer.lora.reset()


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
