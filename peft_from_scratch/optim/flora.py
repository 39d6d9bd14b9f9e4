"""FLORA: Adafactor with a first moment compressed by resampled random projections, and gradient
accumulation through the same projections.

Hao, Cao & Mou (2024), "Flora: Low-Rank Adapters Are Secretly Gradient Compressors", ICML 2024,
arXiv 2402.03293. In LoRA, W = W0 + B A with B0 = 0 and A0 random, small steps leave A near A0, so the
weights change by about -eta sum_t G_t A0^T A0: each gradient G (n x m) is compressed to G A0^T
(n x r) and decompressed by A0, and one fixed A0 confines the change to rank r. FLORA keeps the
compression, A ~ N(0, 1/r) (E[A^T A] = I: decompression is unbiased), but draws a new A from a new
seed, so the summed update is high-rank while every state is r wide. A is regenerated from its seed
whenever it is needed, never stored.

    Algorithm 1 (accumulation): C <- C + G_i A^T over the micro-batches i; the optimizer steps on
                                C A; a new A for the next step.
    Algorithm 2 (momentum):     every kappa steps M <- M A_old A_new^T (the momentum moves to the
                                new basis); M <- beta1 M + (1 - beta1) G A^T; the update uses M A.

What the reference (flora-opt 0.0.3, ``Flora``) computes for a matrix W at step t, gradient G, seed s:

    beta2_t = 1 - t^decay_rate                             (decay_rate = -0.8, so beta2_1 = 0)
    R <- beta2_t R + (1 - beta2_t) rowmean(G^2 + eps1)     (n,)  Adafactor's factored second moment
    S <- beta2_t S + (1 - beta2_t) colmean(G^2 + eps1)     (m,)  (Shazeer & Stern 2018)
    u = G / sqrt(R S^T / mean(R))
    u~ = (1 - beta1) u + beta1 up_s(M)
    if t % kappa == 0:  s' = next_seed(s);  M <- down_s'(up_s(M));  s <- s'
    M <- beta1 M + (1 - beta1) down_s(u)
    u~ <- u~ / max(1, RMS(u~) / clip_threshold)            update clipping
    alpha_t = lr max(eps2, RMS(W))                         relative step size (scale_parameter)
    W <- W - alpha_t weight_decay W;  W <- W - alpha_t u~

Where the reference departs from the paper (we implement the reference):
* the update takes the current u uncompressed and the momentum of step t-1 decompressed, not
  up(M_t): only the momentum is compressed, the update itself is full-rank at every step;
* the shorter side is projected: for n < m, P (r x n) from the left, down(G) = P G (r x m) and
  up(C) = P^T C; else P (m x r) (= A^T) from the right, down(G) = G P (n x r), up(C) = C P^T;
* only a matrix whose shorter side is >= r and whose aspect ratio is <= 4 ("rule out embeddings")
  gets a compressed moment; other tensors keep Adafactor's full momentum (an EMA of u). SmolLM2's tied
  49152 x 576 embedding (ratio 85) is therefore never compressed; its seven projections all are;
* unlike Adafactor's momentum, which averages the clipped, lr-scaled update, M averages u.

Reference defaults that change the method: ``beta1=None`` (its default) is no momentum at all, plain
Adafactor with ``rank`` ignored (ours defaults to 0.9). The lr is relative: lr 1e-3 on weights of RMS
0.02 moves them by about 2e-5. Parameter i (counted over all groups, frozen ones too) starts from
seed ``seed + i + 1``, split into a left and a right seed; projections are drawn by a generator on
the parameter's device, so CPU and CUDA draw different ones from the same seed. Not implemented:
Adafactor's own step schedule (``relative_step``: the loop sets lr) and quantized states.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..core import register
from ..core.step import BackpropStep, StepResult

_INT64_MAX = torch.iinfo(torch.int64).max


# --- seeds and projections ---
def split_seed(seed: int) -> tuple[int, int]:
    """The (left, right) projection seeds of a momentum seed: two int64 draws of a CPU generator."""
    left, right = torch.randint(0, _INT64_MAX, (2,), generator=torch.Generator().manual_seed(seed)).tolist()
    return left, right


def next_seed(seed: int) -> int:
    """The seed of the next projection: the 15th int64 draw of a CPU generator seeded with ``seed``."""
    return torch.randint(0, _INT64_MAX, (15,), generator=torch.Generator().manual_seed(seed)).tolist()[-1]


def projection(seed: int, shape, rank: int, device, dtype) -> torch.Tensor:
    """P for an n x m matrix, N(0, 1/r) entries from a generator on ``device``: (r, n) if n < m, else (m, r)."""
    n, m = shape[0], shape[-1]
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn((rank, n) if n < m else (m, rank), generator=generator, device=device,
                       dtype=dtype) / math.sqrt(rank)


def down(G: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """Compress: P G (r x m) or G P (n x r)."""
    return P @ G if G.shape[0] < G.shape[-1] else G @ P


def up(C: torch.Tensor, P: torch.Tensor, shape) -> torch.Tensor:
    """Decompress to ``shape`` (n x m): P^T C or C P^T. Unbiased: E[up(down(G))] = G."""
    return P.t() @ C if shape[0] < shape[-1] else C @ P.t()


def has_compressed_moment(shape, rank: int | None) -> bool:
    """Whether Flora compresses this tensor's first moment (as flora-opt decides, momentum on): a
    matrix whose shorter side is >= rank and whose aspect ratio is <= 4."""
    return rank is not None and len(shape) == 2 and min(shape) >= rank and max(shape) / min(shape) <= 4


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.norm(2) / x.numel() ** 0.5


def _check(lr, rank, kappa, beta1, eps=(0, 0), clip_threshold=1.0, decay_rate=-0.8, weight_decay=0.0,
           scale_parameter=True, factorize_second_moment=True, seed=0):
    if not isinstance(lr, (int, float)) or not lr >= 0:
        raise ValueError(f"lr must be a number >= 0 (Flora scales it by RMS(W)), got {lr!r}")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be an integer >= 1 (or None: an uncompressed momentum), got {rank!r}")
    if not isinstance(kappa, int) or kappa < 1:
        raise ValueError(f"kappa (steps between resampling the projection) must be an integer >= 1, got {kappa!r}")
    if beta1 is not None and not (isinstance(beta1, (int, float)) and 0 <= beta1 < 1):
        raise ValueError(f"beta1 must be in [0, 1) (or None: no momentum), got {beta1!r}")
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not decay_rate <= 0:
        raise ValueError(f"decay_rate must be <= 0 (beta2_t = 1 - t^decay_rate), got {decay_rate!r}")
    if len(eps) != 2 or not min(eps) >= 0 or not clip_threshold > 0 or not weight_decay >= 0:
        raise ValueError(f"expected eps = (eps1, eps2) >= 0, clip_threshold > 0, weight_decay >= 0, got "
                         f"eps={eps!r}, clip_threshold={clip_threshold!r}, weight_decay={weight_decay!r}")


@register("flora", family="optimizers", kind="optimizer", paper="hao2024flora")
class Flora(torch.optim.Optimizer):
    """Adafactor plus a compressed first moment: the module docstring's update, in flora-opt's order of
    operations (equal to it bit for bit on CPU). ``step`` frees each gradient once used, as flora-opt.

    Args: lr (relative unless scale_parameter=False), rank (None: full momentum), kappa (steps between
    resamplings), beta1 (None or 0: no momentum), eps (eps1 in the second moment, eps2 the floor of
    RMS(W)), clip_threshold, decay_rate, weight_decay, factorize_second_moment (False: a full second
    moment and no compressed first moment), seed.
    """

    def __init__(self, params, lr: float = 1e-3, rank: int | None = 8, kappa: int = 1000, beta1: float | None = 0.9,
                 eps: tuple[float, float] = (1e-30, 1e-3), clip_threshold: float = 1.0, decay_rate: float = -0.8,
                 weight_decay: float = 0.0, scale_parameter: bool = True, factorize_second_moment: bool = True,
                 seed: int = 0):
        defaults = dict(lr=lr, rank=rank, kappa=kappa, beta1=beta1, eps=eps, clip_threshold=clip_threshold,
                        decay_rate=decay_rate, weight_decay=weight_decay, scale_parameter=scale_parameter,
                        factorize_second_moment=factorize_second_moment)
        _check(**defaults, seed=seed)
        super().__init__(params, defaults)
        index = seed
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if p.requires_grad:
                    self.state[p]["seed"] = index

    @staticmethod
    def options(group: dict, shape) -> tuple[bool, bool, bool]:
        """(factored second moment, first moment, compressed first moment) for a tensor of ``shape``."""
        factored = len(shape) == 2 and group["factorize_second_moment"]
        momentum = group["beta1"] is not None and group["beta1"] > 0
        return factored, momentum, momentum and factored and has_compressed_moment(shape, group["rank"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grad, p.grad = p.grad, None
                    self.step_parameter(p, grad, group)
        return loss

    @torch.no_grad()
    def step_parameter(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        """One update of ``p`` with ``grad`` (``FloraAccumulationStep`` calls it inside backward)."""
        if grad.is_sparse:
            raise RuntimeError("Flora does not support sparse gradients")
        G, W = grad.float(), p.float()              # W is p itself in float32, a float32 copy of a 16-bit p
        state = self.state[p]
        factored, momentum, compressed = self.options(group, G.shape)
        if "step" not in state:
            state["step"] = 0
            if momentum and compressed:
                n, m, r = G.shape[0], G.shape[1], group["rank"]
                state["exp_avg"] = G.new_zeros((r, m) if n < m else (n, r))
            elif momentum:
                state["exp_avg"] = torch.zeros_like(G)
            if factored:
                state["exp_avg_sq_row"], state["exp_avg_sq_col"] = G.new_zeros(G.shape[0]), G.new_zeros(G.shape[1])
            else:
                state["exp_avg_sq"] = torch.zeros_like(G)
        state["step"] += 1
        t = state["step"]
        alpha = max(group["eps"][1], _rms(W)) * group["lr"] if group["scale_parameter"] else group["lr"]
        beta2 = 1.0 - math.pow(t, group["decay_rate"])

        sq = G ** 2 + group["eps"][0]
        if factored:
            R, S = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            R.mul_(beta2).add_(sq.mean(dim=-1), alpha=1.0 - beta2)
            S.mul_(beta2).add_(sq.mean(dim=-2), alpha=1.0 - beta2)
            u = (R / R.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1) * S.unsqueeze(-2).rsqrt()   # (n, m)
            u.mul_(G)
        else:
            V = state["exp_avg_sq"]
            V.mul_(beta2).add_(sq, alpha=1.0 - beta2)
            u = V.rsqrt().mul_(G)
        del sq                                      # a gradient-sized temporary: not alive for the rest

        if momentum and not compressed:             # Adafactor's momentum: an EMA of u
            b1, M = group["beta1"], state["exp_avg"]
            u = u * (1 - b1) + M * b1
            M.copy_(u)
        elif compressed:
            b1, M = group["beta1"], state["exp_avg"]                     # M: (r, m) or (n, r)

            def momentum_projection(seed):          # from the left or the right half of the split seed
                side_seed = split_seed(seed)[0 if G.shape[0] < G.shape[1] else 1]
                return projection(side_seed, G.shape, group["rank"], M.device, M.dtype)

            P = momentum_projection(state["seed"])
            raw = u
            u = u * (1 - b1) + up(M, P, G.shape) * b1
            if t % group["kappa"] == 0:             # resample, and move the momentum to the new basis
                state["seed"] = next_seed(state["seed"])
                P_old, P = P, momentum_projection(state["seed"])
                M.copy_(down(up(M, P_old, G.shape), P))
            M.copy_(M * b1 + down(raw, P) * (1 - b1))

        u.div_((_rms(u) / group["clip_threshold"]).clamp_(min=1.0))
        u.mul_(alpha)
        if group["weight_decay"] != 0:
            W.add_(W, alpha=-group["weight_decay"] * alpha)
        W.add_(-u)
        if W is not p:
            p.copy_(W)

    def state_bytes(self) -> dict[str, int]:
        """Bytes of the state tensors, {"first_moment", "second_moment", "total"}: a compressed moment
        holds r max(n, m) floats, the factored second moment n + m (AdamW: 2 n m)."""
        first = sum(s["exp_avg"].numel() * s["exp_avg"].element_size() for s in self.state.values() if "exp_avg" in s)
        total = sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values() if torch.is_tensor(t))
        return {"first_moment": first, "second_moment": total - first, "total": total}


def make_flora(rank: int | None = 8, kappa: int = 1000, beta1: float | None = 0.9, **options) -> Callable[..., Flora]:
    """A ``make_optimizer(params, config)`` for ``BackpropStep`` / ``FloraAccumulationStep``: Flora with
    the config's lr and weight decay and these settings (checked now, not at the first step)."""
    _check(0.0, rank, kappa, beta1, **options)
    return lambda params, config: Flora(params, lr=config.lr, rank=rank, kappa=kappa, beta1=beta1,
                                        weight_decay=config.weight_decay, **options)


@register("flora_accumulation", family="optimizers", kind="step", paper="hao2024flora")
class FloraAccumulationStep(BackpropStep):
    """Compressed gradient accumulation (Algorithm 1), as flora-opt's ``FloraAccelerator`` does it.

    With ``config.grad_accum`` > 1, a post-accumulate-grad hook takes each micro-batch gradient of a
    matrix, adds its compression (``down`` with the matrix's current seed: r x m or n x r) to a buffer
    and frees it. At the last micro-batch the hook decompresses the sum (``up``), runs that
    parameter's Flora update there, inside backward (fused, as LOMO), and advances the seed
    (``next_seed``): each optimizer step gets a new projection. Other tensors are summed in full.
    With ``grad_accum`` == 1 nothing is compressed (the fused Flora step alone), as in the reference.

    Where the reference departs from the paper: the shorter side is projected, as in the optimizer; the
    seed is used unsplit, the i-th trainable matrix (in the optimizer's order) starting at i; every
    tensor of >= 2 dimensions is compressed, embeddings and matrices with rank >= their shorter side
    included (the sum is then exact only in expectation: P^T P is not I). Ours starts at ``seed + i``
    (``seed=0``: the reference's) and keeps tensors of more than 2 dimensions dense (LLMs have none).
    As each parameter steps inside backward, no global gradient clip can come first:
    ``max_grad_norm`` must be None (Flora clips each update by its RMS); the reported gradient norm is
    that of the decompressed gradients.

    Args:
        rank: r of the projection (the accelerator's ``accumulation_compression_rank``).
        make_optimizer: ``make_optimizer(groups, config)`` returning a ``Flora`` (default ``make_flora()``).
        seed: the first accumulation seed.
    """
    parallel = ()   # updates inside backward hooks, before DDP would have averaged the gradient

    def __init__(self, rank: int, make_optimizer: Callable[..., Flora] | None = None, seed: int = 0):
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        super().__init__(make_optimizer or make_flora())
        self.rank, self.seed = rank, seed
        self.handles, self.buffers, self.seeds, self.norms = [], {}, {}, []
        self.active = self.last = False

    def setup(self, model, config):
        if config.max_grad_norm is not None:
            raise ValueError("FloraAccumulationStep updates each parameter inside backward, so no global gradient "
                             f"clip can come first: use TrainConfig(max_grad_norm=None), got {config.max_grad_norm}")
        trainable = super().setup(model, config)
        if not isinstance(self.optimizer, Flora):
            raise ValueError("make_optimizer must return a Flora (its per-parameter update runs in the hooks), "
                             f"got {type(self.optimizer).__name__}")
        self.remove()
        self.groups = {p: g for g in self.optimizer.param_groups for p in g["params"]}
        matrices = [p for p in trainable if p.dim() == 2] if config.grad_accum > 1 else []
        self.seeds = {p: self.seed + i for i, p in enumerate(matrices)}
        self.handles = [p.register_post_accumulate_grad_hook(self._accumulate) for p in trainable]
        return trainable

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    @torch.no_grad()
    def _accumulate(self, p: torch.Tensor) -> None:
        if not self.active:                         # a backward outside a step: leave the gradient alone
            return
        grad, p.grad = p.grad, None
        if p in self.seeds:
            grad = down(grad, projection(self.seeds[p], p.shape, self.rank, grad.device, grad.dtype))  # (r, m) | (n, r)
        if p in self.buffers:
            self.buffers[p].add_(grad)
        else:
            self.buffers[p] = grad
        if self.last:
            self._update(p)

    def _update(self, p: torch.Tensor) -> None:
        G = self.buffers.pop(p)
        if p in self.seeds:
            G = up(G, projection(self.seeds[p], p.shape, self.rank, p.device, G.dtype), p.shape)   # (n, m)
            self.seeds[p] = next_seed(self.seeds[p])
        self.norms.append(torch.linalg.vector_norm(G.float()))
        self.optimizer.step_parameter(p, G, self.groups[p])

    def __call__(self, model, batches, forward, lr_scale) -> StepResult:
        lr = self.set_lr(lr_scale)
        self.norms, loss_sum, self.active = [], 0.0, True
        try:
            for i, batch in enumerate(batches):
                self.last = i == len(batches) - 1
                loss = forward(batch)
                (loss / len(batches)).backward()
                loss_sum = loss_sum + loss.detach().float()
            for p in list(self.buffers):            # a parameter the last micro-batch did not reach
                self._update(p)
        finally:
            self.active = False
        grad_norm = torch.linalg.vector_norm(torch.stack(self.norms)) if self.norms else float("nan")
        return StepResult(loss_sum.item() / len(batches), float(grad_norm), lr)

    def buffer_bytes(self, dense: bool = False) -> int:
        """Bytes the buffers hold between micro-batches (after ``setup``): r max(n, m) per compressed
        matrix, full size for the rest; with ``dense``, what plain accumulation holds."""
        return sum((self.rank * max(p.shape) if p in self.seeds and not dense else p.numel()) * p.element_size()
                   for p in self.trainable)
