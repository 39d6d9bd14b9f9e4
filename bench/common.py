"""What every benchmark shares: the machine it ran on, timing, memory measured in a fresh process,
random batches, and writing results to bench/results.

Run a benchmark as a module from the repository root, e.g. ``python -m bench.bench_lora_dora``.
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import weakref
from pathlib import Path

import torch

from peft_from_scratch.models import SMOLLM2, load_model

ROOT = Path(__file__).resolve().parents[1]
BATCH, SEQ = 4, 128


def machine(device: str) -> dict:
    """Versions and hardware: python, torch (threads, CPU capability), the reference libraries, the CPU or GPU."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    for package in ("peft", "transformers", "bitsandbytes", "triton"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor() or "unknown"
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    stand_in = os.environ.get("PFS_SMOLLM2_DIR")
    info["weights"] = (f"SmolLM2's shapes from {stand_in}" + (", random weights" if (Path(stand_in) / "RANDOM_WEIGHTS").exists()
                                                              else "") if stand_in else "SmolLM2's own")
    return info


def load_average() -> list[float] | None:
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ----------------------------------------------------------------------------- training steps, round-robin

def make_batches(n: int, vocab: int, device: str, batch: int = BATCH, seq: int = SEQ) -> list[dict]:
    """n batches of random tokens with labels = inputs (seeded: every model sees the same)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
        out.append({"input_ids": x, "labels": x})
    return out


def step(model, optimizer, batch) -> None:
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def time_all(base, device: str, steps: int, warmup: int, build, configs: list[str]) -> dict:
    """Median step time of each of ``configs`` (built by ``build(name, base, device)``), stepped round-robin."""
    models = {name: build(name, base, device) for name in configs}
    trainable = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, (m, _) in models.items()}
    batches = make_batches(warmup + steps, base.config.vocab_size, device)
    times = {name: [] for name in configs}
    loads = []
    for i, batch in enumerate(batches):
        k = i % len(configs)
        order = configs[k:] + configs[:k]                    # rotate who goes first
        for name in order:
            model, optimizer = models[name]
            sync(device)
            t = time.perf_counter()
            step(model, optimizer, batch)
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
        if i >= warmup:
            loads.append(load_average()[0] if load_average() else None)
        print(f"  round {i + 1}/{len(batches)}" + ("" if i >= warmup else " (warm-up)") + ": "
              + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in configs if i >= warmup), flush=True)
    out = {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "steps_s": t,
                  "trainable_params": trainable[name]} for name, t in times.items()}
    out["load_1min_per_round"] = loads
    return out


def round_robin(fns: dict, rounds: int, device: str, warmup: int = 0) -> dict:
    """Seconds of each call of ``fns`` ({name: zero-argument callable}), called round-robin, the order
    rotating each round, so that every one sees the same load: {name: [seconds per timed round]} and
    "load_1min_per_round". The first ``warmup`` rounds are run and not recorded."""
    names = list(fns)
    times, loads = {name: [] for name in names}, []
    for i in range(warmup + rounds):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            sync(device)
            t = time.perf_counter()
            fns[name]()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
        if i >= warmup:
            loads.append(load_average()[0] if load_average() else None)
        print(f"  round {i + 1}/{warmup + rounds}" + (" (warm-up)" if i < warmup else ": " + ", ".join(
            f"{n} {times[n][-1]:.2f}s" for n in names)), flush=True)
    return {**times, "load_1min_per_round": loads}


def e2e_batch(tokenizer, n: int, max_length: int, device: str) -> dict:
    """The first ``n`` E2E NLG training examples (``data.load_e2e``, seed 0) in SmolLM2's chat format,
    padded into one batch (labels -100 on the prompt and the padding), on ``device``: a real batch."""
    from peft_from_scratch import data
    rows = data.load_e2e("train", n=n, seed=0)
    examples = data.tokenize_causal(rows, tokenizer, data.e2e_example, max_length=max_length)
    batch = data.Collator(tokenizer.pad_token_id)([examples[i] for i in range(n)])
    return {k: v.to(device) for k, v in batch.items()}


# ----------------------------------------------------------------------------- memory (one subprocess per model)

def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def saved_for_backward_mib(model, optimizer, batch) -> float:
    """MiB autograd saves for backward in one forward on ``batch``: every tensor it packs, counted if
    it is still alive when the forward returns (a graph that was built and dropped inside the forward,
    like peft's B(A(eye)), frees its tensors at once) and once per storage, parameters excluded. The
    backward then runs and the gradients are dropped."""
    packed = []
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(weakref.ref(t)) or t, lambda t: t):
        loss = model(**batch).loss
    alive = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (r() for r in packed)
             if t is not None and t.untyped_storage().data_ptr() not in params}
    loss.backward()
    optimizer.zero_grad(set_to_none=True)
    return sum(alive.values()) / 2**20


def measure_memory(name: str, device: str, warmup: int, build) -> dict:
    """Runs inside the subprocess: build one model, warm up, then measure one step."""
    base, _ = load_model(SMOLLM2)
    model, optimizer = build(name, base, device)
    del base
    batches = make_batches(warmup + 2, model.config.vocab_size, device)
    for batch in batches[:warmup]:
        step(model, optimizer, batch)

    result = {"saved_mib": saved_for_backward_mib(model, optimizer, batches[warmup])}

    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(model, optimizer, batches[warmup + 1])
        torch.cuda.synchronize()
        result["step_peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as f:   # reset VmHWM (the peak) to the current RSS
            f.write("5")
        before = _rss_kib("VmRSS")
        step(model, optimizer, batches[warmup + 1])
        result["step_peak_rss_mib"] = (_rss_kib("VmHWM") - before) / 2**10
    return result


def memory_all(device: str, warmup: int, module: str, configs: list[str]) -> dict:
    """measure_memory for each of ``configs``, each in a fresh ``python -m module --memory-child NAME`` process."""
    out = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    for name in configs:
        cmd = [sys.executable, "-m", module, "--memory-child", name, "--device", device, "--warmup", str(warmup),
               "--threads", str(torch.get_num_threads())]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=ROOT)
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  memory {name}: {out[name]}", flush=True)
    return out


def write_results(prefix: str, result: dict, md: str, threads: int, out: Path | None = None) -> Path:
    """bench/results/<prefix>_<device>-<machine>[_<n>threads].json and .md; prints the markdown."""
    out = out or ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    m = result["machine"]
    name = f"{prefix}_{slug(result['device'] + '-' + (m.get('gpu') or m['cpu']))}"
    if threads != os.cpu_count():
        name += f"_{threads}threads"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(md)
    print(md)
    return out / name
