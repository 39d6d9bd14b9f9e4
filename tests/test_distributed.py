"""The training loop under PyTorch distributed: 2 processes on this CPU (gloo), DDP and FSDP.

One launch (``accelerate launch --multi_gpu --num_processes 2``, which on a machine without GPUs
starts CPU processes on gloo) trains every case of ``tests/distributed_worker.py`` (every registered
adapter method's tiny-Llama examples, peft's LoRA, full fine-tuning and QLoRA, each under DDP and
FSDP) for 3 steps on batches of 4 rows, 2 per rank. Here the same cases train in one process on the
same batches, and:

* the trained tensors agree to 1e-6 absolute + 1e-5 relative (the rounding of averaging two
  half-batch gradients instead of taking one; measured at most 1.2e-7), tensors that moved by at
  least 1e-3, so the agreement is not that of untrained tensors;
* the per-step losses and gradient norms agree to 1e-5 (relative);
* the adapter saved in the parallel run loads in this process bit-exactly;
* launches that would train something else than one process are refused, naming the problem.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peft_from_scratch import core, train
from peft_from_scratch.training import distributed
from tests.distributed_worker import ACCUMULATED, CASES, MASKED, PEFT_FORMAT, batches, build, config, step, trained_state

ROOT = Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def parallel_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    distributed.launch("tests/distributed_worker.py", [out], cpu=True, cwd=ROOT)   # accelerate launch --multi_gpu
    return out


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)     # as each rank ran
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", list(CASES))
def test_parallel_run_equals_one_process(parallel_run, name):
    mode, what, optimizer = CASES[name]
    model = build(what)
    before = trained_state(model)
    accum = 2 if name in ACCUMULATED else 1
    history = train(model, batches(masked=name in MASKED), config("none", optimizer, accum), step=step(optimizer),
                    progress=False)
    alone = trained_state(model)
    parallel = torch.load(parallel_run / name / "trained.pt")
    assert parallel.keys() == alone.keys()
    moved = max((alone[k] - before[k]).abs().max().item() for k in alone)
    assert moved > 1e-3, f"the case trains nothing (largest change {moved:.2e})"
    for key in alone:
        torch.testing.assert_close(parallel[key], alone[key], rtol=RTOL, atol=ATOL, msg=lambda m: f"{key}: {m}")
    recorded = json.loads((parallel_run / name / "history.json").read_text())
    assert recorded["world_size"] == 2 and f"x 2 ranks ({mode})" in recorded["device"]
    for field in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor(recorded[field]), torch.tensor(getattr(history, field)),
                                   rtol=RTOL, atol=0.0)


@pytest.mark.parametrize("name", [n for n, (_, what, _) in CASES.items() if what not in ("full", "peft_lora")])
def test_adapter_saved_in_parallel_loads_bit_exactly(parallel_run, name):
    model = build(CASES[name][1])                      # the same base, its adapter at other values
    core.load_adapter(model, parallel_run / name / "adapter")
    saved = torch.load(parallel_run / name / "trained.pt")
    loaded = trained_state(model)
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


@pytest.mark.parametrize("name", PEFT_FORMAT)
def test_peft_format_saved_in_parallel_loads_bit_exactly(parallel_run, name):
    from peft import PeftModel
    from peft_from_scratch.interop import peft as pio
    saved = torch.load(parallel_run / name / "trained.pt")
    ours = pio.load_peft_adapter(build("plain"), parallel_run / name / "peft")
    assert all(torch.equal(v, saved[k]) for k, v in trained_state(ours).items())
    theirs = PeftModel.from_pretrained(build("plain"), parallel_run / name / "peft")
    x = batches().dataset[0]["input_ids"][None]
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=x).logits, ours(input_ids=x).logits, rtol=1e-5, atol=1e-6)


def test_bad_launches_are_refused_with_the_reason(parallel_run):
    errors = json.loads((parallel_run / "errors.json").read_text())
    assert "a batch of 3 rows does not split over 2 ranks" in errors["batch_not_divisible"]
    assert "the last batch" in errors["last_batch_not_divisible"] and "3 rows" in errors["last_batch_not_divisible"]
    assert "LomoStep does not support parallel='ddp'" in errors["step_not_parallel"]
    assert "Flora needs whole matrices" in errors["optimizer_needs_whole_matrices"]
    assert "the ranks built different models" in errors["ranks_built_different_models"]


def test_parallel_modes_need_a_launcher():
    model = build(("lora", 0))
    with pytest.raises(ValueError, match="needs several processes"):
        train(model, batches(), config("ddp"), progress=False)
    with pytest.raises(ValueError, match="parallel must be one of"):
        train(model, batches(), config("zero3"), progress=False)


@pytest.mark.parametrize("launcher, method", [("--use_fsdp", "qlora"), ("--multi_gpu", "full")])
def test_the_provided_script_equals_one_process(tmp_path, launcher, method):
    """``scripts/train_distributed.py --check``, as the README launches it (here on the tiny model):
    the parallel run equals rank 0's run alone, and the saved adapter loads bit-exactly."""
    done = distributed.launch("scripts/train_distributed.py", ["--tiny", "--check", "--method", method,
                              "--out", tmp_path], fsdp=launcher == "--use_fsdp", cpu=True, cwd=ROOT)
    result = json.loads((tmp_path / method / "result.json").read_text())
    mode = "fsdp" if launcher == "--use_fsdp" else "ddp"
    assert result["world_size"] == 2 and f"({mode})" in result["device"], result["device"]
    check = result["check"]
    assert check["passed"] and check["loaded_bit_exact"], check
    assert check["first_gradients"]["outside"] == 0 and check["first_gradients"]["total"] > 0
    assert f"{method}: 2 ranks vs one process" in done.stdout
    per_rank, whole = result["memory_per_rank"], result["memory_whole"]
    assert len(per_rank) == 2
    for part in ("frozen base", "trained weights", "optimizer state"):   # DDP replicates, FSDP shards
        held = max(r[part] for r in per_rank) / whole[part]
        assert held == 1.0 if mode == "ddp" else held < 0.75, (part, held)
