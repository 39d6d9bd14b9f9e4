"""One small training loop, shared by every notebook and every method.

It trains any ``nn.Module`` whose forward takes a batch dict as keyword arguments and returns
something with a ``loss`` (a HF ``ModelOutput`` or a plain dict): our from-scratch adapters and
``peft`` models alike, so comparisons between them differ only in the model, never in the loop.
What a step does to the weights is pluggable (``core.step``): backprop + an optimizer by default,
or a step that updates in backward hooks, from forward passes only, or through a mask.

Optimizer: AdamW (Loshchilov & Hutter, 2019) *with* bias correction, as torch's AdamW does it.
Mosbach et al. (2020), "On the Stability of Fine-tuning BERT", find that dropping the correction (as
the original BERT code did) makes fine-tuning unstable, and recommend the defaults here for full
fine-tuning: lr 2e-5, warm-up over the first 10% of steps, then linear decay to zero.

Schedule. With T optimizer steps and W = ceil(warmup_ratio * T) warm-up steps, optimizer step s
(s = 0, ..., T-1) uses the learning rate lr * m(s), where

    m(s) = s / W                   if s < W    (linear warm-up from 0)
    m(s) = (T - s) / (T - W)       otherwise, schedule="linear"   (reaches 0 at s = T)
    m(s) = 1                       otherwise, schedule="constant" (the QLoRA recipe, Dettmers et al. 2023)

as in ``transformers.get_linear_schedule_with_warmup`` (so when W > 0 the first step has lr 0).

Gradient accumulation: each micro-batch loss is divided by ``grad_accum`` and back-propagated, and
the optimizer steps every ``grad_accum`` micro-batches: the update of a ``grad_accum`` times larger
batch (exactly, when micro-batches hold equal token counts). Micro-batches form one stream across
epochs; a trailing incomplete group is dropped.

Several processes: launched by ``accelerate launch`` or ``torchrun``, the same call trains with data
parallelism (DDP) or sharding (FSDP), each rank on its slice of every batch (``training.distributed``).
"""
from __future__ import annotations

import itertools
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm  # the text bar: it renders in terminals and in committed notebooks alike

from ..core.step import BackpropStep, Step, make_adamw
from . import distributed

__all__ = ["TrainConfig", "History", "train", "evaluate_loss", "set_seed", "lr_multiplier", "set_progress"]

_PROGRESS = "bar"


def set_progress(mode: str) -> None:
    """How ``train(progress=True)`` reports: "bar" (a live tqdm bar, for terminals and interactive
    work) or "line" (one finished line per run: what a committed notebook should show)."""
    global _PROGRESS
    if mode not in ("bar", "line"):
        raise ValueError(f"progress mode must be 'bar' or 'line', got {mode!r}")
    _PROGRESS = mode


@dataclass
class TrainConfig:
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "linear"            # "linear" (Mosbach et al.) | "constant" (QLoRA); both warm up
    warmup_ratio: float = 0.1
    epochs: int = 1
    max_steps: int | None = None        # optimizer steps; overrides epochs (the loader is cycled)
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0   # None disables clipping
    eval_every: int | None = None       # optimizer steps; None = evaluate only at the end
    log_every: int = 1                  # progress-bar refresh, in optimizer steps
    seed: int = 0
    precision: str = "auto"             # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "fp32" | "bf16"
    device: str = "auto"                # "auto": leave a model on an accelerator, else CUDA if present
    parallel: str = "auto"              # launched as N > 1 processes: "ddp" | "fsdp" | "auto" (FSDP if
                                        # `accelerate launch --use_fsdp`, else DDP) | "none" (this one alone)


@dataclass
class History:
    """What happened in a run. ``loss``, ``lr`` and ``grad_norm`` (before clipping) have one entry per
    optimizer step; ``loss`` is the mean over that step's micro-batches; ``elapsed_s`` is the training
    time up to the end of each step, evaluations excluded (quality against wall time: an evaluation
    at step s happened after ``elapsed_s[s - 1]`` seconds of training). ``eval`` holds one dict per
    evaluation, ``{"step": ..., **metrics}``. ``peak_memory_mb`` is, on CUDA, the peak allocated by
    torch during the run; on CPU, the whole process's peak resident set size, which cannot be reset
    and so also counts whatever ran before. In a parallel run ``loss`` and the metrics are over all
    ranks (the same History on each), ``peak_memory_mb`` is this rank's."""
    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    elapsed_s: list[float] = field(default_factory=list)
    eval: list[dict] = field(default_factory=list)
    tokens_per_s: float = 0.0
    peak_memory_mb: float = 0.0
    wall_time_s: float = 0.0
    device: str = ""
    trainable_params: int = 0
    world_size: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def final_eval(self) -> dict | None:
        return self.eval[-1] if self.eval else None

    def plot(self, ax=None, label=None):
        """Training loss against optimizer step; returns the matplotlib axes."""
        import matplotlib.pyplot as plt
        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(self.step, self.loss, label=label)
        ax.set(xlabel="optimizer step", ylabel="training loss")
        if label is not None:
            ax.legend()
        return ax


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (``torch.manual_seed`` seeds every CUDA device too)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str = "linear") -> float:
    """m(s) from the module docstring: the factor on the base lr at optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def train(model: nn.Module, train_loader: Iterable[Mapping], config: TrainConfig | None = None,
          eval_fn: Callable[[nn.Module], Mapping[str, float]] | None = None, params=None,
          progress: bool = True, desc: str | None = None,
          make_optimizer: Callable[..., torch.optim.Optimizer] = make_adamw, step: Step | None = None) -> History:
    """Train ``model`` on the batch dicts of ``train_loader`` and return a :class:`History`.

    ``step`` decides what each optimizer step does (``core.step``); the default,
    ``BackpropStep(make_optimizer, params)``, trains the parameters with ``requires_grad`` (or
    ``params``: tensors or param-group dicts, e.g. ``[{"params": sparse, "lr": 1e-4}, {"params":
    low_rank}]``; groups without an "lr" use ``config.lr``; ``History.lr`` records the first group's).
    ``eval_fn(model) -> {name: value}`` runs every ``eval_every`` optimizer steps and at the end, in
    eval mode under ``torch.no_grad``. The model's train/eval mode is restored on return.

    Under ``accelerate launch`` / ``torchrun`` with N processes, every rank calls ``train`` the same
    way (``training.distributed`` says what changes: the model wrapped, each batch split N ways).
    """
    config = config or TrainConfig()
    if config.schedule not in ("linear", "constant") or config.precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"bad schedule {config.schedule!r} or precision {config.precision!r}")
    if step is None:
        step = BackpropStep(make_optimizer, params)
    elif params is not None or make_optimizer is not make_adamw:
        raise ValueError("pass params and make_optimizer to the step (e.g. BackpropStep(make_optimizer, params)), "
                         "not to train() alongside step=")
    set_seed(config.seed)
    device = _resolve_device(model, config.device)
    par = distributed.setup(config.parallel, device)
    if par.mode != "none":
        _check_parallel(par, step, train_loader, config)
        if device.type == "cuda":   # the launcher gave this rank its own GPU
            device = torch.device("cuda", torch.cuda.current_device())
    if _model_device(model) != device:
        model.to(device)
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")

    net = par.wrap(model)                     # model itself, or DDP around it; FSDP shards model in place
    trainable = step.setup(model, config)
    total = config.max_steps or config.epochs * len(train_loader) // config.grad_accum
    if total < 1:
        raise ValueError("no optimizer step to take: too few batches for grad_accum")
    warmup = math.ceil(config.warmup_ratio * total)
    history = History(device=f"cpu ({torch.get_num_threads()} threads)",
                      trainable_params=sum(p.numel() for p in trainable), world_size=par.world_size)
    if device.type == "cuda":
        history.device = torch.cuda.get_device_name(device)
        torch.cuda.reset_peak_memory_stats(device)
    if par.mode != "none":
        history.device += f" x {par.world_size} ranks ({par.mode})"

    causal = par.mode != "none" and distributed.is_causal_lm(model)

    def forward(batch: Mapping) -> torch.Tensor:
        batch = par.shard(batch)                           # this rank's rows (all of them in one process)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = _loss(net(**_to_device(batch, device)))
        return loss if par.mode == "none" else loss * par.loss_weight(batch, causal)

    was_training = model.training
    model.train()
    batches = _micro_batches(train_loader, None if config.max_steps else config.epochs)
    tokens, eval_time, start = 0, 0.0, time.perf_counter()
    show = progress and par.is_main
    bar = tqdm(range(1, total + 1), disable=not show or _PROGRESS == "line", desc=desc, unit="step",
               mininterval=10)
    with distributed.activate(par):
        for s in bar:  # one optimizer step = grad_accum micro-batches
            micro = [next(batches) for _ in range(config.grad_accum)]
            tokens += sum(_count_tokens(par.shard(b)) for b in micro)
            result = step(model, micro, forward, lr_multiplier(s - 1, total, warmup, config.schedule))
            history.step.append(s)
            history.lr.append(result.lr)
            history.loss.append(par.mean(result.loss))     # weighted: the loss of the whole batch
            history.grad_norm.append(result.grad_norm)
            history.elapsed_s.append(time.perf_counter() - start - eval_time)   # result.loss is a float: synced
            if s % config.log_every == 0 or s == total:
                bar.set_postfix(loss=f"{history.loss[-1]:.4f}", lr=f"{history.lr[-1]:.2e}")
            if eval_fn is not None and ((config.eval_every and s % config.eval_every == 0) or s == total):
                t0 = time.perf_counter()
                metrics = _run_eval(model, eval_fn)
                if par.mode == "fsdp":
                    distributed.reshard(model)         # an evaluation left the root's weights gathered
                history.eval.append({"step": s, **{k: par.mean(v) for k, v in metrics.items()}})
                eval_time += time.perf_counter() - t0

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    history.wall_time_s = time.perf_counter() - start
    tokens = par.sum(tokens)
    history.tokens_per_s = tokens / max(history.wall_time_s - eval_time, 1e-9)  # training time only
    history.peak_memory_mb = _peak_memory_mb(device)
    model.train(was_training)
    if show and _PROGRESS == "line":
        print(f"{desc or 'train'}: {total} steps in {history.wall_time_s:.0f} s "
              f"({history.wall_time_s / total:.2f} s/step), training loss {history.loss[0]:.4f} -> {history.loss[-1]:.4f}")
    return history


@torch.no_grad()
def evaluate_loss(model: nn.Module, loader: Iterable[Mapping]) -> float:
    """Mean token-level loss over ``loader``: each batch's mean loss weighted by its count of labels
    != -100 (1 if it has no labels). Causal LMs never predict a sequence's first label, so their
    weights are one token per sequence too high; exact when all batches have the same shape."""
    was_training, device = model.training, _model_device(model)
    par = distributed.active()   # inside a parallel train(): each rank its slice, summed over ranks
    model.eval()
    total, weight = 0.0, 0
    for batch in loader:
        batch = par.shard(batch)
        labels = batch.get("labels")
        n = int((labels != -100).sum()) if labels is not None else 1
        total += _loss(model(**_to_device(batch, device))).item() * n
        weight += n
    model.train(was_training)
    return par.sum(total) / par.sum(weight)


# --- helpers ---
def _check_parallel(par, step: Step, loader, config: TrainConfig) -> None:
    """Refuse, before anything changes, a parallel run that would train something else than one
    process would."""
    if par.mode not in step.parallel:
        raise ValueError(f"{type(step).__name__} does not support parallel={par.mode!r} ({par.world_size} "
                         f"processes); it supports {step.parallel or 'a single process only'}")
    batch_size = getattr(loader, "batch_size", None)
    if batch_size is not None:
        par.check_batch(batch_size)
        n = len(getattr(loader, "dataset", ()))
        if n and not getattr(loader, "drop_last", False) and n % batch_size:
            par.check_batch(n % batch_size, "the last batch")
    if par.mode == "fsdp" and getattr(step, "params", None) is not None:
        raise ValueError("under FSDP the step trains the parameters that require grad: FSDP replaces each "
                         "parameter by its shard, so tensors passed as params= would not be trained")
    make_optimizer = getattr(step, "make_optimizer", None)
    if par.mode == "fsdp" and make_optimizer is not None:   # which optimizer, asked on a 1x1 stand-in
        optimizer = make_optimizer([{"params": [nn.Parameter(torch.zeros(1, 1))]}], config)
        if not type(optimizer).__module__.startswith("torch.optim"):
            raise ValueError(f"under FSDP each rank holds a shard of every parameter; {type(optimizer).__name__} "
                             f"needs whole matrices (a torch.optim optimizer works on shards): use parallel='ddp'")


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _resolve_device(model: nn.Module, name: str) -> torch.device:
    """"auto" keeps a model that is already on an accelerator, else picks CUDA when there is one."""
    current = _model_device(model)
    if name == "auto":
        name = "cuda" if current.type == "cpu" and torch.cuda.is_available() else str(current)
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:  # "cuda" -> "cuda:0", comparable with the model's
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _micro_batches(loader, epochs: int | None):
    """Yield batches for ``epochs`` passes over ``loader`` (forever if None), re-iterating it each pass."""
    for _ in itertools.count() if epochs is None else range(epochs):
        n = 0
        for n, batch in enumerate(loader, 1):
            yield batch
        if n == 0:
            raise ValueError("train_loader yielded no batches")


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _count_tokens(batch: Mapping) -> int:
    mask, ids = batch.get("attention_mask"), batch.get("input_ids")
    return int(mask.sum()) if mask is not None else (ids.numel() if ids is not None else 0)


def _loss(output) -> torch.Tensor:
    loss = output["loss"] if isinstance(output, Mapping) else output.loss
    if loss is None:
        raise ValueError("the model returned no loss; does the batch contain labels?")
    return loss


def _run_eval(model: nn.Module, eval_fn) -> dict[str, float]:
    model.eval()
    try:
        with torch.no_grad():
            metrics = eval_fn(model)
    finally:
        model.train()
    return {k: float(v) for k, v in metrics.items()}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # Unix only; ru_maxrss is in KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
