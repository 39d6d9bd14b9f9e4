"""Every notebook, executed with papermill in the smoke profile, with its recorded results asserted.

For each notebook this test
1. checks the committed ``.ipynb`` has the same code as its jupytext ``.py`` twin and carries the
   outputs of a real run in the cpu or gpu profile (with the device named);
2. executes it with papermill (``profile="smoke"``) into a temporary folder;
3. asserts the claims the notebook computed and wrote to its results file, plus the notebook's
   own expectations listed in ``EXPECTED`` below;
4. compares, as nbval does, the outputs of every cell marked ``# NBVAL_CHECK_OUTPUT`` (outputs
   that do not depend on the profile: parameter counts, equivalence checks) with the committed ones.
"""
import copy
import json
from pathlib import Path

import jupytext
import nbformat
import papermill as pm
import pytest
from nbval.plugin import coalesce_streams

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
ALL = sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def expect_overview(r):
    assert r["metrics"]["smollm2_params"] > 100_000_000 and r["metrics"]["minilm_params"] > 20_000_000


def expect_full_finetuning(r):
    m = r["metrics"]
    assert 0 <= m["sst2"]["accuracy_after"] <= 1 and m["sst2"]["steps"] > 0
    assert m["e2e"]["eval_loss_after"] < m["e2e"]["eval_loss_before"]


def expect_lora(r):
    m = r["metrics"]
    assert m["e2e"]["trainable_params"] < 0.01 * 134_515_008 and m["e2e"]["bleu"] == m["e2e"]["bleu_peft"]
    assert all(d["max_rel"] < 1e-4 for d in m["equivalence"].values())


def expect_dora(r):
    assert r["metrics"]["norm_rel_err"] < 1e-5
    assert set(r["metrics"]["correlation"]) == {"FT", "LoRA", "DoRA"}


def expect_nf4_double_quant(r):
    m = r["metrics"]
    assert m["mse"]["NF4"] < m["mse"]["Int4"] and m["mse"]["NF4"] < m["mse"]["FP4"]
    assert abs(m["bits_per_parameter"]["NF4+DQ"]["measured"] - 4.127) < 0.01
    assert 1 < m["perplexity"]["NF4+DQ"] < 1.5 * m["perplexity"]["float32"]


def expect_qlora(r):
    m = r["metrics"]
    assert m["e2e"]["QLoRA"]["test_loss"] < m["zero_shot_test_loss"]["NF4+DQ"]
    assert m["e2e"]["QLoRA"]["steps"] == m["e2e"]["LoRA"]["steps"] > 0
    assert m["equivalence"]["params"]["max_rel"] < 1e-4
    assert m["memory_mb"]["QLoRA"]["total"] < m["memory_mb"]["LoRA"]["total"] < m["memory_mb"]["full FT"]["total"]


def expect_houlsby_adapters(r):
    s = r["metrics"]["sst2"]
    assert all(0 <= s[k] <= 1 for k in s if k.startswith(("adapters_m", "top", "pfeiffer")) and "trainable" not in k)
    assert s["adapters_m8_trainable"] < s["adapters_m64_trainable"] < 22_713_986
    assert r["metrics"]["layer_max_diff"] < 1e-5
    assert r["metrics"]["adapterhub"]["params"]["max_rel"] < 1e-4 and r["metrics"]["adapterhub"]["adapter_effect"] > 0.1


def expect_prefix_tuning(r):
    e = r["metrics"]["e2e"]
    assert 0 <= e["bleu"] <= 100 and e["test_loss"] > 0 and e["zero_shot_test_loss"] > 0
    assert e["trainable_params_kept"] < e["trainable_params_training"]
    assert e["lora_same_budget"]["trainable_params"] == e["trainable_params_kept"]
    assert r["metrics"]["fold_max_diff"] < 1e-5 and r["metrics"]["ablation_test_loss"]


def expect_prompt_tuning(r):
    s = r["metrics"]["sst2"]
    assert all(0 <= s[k] <= 1 for k in ("zero_shot", "init_random", "init_vocab", "init_text", "init_labels", "p_tuning_lstm"))
    assert s["prompt_trainable_n20"] == 20 * 576
    a = r["metrics"]["agnews"]
    assert set(a) == {"zero_shot", "prompt_labels_init", "p_tuning_lstm", "majority_baseline"}
    assert all(0 <= v <= 1 for v in a.values())


def expect_rosa(r):
    g = r["metrics"]["gsm8k"]
    assert {"LoRA r=16", "SpA", "RoSA r=12"} <= set(g)
    assert len({g[k]["trainable_params"] for k in ("LoRA r=16", "SpA", "RoSA r=12")}) == 1
    assert all(0 <= g[k]["solved"] <= 1 and g[k]["test_loss"] > 0 for k in ("LoRA r=16", "SpA", "RoSA r=12"))
    e = r["metrics"]["equivalence"]
    assert e["lora"]["params"]["max_abs"] == 0                        # d = 0 is peft's LoRA bit for bit
    assert e["shira"]["grads"]["max_rel"] < 1e-5 and e["shira"]["params"]["max_abs"] <= 2 * 1e-3 * 3   # Adam's bound


EXPECTED = {"00_overview": expect_overview, "01_full_finetuning": expect_full_finetuning,
            "02_lora": expect_lora, "03_dora": expect_dora,
            "04_nf4_double_quant": expect_nf4_double_quant, "05_qlora": expect_qlora,
            "06_houlsby_adapters": expect_houlsby_adapters, "07_prefix_tuning": expect_prefix_tuning,
            "08_prompt_tuning": expect_prompt_tuning, "09_rosa": expect_rosa}


def test_every_notebook_is_listed_here():
    assert ALL, "no notebooks found"
    assert set(ALL) <= set(EXPECTED), f"add expectations for {set(ALL) - set(EXPECTED)} to EXPECTED"


def _code(nb):
    return [c.source.strip() for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("name", ALL)
def test_committed_notebook_is_synced_and_executed(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    twin = NOTEBOOKS / f"{name}.py"
    assert twin.exists(), f"{twin.name} missing: pair it with `jupytext --set-formats ipynb,py:percent`"
    assert _code(jupytext.read(twin)) == _code(nb), \
        f"{name}.ipynb and {name}.py differ: run `python scripts/run_notebooks.py --inplace {name}`"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert any("parameters" in c.metadata.get("tags", []) for c in code), "no cell tagged 'parameters'"
    assert all(c.get("execution_count") for c in code), "committed without the outputs of a full run"
    header = "".join(o.get("text", "") for c in code[:3] for o in c.outputs)
    assert f"notebook {name} | profile " in header and " | device " in header
    assert "profile smoke" not in header, "commit the outputs of a cpu or gpu run, not of the smoke profile"


@pytest.mark.notebook
@pytest.mark.parametrize("name", ALL)
def test_notebook_smoke_run(name, tmp_path):
    executed = tmp_path / f"{name}.ipynb"
    pm.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(executed), cwd=str(NOTEBOOKS),
                        parameters={"profile": "smoke", "results_dir": str(tmp_path)},
                        kernel_name="python3", progress_bar=False)
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert result["profile"] == "smoke" and result["claims"], "the notebook recorded no claims"
    failed = [k for k, v in result["claims"].items() if not v]
    assert not failed, f"{name}: claims failed in the smoke run: {failed}"
    EXPECTED[name](result)

    committed = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    ran = nbformat.read(executed, as_version=4)
    ref_cells = [c for c in committed.cells if c.cell_type == "code"]
    new_cells = [c for c in ran.cells if c.cell_type == "code" and "injected-parameters" not in c.metadata.get("tags", [])]
    assert len(ref_cells) == len(new_cells)
    for ref, new in zip(ref_cells, new_cells):
        if "NBVAL_CHECK_OUTPUT" in ref.source:
            assert _texts(new.outputs) == _texts(ref.outputs), f"{name}: output changed in cell:\n{ref.source[:300]}"


def _texts(outputs):
    """Output text as nbval compares it: stdout streams merged (nbval's own coalesce_streams) and the
    text/plain of results. stderr is left out: it holds library warnings with local paths."""
    out = []
    for o in coalesce_streams(copy.deepcopy(outputs)):
        if o.output_type == "stream":
            if o.name == "stdout":
                out.append(o.text)
        else:
            out.append(o.get("data", {}).get("text/plain"))
    return out


def test_checked_outputs_compare_text_not_just_count():
    stream = lambda text: nbformat.v4.new_output("stream", name="stdout", text=text)
    assert _texts([stream("a: True\n"), stream("b: 1\n")]) == _texts([stream("a: True\nb: 1\n")])   # chunking is ignored
    assert _texts([stream("a: True\n")]) != _texts([stream("a: False\n")])
    assert _texts([stream("x\n"), nbformat.v4.new_output("stream", name="stderr", text="warning\n")]) == ["x\n"]
