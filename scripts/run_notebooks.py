"""Execute the notebooks in one profile, re-running only those whose inputs changed, and summarise them.

    python scripts/run_notebooks.py                 # profile "auto": gpu if CUDA is available, else cpu
    python scripts/run_notebooks.py --profile smoke --out runs/smoke
    python scripts/run_notebooks.py 02 05           # only these (name or number prefix; 02 includes its solutions)
    python scripts/run_notebooks.py 02_lora.ipynb   # exactly this notebook
    python scripts/run_notebooks.py --force         # run every notebook, changed or not
    python scripts/run_notebooks.py --inplace       # maintainers: refresh the committed outputs

The suite is the chapters ``notebooks/00_*`` ... ``09_*`` in order, then the exercise solutions
``notebooks/solutions/NN_*_solutions``, so that each solution runs after its chapter. Every notebook
runs in its own folder, as in Jupyter, and writes its results to one results folder: ``<out>/results``
(given to it as the ``results_dir`` parameter), which is also where ``tasks.full_finetuning_*`` cache
the baselines that later notebooks of the same run read.

**Incremental.** A notebook is skipped when its results file in that folder is of the same profile
and records the same ``inputs_hash`` (``peft_from_scratch.notebook.inputs_hash``: the notebook's
``.py`` twin, the library, the data, the claims) and its executed notebook finished; ``--force``
runs it anyway. Each notebook gets one line: ``02_lora (inputs changed ...) ... done in 412 s``,
``03_dora ... skipped (inputs unchanged since the run of ...)`` or ``... FAILED ...``.

Executed notebooks go to ``--out`` (default ``runs/<profile>``), the summary to ``<out>/SUMMARY.md``:
one table of every paper claim tested (what the paper says, ours, the verdict), with each notebook's
time and device, and a line for each notebook whose checks failed. With ``--inplace`` the notebooks in
``notebooks/`` are overwritten with their executed versions (first synced from their jupytext ``.py``
twin), their own ``results_dir`` parameter is kept (``results`` from a chapter, ``../results`` from a
solution: both ``notebooks/results``, which is what the repository commits), and the summary goes to
``notebooks/results/SUMMARY.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
README = REPO / "README.md"          # its "measured times" block is refreshed by --inplace
sys.path.insert(0, str(REPO))

from peft_from_scratch import bib  # noqa: E402
from peft_from_scratch.notebook import inputs_hash, resolve_profile  # noqa: E402
from peft_from_scratch.verdicts import RULE  # noqa: E402


# ----------------------------------------------------------------------------- which notebooks, in which order

def notebooks(only: list[str] | None = None, root: Path = NOTEBOOKS) -> list[Path]:
    """The suite in the order it runs: the chapters ``NN_*.ipynb``, then ``solutions/NN_*.ipynb``.

    ``only``: names or prefixes ("02" is ``02_lora`` and ``02_lora_solutions``), or a file name for
    exactly that notebook ("02_lora.ipynb": the chapter alone)."""
    found = sorted(root.glob("[0-9][0-9]_*.ipynb")) + sorted((root / "solutions").glob("[0-9][0-9]_*.ipynb"))
    if only:
        found = [p for p in found if any(p.name == o if o.endswith(".ipynb") else p.stem.startswith(o) for o in only)]
        if not found:
            every = [p.stem for p in notebooks(root=root)]
            raise SystemExit(f"no notebook matches {only}; available: {every}")
    return found


@dataclass(frozen=True)
class Decision:
    run: bool
    why: str       # for the progress line: "inputs changed since the run of ...", "--force", ...


def decide(name: str, results_dir: Path, executed: Path, profile: str, force: bool = False) -> Decision:
    """Whether ``name`` must run, and why: only a finished run of the same profile on the same inputs stands."""
    if force:
        return Decision(True, "--force")
    path = results_dir / f"{name}.json"
    if not path.exists():
        return Decision(True, "no recorded run")
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return Decision(True, f"its results file is unreadable ({type(e).__name__})")
    when = recorded.get("finished") or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(path.stat().st_mtime))
    if recorded.get("profile") != profile:
        return Decision(True, f"the recorded run is of the {recorded.get('profile')} profile")
    if "inputs_hash" not in recorded:
        return Decision(True, "its results file records no inputs hash (an older format)")
    if recorded["inputs_hash"] != inputs_hash(name):
        return Decision(True, f"inputs changed since the run of {when}")
    if not finished(executed):
        return Decision(True, f"the executed notebook {executed.name} is missing or did not finish")
    return Decision(False, f"inputs unchanged since the run of {when}")


def finished(executed: Path) -> bool:
    """Every code cell of the executed notebook ran and none raised (papermill writes a notebook as it
    runs, so one interrupted or failed halfway has cells without an execution count, or an error)."""
    import nbformat
    try:
        nb = nbformat.read(executed, as_version=4)
    except (OSError, ValueError):
        return False
    code = [c for c in nb.cells if c.cell_type == "code"]
    return all(c.get("execution_count") for c in code) and not any(
        o.output_type == "error" for c in code for o in c.outputs)


# ----------------------------------------------------------------------------- running one notebook

def sync_from_text(nb: Path) -> None:
    """Update the .ipynb's sources from its jupytext .py twin, keeping outputs."""
    py = nb.with_suffix(".py")
    if py.exists():
        subprocess.run([sys.executable, "-m", "jupytext", "--quiet", "--to", "ipynb", "--update", str(py)], check=True)


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """Set environment variables (inherited by the kernel) for the duration of the block."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _kernel_options(socket_dir: str) -> dict:
    """How papermill's kernel talks to us: Unix sockets in a private folder, not TCP.

    Why: on every start over TCP, ipykernel (``IPKernelApp.init_sockets``) logs "Kernel is running
    over TCP without encryption", because any local user can read a TCP kernel's traffic. The warning
    is right, so rather than hide it we use the transport it recommends: IPC (Unix domain sockets).
    jupyter_client's IPC default puts the sockets in the working directory (``kernel-ipc-1``, ...),
    where two notebooks run side by side (``pytest -n 2``) would collide, so each kernel gets a fresh
    folder (``tempfile`` makes it readable by us alone). Windows has no Unix sockets in ZeroMQ: there
    the kernel stays on TCP (local only) and logs only errors.
    """
    from traitlets.config import Config
    if os.name == "nt":
        return {"extra_arguments": ["--IPKernelApp.log_level=ERROR"]}
    return {"config": Config({"KernelManager": {"transport": "ipc", "ip": os.path.join(socket_dir, "kernel")}})}


def execute(nb: Path, out: Path, profile: str, results_dir: Path | None, timeout: int | None = None,
            threads: int | None = None) -> float:
    """Run ``nb`` into ``out`` in ``nb``'s own folder; returns the seconds it took.

    With ``results_dir=None`` (``--inplace``) no parameters are injected, so the committed notebook
    keeps its own parameters cell; the profile then travels in ``$PFS_PROFILE``, which
    ``profile="auto"`` reads. ``threads`` becomes ``$PFS_THREADS`` (torch threads in the kernel)."""
    import papermill as pm
    params = {} if results_dir is None else {"profile": profile, "results_dir": str(results_dir)}
    env = {"PFS_PROFILE": profile, **({"PFS_THREADS": str(threads)} if threads else {})}
    out.parent.mkdir(parents=True, exist_ok=True)
    with _environ(env), tempfile.TemporaryDirectory(prefix="pfs-kernel-") as sockets:
        t = time.time()
        # coalesce_streams: a cell's prints, which arrive in as many pieces as the kernel flushed,
        # are saved as one stdout output (and one stderr), as Jupyter shows them
        pm.execute_notebook(str(nb), str(out), parameters=params, cwd=str(nb.parent), kernel_name="python3",
                            progress_bar=False, execution_timeout=timeout, log_output=False,
                            coalesce_streams=True, **_kernel_options(sockets))
        return time.time() - t


def failure(e: Exception) -> str:
    """One line for a notebook that raised: the error and the cell, not papermill's whole traceback."""
    from papermill.exceptions import PapermillExecutionError
    if isinstance(e, PapermillExecutionError):
        first = (e.evalue or "").strip().splitlines()[:1]
        return f"{e.ename} in cell [{e.exec_count}]: {first[0] if first else ''}"[:400]
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:400]


def failed_checks(results: Path) -> list[str]:
    try:
        return sorted(k for k, v in json.loads(results.read_text()).get("checks", {}).items() if not v)
    except (OSError, ValueError):
        return []


def run_one(nb: Path, executed: Path, results_dir: Path, profile: str, inplace: bool,
            timeout: int | None, threads: int | None) -> str | None:
    """Execute one notebook and check it left a results file of this run; returns why not, or None."""
    results = results_dir / f"{nb.stem}.json"
    before = results.stat().st_mtime_ns if results.exists() else None
    if inplace:
        sync_from_text(nb)
    try:
        execute(nb, executed, profile, None if inplace else results_dir.resolve(), timeout, threads)
    except Exception as e:  # noqa: BLE001 -- keep going: one broken notebook should not hide the others
        return f"{failure(e)} (see {_rel(executed)})"
    if not results.exists() or results.stat().st_mtime_ns == before:
        where = ("its results_dir parameter must lead there from its folder: 'results' for a chapter, "
                 "'../results' for a solution" if inplace else "does it call run.save(...)?")
        return f"it wrote no results to {_rel(results)} ({where})"
    return None


def _rel(path: Path) -> str:
    """``path`` from the repository root when it is inside it (no machine paths in what we write)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------- the summary

def summary(results_dir: Path, profile: str, unfinished: dict[str, str] | None = None) -> str:
    """SUMMARY.md: one table of every paper claim the notebooks tested, then what failed. Sorted by
    notebook and claim, so the same results always give the same page."""
    lines = [f"# Notebook results ({profile} profile)", "",
             "Written by `scripts/run_notebooks.py` from each notebook's results file: one row per paper "
             "claim a notebook tested (what the paper says, shortened: the whole claim is in "
             "`references/claims.toml` and in the notebook's \"paper vs ours\" table), our numbers, and the "
             f"verdict. The rule: {RULE}.", "",
             "| notebook | paper claim | ours | verdict | time | device |", "|---|---|---|---|---|---|"]
    broken = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            r = json.loads(path.read_text())
        except ValueError:
            broken.append(f"- `{path.stem}`: its results file is not valid JSON")
            continue
        name = r.get("notebook", path.stem)
        time_ = _duration(r.get("wall_time_s")) + ("" if r.get("profile") == profile else f" ({r.get('profile')} profile)")
        first = [time_, _cell(r.get("device", "?"))]          # once per notebook, on its first row
        verdicts = r.get("verdicts") or {}
        if not verdicts:
            lines.append(_row([name, "(no paper claim tested)", "", "", *first]))
        for i, (claim, v) in enumerate(sorted(verdicts.items())):
            lines.append(_row([name, _claim(claim, v), _cell(v.get("ours", "")), f"**{v.get('verdict', '?')}**",
                               *(first if i == 0 else ["", ""])]))
        if "checks" not in r:
            broken.append(f"- `{name}`: its results file has no checks (an older format): run it again")
        bad = sorted(k for k, ok in (r.get("checks") or {}).items() if not ok)
        if bad:
            broken.append(f"- `{name}`: checks failed: {', '.join(f'`{k}`' for k in bad)}")
    for name, why in sorted((unfinished or {}).items()):
        broken.append(f"- `{name}` did not finish in the last run of the suite: {_cell(why)}")
    if broken:
        lines += ["", "## Failed", "", *broken]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the README's measured times

TIMES_START = "<!-- measured times: written by scripts/run_notebooks.py --inplace; do not edit -->"
TIMES_END = "<!-- end of measured times -->"


def times_table(results_dir: Path) -> str:
    """The README's table of what each committed notebook took, read from its results file."""
    lines = ["| notebook | profile | time | device | run finished |", "|---|---|---|---|---|"]
    for path in sorted(results_dir.glob("*.json")):
        try:
            r = json.loads(path.read_text())
        except ValueError:
            continue
        lines.append(_row([r.get("notebook", path.stem), r.get("profile", "?"), _duration(r.get("wall_time_s")),
                           _cell(r.get("device", "?")), _cell(r.get("finished", "?"))]))
    return "\n".join(lines)


def with_times(readme: str, results_dir: Path) -> str:
    """``readme`` with the block between the two markers replaced by ``times_table``."""
    head, sep, rest = readme.partition(TIMES_START)
    _, sep2, tail = rest.partition(TIMES_END)
    if not (sep and sep2):
        raise ValueError(f"README.md has no measured-times block ({TIMES_START!r} ... {TIMES_END!r})")
    return f"{head}{TIMES_START}\n{times_table(results_dir)}\n{TIMES_END}{tail}"


def _row(cells: list[str]) -> str:
    return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"


def _claim(claim: str, v: dict) -> str:
    """'Hu et al. (2021), Table 3: GPT-2 Medium on E2E NLG: LoRA ... BLEU 70.4, full …'."""
    try:
        who = bib.cite(v["paper"])
    except (KeyError, ValueError):
        who = v.get("paper", claim)
    return _cell(f"{who}, {v.get('where', '?')}: {_short(v.get('says', claim))}")


def _short(text: str, n: int = 100) -> str:
    text = " ".join(str(text).split())
    if len(text) <= n:
        return text
    return text[:n].rsplit(" ", 1)[0].rstrip(",;:") + " …"


def _cell(text) -> str:
    """Text that cannot break a Markdown table row."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "?"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# ----------------------------------------------------------------------------- the command

def main(argv: list[str] | None = None, root: Path = NOTEBOOKS) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="auto", help="smoke | cpu | gpu | auto (default)")
    ap.add_argument("--out", type=Path, help="folder for executed notebooks (default runs/<profile>)")
    ap.add_argument("--inplace", action="store_true", help="overwrite notebooks/ and notebooks/results")
    ap.add_argument("--force", action="store_true", help="run every notebook, even those whose inputs did not change")
    ap.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds")
    ap.add_argument("--threads", type=int, help="torch threads in each notebook (default: torch's own)")
    ap.add_argument("only", nargs="*", help="run only these notebooks (name or number prefix, or a file name for exactly one)")
    args = ap.parse_args(argv)
    profile = resolve_profile(args.profile)
    out = root if args.inplace else (args.out or REPO / "runs" / profile)
    results_dir = (root / "results") if args.inplace else out / "results"
    out.mkdir(parents=True, exist_ok=True)
    unfinished: dict[str, str] = {}       # notebooks that raised or wrote no results, and why
    failing: list[str] = []               # those, and those whose checks failed
    counts = {"ran": 0, "skipped": 0}
    t0 = time.time()
    for nb in notebooks(args.only, root):
        executed = out / nb.relative_to(root)
        plan = decide(nb.stem, results_dir, executed, profile, args.force)
        if not plan.run:
            bad = failed_checks(results_dir / f"{nb.stem}.json")   # the same inputs would fail them again
            print(f"{nb.stem} ... skipped ({plan.why})" + (f", but its checks failed: {', '.join(bad)}" if bad else ""),
                  flush=True)
            failing += [nb.stem] if bad else []
            counts["skipped"] += 1
            continue
        print(f"{nb.stem} ({plan.why}) ... ", end="", flush=True)
        t = time.time()
        why = run_one(nb, executed, results_dir, profile, args.inplace, args.timeout, args.threads)
        bad = [] if why else failed_checks(results_dir / f"{nb.stem}.json")
        if why:
            unfinished[nb.stem] = why
        elif bad:
            why = f"checks failed: {', '.join(bad)}"
        print(f"FAILED after {time.time() - t:.0f} s: {why}" if why else f"done in {time.time() - t:.0f} s", flush=True)
        failing += [nb.stem] if why else []
        counts["ran"] += 1
    summary_path = (results_dir if args.inplace else out) / "SUMMARY.md"
    results_dir.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(summary(results_dir, profile, unfinished))
    if args.inplace:  # the reading list links papers to notebooks: keep it in step
        bib.README_PATH.write_text(bib.render_reading_list())
        README.write_text(with_times(README.read_text(), results_dir))   # and the README's measured times
    print(f"{counts['ran']} run, {counts['skipped']} skipped, {len(failing)} failed"
          + (f" ({', '.join(failing)})" if failing else "") + f" in {time.time() - t0:.0f} s; summary: {summary_path}")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
