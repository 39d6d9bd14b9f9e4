"""NF4 quantize / dequantize throughput: ours (PyTorch reference, and the Triton kernel on CUDA) vs
bitsandbytes, on the same tensors, with double quantization (QLoRA's setting: blocksize 64, 256).

One run of this script = one measurement: each operation is warmed up once, then timed ``--repeats``
times, and we report the median. Shapes: a 4096 x 4096 matrix and SmolLM2-135M's largest matrices
(the 49152 x 576 token embedding / tied output head, and the 1536 x 576 MLP projections), filled
with N(0, 0.02^2) values in float32 (the values do not change the speed).

On CUDA we also report the Triton kernel's achieved bandwidth, bytes read + written per second:
read = packed bytes (n/2) + uint8 absmax (n/64) + float32 absmax2 (4 n / (64 * 256)); written = n *
output element size; as a fraction of the GPU's peak memory bandwidth from ``PEAK_BANDWIDTH`` (the
vendors' data-sheet numbers; the first entry whose key is in the device name wins).

    python -m bench.bench_nf4 [--device cpu|cuda] [--repeats 5]

Writes bench/results/nf4_<device-slug>.json and .md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.common import machine, slug, timed
from peft_from_scratch.kernels import triton_available
from peft_from_scratch.quantized import nf4
from peft_from_scratch.quantized.linear4bit import dequantize_triton

PEAK_BANDWIDTH = {          # bytes/s, data sheets (SXM parts unless named)
    "H200": 4.8e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,        # H100 SXM5 80GB HBM3
    "A100-SXM4-80GB": 2.039e12,
    "A100": 1.555e12,       # A100 40GB
    "L40S": 0.864e12,
    "L4": 0.3e12,
    "A10G": 0.6e12,
    "RTX 4090": 1.008e12,
}
SHAPES = {
    "4096x4096": (4096, 4096),
    "SmolLM2 embed/lm_head 49152x576": (49152, 576),
    "SmolLM2 mlp 1536x576": (1536, 576),
    "SmolLM2 q/o 576x576": (576, 576),
    "SmolLM2 k/v 192x576": (192, 576),
}


def peak_bandwidth(name: str) -> tuple[str | None, float | None]:
    for key, value in PEAK_BANDWIDTH.items():
        if key in name:
            return key, value
    return None, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    device = args.device
    info = machine(device)
    try:
        import bitsandbytes.functional as BF
        torch._dynamo.config.disable = True   # bnb's PyTorch fallbacks are torch.compile'd: time kernels, not compiles
    except ImportError:
        BF = None
    triton_ok = device == "cuda" and triton_available()

    rows = []
    for name, shape in SHAPES.items():
        W = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).mul_(0.02).to(device)
        n = W.numel()
        row = {"shape": name, "numel": n}
        row["quantize_ours_s"] = timed(lambda: nf4.quantize_nf4(W), device, args.repeats)
        packed, state = nf4.quantize_nf4(W)
        row["dequantize_ours_s"] = timed(lambda: nf4.dequantize_4bit(packed, state, check=False), device, args.repeats)
        if BF is not None:
            row["quantize_bnb_s"] = timed(lambda: BF.quantize_4bit(W, blocksize=64, quant_type="nf4",
                                                                   compress_statistics=True), device, args.repeats)
            bpacked, bstate = BF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
            row["dequantize_bnb_s"] = timed(lambda: BF.dequantize_4bit(bpacked, bstate), device, args.repeats)
            row["bit_exact"] = bool(torch.equal(packed, bpacked) and torch.equal(state.absmax, bstate.absmax)
                                    and torch.equal(nf4.dequantize_4bit(packed, state), BF.dequantize_4bit(bpacked, bstate)))
            row["quantize_speed_vs_bnb"] = row["quantize_bnb_s"] / row["quantize_ours_s"]
            row["dequantize_speed_vs_bnb"] = row["dequantize_bnb_s"] / row["dequantize_ours_s"]
        if triton_ok:
            row["dequantize_triton_s"] = t = timed(lambda: dequantize_triton(packed, state), device, args.repeats)
            moved = (packed.numel() + state.absmax.numel() + 4 * state.absmax2.numel()) + n * W.element_size()
            row["triton_bandwidth_GBps"] = moved / t / 1e9
            key, peak = peak_bandwidth(info["gpu"])
            row["triton_fraction_of_peak"] = moved / t / peak if peak else None
            row["peak_source"] = key
            if BF is not None:
                row["dequantize_triton_speed_vs_bnb"] = row["dequantize_bnb_s"] / t
        rows.append(row)
        print(json.dumps(row))

    machine_name = info.get("gpu") or info["cpu"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"nf4_{slug(device + '-' + machine_name)}"
    result = {"machine": info, "device": device, "repeats": args.repeats, "note": "median of repeats after one "
              "warm-up, one run of the script; throughput in elements/s", "rows": rows}
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")

    def ms(x):
        return "-" if x is None else f"{1e3 * x:.1f}"

    lines = [f"# NF4 quantize / dequantize: ours vs bitsandbytes ({device})", "",
             f"Machine: {machine_name}; {info['cpu_count']} CPUs visible, torch threads {info['torch_threads']}, "
             f"CPU capability {info['cpu_capability']}; torch {info['torch']}, bitsandbytes {info['bitsandbytes']}"
             + (f", triton {info.get('triton')}" if device == "cuda" else "") + ".",
             f"One run; each cell is the median of {args.repeats} timings after a warm-up. NF4 with double "
             "quantization (blocksize 64, blocksize2 256), float32 input. Speed ratio = bnb time / our time "
             "(> 1: ours is faster).", ""]
    header = "| matrix | ours quantize ms | bnb quantize ms | ratio | ours dequant ms | bnb dequant ms | ratio |"
    sep = "|---|---|---|---|---|---|---|"
    if triton_ok:
        header += " triton dequant ms | ratio vs bnb | GB/s | of peak |"
        sep += "---|---|---|---|"
    lines += [header, sep]
    for r in rows:
        line = (f"| {r['shape']} | {ms(r['quantize_ours_s'])} | {ms(r.get('quantize_bnb_s'))} | "
                f"{r.get('quantize_speed_vs_bnb', float('nan')):.2f} | {ms(r['dequantize_ours_s'])} | "
                f"{ms(r.get('dequantize_bnb_s'))} | {r.get('dequantize_speed_vs_bnb', float('nan')):.2f} |")
        if triton_ok:
            frac = r["triton_fraction_of_peak"]
            line += (f" {ms(r['dequantize_triton_s'])} | {r.get('dequantize_triton_speed_vs_bnb', float('nan')):.2f} | "
                     f"{r['triton_bandwidth_GBps']:.0f} | {'-' if frac is None else f'{100 * frac:.0f}%'} |")
        lines.append(line)
    lines += ["", "Bit-exact with bitsandbytes on these tensors: "
              + ", ".join(f"{r['shape']}: {r.get('bit_exact')}" for r in rows) + "."]
    if device == "cpu":
        lines += ["", "bitsandbytes on CPU quantizes 4-bit with its pure-PyTorch backend and the 8-bit constants "
                  "and dequantization with its compiled library (AVX-512, OpenMP). This machine's cores are shared "
                  "with other jobs, so timings are noisy."]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
    main()
