"""Compare two folders of notebook results (``<name>.json``), ignoring what is measured, not computed.

    python scripts/compare_results.py BEFORE_DIR AFTER_DIR

Timings, throughput and resident memory vary from run to run; every other number a notebook records
is deterministic on the CPU under its seed, so a refactoring that changes behaviour shows up here.
Exits 1 if a notebook is missing or any other value differs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

MEASURED = ("wall_time_s", "tokens_per_s", "s_per_step", "peak_memory_mb", "peak_rss_mb", "generate_s", "load_s",
            "started")


def measured(key: str) -> bool:
    return any(key == m or key.endswith(m) for m in MEASURED)


def differences(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if not measured(k):
                yield from differences(a.get(k), b.get(k), f"{path}.{k}")
    elif a != b:
        yield f"{path}: {a!r} -> {b!r}"


def main(argv: list[str]) -> int:
    before, after = (Path(p) for p in argv)
    bad = 0
    for path in sorted(before.glob("*.json")):
        other = after / path.name
        if not other.exists():
            print(f"{path.name}: missing in {after}")
            bad += 1
            continue
        diffs = list(differences(json.loads(path.read_text()), json.loads(other.read_text())))
        print(f"{path.name}: {'identical' if not diffs else 'DIFFERENT'} (measured timings and memory left out)")
        for d in diffs:
            print("   ", d)
        bad += bool(diffs)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
