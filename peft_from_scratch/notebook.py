"""What every notebook shares: the run profile, the device line, seeding, and the results file.

Every notebook starts with a papermill ``parameters`` cell::

    profile = "auto"        # "smoke" (CI, < 2 min), "cpu" (~10 min), "gpu" (the full run), or "auto"
    seed = 0
    results_dir = "results"

and then::

    run = start("02_lora", profile, seed, results_dir)
    n_train = run.pick(smoke=64, cpu=2_000, gpu=20_000)
    ...
    run.save(metrics={"bleu": bleu}, claims={"lora_matches_peft": max_err < 1e-5})

``auto`` means ``$PFS_PROFILE`` if set, else ``gpu`` when CUDA is available, else ``cpu``. The
results file (``<results_dir>/<name>.json``) holds the headline metrics and the notebook's claims,
each a boolean the notebook computed; the tests execute every notebook in the smoke profile and
assert those claims, and the suite runner summarises all results on one page.
"""
from __future__ import annotations

import json
import os
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

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

    def pick(self, smoke, cpu, gpu):
        """The value for this run's profile."""
        return {"smoke": smoke, "cpu": cpu, "gpu": gpu}[self.profile]

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda" if self.profile == "gpu" and torch.cuda.is_available() else "cpu")

    def save(self, metrics: dict, claims: dict[str, bool]) -> Path:
        """Write the headline metrics and the computed claims; print the claims as a table."""
        bad = {k: v for k, v in claims.items() if not isinstance(v, (bool, np.bool_))}
        if bad:
            raise TypeError(f"claims must be booleans computed by the notebook, got {bad}")
        record = {"notebook": self.name, "profile": self.profile, "seed": self.seed, "device": self.device,
                  "torch": torch.__version__, "wall_time_s": round(time.time() - self.started, 1),
                  "metrics": _jsonable(metrics), "claims": {k: bool(v) for k, v in claims.items()}}
        self.results_dir.mkdir(parents=True, exist_ok=True)
        path = self.results_dir / f"{self.name}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        for k, v in record["claims"].items():
            print(f"{'PASS' if v else 'FAIL'}  {k}")
        return path


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
    print(f"notebook {name} | profile {run.profile} | seed {seed} | device {run.device} | torch {torch.__version__}")
    return run


def load_results(name: str, results_dir: str | Path = "results") -> dict:
    """A recorded result of another notebook, e.g. the full fine-tuning baseline."""
    path = Path(results_dir) / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run notebooks/{name}.ipynb first "
                                f"(or `make notebooks`), which writes it")
    return json.loads(path.read_text())
