"""The benchmarks import as modules of the ``bench`` package (``python -m bench.NAME``), sharing
``bench/common.py``, with no sys.path tricks. (They are timed in bench/, never in tests.)"""
import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p.stem for p in BENCH.glob("bench_*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_benchmark_imports_as_a_module_without_sys_path_changes(name):
    source = (BENCH / f"{name}.py").read_text()
    assert "sys.path" not in source
    module = importlib.import_module(f"bench.{name}")
    assert callable(module.main)
    assert f"python -m bench.{name}" in module.__doc__
