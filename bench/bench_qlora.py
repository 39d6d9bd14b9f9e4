"""QLoRA training step: ours (prepare_qlora + PagedAdamW) vs bitsandbytes + peft, on SmolLM2-135M.

Both sides run the QLoRA recipe on the same float32 checkpoint: NF4 with double quantization
(blocksize 64 / 256) on every linear layer but the head, LoRA r=16 (alpha 32) on all of them,
non-re-entrant gradient checkpointing, a batch of 4 x 128 random tokens (labels = inputs).

* ours: ``prepare_qlora`` on the float model, optimizer ``PagedAdamW`` (states in CPU memory);
* reference: ``from_pretrained(..., quantization_config=BitsAndBytesConfig(nf4, double quant))``,
  ``prepare_model_for_kbit_training``, ``get_peft_model(LoraConfig(r=16, all-linear))``, optimizer
  ``bnb.optim.PagedAdamW32bit`` on CUDA (the paper's) and ``torch.optim.AdamW`` on CPU (bnb's paged
  optimizers allocate CUDA unified memory and do not run on CPU).

Compute dtype: bfloat16 on CUDA (the paper), float32 on CPU.

Memory. On CUDA: ``torch.cuda.max_memory_allocated`` over the timed steps, and the optimizer state
bytes resident on the GPU. On CPU the process's peak RSS is shared by both models and cannot be
reset, so we report what is comparable: the bytes of every tensor the model holds (unique storages:
parameters, buffers and, for bitsandbytes, the tensors of each layer's ``quant_state``), split into
the 4-bit weights (packed codes + block constants), the LoRA weights and the rest (embeddings, norms),
and the bytes of optimizer state after one step.

One run = one measurement: one warm-up step, then the median of ``--steps`` timed steps (forward,
backward, optimizer step, zero_grad).

    python -m bench.bench_qlora [--device cpu|cuda] [--steps 3] [--threads N]

Writes bench/results/qlora_<device-slug>.json and .md.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch

from bench.common import machine, slug
from peft_from_scratch import LoRAConfig, models
from peft_from_scratch.optim import PagedAdamW, optimizer_state_bytes
from peft_from_scratch.quantized import linear4bit, prepare_qlora

R, ALPHA, LR = 16, 32, 2e-4
MiB = 2 ** 20


def build_ours(path, device):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prepare_qlora(model.to(device), LoRAConfig(r=R, alpha=ALPHA, target_modules="all-linear"))
    optimizer = PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    return model, optimizer, "PagedAdamW (ours)"


def build_reference(path, device):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map=device,
                                                 dtype=torch.float32)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    if device == "cuda":
        return model, bnb.optim.PagedAdamW32bit(params, lr=LR, weight_decay=0.0), "bnb PagedAdamW32bit"
    return model, torch.optim.AdamW(params, lr=LR, weight_decay=0.0), "torch AdamW (bnb paged needs CUDA)"


def tensor_bytes(model) -> dict:
    """Bytes of the model's tensors by kind, each storage counted once."""
    seen, out = set(), {"4-bit weights (codes + constants)": 0, "LoRA": 0, "other (embeddings, norms, head)": 0}

    def add(kind, t):
        if t is None or not isinstance(t, torch.Tensor):
            return
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            out[kind] += t.untyped_storage().nbytes()

    for name, m in model.named_modules():
        quant_state = getattr(getattr(m, "weight", None), "quant_state", None)
        if isinstance(m, linear4bit.Linear4bit):
            for t in m.buffers(recurse=False):
                add("4-bit weights (codes + constants)", t)
        elif quant_state is not None:              # bitsandbytes: the packed uint8 Params4bit + its state
            add("4-bit weights (codes + constants)", m.weight)
            for attr in ("absmax", "offset", "code"):
                add("4-bit weights (codes + constants)", getattr(quant_state, attr, None))
            if quant_state.state2 is not None:
                add("4-bit weights (codes + constants)", quant_state.state2.absmax)
                add("4-bit weights (codes + constants)", quant_state.state2.code)
    for name, p in model.named_parameters():
        add("LoRA" if p.requires_grad else "other (embeddings, norms, head)", p)
    for name, b in model.named_buffers():
        add("other (embeddings, norms, head)", b)
    out["total"] = sum(out.values())
    return out


def run(build, path, device, batch, seq, steps) -> dict:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model, optimizer, opt_name = build(path, device)
    model.train()
    ids = torch.randint(0, 49152, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    load_before = os.getloadavg()[0]
    step()                                          # warm-up (also creates the optimizer state)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(step())
        sync()
        times.append(time.perf_counter() - start)
    row = {"optimizer": opt_name, "step_s": statistics.median(times), "step_times_s": times, "losses": losses,
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "tensor_bytes": tensor_bytes(model),
           "optimizer_state_bytes": optimizer_state_bytes(optimizer),
           "optimizer_state_bytes_on_device": optimizer_state_bytes(optimizer, on_device=True),
           "load_average_1min": [load_before, os.getloadavg()[0]]}   # other processes on the machine
    if device == "cuda":
        row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    del model, optimizer
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def markdown(result: dict) -> str:
    ours, ref = result["ours"], result["bnb_peft"]
    m = result["machine"]
    where = m.get("gpu") or f"{m['cpu']} ({m['torch_threads']} threads)"
    lines = [f"# QLoRA step: ours vs bitsandbytes + peft, SmolLM2-135M, batch {result['batch']} x {result['seq']}, "
             f"r={R} all-linear",
             "",
             f"Machine: {where}; torch {m['torch']}, bitsandbytes {m['bitsandbytes']}, peft {result['peft']}, "
             f"transformers {result['transformers']}. One run; step = median of {result['steps']} timed steps "
             "after one warm-up (forward + backward with gradient checkpointing + optimizer step).",
             "",
             "| | ours | bnb + peft | ours / bnb |",
             "|---|---:|---:|---:|",
             f"| optimizer | {ours['optimizer']} | {ref['optimizer']} | |",
             f"| step time (s) | {ours['step_s']:.2f} | {ref['step_s']:.2f} | {ours['step_s'] / ref['step_s']:.2f} |",
             f"| trainable parameters | {ours['trainable_params']:,} | {ref['trainable_params']:,} | |"]
    for kind in ours["tensor_bytes"]:
        a, b = ours["tensor_bytes"][kind], ref["tensor_bytes"][kind]
        lines.append(f"| model tensors: {kind} (MiB) | {a / MiB:.2f} | {b / MiB:.2f} | {a / b:.3f} |")
    a, b = ours["optimizer_state_bytes"], ref["optimizer_state_bytes"]
    lines.append(f"| optimizer state, all (MiB) | {a / MiB:.2f} | {b / MiB:.2f} | {a / b:.3f} |")
    a, b = ours["optimizer_state_bytes_on_device"], ref["optimizer_state_bytes_on_device"]
    lines.append(f"| optimizer state on the accelerator (MiB) | {a / MiB:.2f} | {b / MiB:.2f} | |")
    if "peak_allocated_bytes" in ours:
        a, b = ours["peak_allocated_bytes"], ref["peak_allocated_bytes"]
        lines.append(f"| CUDA max_memory_allocated (MiB) | {a / MiB:.1f} | {b / MiB:.1f} | {a / b:.3f} |")
    lines += ["", f"Step times (s), ours: {', '.join(f'{t:.1f}' for t in ours['step_times_s'])}; bnb + peft: "
                  f"{', '.join(f'{t:.1f}' for t in ref['step_times_s'])}. 1-minute load average before / after "
                  f"(ours: {ours['load_average_1min'][0]:.1f} / {ours['load_average_1min'][1]:.1f}, bnb + peft: "
                  f"{ref['load_average_1min'][0]:.1f} / {ref['load_average_1min'][1]:.1f}, on "
                  f"{m['cpu_count']} cores): a load above the core count means other processes shared the CPU and "
                  "the times are noisy; the ratio is indicative only."]
    lines += ["", f"Losses (ours): {', '.join(f'{x:.4f}' for x in ours['losses'])}; "
                  f"(bnb + peft): {', '.join(f'{x:.4f}' for x in ref['losses'])} "
                  "(they differ because each side draws its own random LoRA A; tests/test_qlora.py copies A and B "
                  "across and finds bit-identical logits and updates).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import peft
    import transformers
    path = models.local_path(models.SMOLLM2)
    result = {"machine": machine(args.device), "peft": peft.__version__, "transformers": transformers.__version__,
              "batch": args.batch, "seq": args.seq, "steps": args.steps, "r": R, "alpha": ALPHA}
    result["ours"] = run(build_ours, path, args.device, args.batch, args.seq, args.steps)
    result["bnb_peft"] = run(build_reference, path, args.device, args.batch, args.seq, args.steps)
    name = result["machine"].get("gpu") or f"cpu {result['machine']['cpu']}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"qlora_{slug(name)}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
