"""Execute every notebook in one profile and write a one-page summary of their headline results.

    python scripts/run_notebooks.py                 # profile "auto": gpu if CUDA is available, else cpu
    python scripts/run_notebooks.py --profile smoke --out runs/smoke
    python scripts/run_notebooks.py --inplace       # maintainers: refresh the committed outputs

Executed notebooks go to ``--out`` (default ``runs/<profile>``), each notebook's results JSON to
``<out>/results``, and the summary to ``<out>/SUMMARY.md``. With ``--inplace`` the notebooks in
``notebooks/`` are overwritten with their executed versions (first synced from their jupytext
``.py`` twin) and the results go to ``notebooks/results``, which is what the repository commits.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
sys.path.insert(0, str(REPO))

from peft_from_scratch.notebook import resolve_profile  # noqa: E402


def notebooks(only: list[str] | None = None) -> list[Path]:
    found = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        found = [p for p in found if any(p.stem.startswith(o) or p.stem == o for o in only)]
        if not found:
            raise SystemExit(f"no notebook matches {only}; available: {[p.stem for p in NOTEBOOKS.glob('*.ipynb')]}")
    return found


def sync_from_text(nb: Path) -> None:
    """Update the .ipynb's sources from its jupytext .py twin, keeping outputs."""
    py = nb.with_suffix(".py")
    if py.exists():
        subprocess.run([sys.executable, "-m", "jupytext", "--quiet", "--to", "ipynb", "--update", str(py)], check=True)


def execute(nb: Path, out: Path, profile: str, results_dir: Path | None, timeout: int | None = None) -> float:
    """Run ``nb`` into ``out``. With ``results_dir=None`` (``--inplace``) no parameters are injected,
    so the committed notebook keeps its own parameters cell; the profile then travels in
    ``$PFS_PROFILE``, which ``profile="auto"`` reads."""
    import papermill as pm
    params = {} if results_dir is None else {"profile": profile, "results_dir": str(results_dir)}
    os.environ["PFS_PROFILE"] = profile
    t = time.time()
    pm.execute_notebook(str(nb), str(out), parameters=params, cwd=str(NOTEBOOKS), kernel_name="python3",
                        progress_bar=False, execution_timeout=timeout, log_output=False)
    return time.time() - t


def summary(results_dir: Path, profile: str) -> str:
    lines = [f"# Notebook results ({profile} profile)", "",
             "Written by `scripts/run_notebooks.py` from each notebook's results file. "
             "A claim is a check the notebook computed; PASS means it held in this run.", ""]
    for path in sorted(results_dir.glob("*.json")):
        r = json.loads(path.read_text())
        passed = sum(r["claims"].values())
        lines += [f"## {r['notebook']}", "",
                  f"{r['device']} · torch {r['torch']} · seed {r['seed']} · {r['wall_time_s']:.0f} s · "
                  f"claims {passed}/{len(r['claims'])} passed", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in _flatten(r["metrics"]).items()]
        lines += ["", "| claim | |", "|---|---|"]
        lines += [f"| {k} | {'PASS' if v else '**FAIL**'} |" for k, v in r["claims"].items()]
        lines.append("")
    return "\n".join(lines)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif not isinstance(v, list) or len(v) <= 8:
            out[f"{prefix}{k}"] = v
    return out


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="auto", help="smoke | cpu | gpu | auto (default)")
    ap.add_argument("--out", type=Path, help="folder for executed notebooks (default runs/<profile>)")
    ap.add_argument("--inplace", action="store_true", help="overwrite notebooks/ and notebooks/results")
    ap.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds")
    ap.add_argument("--threads", type=int, help="torch threads in each notebook (default: torch's own)")
    ap.add_argument("only", nargs="*", help="run only these notebooks (name or number prefix)")
    args = ap.parse_args(argv)
    profile = resolve_profile(args.profile)
    if args.threads:
        os.environ["PFS_THREADS"] = str(args.threads)
    out = NOTEBOOKS if args.inplace else (args.out or REPO / "runs" / profile)
    results_dir = (NOTEBOOKS / "results") if args.inplace else out / "results"
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for nb in notebooks(args.only):
        if args.inplace:
            sync_from_text(nb)
        print(f"running {nb.name} ({profile}) ...", flush=True)
        try:
            seconds = execute(nb, out / nb.name, profile, None if args.inplace else results_dir.resolve(), args.timeout)
            print(f"  done in {seconds:.0f} s -> {out / nb.name}")
        except Exception as e:  # keep going: one broken notebook should not hide the others' results
            failed.append(nb.name)
            print(f"  FAILED: {type(e).__name__}: {str(e)[:2000]}")
    summary_path = (results_dir if args.inplace else out) / "SUMMARY.md"
    summary_path.write_text(summary(results_dir, profile))
    if args.inplace:  # the reading list links papers to notebooks: keep it in step
        from peft_from_scratch import bib
        bib.README_PATH.write_text(bib.render_reading_list())
    print(f"summary: {summary_path}")
    if failed:
        print(f"failed notebooks: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
