"""GaLore: Adam whose moments live in a low-rank projection of each weight matrix's gradient.

Zhao, Zhang, Chen, Wang, Anandkumar and Tian (2024), "GaLore: Memory-Efficient LLM Training by
Gradient Low-Rank Projection", arXiv 2403.03507. Every weight is trained in full; only the optimizer
is low-rank. Algorithm 1 of the paper is the whole idea in four lines, for each weight:
``lor_grad = project(grad)``, ``lor_update = update(lor_grad)`` (Adam, here),
``update = project_back(lor_update)``, ``weight.data += update``. Algorithm 2 ("Adam with GaLore")
spells it out for W in R^{m x n} with m <= n, step size eta, scale alpha, rank r, subspace change
frequency T, and G_t the *negative* gradient:

    if t mod T = 0:  U, S, V <- SVD(G_t);  P_t <- U[:, :r]   else P_t <- P_{t-1}    P_t: (m, r)
    R_t <- P_t^T G_t                                    project                 R_t: (r, n)
    M_t <- beta1 M_{t-1} + (1 - beta1) R_t              Adam, in the compact space
    V_t <- beta2 V_{t-1} + (1 - beta2) R_t^2
    M_t <- M_t / (1 - beta1^t);  V_t <- V_t / (1 - beta2^t)
    N_t <- M_t / (sqrt(V_t) + eps)
    G~_t <- alpha P_t N_t                               project back            G~_t: (m, n)
    W_t <- W_{t-1} + eta G~_t

So Adam keeps 2 r n numbers for the matrix instead of 2 m n, plus P (m r). Within one period of T
steps every update lies in the column space of the same P, so their sum has rank <= r; a new SVD
every T steps lets the weights leave that subspace, and over many periods the sum can reach full
rank. The moments are carried across a refresh as they are (not re-projected), in the paper as in
the reference.

Where the reference (``galore_torch.GaLoreAdamW``, built on transformers' old AdamW) departs from
the paper, and what this file does (the reference's choice each time, so the two agree bit for bit):

* Which side is projected. The paper states m <= n and a left projector. The reference's
  ``proj_type="std"`` projects on the left (P = U[:, :r], R = P^T G) when m < n and on the right
  (P = V^T[:r, :], R = G P^T, back: N P) when m >= n, so a square matrix goes right. Either way P
  is the smaller factor, r x min(m, n), and the moments r x max(m, n). "reverse_std" swaps the
  sides, "left"/"right" force one, "full" projects on both (R = U_r^T G V_r, r x r).
* Bias correction is folded into the step size, eta_t = eta sqrt(1 - beta2^t) / (1 - beta1^t), with
  N_t = M_t / (sqrt(V_t) + eps) on the uncorrected moments: the paper's update with eps replaced by
  eps / sqrt(1 - beta2^t), a difference only while eps is not small against sqrt(V_t).
  ``correct_bias=False`` drops the correction (as the original BERT code did).
* Weight decay, absent from the paper's algorithm, is decoupled and comes *after* the update, on the
  updated weights, unscaled by alpha: W <- W - eta lambda W (torch's AdamW decays before). It applies
  to every parameter, GaLore or not.
* Parameters of groups without a ``rank`` get that same AdamW (eps on the uncorrected sqrt(V),
  decay last), not ``torch.optim.AdamW``: they differ from the training loop's default optimizer.
* The SVD is taken in float32 (a bf16/fp16 gradient is cast up, P cast back to its dtype). The
  reference keeps a float32 P as a slice of the SVD's factor, so the whole min(m, n)^2 factor stays
  alive (for SmolLM2, 1.7M floats per layer whatever r); ours does the same by default
  (so the two agree bit for bit) and ``compact_projector=True`` keeps only P, as the paper counts it.
* The reference crashes on a 1-D parameter in a GaLore group and silently truncates a rank larger
  than the matrix's smaller side; here both are construction errors.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ..core import find_targets, register

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
GROUP_DEFAULTS = {"update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}  # the paper's T and alpha


def check_galore_settings(rank, update_proj_gap, scale, proj_type) -> None:
    """Raise ``ValueError`` unless these are valid GaLore settings (shapes are checked separately)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if isinstance(update_proj_gap, bool) or not isinstance(update_proj_gap, int) or update_proj_gap < 1:
        raise ValueError(f"update_proj_gap (T, steps between SVDs) must be an integer >= 1, got {update_proj_gap!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale (alpha) must be a positive number, got {scale!r}")
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")


def check_matrix(name: str, shape, rank: int) -> None:
    """A GaLore parameter is a matrix whose smaller side is at least the rank."""
    if len(shape) != 2:
        raise ValueError(f"GaLore projects matrices; {name} has shape {tuple(shape)} "
                         f"(put it in a group without 'rank')")
    if rank > min(shape):
        raise ValueError(f"rank {rank} is larger than the smaller side of {name} (shape {shape[0]} x {shape[1]}); "
                         f"GaLore needs rank <= {min(shape)}")


def projected_side(shape, proj_type: str) -> str:
    """"left" (R = P^T G), "right" (R = G P^T) or "both", as the reference picks it (ties go right)."""
    m, n = shape
    if proj_type == "std":
        return "left" if m < n else "right"
    if proj_type == "reverse_std":
        return "right" if m < n else "left"
    return "both" if proj_type == "full" else proj_type


@register("galore", family="optimizers", kind="optimizer", paper="zhao2024galore")
class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore's gradient projection for the parameter groups that carry a ``rank``.

    Group keys (the reference's): ``rank`` (r), ``update_proj_gap`` (T, default 200), ``scale``
    (alpha, default 0.25), ``proj_type`` (default "std"; see the module docstring). Groups without
    ``rank`` are plain AdamW. Params may be tensors, (name, tensor) pairs (names then appear in
    errors) or group dicts, as for any torch optimizer. Defaults as the reference (eps 1e-6).
    ``compact_projector=True`` stores P as a copy of its r rows or columns (the paper's r x min(m, n)
    floats) instead of the reference's slice of the SVD factor, which keeps all min(m, n)^2 alive;
    the numbers differ from the reference's only in the last bits (the matmuls see another layout).

    Raises:
        ValueError: bad lr/betas/eps/weight_decay, or a GaLore group with a bad rank,
            update_proj_gap, scale or proj_type, a parameter that is not a matrix, or a matrix whose
            smaller side is below the rank. Nothing is built then.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True, compact_projector: bool = False):
        if not lr >= 0.0 or not eps >= 0.0 or not weight_decay >= 0.0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got lr={lr}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        params = list(params)
        groups = [dict(g) for g in params] if params and isinstance(params[0], Mapping) else [{"params": params}]
        for i, group in enumerate(groups):
            group["params"] = [group["params"]] if torch.is_tensor(group["params"]) else list(group["params"])
            if "rank" not in group:
                continue
            for key, default in GROUP_DEFAULTS.items():
                group.setdefault(key, default)
            check_galore_settings(group["rank"], group["update_proj_gap"], group["scale"], group["proj_type"])
            for j, p in enumerate(group["params"]):
                name, p = p if isinstance(p, tuple) else (f"params[{j}] of group {i}", p)
                check_matrix(name, p.shape, group["rank"])
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      correct_bias=correct_bias))
        self.compact_projector = compact_projector

    @staticmethod
    def _new_subspace(G: torch.Tensor, rank: int, side: str, compact: bool) -> dict[str, torch.Tensor]:
        """Algorithm 2: U, S, V <- SVD(G_t); P_t <- U[:, :r] (left) or V^T[:r, :] (right)."""
        U, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)   # U: (m, k), Vh: (k, n), k = min(m, n)

        def keep(factor):   # the reference's slice of the factor keeps all k^2 entries alive; compact: a copy
            return factor.to(G.dtype, memory_format=torch.contiguous_format, copy=True) if compact else factor.to(G.dtype)
        if side == "left":
            return {"P": keep(U[:, :rank])}                            # (m, r)
        if side == "right":
            return {"P": keep(Vh[:rank, :])}                           # (r, n)
        return {"P": keep(U[:, :rank]), "Q": keep(Vh[:rank, :])}

    @staticmethod
    def _project(G, state, side):
        if side == "left":
            return state["P"].t() @ G                  # (r, m) @ (m, n) -> (r, n)
        if side == "right":
            return G @ state["P"].t()                  # (m, n) @ (n, r) -> (m, r)
        return state["P"].t() @ G @ state["Q"].t()     # -> (r, r)

    @staticmethod
    def _project_back(N, state, side):
        if side == "left":
            return state["P"] @ N                      # (m, r) @ (r, n) -> (m, n)
        if side == "right":
            return N @ state["P"]                      # (m, r) @ (r, n) -> (m, n)
        return state["P"] @ N @ state["Q"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            galore = "rank" in group
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW does not support sparse gradients")
                G, state = p.grad, self.state[p]                          # G: (m, n)
                if not state:
                    state["step"] = 0                                     # t, counted from 0 as in Algorithm 2
                if galore:
                    side = projected_side(p.shape, group["proj_type"])
                    if state["step"] % group["update_proj_gap"] == 0:     # t mod T = 0: a new subspace
                        state.update(self._new_subspace(G, group["rank"], side, self.compact_projector))
                    R = self._project(G, state, side)                    # lor_grad = project(grad)
                else:
                    R = G
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(R)                # M, V: R's shape
                    state["exp_avg_sq"] = torch.zeros_like(R)
                M, V = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                t = state["step"]
                # lor_update = update(lor_grad): Adam on R, bias correction folded into the step size
                M.mul_(beta1).add_(R, alpha=1.0 - beta1)
                V.mul_(beta2).addcmul_(R, R, value=1.0 - beta2)
                denom = V.sqrt().add_(eps)
                step_size = lr
                if group["correct_bias"]:
                    step_size = lr * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
                N = M / denom
                if galore:                                                # update = project_back(lor_update)
                    N = self._project_back(N, state, side) * group["scale"]   # alpha P N: (m, n)
                p.add_(N, alpha=-step_size)                               # weight.data += update
                if wd > 0.0:
                    p.add_(p, alpha=-lr * wd)                             # decoupled decay, after the update
        return loss

    def state_bytes(self) -> dict[str, int]:
        """Bytes the optimizer state holds now (after a first step): ``moments`` (M and V, r x max(m, n)
        for a GaLore matrix), ``projectors`` (the storage behind P, and Q for "full": all of the SVD
        factor unless ``compact_projector``), their ``total``, and ``adamw``: what AdamW's two
        full-size moments for the same parameters would take."""
        out = {"moments": 0, "projectors": 0}
        for state in self.state.values():
            for key, t in state.items():
                if torch.is_tensor(t):
                    held = t.untyped_storage().nbytes() if t.dim() else t.numel() * t.element_size()
                    out["moments" if key.startswith("exp_avg") else "projectors"] += held
        out["total"] = out["moments"] + out["projectors"]
        out["adamw"] = sum(2 * p.numel() * p.element_size() for g in self.param_groups for p in g["params"])
        return out


def make_galore(model: nn.Module, rank: int, update_proj_gap: int = 200, scale: float = 0.25, proj_type: str = "std",
                target_modules: list[str] | str = "all-linear", correct_bias: bool = True, compact_projector: bool = False):
    """``make_optimizer(params, config)`` for ``training.train``: GaLore on the weights of the
    ``nn.Linear`` modules that ``target_modules`` selects (peft's rule, ``core.find_targets``;
    "all-linear", the default, is every linear layer but the output head: on a Llama exactly the
    attention and MLP matrices that the official training script selects with ``["attn", "mlp"]``),
    AdamW on every other trained parameter; lr, betas, eps and weight decay from the config::

        train(model, loader, config, make_optimizer=make_galore(model, rank=8, update_proj_gap=50))

    Settings, targets and every targeted matrix's shape are checked here, before training starts.
    """
    check_galore_settings(rank, update_proj_gap, scale, proj_type)
    linear = [n for n in find_targets(model, target_modules) if isinstance(model.get_submodule(n), nn.Linear)]
    if not linear:
        raise ValueError(f"target_modules {target_modules!r} selected no nn.Linear module; GaLore projects "
                         f"linear weights")
    targets = {}
    for n in linear:
        weight = model.get_submodule(n).weight
        if weight.requires_grad:
            check_matrix(f"{n}.weight", weight.shape, rank)
            targets[id(weight)] = weight
    if not targets:
        raise ValueError(f"no weight that target_modules {target_modules!r} selects requires grad: nothing for GaLore")
    settings = dict(rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type)

    def make_optimizer(params, config) -> GaLoreAdamW:
        params = list(params)
        groups = params if params and isinstance(params[0], Mapping) else [{"params": params}]
        split = []
        for group in groups:
            tensors = [group["params"]] if torch.is_tensor(group["params"]) else list(group["params"])
            plain = [p for p in tensors if id(p) not in targets]
            low_rank = [p for p in tensors if id(p) in targets]
            split += [{**group, "params": plain}] if plain else []
            split += [{**group, "params": low_rank, **settings}] if low_rank else []
        return GaLoreAdamW(split, lr=config.lr, betas=config.betas, eps=config.eps,
                           weight_decay=config.weight_decay, correct_bias=correct_bias,
                           compact_projector=compact_projector)

    return make_optimizer
