"""Training-step time and memory of our Compacter and Compacter++ against AdapterHub's, on all-MiniLM-L6-v2.

Setting: MiniLM as a 2-class classifier in float32, batch 16 x 64 random tokens with random labels,
the paper's configuration (reduction factor 32, n = 4, rank 1, GELU), the adapters, every LayerNorm
and the head trained by AdamW (lr 1e-3), train mode. Ours: ``CompacterConfig(placement="houlsby" |
"pfeiffer")``; AdapterHub (adapters 1.3.0): ``CompacterConfig`` / ``CompacterPlusPlusConfig
(original_ln_before=False)``, the configurations ``interop/adapterhub.py`` proves equal to ours.

AdapterHub needs transformers 4.57, so it cannot share a process with ours: it runs in the worker
(``scripts/adapterhub_worker.py --serve``), which builds its model from the same weights and then
takes one step each time it is told. The two processes are stepped in turn, round-robin with the
order rotating each round (``common.round_robin``): never at once, so each has the cores to itself,
and both see the same load. The worker reports its own step time (no pipe in it); ours is timed the
same way around the step. Memory: what autograd saves for backward in one forward, counted in each
process the same way (``common.saved_for_backward_mib``). Not the step's peak RSS: the two processes
hold different numbers of models and allocator caches, so their RSS rises do not compare.

    python -m bench.bench_compacter [--steps 20] [--warmup 3] [--threads N]

Writes bench/results/compacter_<device-slug>.json and .md. CPU only: the worker's env has no CUDA
path here.
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata as md
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import load_average, machine, round_robin, saved_for_backward_mib, step, write_results
from peft_from_scratch import core
from peft_from_scratch.additive.compacter import CompacterConfig
from peft_from_scratch.interop import adapterhub
from peft_from_scratch.models import MINILM, load_model

BATCH, SEQ, LR = 16, 64, 1e-3
METHODS = {"houlsby": "Compacter", "pfeiffer": "Compacter++"}


def batches(vocab: int, n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1, vocab, (BATCH, SEQ), generator=g),
             "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
             "labels": torch.randint(0, 2, (BATCH,), generator=g)} for _ in range(n)]


class Ours:
    def __init__(self, base, placement: str, data: list[dict]):
        self.model = core.add_adapter(base, CompacterConfig(placement=placement, modules_to_save=["classifier"])).train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=LR)
        self.data, self.i = data, 0

    def step(self) -> float:
        start = time.perf_counter()
        step(self.model, self.optimizer, self.data[self.i % len(self.data)])
        self.i += 1
        return time.perf_counter() - start

    def memory(self) -> dict:
        return {"saved_mib": saved_for_backward_mib(self.model, self.optimizer, self.data[0])}


class Theirs:
    """AdapterHub's model in the worker process, driven over its stdin."""
    def __init__(self, ours: Ours, folder: Path):
        adapterhub.prepare_case(ours.model, ours.data, folder, steps=1, lr=LR)   # weights, adapter values, batches
        self.proc = adapterhub.serve_worker(folder)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise adapterhub.AdapterHubError(f"the AdapterHub worker stopped (exit {self.proc.wait()})")
        return json.loads(line)

    def step(self) -> float:
        return self.ask("step")["s"]

    def close(self):
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)


def markdown(result: dict) -> str:
    m, t, mem = result["machine"], result["time"], result["memory"]
    lines = [f"# Compacter and Compacter++ training step: ours vs AdapterHub {result['adapterhub']}", "",
             f"Machine: {m['cpu']}; {m['cpu_count']} cores, torch {m['torch']} with {m['torch_threads']} threads, "
             f"transformers {m['transformers']} (ours) and 4.57.6 (AdapterHub's worker). Load average before / after: "
             f"{result['load_before']} / {result['load_after']}.", "",
             f"all-MiniLM-L6-v2 classifier, float32, batch {BATCH} x {SEQ}, reduction factor 32, n = 4, rank 1, AdamW; "
             f"step = forward + backward + optimizer step. Median of {result['steps']} steps after {result['warmup']} "
             "warm-up steps, the four models (two processes) stepped in turn, round-robin. Ratios are ours / AdapterHub.", "",
             "| method | model | step median (s) | min-max (s) | ours/AdapterHub time | saved for backward (MiB) | "
             "trainable params |", "|---|---|---|---|---|---|---|"]
    for placement, label in METHODS.items():
        for owner in ("adapterhub", "ours"):
            name, times = f"{owner}-{placement}", t[f"{owner}-{placement}"]
            ratio = f"**{result['ratios'][placement]['time']:.3f}**" if owner == "ours" else ""
            lines.append(f"| {label} | {owner} | {statistics.median(times):.4f} | {min(times):.4f}-{max(times):.4f} | "
                         f"{ratio} | {mem[name]['saved_mib']:.1f} | {result['trainable'][placement]:,} |")
    lines += ["", "| ours / AdapterHub | time (ratio of medians) | time (median of per-round ratios) | saved for backward |",
              "|---|---|---|---|"]
    for placement, r in result["ratios"].items():
        lines.append(f"| {METHODS[placement]} | **{r['time']:.3f}** | {r['time_paired']:.3f} | {r['saved']:.3f} |")
    return "\n".join(lines + [""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = load_average()
    base, _ = load_model(MINILM, num_labels=2)
    data = batches(base.config.vocab_size)
    ours, theirs = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-compacter-") as tmp:
        try:
            for placement in METHODS:
                ours[placement] = Ours(copy.deepcopy(base), placement, data)
                theirs[placement] = Theirs(ours[placement], Path(tmp) / placement)
            fns = {**{f"ours-{p}": o.step for p, o in ours.items()}, **{f"adapterhub-{p}": t.step for p, t in theirs.items()}}
            recorded = {name: [] for name in fns}
            wrapped = {name: (lambda name=name: recorded[name].append(fns[name]())) for name in fns}
            loads = round_robin(wrapped, args.steps, "cpu", warmup=args.warmup)["load_1min_per_round"]
            times = {name: seconds[args.warmup:] for name, seconds in recorded.items()}   # each process's own clock
            memory = {**{f"ours-{p}": o.memory() for p, o in ours.items()},
                      **{f"adapterhub-{p}": t.ask("memory") for p, t in theirs.items()}}
        finally:
            for t in theirs.values():
                t.close()
    ratios = {p: {"time": statistics.median(times[f"ours-{p}"]) / statistics.median(times[f"adapterhub-{p}"]),
                  "time_paired": statistics.median(a / b for a, b in zip(times[f"ours-{p}"], times[f"adapterhub-{p}"])),
                  "saved": memory[f"ours-{p}"]["saved_mib"] / memory[f"adapterhub-{p}"]["saved_mib"]} for p in METHODS}
    env = adapterhub.adapterhub_env()
    version = next((d.version for d in md.distributions(path=[str(env)]) if d.metadata["Name"] == "adapters"), "?")
    result = {"device": "cpu", "machine": machine("cpu"), "steps": args.steps, "warmup": args.warmup,
              "load_before": load_before, "load_after": load_average(), "load_1min_per_round": loads,
              "adapterhub": version, "setting": {"model": MINILM, "batch": BATCH, "seq": SEQ, "lr": LR, "dtype": "float32",
                                                 "reduction_factor": 32, "phm_dim": 4, "rank": 1},
              "trainable": {p: core.count_parameters(o.model)[0] for p, o in ours.items()},
              "time": times, "memory": memory, "ratios": ratios}
    write_results("compacter", result, markdown(result), args.threads)


if __name__ == "__main__":
    main()
