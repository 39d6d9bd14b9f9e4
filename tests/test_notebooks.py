"""Every notebook and every exercise-solutions notebook: committed as run, clean, and executed in the smoke profile.

For each chapter ``notebooks/NN_*.ipynb`` and each ``notebooks/solutions/NN_*_solutions.ipynb``:

1. the committed ``.ipynb`` has the same code as its jupytext ``.py`` twin, a ``parameters`` cell,
   and the outputs of a real run in the cpu or gpu profile (with the device named);
2. its committed outputs are clean: few stream outputs, none of the library warnings we silence,
   no machine paths, no error;
3. executed with papermill (``profile="smoke"``, through the suite runner's ``execute``) into a
   temporary folder, it records at least one check and every check holds, and every verdict was
   computed by the rule (one of ``verdicts.VERDICTS``, with its rule, our numbers and interval)
   for a claim of ``references/claims.toml``. The checks are the notebook's own statement of what
   its results must satisfy; this file adds no expectations of its own;
4. the outputs of every cell marked ``# NBVAL_CHECK_OUTPUT`` (outputs that do not depend on the
   profile: parameter counts, equivalence checks) are compared, as nbval does, with the committed ones.
"""
import copy
import json
import math
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbval.plugin import coalesce_streams

from peft_from_scratch import bib
from peft_from_scratch.verdicts import VERDICTS
from scripts import run_notebooks as runner

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SOLUTIONS = NOTEBOOKS / "solutions"
CHAPTERS = sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
PATHS = {p.stem: p for p in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")) + sorted(SOLUTIONS.glob("[0-9][0-9]_*.ipynb"))}
ALL = list(PATHS)

MAX_STREAMS = 30
WARNINGS = ("TqdmWarning", "FutureWarning", "DeprecationWarning", "UserWarning", "LOAD REPORT",
            "Failed to load CPU gemm", "IProgress not found", "Kernel is running over TCP")
MACHINE_PATHS = ("site-packages/", "/home/", "/root/", "/work/", "/tmp/")


def test_every_notebook_is_found():
    """What this file and the suite runner execute: every twin has a notebook, every solution a chapter."""
    assert CHAPTERS, "no notebooks found"
    twins = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py")) + sorted(SOLUTIONS.glob("[0-9][0-9]_*.py"))
    lonely = [p.name for p in twins if p.stem not in PATHS]
    assert not lonely, f"{lonely} have no .ipynb, so nothing runs them: `jupytext --to ipynb` them"
    orphans = [n for n, p in PATHS.items() if p.parent == SOLUTIONS
               and not (n.endswith("_solutions") and n.removesuffix("_solutions") in CHAPTERS)]
    assert not orphans, f"solutions must be named <chapter>_solutions after a chapter of {CHAPTERS}: {orphans}"
    assert [p.stem for p in runner.notebooks()] == ALL, "the suite runner lists other notebooks than the tests"


def _code(nb):
    return [c.source.strip() for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("name", ALL)
def test_committed_notebook_is_synced_and_executed(name):
    path = PATHS[name]
    nb = nbformat.read(path, as_version=4)
    twin = path.with_suffix(".py")
    assert twin.exists(), f"{twin.name} missing: pair it with `jupytext --set-formats ipynb,py:percent`"
    assert _code(jupytext.read(twin)) == _code(nb), \
        f"{path.name} and {twin.name} differ: run `python scripts/run_notebooks.py --inplace {name}`"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert any("parameters" in c.metadata.get("tags", []) for c in code), "no cell tagged 'parameters'"
    assert all(c.get("execution_count") for c in code), "committed without the outputs of a full run"
    header = "".join(o.get("text", "") for c in code[:3] for o in c.outputs)
    assert f"notebook {name} | profile " in header and " | device " in header
    assert "profile smoke" not in header, "commit the outputs of a cpu or gpu run, not of the smoke profile"


def dirt(nb) -> list[str]:
    """What a committed notebook should not show: too many stream outputs, warnings, machine paths, errors."""
    problems = []
    outputs = [(i, o) for i, c in enumerate(nb.cells) if c.cell_type == "code" for o in c.outputs]
    streams = sum(o.output_type == "stream" for _, o in outputs)
    if streams > MAX_STREAMS:
        problems.append(f"{streams} stream outputs (at most {MAX_STREAMS}: one finished line per training run)")
    for i, o in outputs:
        if o.output_type == "error":
            problems.append(f"cell {i} raised {o.ename}")
        text = "\n".join(_text_of(o))
        problems += [f"cell {i} shows {w!r}: silence it at its source" for w in WARNINGS if w in text]
        problems += [f"cell {i} shows a machine path ({p!r})" for p in MACHINE_PATHS if p in text]
    return problems


def _text_of(output) -> list[str]:
    """Every text a reader sees in an output (images left out: base64 is not text)."""
    if output.output_type == "stream":
        return [output.text]
    if output.output_type == "error":
        return [output.ename, output.evalue, *output.traceback]
    return [v if isinstance(v, str) else json.dumps(v) for k, v in output.get("data", {}).items()
            if k.startswith("text/") or k.endswith("json")]


@pytest.mark.parametrize("name", ALL)
def test_committed_outputs_are_clean(name):
    problems = dirt(nbformat.read(PATHS[name], as_version=4))
    assert not problems, f"{name}: " + "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else "")


def test_clean_outputs_check_can_fail():
    new = nbformat.v4
    stream = lambda text, name="stdout": new.new_output("stream", name=name, text=text)
    clean = new.new_notebook(cells=[new.new_code_cell("x", outputs=[stream("trained 100 steps\n")])])
    assert dirt(clean) == []
    for output in (stream("foo.py:3: FutureWarning: bar\n", "stderr"), stream("saved to /home/me/x\n"),
                   new.new_output("execute_result", data={"text/plain": "'/work/main/.venv/lib/site-packages/x'"}),
                   new.new_output("error", ename="ValueError", evalue="bad", traceback=[])):
        assert dirt(new.new_notebook(cells=[new.new_code_cell("x", outputs=[output])])), output
    chatty = new.new_notebook(cells=[new.new_code_cell("x", outputs=[stream(f"{i}\n") for i in range(MAX_STREAMS + 1)])])
    assert dirt(chatty)
    image = new.new_output("display_data", data={"image/png": "AAAA/tmp/BBBB", "text/plain": "<Figure>"})
    assert dirt(new.new_notebook(cells=[new.new_code_cell("x", outputs=[image])])) == []


def result_problems(result: dict, name: str, claims: dict) -> list[str]:
    """What is wrong with a smoke run's results file: a check that failed, none at all, or a verdict
    not computed by the rule for a known claim."""
    problems = []
    if result.get("notebook") != name or result.get("profile") != "smoke":
        problems.append(f"the results are of {result.get('notebook')!r} in the {result.get('profile')!r} profile")
    checks = result.get("checks") or {}
    if not checks:
        problems.append("the notebook recorded no check (run.check(...))")
    problems += [f"check failed: {k}" for k, ok in checks.items() if ok is not True]
    for claim, v in (result.get("verdicts") or {}).items():
        if claim not in claims:
            problems.append(f"verdict on {claim!r}, which is not a claim of references/claims.toml")
        if v.get("verdict") not in VERDICTS:
            problems.append(f"{claim}: verdict {v.get('verdict')!r} is not one of {VERDICTS}")
        if not v.get("rule"):
            problems.append(f"{claim}: no rule (or, when not testable, no reason) recorded")
        if v.get("verdict") != "not testable at this scale":
            iv = v.get("interval") or {}
            numbers = [iv.get(k) for k in ("low", "estimate", "high")]
            if not v.get("ours"):
                problems.append(f"{claim}: no numbers of ours")
            if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in numbers) or sorted(numbers) != numbers:
                problems.append(f"{claim}: the interval {iv or None} is not low <= estimate <= high")
    return problems


def test_result_check_can_fail():
    claims = bib.claims()
    claim = next(iter(claims))
    ok = {"verdict": "direction reproduced", "rule": "x >= 0; interval ...", "ours": "0.3 vs 0.2",
          "interval": {"estimate": 0.1, "low": -0.05, "high": 0.2, "method": "bootstrap"}}
    good = {"notebook": "02_lora", "profile": "smoke", "checks": {"a": True}, "verdicts": {claim: ok}}
    assert result_problems(good, "02_lora", claims) == []
    untestable = {"verdict": "not testable at this scale", "rule": "every method solves 0 of 24", "ours": "", "interval": None}
    assert result_problems({**good, "verdicts": {claim: untestable}}, "02_lora", claims) == []
    for bad in ({"checks": {}}, {"checks": {"a": True, "b": False}}, {"profile": "cpu"},
                {"verdicts": {"no_such_claim": ok}}, {"verdicts": {claim: {**ok, "verdict": "PASS"}}},
                {"verdicts": {claim: {**ok, "rule": ""}}}, {"verdicts": {claim: {**ok, "ours": ""}}},
                {"verdicts": {claim: {**ok, "interval": {"estimate": 0.3, "low": -0.05, "high": 0.2}}}},
                {"verdicts": {claim: {**ok, "interval": None}}}):
        assert result_problems({**good, **bad}, "02_lora", claims), bad


@pytest.mark.notebook
@pytest.mark.parametrize("name", ALL)
def test_notebook_smoke_run(name, tmp_path):
    executed = tmp_path / f"{name}.ipynb"
    runner.execute(PATHS[name], executed, "smoke", tmp_path)
    result = json.loads((tmp_path / f"{name}.json").read_text())
    problems = result_problems(result, name, bib.claims())
    assert not problems, f"{name} in the smoke run: " + "; ".join(problems)

    committed = nbformat.read(PATHS[name], as_version=4)
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
