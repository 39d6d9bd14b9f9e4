"""Same weights in, same outputs and gradients out: the check every notebook runs against a reference.

``compare(ours, theirs, pairs, batches)`` takes two models that should compute the same function
(ours and peft's, or ours and bitsandbytes+peft) and ``pairs``, our trainable tensors matched with
the reference's, already holding equal values. It then runs ``steps`` AdamW steps on both, on the
same batches, and records

* the largest difference of the logits at every step,
* of every gradient at the first step, and
* of every trained parameter after the last step,

each as an absolute value and relative to the reference tensor's largest entry, together with how
many elements fall outside ``|ours - ref| <= atol * max(1, max|ref|) + rtol * |ref|``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Diff:
    """Largest absolute and relative difference, and the elements outside the tolerance."""
    abs: float = 0.0
    rel: float = 0.0
    outside: int = 0
    total: int = 0

    def update(self, ours: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float) -> None:
        ours, ref = ours.detach().double(), ref.detach().double()
        d = (ours - ref).abs()
        scale = ref.abs().max().item()
        self.abs = max(self.abs, d.max().item())
        self.rel = max(self.rel, d.max().item() / max(scale, 1e-30))
        self.outside += int((d > atol * max(scale, 1.0) + rtol * ref.abs()).sum().item())
        self.total += d.numel()


@dataclass
class Report:
    rtol: float
    atol: float
    steps: int
    diffs: dict[str, Diff] = field(default_factory=lambda: {"logits": Diff(), "grads": Diff(), "params": Diff()})

    @property
    def passed(self) -> bool:
        return all(d.outside == 0 for d in self.diffs.values())

    def verdict(self) -> str:
        """One line per quantity, with no numbers that vary from run to run (for committed outputs)."""
        return "\n".join(f"{k:7s} agree within rtol={self.rtol:g}, atol={self.atol:g}: {d.outside == 0}"
                         for k, d in self.diffs.items())

    def table(self) -> str:
        return "\n".join(f"{k:7s} max abs {d.abs:.2e}  max rel {d.rel:.2e}  outside tolerance {d.outside}/{d.total}"
                         for k, d in self.diffs.items())


def compare(ours: nn.Module, theirs: nn.Module, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
            batches: list[dict], steps: int = 5, lr: float = 1e-3, rtol: float = 1e-5, atol: float = 1e-6) -> Report:
    """Train both models side by side for ``steps`` AdamW steps and report how far apart they are.

    ``pairs`` maps a name to (our parameter, the reference's parameter); every pair must start equal.
    The two may differ in shape but not in size ((IA)³: our flat vector, peft's (d, 1)): entries are
    compared in order.
    """
    for name, (a, b) in pairs.items():
        if a.numel() != b.numel() or not torch.equal(a.detach().reshape(b.shape), b.detach()):
            raise ValueError(f"{name}: the two models do not start from equal values; copy them across first")
    report = Report(rtol, atol, steps)
    opt_ours = torch.optim.AdamW([a for a, _ in pairs.values()], lr=lr)
    opt_theirs = torch.optim.AdamW([b for _, b in pairs.values()], lr=lr)
    for step in range(steps):
        batch = batches[step % len(batches)]
        out_ours, out_theirs = ours(**batch), theirs(**batch)
        report.diffs["logits"].update(out_ours.logits, out_theirs.logits, rtol, atol)
        out_ours.loss.backward()
        out_theirs.loss.backward()
        if step == 0:
            for a, b in pairs.values():
                report.diffs["grads"].update(a.grad.reshape(b.shape), b.grad, rtol, atol)
        opt_ours.step(), opt_theirs.step()
        opt_ours.zero_grad(), opt_theirs.zero_grad()
    for a, b in pairs.values():
        report.diffs["params"].update(a.reshape(b.shape), b, rtol, atol)
    return report
