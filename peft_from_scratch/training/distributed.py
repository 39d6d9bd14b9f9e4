"""Training past one process: data parallelism (DDP) and sharding (FSDP), on PyTorch distributed.

``train()`` needs no change to run under ``accelerate launch`` or ``torchrun``: when the launcher
has started several processes (``WORLD_SIZE`` > 1), ``setup`` joins them through accelerate's
``PartialState`` (gloo on CPU, NCCL on CUDA) and the loop

* wraps the model: ``"ddp"``, ``torch.nn.parallel.DistributedDataParallel``, every rank holds the
  whole model and the gradients of the trained tensors are averaged (all-reduced) in backward;
  ``"fsdp"``, ``torch.distributed.fsdp.fully_shard`` (FSDP2) on every decoder layer and on the
  root, every rank holds 1/N of each tensor, frozen base included, and gathers a layer's tensors
  just before it runs (the gradients are reduce-scattered, each rank updates its own shard);
* shards the data: every rank walks the same seeded loader and keeps its slice of each batch,
  rank r the rows ``[r*B/N, (r+1)*B/N)``, so N ranks on batches of B rows take the steps of one
  process on batches of B rows. A model's loss is the mean over its slice's n_r labels, and DDP
  averages the ranks' gradients, so rank r's loss is weighted by N n_r / n (n = sum of the n_r):

      (1/N) sum_r (N n_r / n) mean_r = (1/n) sum_r n_r mean_r = the batch's mean loss,

  the loss one process computes on the whole batch (labels counted as transformers' losses count
  them: != -100, after the shift by one for a causal LM; one per row for a classifier);
* reports once: the step loss is averaged over ranks, so every rank's ``History`` is the same;
  only rank 0 draws the progress bar; ``evaluate_loss`` inside a run evaluates each rank's slice
  and sums across ranks (any other ``eval_fn``'s metrics are averaged over ranks).

After training, ``save_adapter`` writes once, from rank 0. Under FSDP the tensors are sharded
(``DTensor``), so gathering them is a collective: call ``save_adapter`` (and ``evaluate_loss``, or
``generate``) on every rank. Which mode: ``TrainConfig.parallel`` (``"auto"``: FSDP when launched
with ``accelerate launch --use_fsdp``, else DDP; ``"none"`` trains this process alone).

A 4-bit base (``quantized.Linear4bit``) under FSDP: FSDP shards parameters, never buffers, so
``fully_shard_model`` turns each packed uint8 weight into a frozen parameter; FSDP2 shards every parameter on
its own (the packed bytes' dim 0), whatever its dtype, and all-gathers it before the forward
dequantizes it. The quantization state (absmax per 64-weight block, about 1/32 of the packed bytes
with double quantization) stays a buffer, whole on every rank. FSDP1 flattens a layer's tensors
into one buffer of one dtype, which is why bitsandbytes added ``bnb_4bit_quant_storage`` (store the
codes in bf16) for the FSDP + QLoRA work of Answer.AI; FSDP2 needs no such trick.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.processes import barrier, full_tensor, is_main, several

__all__ = ["Parallel", "setup", "active", "full_tensor", "is_main", "barrier", "local_nbytes", "model_state_bytes",
           "gather_object", "launch"]

MODES = ("auto", "none", "ddp", "fsdp")


@dataclass
class Parallel:
    """The processes of one run: ``mode`` ("none", "ddp" or "fsdp"), this process's ``rank`` of
    ``world_size``."""
    mode: str = "none"
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check_batch(self, n_rows: int, what: str = "a batch") -> None:
        if n_rows % self.world_size:
            raise ValueError(f"{what} of {n_rows} rows does not split over {self.world_size} ranks: use a "
                             f"batch size divisible by the world size (and drop_last=True, or a dataset size "
                             f"whose last batch divides too)")

    def shard(self, batch: Mapping) -> dict:
        """This rank's rows of a batch dict: tensors are sliced on dim 0, everything else kept."""
        if self.world_size == 1:
            return dict(batch)
        rows = {v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0}
        if len(rows) != 1:
            raise ValueError(f"cannot shard a batch whose tensors disagree on the number of rows: {sorted(rows)}")
        n = rows.pop()
        self.check_batch(n)
        k = n // self.world_size
        return {key: v[self.rank * k:(self.rank + 1) * k] if torch.is_tensor(v) and v.dim() > 0 else v
                for key, v in batch.items()}

    def loss_weight(self, batch: Mapping, causal: bool) -> float:
        """N n_r / n for this rank's slice ``batch`` (1 when every slice holds as many labels)."""
        labels = batch.get("labels")
        if self.world_size == 1 or labels is None:
            return 1.0
        if labels.dim() == 1:
            n_r = labels.shape[0]
        else:
            n_r = int((labels[..., 1:] if causal else labels).ne(-100).sum())
        n = self.sum(n_r)
        if n == 0:
            raise ValueError("a batch with no label to learn from (every label is -100)")
        return self.world_size * n_r / n

    def sum(self, value: float | torch.Tensor) -> float:
        """The sum over ranks of a number (every rank must call it)."""
        if self.world_size == 1:
            return float(value)
        import torch.distributed as dist
        t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        return t.item()

    def mean(self, value: float | torch.Tensor) -> float:
        return self.sum(value) / self.world_size

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the loop calls: ``model`` itself ("none", and "fsdp", which shards in place) or
        a DDP wrapper around it (whose ``.module`` is ``model``)."""
        if self.mode == "ddp":
            return nn.parallel.DistributedDataParallel(model)
        if self.mode == "fsdp":
            fully_shard_model(model)
        return model


_ACTIVE = Parallel()


def active() -> Parallel:
    """The ``Parallel`` of the run in progress (a single process when no parallel run is active)."""
    return _ACTIVE


def launched_world_size() -> int:
    """How many processes the launcher started (``WORLD_SIZE``, set by torchrun and accelerate)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(mode: str, device: torch.device) -> Parallel:
    """Join the launched processes (once per process) and decide the mode of this run.

    "auto" is a single process unless a launcher started this one: then FSDP under ``accelerate
    launch --use_fsdp``, else DDP when there are several processes. One launched process may run
    "fsdp" or "ddp" (on one GPU, FSDP with 1 rank still shows the wrapping, and shards nothing).
    """
    if mode not in MODES:
        raise ValueError(f"parallel must be one of {MODES}, got {mode!r}")
    launched = "LOCAL_RANK" in os.environ          # set by torchrun and accelerate launch
    if mode == "none" or (mode == "auto" and not launched):
        return Parallel()
    if not launched:
        raise ValueError(f"parallel={mode!r} needs several processes: launch the script with "
                         f"`accelerate launch --num_processes N` or `torchrun --nproc_per_node N`")
    if mode == "auto":
        fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
        mode = "fsdp" if fsdp else "ddp" if launched_world_size() > 1 else "none"
        if mode == "none":
            return Parallel()
    from accelerate import PartialState
    state = PartialState(cpu=device.type == "cpu")   # initialises torch.distributed from the launcher's env
    return Parallel(mode, state.process_index, state.num_processes)


class activate:
    """``with activate(parallel): ...``: make ``parallel`` the active run (what ``evaluate_loss``
    consults), restoring the previous one on exit."""

    def __init__(self, parallel: Parallel):
        self.parallel = parallel

    def __enter__(self) -> Parallel:
        global _ACTIVE
        self.before, _ACTIVE = _ACTIVE, self.parallel
        return self.parallel

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        _ACTIVE = self.before


def fully_shard_model(model: nn.Module) -> nn.Module:
    """FSDP2 on each decoder layer (HF's ``_no_split_modules``), then on the root. In place; checks
    first, so a model it refuses is left as it was."""
    from torch.distributed.fsdp import fully_shard
    from ..quantized.linear4bit import Linear4bit
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(f"FSDP: found no decoder layer to shard in {type(model).__name__} (it names none in "
                         f"_no_split_modules); shard a transformers model, or wrap it yourself")
    check_same_on_every_rank(model)
    for module in model.modules():
        if isinstance(module, Linear4bit) and "weight" in module._buffers:
            packed = module._buffers.pop("weight")          # a frozen parameter, so that FSDP shards it
            module.weight = nn.Parameter(packed, requires_grad=False)
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def reshard(model: nn.Module) -> None:
    """Put every FSDP-wrapped module back to its shards. FSDP2 frees a layer's gathered weights after
    its backward, but the root's stay gathered after a forward alone (an evaluation)."""
    from torch.distributed.fsdp import FSDPModule
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def check_same_on_every_rank(model: nn.Module) -> None:
    """FSDP keeps each rank's own values for its shard (DDP copies rank 0's), so every rank must
    have built the same model: compare each tensor's sum across ranks (a collective)."""
    import torch.distributed as dist
    tensors = list(model.parameters()) + list(model.buffers())
    if not tensors:
        return
    sums = torch.stack([t.detach().to(torch.float64).sum().cpu() for t in tensors]).to(_comm_device())
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    differ = (low != high).nonzero().flatten().tolist()
    if differ:
        names = [n for n, _ in list(model.named_parameters()) + list(model.named_buffers())]
        raise ValueError(f"FSDP: the ranks built different models ({len(differ)} tensors differ, e.g. "
                         f"{names[differ[0]]}); build it the same way on every rank (same checkpoint, same seed "
                         f"before adding the adapter)")


def local_nbytes(tensors, whole: bool = False) -> int:
    """Bytes this rank holds of ``tensors``: its shard of a ``DTensor``, all of a plain tensor
    (``whole``: the whole tensor's bytes, as one process would hold them)."""
    from torch.distributed.tensor import DTensor
    total, seen = 0, set()
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if isinstance(t, DTensor) else t
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), local.numel())
        if key in seen:            # the same storage under two names (tied weights, a shared code book)
            continue
        seen.add(key)
        total += (t.numel() if whole else local.numel()) * t.element_size()
    return total


def is_causal_lm(model: nn.Module) -> bool:
    """Whether the loss shifts the labels by one (a transformers ``...ForCausalLM`` inside)."""
    return any(type(m).__name__.endswith("ForCausalLM") for m in model.modules())


def model_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                      whole: bool = False) -> dict[str, int]:
    """The bytes of model state this rank holds, counted from its tensors (under FSDP, its shards):
    the frozen base (parameters and buffers, 4-bit codes and their constants included), the trained
    weights, their gradients (one per trained weight, held from backward to the optimizer step: the
    trained weights' bytes again) and the optimizer's state: ZeRO's "model states". ``whole``: what
    one process holding every tensor whole would hold."""
    trained = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)] if optimizer else []
    return {"frozen base": local_nbytes(frozen, whole), "trained weights": local_nbytes(trained, whole),
            "gradients": local_nbytes(trained, whole), "optimizer state": local_nbytes(state, whole)}


def gather_object(obj) -> list:
    """``obj`` of every rank, in rank order, on every rank (a collective; ``[obj]`` in one process)."""
    import torch.distributed as dist
    if not several():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def launch(script: str | Path, args: list[str] = (), processes: int = 2, fsdp: bool = False, threads: int = 1,
           cpu: bool = False, cwd: str | Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``script`` on ``processes`` ranks with ``accelerate launch`` (``--use_fsdp`` or
    ``--multi_gpu``: without GPUs, or with ``cpu``, CPU processes on gloo), each with ``threads``
    torch threads, on a free port; returns the finished process, raising with its output's tail if
    it failed."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT",
                                                              "MASTER_ADDR", "ACCELERATE_USE_FSDP")}
    env["OMP_NUM_THREADS"] = str(threads)
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    if cwd is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp" if fsdp else "--multi_gpu",
           "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(port), str(script), *map(str, args)]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n"
                           f"{done.stderr[-3000:]}")
    return done


def _comm_device() -> torch.device:
    import torch.distributed as dist
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
