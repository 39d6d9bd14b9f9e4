"""Training-step time and memory of our prompt tuning, P-tuning, prefix tuning and LLaMA-Adapter against peft's, on SmolLM2-135M.

Setting: SmolLM2-135M-Instruct in float32, 20 virtual tokens, batch 4 x 128 random tokens with
labels = inputs, AdamW (lr 1e-3). The methods in the configuration each paper trains with:

* prompt tuning: a 20 x 576 prompt, random init (peft's ``PromptTuningConfig``);
* P-tuning: the paper's encoder, BiLSTM + MLP (peft's ``PromptEncoderConfig(encoder_reparameterization_type="LSTM")``,
  hidden size 576, so both build the same modules);
* prefix tuning with the paper's reparameterisation MLP (peft's ``PrefixTuningConfig(prefix_projection=True)``,
  hidden 512, peft's default);
* LLaMA-Adapter: 10 adaption-prompt tokens in the top 8 layers (peft's ``AdaptionPromptConfig(adapter_len=10,
  adapter_layers=8)``), ours in peft's variant (one scalar gate per layer, ``gate="scalar"``) and in the
  paper's (a tanh gate per head, ``gate="tanh_per_head"``); both are timed against peft's, which has
  only the scalar gate, so the second ratio is what the paper's gate costs over peft.

The measurement is bench_lora_dora.py's (its docstring says what each number means): every model
lives in one process and is stepped round-robin, the order rotating each round; the median of
``--steps`` timed steps after ``--warmup``; ratios ours / peft from the medians. Memory comes from a
fresh subprocess per model: bytes saved for backward during one forward, and the step's peak
(RSS delta on CPU, allocated memory on CUDA).

    python -m bench.bench_prompts [--device cpu|cuda] [--steps 10] [--warmup 2] [--threads N]

Writes bench/results/prompts_<device-slug>.json and .md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics

import torch

from bench.common import BATCH, SEQ, load_average, machine, measure_memory, memory_all, time_all, write_results
from peft_from_scratch import PrefixTuningConfig, PromptTuningConfig, PTuningConfig, core
from peft_from_scratch.additive.llama_adapter import LlamaAdapterConfig
from peft_from_scratch.models import SMOLLM2, load_model

METHODS = {"prompt": "prompt tuning", "ptuning": "P-tuning (LSTM)", "prefix": "prefix tuning (MLP)",
           "adaption": "LLaMA-Adapter (peft's scalar gate)", "adaption_paper": "LLaMA-Adapter (the paper's tanh gate per head)"}
REFERENCE = {**{m: f"peft-{m}" for m in METHODS}, "adaption_paper": "peft-adaption"}   # peft has no per-head gate
CONFIGS = list(dict.fromkeys(name for m in METHODS for name in (REFERENCE[m], f"ours-{m}")))   # peft-adaption once
N, LR = 20, 1e-3
PREFIX_HIDDEN = 512
ADAPTER_LEN, ADAPTER_LAYERS = 10, 8


def build(name: str, base, device: str):
    """One of CONFIGS on a deep copy of ``base``, with its AdamW optimizer."""
    owner, method = name.split("-")
    model = copy.deepcopy(base)
    d = base.config.hidden_size
    if owner == "ours":
        config = {"prompt": PromptTuningConfig(num_virtual_tokens=N),
                  "ptuning": PTuningConfig(num_virtual_tokens=N, encoder="lstm", encoder_hidden_size=d),
                  "prefix": PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True,
                                               encoder_hidden_size=PREFIX_HIDDEN),
                  "adaption": LlamaAdapterConfig(adapter_len=ADAPTER_LEN, adapter_layers=ADAPTER_LAYERS, gate="scalar"),
                  "adaption_paper": LlamaAdapterConfig(adapter_len=ADAPTER_LEN, adapter_layers=ADAPTER_LAYERS,
                                                       gate="tanh_per_head")}[method]
        core.add_adapter(model, config)
    else:
        from peft import (AdaptionPromptConfig, PrefixTuningConfig as Prefix, PromptEncoderConfig,
                          PromptTuningConfig as Prompt, get_peft_model)
        config = {"prompt": Prompt(task_type="CAUSAL_LM", num_virtual_tokens=N),
                  "ptuning": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=d,
                                                 encoder_reparameterization_type="LSTM"),
                  "prefix": Prefix(task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=True,
                                   encoder_hidden_size=PREFIX_HIDDEN),
                  "adaption": AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=ADAPTER_LEN,
                                                   adapter_layers=ADAPTER_LAYERS)}[method]
        model = get_peft_model(model, config)
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    return model, optimizer


def markdown(result: dict) -> str:
    m, t, mem = result["machine"], result["time"], result["memory"]
    cuda = result["device"] == "cuda"
    mem_key = "step_peak_mib" if cuda else "step_peak_rss_mib"
    lines = [
        f"# Prompt tuning, P-tuning, prefix tuning and LLaMA-Adapter training step: ours vs peft {m.get('peft', '')}", "",
        f"Machine: {m.get('gpu') or m['cpu']}; {m['cpu_count']} cores, torch {m['torch']} with {m['torch_threads']} "
        f"threads, transformers {m.get('transformers', '?')}. Load average before / after: "
        f"{result['load_before']} / {result['load_after']}.", "",
        f"SmolLM2-135M-Instruct, float32, {N} virtual tokens (LLaMA-Adapter: {ADAPTER_LEN} in the top "
        f"{ADAPTER_LAYERS} layers), batch {BATCH} x {SEQ}, AdamW. Step = forward + "
        f"backward + optimizer step. Median of {result['steps']} steps after {result['warmup']} warm-up steps, the "
        f"{len(CONFIGS)} models interleaved round-robin in one process. Ratios are ours / peft.", "",
        f"| method | model | step median (s) | min-max (s) | ours/peft time | saved for backward (MiB) | "
        f"{'step peak (MiB)' if cuda else 'step peak RSS delta (MiB)'} | trainable params |",
        "|---|---|---|---|---|---|---|---|"]
    for method, label in METHODS.items():
        for name in (REFERENCE[method], f"ours-{method}"):
            owner = name.split("-")[0]
            ratio = f"**{result['ratios'][method]['time']:.3f}**" if owner == "ours" else ""
            lines.append(f"| {label} | {owner} | {t[name]['median_s']:.3f} | {t[name]['min_s']:.3f}-{t[name]['max_s']:.3f}"
                         f" | {ratio} | {mem[name]['saved_mib']:.1f} | {mem[name][mem_key]:.1f} | "
                         f"{t[name]['trainable_params']:,} |")
    lines += ["", "| ours / peft | time (ratio of medians) | time (median of per-round ratios) | saved for backward "
              "| step peak |", "|---|---|---|---|---|"]
    for method, r in result["ratios"].items():
        lines.append(f"| {METHODS[method]} | **{r['time']:.3f}** | {r['time_paired']:.3f} | {r['saved']:.3f} | "
                     f"{r['peak']:.3f} |")
    loads = [x for x in t["load_1min_per_round"] if x is not None]
    if loads:
        lines += ["", f"1-minute load average during the timed rounds: {min(loads):.2f} to {max(loads):.2f} on "
                      f"{m['cpu_count']} cores, this benchmark's own {m['torch_threads']} thread(s) included."]
    return "\n".join(lines + [""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(measure_memory(args.memory_child, args.device, args.warmup, build)))
        return

    load_before = load_average()
    base, _ = load_model(SMOLLM2)
    times = time_all(base, args.device, args.steps, args.warmup, build, CONFIGS)
    del base
    memory = memory_all(args.device, args.warmup, "bench.bench_prompts", CONFIGS)
    mem_key = "step_peak_mib" if args.device == "cuda" else "step_peak_rss_mib"
    ratios = {}
    for method in METHODS:
        ours, peft = times[f"ours-{method}"], times[REFERENCE[method]]
        ratios[method] = {"time": ours["median_s"] / peft["median_s"],
                          "time_paired": statistics.median(a / b for a, b in zip(ours["steps_s"], peft["steps_s"])),
                          "saved": memory[f"ours-{method}"]["saved_mib"] / memory[REFERENCE[method]]["saved_mib"],
                          "peak": memory[f"ours-{method}"][mem_key] / memory[REFERENCE[method]][mem_key]}
    info = machine(args.device)
    result = {"device": args.device, "machine": info, "steps": args.steps, "warmup": args.warmup,
              "load_before": load_before, "load_after": load_average(),
              "setting": {"model": SMOLLM2, "num_virtual_tokens": N, "prefix_hidden": PREFIX_HIDDEN,
                          "adapter_len": ADAPTER_LEN, "adapter_layers": ADAPTER_LAYERS, "batch": BATCH,
                          "seq": SEQ, "lr": LR, "dtype": "float32"},
              "time": times, "memory": memory, "ratios": ratios}
    write_results("prompts", result, markdown(result), args.threads)


if __name__ == "__main__":
    main()
