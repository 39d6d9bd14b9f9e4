"""RoSA's sparse products against a dense masked matmul, and a RoSA training step against LoRA's.

Part 1, kernels. One adapted layer of SmolLM2's MLP shape, S: 1536 x 576 (d_out x d_in), N = 512
tokens (batch 4 x 128), S's entries at random positions, densities 0.1% to 5%. Per density we time

* forward: ``x @ S^T`` and backward: ``grad_x = grad_out @ S`` plus the value gradient;
* ``dense``: S as a dense matrix, the value gradient as the dense ``grad_out^T x`` read at the mask
  (what a masked dense implementation does, and the cost RoSA avoids);
* ``torch``: our CPU path, PyTorch's sparse CSR kernels (``torch.sparse.mm``, ``sampled_addmm``);
* ``triton``: our Triton SpMM / SDDMM (CUDA only; the CPU interpreter is not a timing).

Part 2, a training step (forward + backward + AdamW step + zero_grad) of LoRA r=16 against RoSA
r=12 with the density that gives the same number of trainable parameters (the paper's pairing,
LoRA r=16 ~ RoSA r=12 with d = 0.15% on LLaMA-2-7B), on all q/k/v/o/gate/up/down layers of
SmolLM2-135M (``--model tiny`` for a small random Llama). The masks come from RoSA's own rule on one
batch. The models are stepped round-robin in one process, the order rotating each round; the
median of ``--steps`` steps after ``--warmup`` is reported, ratios are RoSA / LoRA. Memory: the bytes
autograd saves for backward during one forward (each storage once, parameters excluded) and, on
CUDA, the peak allocated during a step minus what was allocated before it.

One run of this script = one measurement.

    python -m bench.bench_rosa [--device cpu|cuda] [--model smollm2|tiny] [--steps 10] [--warmup 2]
    python -m bench.bench_rosa --quick     # a smoke run: tiny shapes, results to a temp folder

Writes bench/results/rosa_<device-slug>.json and .md.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
import weakref
from pathlib import Path

import torch

from bench.common import ROOT, machine, make_batches, sync, timed, write_results
from peft_from_scratch import LoRAConfig, core
from peft_from_scratch.kernels import sparse as sp, triton_available
from peft_from_scratch.models import SMOLLM2, load_model, tiny_llama
from peft_from_scratch.reparameterized import rosa

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DENSITIES = [0.001, 0.003, 0.01, 0.03, 0.05]
R_LORA, R_ROSA, LR = 16, 12, 1e-4
from bench.common import BATCH, SEQ  # noqa: E402


# ----------------------------------------------------------------------------- part 1: kernels

def bench_kernels(device: str, shape, n_tokens: int, densities, repeats: int) -> list[dict]:
    d_out, d_in = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_tokens, d_in, generator=g).to(device)
    grad_out = torch.randn(n_tokens, d_out, generator=g).to(device)
    rows = []
    for d in densities:
        k = rosa.n_entries(d, d_out, d_in)
        mask = torch.zeros(d_out * d_in, dtype=torch.bool)
        mask[torch.randperm(d_out * d_in, generator=g)[:k]] = True
        mask = mask.view(d_out, d_in).to(device)
        crow, col = sp.csr_from_mask(mask)
        values = torch.randn(k, generator=g).to(device)
        crow_t, col_t, perm = sp.csr_transpose(crow, col, shape)
        row_idx = sp.csr_row_indices(crow)
        dense = sp.csr_to_dense(values, crow, col, shape)
        paths = {
            "dense": (lambda: x @ dense.T,
                      lambda: (grad_out @ dense, (grad_out.T @ x)[mask])),
            "torch": (lambda: sp.spmm_torch(x, values, crow, col, shape),
                      lambda: (sp.spmm_torch(grad_out, values[perm], crow_t, col_t, shape[::-1]),
                               sp.sddmm_torch(grad_out, x, crow, col, shape))),
        }
        if device == "cuda" and triton_available():
            paths["triton"] = (lambda: sp.spmm_triton(x, values, crow, col, shape),
                               lambda: (sp.spmm_triton(grad_out, values[perm], crow_t, col_t, shape[::-1]),
                                        sp.sddmm_triton(grad_out, x, row_idx, col)))
        row = {"density": d, "nnz": k}
        for name, (forward, backward) in paths.items():
            row[f"{name}_forward_ms"] = 1e3 * timed(forward, device, repeats)
            row[f"{name}_backward_ms"] = 1e3 * timed(backward, device, repeats)
        for name in paths:
            if name != "dense":
                row[f"{name}_vs_dense"] = ((row[f"{name}_forward_ms"] + row[f"{name}_backward_ms"])
                                           / (row["dense_forward_ms"] + row["dense_backward_ms"]))
        rows.append(row)
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


# ----------------------------------------------------------------------------- part 2: a training step

def matched_density(base, r_lora: int, r_rosa: int) -> float:
    """d such that RoSA(r_rosa, d) has as many trainable parameters as LoRA(r_lora), summed over TARGETS."""
    layers = [base.get_submodule(n) for n in core.find_targets(base, TARGETS)]
    extra = sum((r_lora - r_rosa) * (m.in_features + m.out_features) for m in layers)
    return extra / sum(m.in_features * m.out_features for m in layers)


def build(name: str, base, device: str, d: float, mask_batch: dict):
    model = copy.deepcopy(base)
    if name == "lora":
        core.add_adapter(model, LoRAConfig(r=R_LORA, alpha=2 * R_LORA, target_modules=TARGETS))
    else:
        core.add_adapter(model, rosa.RoSAConfig(r=R_ROSA, alpha=2 * R_ROSA, d=d, target_modules=TARGETS))
    model.to(device).train()
    if name == "rosa":
        masks = rosa.select_masks(rosa.accumulate_fisher(model, [mask_batch]), model.adapter_config)
        rosa.set_masks(model, masks)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    return model, optimizer


def step(model, optimizer, batch) -> None:
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def saved_mib(model, batch) -> float:
    """MiB of the tensors autograd keeps for backward during one forward (each storage once, no parameters)."""
    packed = []
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(weakref.ref(t)) or t, lambda t: t):
        loss = model(**batch).loss
    alive = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (r() for r in packed)
             if t is not None and t.untyped_storage().data_ptr() not in params}
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(alive.values()) / 2**20


def bench_step(base, device: str, steps: int, warmup: int, batch: int, seq: int) -> dict:
    d = matched_density(base, R_LORA, R_ROSA)
    batches = make_batches(warmup + steps + 1, base.config.vocab_size, device, batch, seq)
    models = {name: build(name, base, device, d, batches[-1]) for name in ("lora", "rosa")}
    out = {"d": d}
    for name, (model, _) in models.items():
        out[name] = {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                     "saved_mib": saved_mib(model, batches[-1]), "steps_s": []}
    for i, b in enumerate(batches[:-1]):
        for name in (["lora", "rosa"] if i % 2 == 0 else ["rosa", "lora"]):
            model, optimizer = models[name]
            if device == "cuda" and i == warmup:
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            t = time.perf_counter()
            step(model, optimizer, b)
            sync(device)
            if i >= warmup:
                out[name]["steps_s"].append(time.perf_counter() - t)
            if device == "cuda" and i == warmup:
                out[name]["step_peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        print(f"  step {i + 1}/{len(batches) - 1}" + (" (warm-up)" if i < warmup else ""), flush=True)
    for name in models:
        out[name]["median_s"] = statistics.median(out[name]["steps_s"])
    out["ratio_time"] = out["rosa"]["median_s"] / out["lora"]["median_s"]
    out["ratio_saved"] = out["rosa"]["saved_mib"] / out["lora"]["saved_mib"]
    return out


# ----------------------------------------------------------------------------- report

def markdown(result: dict) -> str:
    m, k, s = result["machine"], result["kernels"], result["step"]
    paths = [p for p in ("dense", "torch", "triton") if f"{p}_forward_ms" in k[0]]
    lines = [f"# RoSA: sparse kernels and training step ({'quick smoke run' if result['quick'] else 'one run'})", "",
             f"Machine: {m.get('gpu') or m['cpu']}; {m['cpu_count']} cores, torch {m['torch']} with "
             f"{m['torch_threads']} threads.", "",
             f"## Sparse products: S {tuple(result['kernel_shape'])} (d_out x d_in), {result['kernel_tokens']} tokens", "",
             "| density | nnz | " + " | ".join(f"{p} fwd / bwd (ms)" for p in paths) + " | "
             + " | ".join(f"{p} / dense" for p in paths if p != "dense") + " |",
             "|---|---|" + "---|" * (2 * len(paths) - 1)]
    for row in k:
        lines.append(f"| {100 * row['density']:g}% | {row['nnz']:,} | "
                     + " | ".join(f"{row[p + '_forward_ms']:.3f} / {row[p + '_backward_ms']:.3f}" for p in paths) + " | "
                     + " | ".join(f"**{row[p + '_vs_dense']:.3f}**" for p in paths if p != "dense") + " |")
    lines += ["", f"## Training step on {result['model']}: LoRA r={R_LORA} vs RoSA r={R_ROSA}, d={100 * s['d']:.3f}% "
              f"(same trainable parameters), batch {result['batch']} x {result['seq']}", "",
              "| adapter | trainable params | step median (s) | saved for backward (MiB) |"
              + (" step peak (MiB) |" if "step_peak_mib" in s["lora"] else ""),
              "|---|---|---|---|" + ("---|" if "step_peak_mib" in s["lora"] else "")]
    for name in ("lora", "rosa"):
        r = s[name]
        lines.append(f"| {name} | {r['trainable_params']:,} | {r['median_s']:.4f} | {r['saved_mib']:.1f} |"
                     + (f" {r['step_peak_mib']:.1f} |" if "step_peak_mib" in r else ""))
    lines += ["", f"RoSA / LoRA: step time **{s['ratio_time']:.3f}**, saved for backward **{s['ratio_saved']:.3f}**.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per kernel measurement")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--quick", action="store_true", help="tiny shapes and model, a few steps: checks the script runs")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results; a temp folder with --quick)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        shape, tokens, densities, model_name, batch, seq = (96, 64), 32, [0.01, 0.05], "tiny", 2, 16
        args.steps, args.warmup, args.repeats = 2, 1, 2
    else:
        shape, tokens, densities, model_name, batch, seq = (1536, 576), BATCH * SEQ, DENSITIES, args.model, BATCH, SEQ
    print(f"kernels on {args.device}: S {shape}, {tokens} tokens", flush=True)
    kernels = bench_kernels(args.device, shape, tokens, densities, args.repeats)
    base = tiny_llama(hidden_size=64 if args.quick else 256) if model_name == "tiny" else load_model(SMOLLM2)[0]
    print(f"training step on {model_name}", flush=True)
    result = {"device": args.device, "quick": args.quick, "machine": machine(args.device),
              "kernel_shape": list(shape), "kernel_tokens": tokens, "kernels": kernels,
              "model": SMOLLM2 if model_name == "smollm2" else "tiny_llama", "batch": batch, "seq": seq,
              "step": bench_step(base, args.device, args.steps, args.warmup, batch, seq)}
    out = args.out or (Path(tempfile.mkdtemp(prefix="bench_rosa_")) if args.quick else ROOT / "bench" / "results")
    path = write_results("rosa", result, markdown(result), args.threads, out)
    print(f"wrote {path}.json and .md")


if __name__ == "__main__":
    main()
