"""Test-session settings shared by every test file.

``make test`` runs pytest with two workers (pytest-xdist, ``-n 2``) on the 2-core machine: each worker
then uses one torch thread, and so does every notebook kernel it starts (``PFS_THREADS``), so the two
never oversubscribe the cores. The notebook smoke runs are the longest tests; they are put first, the
longest first, so that the work-stealing scheduler ends both workers at about the same time.
"""
import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["PFS_THREADS"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(session, config, items):
    def order(item):
        if item.get_closest_marker("notebook") is not None:
            return (0, -_committed_seconds(item))
        return (1, 0)
    items.sort(key=order)   # sort is stable: everything else keeps its file order


def _committed_seconds(item) -> float:
    """The smoke run's length is unknown before it runs; the committed cpu run's length orders them."""
    import json
    from pathlib import Path
    name = item.callspec.params.get("name", "") if hasattr(item, "callspec") else ""
    path = Path(__file__).resolve().parents[1] / "notebooks" / "results" / f"{name}.json"
    try:
        return float(json.loads(path.read_text()).get("wall_time_s", 0))
    except (OSError, ValueError):
        return 0.0
