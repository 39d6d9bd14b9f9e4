"""Where the memory of a training step goes: weights, gradients, optimizer state, activations.

Full fine-tuning with AdamW holds about 16 bytes per parameter in float32: 4 for the weight, 4 for
its gradient, 8 for Adam's two moments, plus the activations the forward pass keeps for the
backward pass. Each memory-efficient method removes a different part: LoRA the gradients and the
state of the frozen weights, QLoRA also most of the weights' bytes, LOMO the gradients (applied and
freed inside backward) and the state, GaLore and FLORA most of the state, MeZO the gradients, the
state and the activations (forward passes only). ``measure_step`` shows it by measurement, not
arithmetic: it runs one step of the training-step protocol (``core.step``) on a real batch and
splits the peak of the bytes alive into

* **weights**: every parameter and buffer of the model (4-bit codes included);
* **gradients**: every tensor that arrived as, or was accumulated into, a parameter's gradient;
* **optimizer state**: the tensors the step keeps between steps (``step.optimizer.state`` for an
  optimizer, or what a step returns from ``state_tensors()``);
* **activations**: the tensors autograd saved for the backward pass (seen through
  ``torch.autograd.graph.saved_tensors_hooks``; under gradient checkpointing only what the
  checkpoints keep);
* **other**: everything else alive at that moment (the batch, the logits, temporaries).

It counts tensor storages (``LiveTensors``: a ``TorchDispatchMode`` sees every tensor an operation
creates, a weak reference when it is freed), not allocator pages, so a CPU measures what a GPU would
hold, without the caching allocator's slack; on CUDA ``torch.cuda.max_memory_allocated`` is
recorded beside it. A tensor in two roles counts once, under the first of the list above.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.step import BackpropStep, Step
from .loop import TrainConfig, _loss, _to_device

__all__ = ["CATEGORIES", "LiveTensors", "StepMemory", "measure_step"]

CATEGORIES = ("weights", "gradients", "optimizer state", "activations", "other")


class LiveTensors:
    """The bytes of tensor storage alive while a block of code runs, its peak, and who made it.

    Every storage an operation creates inside the block is counted under the current ``phase``
    until it is freed; the tensors passed as ``existing`` are counted under "model". ``peak`` is the
    largest total, ``at_peak`` its breakdown by phase, ``peak_phase`` when it happened. Views share
    their base's storage and count once. ``alive_at_peak()`` gives the serial numbers of the
    storages alive at the peak, ``serial(t)`` the serial of a live tensor's storage, so that a
    caller can sort them into categories afterwards::

        with LiveTensors(model.parameters()) as live:
            live.phase = "forward";   loss = model(**batch).loss
            live.phase = "backward";  loss.backward()
    """

    def __init__(self, existing: Iterable[torch.Tensor] = ()):
        self.phase, self.live, self.peak, self.at_peak, self.peak_phase = "model", {}, 0, {}, "model"
        self._seen = {}                 # id(storage) -> serial, while the storage is alive
        self._records = []              # serial -> [nbytes, phase, event of allocation, event of free or None]
        self._event, self._peak_event = 0, 0
        for t in existing:
            self._track(t)
        self.phase = "other"

    def _track(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            return
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._seen or storage.nbytes() == 0:
            return
        self._event += 1
        self._seen[key] = len(self._records)
        self._records.append([storage.nbytes(), self.phase, self._event, None])
        self.live[self.phase] = self.live.get(self.phase, 0) + storage.nbytes()
        weakref.finalize(storage, self._free, key)
        total = sum(self.live.values())
        if total > self.peak:
            self.peak, self.at_peak, self.peak_phase, self._peak_event = total, dict(self.live), self.phase, self._event

    def _free(self, key) -> None:
        self._event += 1
        record = self._records[self._seen.pop(key)]
        record[3] = self._event
        self.live[record[1]] -= record[0]

    def serial(self, t: torch.Tensor) -> int | None:
        """The serial number of ``t``'s storage while it is alive and tracked, else None."""
        return self._seen.get(id(t.untyped_storage())) if isinstance(t, torch.Tensor) else None

    def alive_at_peak(self) -> dict[int, int]:
        """{serial: bytes} of the storages alive at the peak."""
        e = self._peak_event
        return {s: r[0] for s, r in enumerate(self._records) if r[2] <= e and (r[3] is None or r[3] > e)}

    def __enter__(self) -> "LiveTensors":
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves
        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    tracker._track(t)
                return out
        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


@dataclass
class StepMemory:
    """One measured training step. Bytes throughout; ``mb()`` for MiB."""
    peak: int                                        # all tensors alive at the peak of the step
    at_peak: dict[str, int]                          # the peak split into CATEGORIES
    peak_phase: str                                  # "step" (or the phase a step names) at the peak
    after: dict[str, int]                            # alive after the step: weights, optimizer state, ...
    most: dict[str, int] = field(default_factory=dict)   # the most of each category alive at any one moment
    cuda_peak: int | None = None                     # torch.cuda.max_memory_allocated during the step
    trained: int = 0                                 # parameters the step trains
    per_phase: dict[str, int] = field(default_factory=dict)

    def mb(self, what: str | None = None) -> float:
        return (self.peak if what is None else self.at_peak[what]) / 2**20


def _state_tensors(step: Step) -> list[torch.Tensor]:
    """What a step keeps between steps: its own ``state_tensors()``, its optimizer's state, or the
    tensors of its ``state`` dict ({parameter: {name: tensor}}, as ``AdaLomoStep`` keeps it)."""
    if hasattr(step, "state_tensors"):
        return list(step.state_tensors())
    optimizer = getattr(step, "optimizer", None)
    state = optimizer.state if optimizer is not None else getattr(step, "state", None)
    if not isinstance(state, Mapping):
        return []
    return [t for s in state.values() if isinstance(s, Mapping) for t in s.values() if isinstance(t, torch.Tensor)]


def measure_step(model: nn.Module, batches: list[Mapping], step: Step | None = None, config: TrainConfig | None = None,
                 warmup_steps: int = 1, lr_scale: float = 1.0) -> StepMemory:
    """Run ``warmup_steps`` steps unmeasured (an optimizer creates its state lazily, at its first
    step), then one step under ``LiveTensors``, and split its peak into ``CATEGORIES``.

    ``batches``: the micro-batches of one step (``config.grad_accum`` of them), on the model's
    device. ``step``: any ``core.step.Step`` (default ``BackpropStep()``, AdamW); ``setup`` is
    called here. The model is trained by these steps: pass a copy if that matters.
    """
    config = config or TrainConfig(max_grad_norm=None)
    step = step or BackpropStep()
    device = next(model.parameters()).device
    batches = [_to_device(b, device) for b in batches]
    trainable = step.setup(model, config)
    was = model.training
    model.train()

    def forward(batch):
        return _loss(model(**batch))

    for _ in range(warmup_steps):
        step(model, batches, forward, lr_scale)
    params = [*model.parameters(), *model.buffers()]
    gradients, saved = set(), set()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with LiveTensors([*params, *_state_tensors(step), *(v for b in batches for v in b.values())]) as live:
        def mark_gradient(g):                         # before accumulation: the tensor that arrives
            gradients.add(live.serial(g))

        def mark_accumulated(p):                      # after: the tensor p.grad holds (freed by LOMO-like steps)
            if p.grad is not None:
                gradients.add(live.serial(p.grad))

        def pack(t):                                  # autograd saves t for the backward pass
            saved.add(live.serial(t))
            return t

        hooks = [h for p in trainable for h in (p.register_hook(mark_gradient),
                                                p.register_post_accumulate_grad_hook(mark_accumulated))]
        live.phase = "step"
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                step(model, batches, forward, lr_scale)
        finally:
            for h in hooks:
                h.remove()
        weights = {live.serial(t) for t in params}
        state = {live.serial(t) for t in _state_tensors(step)}
        alive_after = {live.serial(t) for t in [*params, *_state_tensors(step)]}
    cuda_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    model.train(was)

    def category(serial):
        for name, members in zip(CATEGORIES[:4], (weights, gradients, state, saved)):
            if serial in members:
                return name
        return "other"

    at_peak = dict.fromkeys(CATEGORIES, 0)
    for serial, nbytes in live.alive_at_peak().items():
        at_peak[category(serial)] += nbytes
    after = dict.fromkeys(CATEGORIES, 0)
    for serial in alive_after - {None}:
        after[category(serial)] += live._records[serial][0]
    return StepMemory(live.peak, at_peak, live.peak_phase, after, _most_alive(live, category), cuda_peak,
                      sum(p.numel() for p in trainable), dict(live.at_peak))


def _most_alive(live: LiveTensors, category) -> dict[str, int]:
    """For each category, the most bytes of it alive at any one moment (not at the same moment)."""
    events = []                                     # (event number, signed bytes, category)
    for serial, (nbytes, _, born, freed) in enumerate(live._records):
        name = category(serial)
        events.append((born, nbytes, name))
        if freed is not None:
            events.append((freed, -nbytes, name))
    now, most = dict.fromkeys(CATEGORIES, 0), dict.fromkeys(CATEGORIES, 0)
    for _, nbytes, name in sorted(events):
        now[name] += nbytes
        most[name] = max(most[name], now[name])
    return most
