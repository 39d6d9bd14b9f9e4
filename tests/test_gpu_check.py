"""The GPU check's CPU-side parts: its arguments, the carried-wheel install, the stand-in model,
running stages within a budget, and the archive that comes back (written there, unpacked here)."""
import base64
import hashlib
import json
import subprocess
import sys
import tarfile
import zipfile

import pytest

from scripts import gpu_check as g


def test_stages_are_chosen_by_name_and_unknown_ones_are_named():
    assert [s.name for s in g.plan(g.parse([]))] == [s.name for s in g.STAGES]
    assert [s.name for s in g.plan(g.parse(["--only", "tests,bench_nf4"]))] == ["tests", "bench_nf4"]
    assert "bench_qlora" not in [s.name for s in g.plan(g.parse(["--skip", "bench_qlora"]))]
    with pytest.raises(SystemExit):
        g.parse(["--only", "tests,bench_typo"])
    with pytest.raises(SystemExit):
        g.parse(["--budget-s", "0"])


def test_without_cuda_it_refuses_unless_asked(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert g.main(["--only", "env"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def _wheel(folder, name="pfs_probe", version="0.1"):
    """A minimal valid wheel holding one module, ``pfs_probe.VALUE = 42``."""
    files = {f"{name}.py": b"VALUE = 42\n",
             f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(b).digest()).rstrip(b'=').decode()},{len(b)}\n"
                     for p, b in files.items()) + f"{name}-{version}.dist-info/RECORD,,\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, b in files.items():
            z.writestr(p, b)
        z.writestr(f"{name}-{version}.dist-info/RECORD", record)
    return path


def test_carried_wheels_install_into_the_site_folder(tmp_path):
    wheels, site = tmp_path / "whl", tmp_path / "site"
    wheels.mkdir()
    assert g.install_wheels(wheels, site) == []                      # nothing carried: nothing to do
    _wheel(wheels)
    assert g.install_wheels(wheels, site) == ["pfs_probe-0.1-py3-none-any.whl"]
    out = subprocess.run([sys.executable, "-c", "import pfs_probe; print(pfs_probe.VALUE)"],
                         env={"PYTHONPATH": str(site)}, capture_output=True, text=True)
    assert out.stdout.strip() == "42"
    (wheels / "broken-0.1-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(RuntimeError, match="installing the carried wheels"):
        g.install_wheels(wheels, site)


def test_stand_in_has_the_configured_shapes_and_random_weights(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig
    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(tmp_path)
    g.make_stand_in(tmp_path, seed=0)
    assert (tmp_path / "RANDOM_WEIGHTS").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.model.layers[0].mlp.up_proj.weight.shape == (48, 32) and len(model.model.layers) == 2
    again = tmp_path / "again"
    again.mkdir()
    (again / "config.json").write_text((tmp_path / "config.json").read_text())
    g.make_stand_in(again, seed=0)                                   # seeded: the same weights
    other = AutoModelForCausalLM.from_pretrained(again)
    assert all((p == q).all() for p, q in zip(model.parameters(), other.parameters()))


def test_stages_run_within_the_budget_and_failures_are_recorded(tmp_path):
    stages = [g.Stage("ok", ("-c", "print('fine')"), 30), g.Stage("bad", ("-c", "raise SystemExit(3)"), 30),
              g.Stage("slow", ("-c", "import time; time.sleep(5)"), 1), g.Stage("late", ("-c", "pass"), 30)]
    records = g.run_stages(stages, budget_s=40, env={"PATH": ""}, logs=tmp_path)
    status = {r["stage"]: r["status"] for r in records}
    assert status["ok"] == "passed" and status["bad"] == "failed" and status["slow"].startswith("timed out")
    assert (tmp_path / "ok.log").read_text().strip() == "fine"
    records = g.run_stages(stages[:1], budget_s=10, env={}, logs=tmp_path)     # too little left for a 30 s stage
    assert records[0]["status"] == "skipped"


def test_the_archive_carries_new_results_and_unpacks_here(tmp_path):
    there, here, out, logs = tmp_path / "there", tmp_path / "here", tmp_path / "out", tmp_path / "logs"
    there.mkdir(), logs.mkdir()
    old = there / "old.json"
    old.write_text("{}")
    import os
    os.utime(old, (1, 1))                                            # written before the check: left out
    (there / "nf4_nvidia-h200.json").write_text('{"x": 1}')
    (logs / "tests.log").write_text("3 passed")
    summary = {"device": "NVIDIA H200", "started": "2026-12-01 00:00", "budget_s": 480, "wheels": [],
               "weights": "a stand-in", "stages": [{"stage": "tests", "status": "passed", "seconds": 1.0, "log": "tests.log"}]}
    archive = g.pack(out, there, since=100, logs=logs, summary=summary)
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert "nf4_nvidia-h200.json" in names and "old.json" not in names
    assert {"gpu_check/gpu_check.json", "gpu_check/gpu_check.md", "gpu_check/logs/tests.log"} <= names
    written = g.unpack(archive, here)
    assert json.loads((here / "gpu_check" / "gpu_check.json").read_text())["device"] == "NVIDIA H200"
    assert (here / "nf4_nvidia-h200.json") in written
    assert "| tests | passed |" in (here / "gpu_check" / "gpu_check.md").read_text()


def test_unpack_refuses_paths_outside_the_results(tmp_path):
    evil = tmp_path / "evil.tar.gz"
    payload = tmp_path / "x.json"
    payload.write_text("{}")
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(payload, arcname="../escaped.json")
    with pytest.raises(ValueError, match="refusing to extract '../escaped.json'"):
        g.unpack(evil, tmp_path / "results")
    assert not (tmp_path / "escaped.json").exists()


def test_a_cpu_run_end_to_end_writes_the_summary(tmp_path, monkeypatch):
    """The whole script, the env stage only, on this machine (--allow-cpu): the archive comes back.
    The stage's limit is raised: under the test suite's load, importing torch can take a minute."""
    monkeypatch.setattr(g, "STAGES", tuple(g.Stage(s.name, s.argv, 600) for s in g.STAGES))
    rc = g.main(["--allow-cpu", "--only", "env", "--out", str(tmp_path), "--results", str(tmp_path / "results"),
                 "--wheels", str(tmp_path / "none"), "--gpu-dir", str(tmp_path / "none")])
    with tarfile.open(tmp_path / g.ARCHIVE) as tar:
        summary = json.load(tar.extractfile("gpu_check/gpu_check.json"))
        env_log = tar.extractfile("gpu_check/logs/env.log").read().decode()
    assert rc == 0 and summary["device"] == "cpu (--allow-cpu)", summary
    assert summary["stages"][0]["status"] == "passed" and json.loads(env_log)["torch"]
    assert (tmp_path / "gpu_check.md").exists()                      # the summary beside the archive, to read there
