"""Training-step time and memory of our LoRA, DoRA and (IA)³ against peft's, on SmolLM2-135M.

Setting: SmolLM2-135M-Instruct in float32, batch 4 x 128 random tokens with labels = inputs, AdamW
(lr 1e-4). LoRA and DoRA: r = 16, alpha = 32, every linear layer of the decoder (q, k, v, o, gate,
up, down: 210 layers; not the tied lm_head). (IA)³: the paper's and peft's default map (keys and
values scaled at their output, down_proj at its input). A step is forward + backward +
``optimizer.step()`` + ``zero_grad()``: the same function for all six models, on the same batches.

One run of this script = one measurement. All six models (peft's and ours for each method) live in
the process at once and are stepped round-robin, the order rotating each round, so a
change in the machine's load hits all six alike; ``--warmup`` steps each are not timed, then the
median of ``--steps`` timed steps is reported, and the ratios ours / peft come from these medians.
torch uses as many threads as the machine has cores (``--threads`` to change it).

Memory, two numbers per model, each from a fresh subprocess holding only that model:

* ``saved_mib``: bytes of the tensors autograd saves for backward during one forward (counted
  through ``torch.autograd.graph.saved_tensors_hooks``, each storage once; parameters excluded).
  This is the activation memory a method adds, independent of the allocator.
* CPU ``step_peak_rss_mib``: peak resident memory during one step (after the warm-up, so the
  optimizer state already exists) minus resident memory just before it. The peak is reset through
  ``/proc/self/clear_refs`` and read from VmHWM; glibc's malloc is told to return every allocation
  over 64 KiB to the system (``MALLOC_MMAP_THRESHOLD_``), so freed activations leave RSS and the
  delta tracks what the step allocates. It includes the gradients of the adapter, the logits
  (4 x 128 x 49152 floats = 96 MiB, the same for all) and allocator slack.
* CUDA ``step_peak_mib``: ``torch.cuda.max_memory_allocated`` during the step minus allocated memory
  before it.

    python -m bench.bench_lora_dora [--device cpu|cuda] [--steps 10] [--warmup 2]

Writes bench/results/lora_dora_<device-slug>.json and .md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics

import torch

from bench.common import BATCH, SEQ, load_average, machine, measure_memory, memory_all, time_all, write_results
from peft_from_scratch import DoRAConfig, IA3Config, LoRAConfig, core
from peft_from_scratch.additive.ia3 import DEFAULT_TARGETS
from peft_from_scratch.models import SMOLLM2, load_model

METHODS = {"lora": "LoRA", "dora": "DoRA", "ia3": "(IA)³"}
CONFIGS = [f"{owner}-{m}" for m in METHODS for owner in ("peft", "ours")]
R, ALPHA, LR = 16, 32, 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IA3_TARGETS, IA3_FF = DEFAULT_TARGETS["llama"]


# ----------------------------------------------------------------------------- the models and the step

def build(name: str, base, device: str):
    """One of CONFIGS on a deep copy of ``base``, with its AdamW optimizer."""
    owner, method = name.split("-")
    model = copy.deepcopy(base)
    if owner == "ours" and method == "ia3":
        core.add_adapter(model, IA3Config())
    elif owner == "ours":
        config = (DoRAConfig if method == "dora" else LoRAConfig)(r=R, alpha=ALPHA, target_modules=TARGETS)
        core.add_adapter(model, config)
    elif method == "ia3":
        from peft import IA3Config as PeftIA3Config, get_peft_model
        model = get_peft_model(model, PeftIA3Config(target_modules=IA3_TARGETS, feedforward_modules=IA3_FF,
                                                    task_type="CAUSAL_LM"))
    else:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                                                 use_dora=method == "dora", task_type="CAUSAL_LM"))
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    return model, optimizer


# ----------------------------------------------------------------------------- time

# ----------------------------------------------------------------------------- memory (one subprocess per model)

# ----------------------------------------------------------------------------- report

def markdown(result: dict) -> str:
    m, t, mem = result["machine"], result["time"], result["memory"]
    mem_key = "step_peak_mib" if result["device"] == "cuda" else "step_peak_rss_mib"
    mem_name = "step peak (MiB)" if result["device"] == "cuda" else "step peak RSS delta (MiB)"
    where = m.get("gpu") or m["cpu"]
    lines = [
        f"# LoRA, DoRA and (IA)³ training step: ours vs peft {m.get('peft', '')}",
        "",
        f"Machine: {where}; {m['cpu_count']} cores, torch {m['torch']} with {m['torch_threads']} threads "
        f"({m['cpu_capability']}), transformers {m.get('transformers', '?')}. "
        f"Load average before / after: {result['load_before']} / {result['load_after']}.",
        "",
        f"SmolLM2-135M-Instruct, float32; LoRA and DoRA r={R}, alpha={ALPHA}, q/k/v/o/gate/up/down in all 30 "
        f"layers; (IA)³ on k/v (output) and down_proj (input); batch {BATCH} x {SEQ}, AdamW. Step = forward + "
        f"backward + optimizer step. Median of {result['steps']} steps after {result['warmup']} warm-up steps, "
        "the six models interleaved round-robin in one process. Ratios are ours / peft.",
        "",
        f"| method | model | step median (s) | min-max (s) | ours/peft time | saved for backward (MiB) | {mem_name} | trainable params |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        for owner in ("peft", "ours"):
            name = f"{owner}-{method}"
            ratio = f"**{result['ratios'][method]['time']:.3f}**" if owner == "ours" else ""
            lines.append(f"| {METHODS[method]} | {owner} | {t[name]['median_s']:.3f} | "
                         f"{t[name]['min_s']:.3f}-{t[name]['max_s']:.3f} | {ratio} | {mem[name]['saved_mib']:.1f} | "
                         f"{mem[name][mem_key]:.1f} | {t[name]['trainable_params']:,} |")
    lines += ["", "| ours / peft | time (ratio of medians) | time (ratio of minima) | time (median of per-round ratios) "
              "| saved for backward | step peak |", "|---|---|---|---|---|---|"]
    for meth, r in result["ratios"].items():
        lines.append(f"| {METHODS[meth]} | **{r['time']:.3f}** | {r['time_min']:.3f} | "
                     f"{r['time_paired']:.3f} | {r['saved']:.3f} | {r['peak']:.3f} |")
    loads = [x for x in t["load_1min_per_round"] if x is not None]
    lines += ["", "Each round steps the six models back to back, so the per-round ratio compares steps taken under "
              "nearly the same load; the minimum is the least disturbed step. "
              + (f"1-minute load average during the timed rounds: {min(loads):.2f} to {max(loads):.2f} "
                 f"on {m['cpu_count']} cores, this benchmark's own {m['torch_threads']} thread(s) included."
                 if loads else ""), "",
        "What is measured: see the docstring of bench/bench_lora_dora.py and bench/common.py. The saved-for-backward bytes "
        "count each storage autograd keeps once (parameters excluded); the step peak is the peak "
        + ("allocated CUDA memory during a step minus the memory allocated before it."
           if result["device"] == "cuda" else
           "resident set size during a step (VmHWM after resetting it) minus RSS before it, in a fresh process "
           "per model with glibc's mmap threshold fixed at 64 KiB so freed tensors leave RSS."),
        ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        torch.set_num_threads(args.threads)
        print(json.dumps(measure_memory(args.memory_child, args.device, args.warmup, build)))
        return

    torch.set_num_threads(args.threads)
    load_before = load_average()
    print(f"time: {args.warmup} warm-up + {args.steps} timed steps per model, round-robin", flush=True)
    base, _ = load_model(SMOLLM2)
    times = time_all(base, args.device, args.steps, args.warmup, build, CONFIGS)
    del base
    print(f"memory, one subprocess per model ({args.device})", flush=True)
    memory = memory_all(args.device, args.warmup, "bench.bench_lora_dora", CONFIGS)
    mem_key = "step_peak_mib" if args.device == "cuda" else "step_peak_rss_mib"
    ratios = {}
    for method in METHODS:
        ours, peft = times[f"ours-{method}"], times[f"peft-{method}"]
        ratios[method] = {
            "time": ours["median_s"] / peft["median_s"],                   # the headline: ratio of medians
            "time_min": ours["min_s"] / peft["min_s"],                     # of the least disturbed steps
            "time_paired": statistics.median(a / b for a, b in zip(ours["steps_s"], peft["steps_s"])),
            "saved": memory[f"ours-{method}"]["saved_mib"] / memory[f"peft-{method}"]["saved_mib"],
            "peak": memory[f"ours-{method}"][mem_key] / memory[f"peft-{method}"][mem_key]}
    info = machine(args.device)
    result = {"device": args.device, "machine": info, "steps": args.steps, "warmup": args.warmup,
              "load_before": load_before, "load_after": load_average(),
              "setting": {"model": SMOLLM2, "r": R, "alpha": ALPHA, "targets": TARGETS,
                          "ia3_targets": IA3_TARGETS, "ia3_feedforward": IA3_FF, "batch": BATCH,
                          "seq": SEQ, "lr": LR, "dtype": "float32"},
              "time": times, "memory": memory, "ratios": ratios}
    write_results("lora_dora", result, markdown(result), args.threads)


if __name__ == "__main__":
    main()
