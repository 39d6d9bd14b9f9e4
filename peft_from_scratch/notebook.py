"""What every notebook shares: the run profile, the device line, seeding, checks, verdicts, results.

Every notebook starts with a papermill ``parameters`` cell::

    profile = "auto"        # "smoke" (CI), "cpu" (the CPU run), "gpu" (the full run), or "auto"
    seed = 0
    results_dir = "results"

and then::

    run = start("02_lora", profile, seed, results_dir)
    n_train = run.pick(smoke=64, cpu=2_000, gpu=20_000)
    ...
    run.check("lora_matches_peft", report.passed)                 # must hold, in every profile
    run.verdict("lora_e2e_matches_full_ft", bleu_gap, at_least=-1.0, ours="BLEU 56.1 vs 55.9")
    run.save(metrics={"bleu": bleu})

Two kinds of record, kept apart:

* **checks** are what the code guarantees (equivalence with the reference, invariants such as "merge
  then unmerge restores W0"); the tests assert every check in the smoke run;
* **verdicts** are what the experiment says about a paper's claim (``references/claims.toml``),
  computed by the one rule of ``verdicts.py`` from an interval; any verdict is a valid outcome, and
  the tests assert only that each was computed.

``auto`` means ``$PFS_PROFILE`` if set, else ``gpu`` when CUDA is available, else ``cpu``. The
results file (``<results_dir>/<name>.json``) also records the device, the wall time and a hash of
everything the run depends on (the notebook, the library, the data, the claims), so the suite runner
can skip notebooks whose inputs did not change.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import bib, verdicts as V

REPO = Path(__file__).resolve().parents[1]

PROFILES = ("smoke", "cpu", "gpu")


def resolve_profile(profile: str = "auto") -> str:
    if profile == "auto":
        profile = os.environ.get("PFS_PROFILE") or ("gpu" if torch.cuda.is_available() else "cpu")
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES} or 'auto', got {profile!r}")
    return profile


def device_name() -> str:
    """The machine in words, e.g. 'NVIDIA H100 80GB HBM3' or 'cpu: AMD EPYC 7B13 (2 threads)'."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu} ({torch.get_num_threads()} threads)"


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Run:
    name: str
    profile: str
    seed: int
    results_dir: Path
    device: str = field(default_factory=device_name)
    started: float = field(default_factory=time.time)
    checks: dict[str, bool] = field(default_factory=dict)
    verdicts: dict[str, dict] = field(default_factory=dict)

    def pick(self, smoke, cpu, gpu):
        """The value for this run's profile."""
        return {"smoke": smoke, "cpu": cpu, "gpu": gpu}[self.profile]

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda" if self.profile == "gpu" and torch.cuda.is_available() else "cpu")

    def check(self, name: str, ok) -> bool:
        """Record a check that must hold in every profile (an equivalence, an invariant)."""
        if not isinstance(ok, (bool, np.bool_)):
            raise TypeError(f"check {name!r} must be a boolean the notebook computed, got {ok!r}")
        self.checks[name] = bool(ok)
        return bool(ok)

    def verdict(self, claim: str, quantity: V.Interval | None, at_least: float | None = None,
                at_most: float | None = None, ours: str = "", not_testable: str | None = None) -> str:
        """Test a claim of ``references/claims.toml`` by the rule of ``verdicts.py``; returns the verdict.

        ``quantity``: the measured interval of the claim's quantity; ``at_least``/``at_most``: the
        inequality the claim asserts about it; ``ours``: our numbers in words, for the table.
        ``not_testable``: the reason the claim cannot be tested at this scale (then ``quantity`` may be None).
        """
        c = bib.claim(claim)
        if not_testable:
            result, rule = "not testable at this scale", not_testable
        else:
            result = V.verdict(quantity, at_least=at_least, at_most=at_most)
            bound = f">= {at_least:g}" if at_least is not None else f"<= {at_most:g}"
            rule = f"{c['quantity']} {bound}; interval {quantity} ({quantity.method})"
        self.verdicts[claim] = {"paper": c["paper"], "where": c["where"], "says": c["says"], "ours": ours,
                                "rule": rule, "interval": quantity.to_dict() if quantity else None,
                                "verdict": result}
        return result

    def verdict_table(self):
        """The "paper vs ours" table of every verdict recorded so far, as Markdown."""
        from IPython.display import Markdown
        rows = ["| claim (paper, where) | the paper | ours | rule applied | verdict |", "|---|---|---|---|---|"]
        for claim, v in self.verdicts.items():
            rows.append(f"| `{claim}` ({bib.cite(v['paper'])}, {v['where']}) | {v['says']} | {v['ours']} | "
                        f"{v['rule']} | **{v['verdict']}** |")
        return Markdown("\n".join(rows) + f"\n\nThe rule: {V.RULE}.")

    def save(self, metrics: dict) -> Path:
        """Write the metrics, checks and verdicts with the run's device, time and inputs hash."""
        record = {"notebook": self.name, "profile": self.profile, "seed": self.seed, "device": self.device,
                  "torch": torch.__version__, "wall_time_s": round(time.time() - self.started, 1),
                  "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  "inputs_hash": inputs_hash(self.name), "metrics": _jsonable(metrics), "checks": self.checks,
                  "verdicts": _jsonable(self.verdicts)}
        self.results_dir.mkdir(parents=True, exist_ok=True)
        path = self.results_dir / f"{self.name}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        for k, v in self.checks.items():
            print(f"{'PASS' if v else 'FAIL'}  {k}")
        for k, v in self.verdicts.items():
            print(f"{v['verdict']:>26}  {k}")
        print(f"this run took {record['wall_time_s'] / 60:.1f} min ({self.profile} profile, {self.device})")
        return path


def inputs_hash(name: str) -> str:
    """A hash of everything a notebook's results depend on: its source (the jupytext twin), the
    library, the data subsets and the claims file. The suite runner re-executes only on a change."""
    files = [notebook_source(name), REPO / "references" / "claims.toml"]
    files += sorted((REPO / "peft_from_scratch").rglob("*.py")) + sorted(p for p in (REPO / "data").rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        if f.exists():
            h.update(f.relative_to(REPO).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def notebook_source(name: str) -> Path:
    """The jupytext twin of notebook ``name``: ``notebooks/02_lora.py``, or, for an exercise
    solutions notebook, ``notebooks/solutions/02_lora_solutions.py``."""
    folder = REPO / "notebooks" / ("solutions" if name.endswith("_solutions") else "")
    return folder / f"{name}.py"


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, float):
        return round(x, 6)
    return x


def start(name: str, profile: str = "auto", seed: int = 0, results_dir: str | Path = "results") -> Run:
    """Resolve the profile, seed everything, print the run's header, and return the Run."""
    if os.environ.get("PFS_THREADS"):  # e.g. 1 on a shared machine: oversubscribed threads spin
        torch.set_num_threads(int(os.environ["PFS_THREADS"]))
    run = Run(name, resolve_profile(profile), seed, Path(results_dir))
    set_seed(seed)
    if run.torch_device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    quiet_for_notebooks()
    print(f"notebook {name} | profile {run.profile} | seed {seed} | device {run.device} | torch {torch.__version__}")
    print(f"the last committed run of this notebook took {recorded_time(name)}")
    return run


def quiet_for_notebooks() -> None:
    """What a committed notebook should not show, switched off where it comes from, each with why.

    * Training prints one finished line per run instead of a live bar (``training.set_progress``):
      a bar refreshes into dozens of outputs in a saved notebook.
    * ``tqdm.auto`` (imported by datasets and transformers) warns that ipywidgets is missing and
      falls back to the text bar, which is what we want.
    * transformers 5.x deprecates ``is_gradient_checkpointing``, which peft 0.21 still calls; the
      call works, the warning is about peft's next release.
    * peft warns that prompt-learning models ignore ``position_ids``; so do ours, by design (the
      prefix's own positions come first), and the notebooks say so.
    * datasets draws a bar for every ``map`` over a few hundred rows, transformers one while it
      loads weights: each becomes an output of its own.
    """
    import datasets
    import transformers
    from .training import set_progress
    set_progress("line")
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="IProgress not found")
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Position ids are not supported for parameter efficient tuning")


def recorded_time(name: str) -> str:
    """The wall time of the committed run of ``name`` (notebooks/results), for the learner's plan."""
    path = REPO / "notebooks" / "results" / f"{name}.json"
    if not path.exists():
        return "not yet recorded"
    r = json.loads(path.read_text())
    return f"{r['wall_time_s'] / 60:.1f} min in the {r['profile']} profile on {r['device']}"
