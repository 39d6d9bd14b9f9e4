"""The notebook suite runner (scripts/run_notebooks.py): order, what it skips and why, its one line per
notebook, and SUMMARY.md. Everything but the last test runs without a kernel: notebook execution is
replaced by a fake that writes what a notebook writes."""
import json
from pathlib import Path

import nbformat
import pytest
from papermill.exceptions import PapermillExecutionError

from peft_from_scratch import bib, notebook
from scripts import run_notebooks as rn

WHEN = "2025-01-02 03:04 UTC"


def _executed_notebook(path: Path, ran: bool = True, error: bool = False) -> None:
    new = nbformat.v4
    cell = new.new_code_cell("print(1)", execution_count=1 if ran else None,
                             outputs=[new.new_output("error", ename="ValueError", evalue="x", traceback=[])] if error else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(new.new_notebook(cells=[new.new_code_cell("x = 1", execution_count=1), cell]), path)


def _results(folder: Path, name: str, profile="smoke", hash_="h1", checks=None, verdicts=None, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"notebook": name, "profile": profile, "seed": 0, "device": "cpu: Test CPU (1 threads)", "torch": "2.x",
              "wall_time_s": 12.0, "finished": WHEN, "inputs_hash": hash_, "metrics": {},
              "checks": {"ok": True} if checks is None else checks, "verdicts": verdicts or {}, **extra}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(record))
    return path


def _suite(root: Path, names=("00_a", "01_b"), solutions=("01_b_solutions",)) -> Path:
    for n in names:
        _executed_notebook(root / f"{n}.ipynb")
    for n in solutions:
        _executed_notebook(root / "solutions" / f"{n}.ipynb")
    return root


# ----------------------------------------------------------------------------- order

def test_chapters_in_order_then_solutions(tmp_path):
    root = _suite(tmp_path, names=("01_b", "00_a", "10_c"), solutions=("01_b_solutions", "00_a_solutions"))
    (root / "notes.ipynb").write_text("{}")                      # not a chapter: no number
    assert [p.stem for p in rn.notebooks(root=root)] == ["00_a", "01_b", "10_c", "00_a_solutions", "01_b_solutions"]
    assert [p.stem for p in rn.notebooks(["01"], root=root)] == ["01_b", "01_b_solutions"]
    assert [p.stem for p in rn.notebooks(["01_b.ipynb"], root=root)] == ["01_b"]             # a file name: exactly it
    with pytest.raises(SystemExit, match="no notebook matches.*available.*00_a"):
        rn.notebooks(["7"], root=root)


# ----------------------------------------------------------------------------- what runs, and why

@pytest.fixture
def hashes(monkeypatch):
    """The inputs hash of every notebook, as the test sets it (the real one reads the repository)."""
    current = {}
    monkeypatch.setattr(rn, "inputs_hash", lambda name: current.get(name, "h1"))
    return current


def test_decide_skips_only_a_finished_run_of_the_same_profile_and_inputs(tmp_path, hashes):
    res, nb = tmp_path / "results", tmp_path / "02_x.ipynb"
    decide = lambda force=False, profile="smoke": rn.decide("02_x", res, nb, profile, force)
    assert decide() == rn.Decision(True, "no recorded run")
    _results(res, "02_x")
    _executed_notebook(nb)
    assert decide() == rn.Decision(False, f"inputs unchanged since the run of {WHEN}")
    assert decide(force=True) == rn.Decision(True, "--force")
    assert decide(profile="cpu") == rn.Decision(True, "the recorded run is of the smoke profile")
    hashes["02_x"] = "h2"
    assert decide() == rn.Decision(True, f"inputs changed since the run of {WHEN}")
    hashes["02_x"] = "h1"
    _executed_notebook(nb, ran=False)                            # interrupted after run.save
    assert decide().run and "did not finish" in decide().why
    _executed_notebook(nb, error=True)                           # raised after run.save
    assert decide().run
    nb.unlink()
    assert decide().run and "missing" in decide().why
    _executed_notebook(nb)
    (res / "02_x.json").write_text(json.dumps({"notebook": "02_x", "profile": "smoke", "claims": {"old": True}}))
    assert decide() == rn.Decision(True, "its results file records no inputs hash (an older format)")
    (res / "02_x.json").write_text("{not json")
    assert decide().run and "unreadable" in decide().why


def _fake_tree(root: Path) -> None:
    files = {"notebooks/02_x.py": "a", "notebooks/03_y.py": "b", "notebooks/solutions/02_x_solutions.py": "c",
             "peft_from_scratch/core/m.py": "d", "data/e2e/test.tsv": "e", "references/claims.toml": "f"}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_inputs_hash_covers_the_notebook_library_data_and_claims(tmp_path, monkeypatch):
    monkeypatch.setattr(notebook, "REPO", tmp_path)
    _fake_tree(tmp_path)
    for name, own in (("02_x", "notebooks/02_x.py"), ("02_x_solutions", "notebooks/solutions/02_x_solutions.py")):
        for rel in (own, "peft_from_scratch/core/m.py", "data/e2e/test.tsv", "references/claims.toml"):
            before = notebook.inputs_hash(name)
            (tmp_path / rel).write_text((tmp_path / rel).read_text() + " changed")
            assert notebook.inputs_hash(name) != before, f"{name}: a change of {rel} would not re-run it"
    before = notebook.inputs_hash("02_x")
    (tmp_path / "notebooks/03_y.py").write_text("another notebook changed")
    assert notebook.inputs_hash("02_x") == before, "a change of another notebook re-runs this one"


# ----------------------------------------------------------------------------- the loop, with a fake kernel

class FakeKernel:
    """Stands in for ``execute``: writes the executed notebook and the results file a notebook writes."""

    def __init__(self, hashes):
        self.hashes, self.ran, self.results_dirs, self.checks, self.raises, self.writes = hashes, [], set(), {}, {}, True

    def __call__(self, nb, out, profile, results_dir, timeout=None, threads=None):
        self.ran.append(nb.stem)
        self.results_dirs.add(results_dir)
        if nb.stem in self.raises:
            raise self.raises[nb.stem]
        _executed_notebook(out)
        if self.writes:
            _results(results_dir, nb.stem, profile, self.hashes.get(nb.stem, "h1"), checks=self.checks.get(nb.stem))
        return 0.0


@pytest.fixture
def kernel(monkeypatch, hashes):
    fake = FakeKernel(hashes)
    monkeypatch.setattr(rn, "execute", fake)
    return fake


def _main(root, out, *args):
    return rn.main(["--profile", "smoke", "--out", str(out), *args], root=root)


def test_runs_what_changed_and_says_why_on_one_line_each(tmp_path, kernel, hashes, capsys):
    root, out = _suite(tmp_path / "nbs"), tmp_path / "out"
    assert _main(root, out) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["00_a (no recorded run) ... done in 0 s", "01_b (no recorded run) ... done in 0 s",
                         "01_b_solutions (no recorded run) ... done in 0 s"]
    assert len(lines) == 4 and lines[3].startswith("3 run, 0 skipped, 0 failed")
    assert kernel.ran == ["00_a", "01_b", "01_b_solutions"]
    assert kernel.results_dirs == {(out / "results").resolve()}, "every notebook writes to one results folder"
    assert (out / "solutions" / "01_b_solutions.ipynb").exists()

    kernel.ran.clear()
    hashes["01_b"] = "h2"                                          # 01_b's inputs change
    assert _main(root, out) == 0
    lines = capsys.readouterr().out.splitlines()
    assert kernel.ran == ["01_b"]
    assert lines[0] == f"00_a ... skipped (inputs unchanged since the run of {WHEN})"
    assert lines[1] == f"01_b (inputs changed since the run of {WHEN}) ... done in 0 s"
    assert lines[2].startswith("01_b_solutions ... skipped") and lines[3].startswith("1 run, 2 skipped, 0 failed")

    kernel.ran.clear()
    assert _main(root, out, "--force", "01") == 0
    assert kernel.ran == ["01_b", "01_b_solutions"]
    assert capsys.readouterr().out.splitlines()[0] == "01_b (--force) ... done in 0 s"


def test_failures_are_one_line_counted_and_summarised(tmp_path, kernel, capsys):
    root, out = _suite(tmp_path / "nbs"), tmp_path / "out"
    kernel.raises["00_a"] = PapermillExecutionError(3, 7, "x = f()", "ValueError", "bad shape\nmore detail", ["tb"])
    kernel.checks["01_b"] = {"matches_peft": True, "merge_restores_W0": False}
    assert _main(root, out) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("00_a (no recorded run) ... FAILED after 0 s: ValueError in cell [7]: bad shape (see ")
    assert lines[1] == "01_b (no recorded run) ... FAILED after 0 s: checks failed: merge_restores_W0"
    assert lines[2] == "01_b_solutions (no recorded run) ... done in 0 s"
    assert lines[3].startswith("3 run, 0 skipped, 2 failed (00_a, 01_b) in ")
    page = (out / "SUMMARY.md").read_text()
    assert "- `00_a` did not finish in the last run of the suite: ValueError in cell [7]: bad shape" in page
    assert "- `01_b`: checks failed: `merge_restores_W0`" in page

    kernel.raises.clear()
    kernel.ran.clear()
    assert _main(root, out) == 1, "a skipped notebook whose checks failed still fails the suite"
    lines = capsys.readouterr().out.splitlines()
    assert kernel.ran == ["00_a"]
    assert lines[1] == f"01_b ... skipped (inputs unchanged since the run of {WHEN}), but its checks failed: merge_restores_W0"


def test_a_notebook_that_writes_no_results_fails(tmp_path, kernel, capsys):
    root, out = _suite(tmp_path / "nbs", names=("00_a",), solutions=()), tmp_path / "out"
    kernel.writes = False
    assert _main(root, out) == 1
    assert "FAILED after 0 s: it wrote no results to" in capsys.readouterr().out


def test_inplace_keeps_the_notebooks_own_parameters(tmp_path, kernel, monkeypatch, capsys):
    root = _suite(tmp_path / "nbs")
    synced, calls = [], []
    monkeypatch.setattr(rn, "sync_from_text", lambda nb: synced.append(nb.stem))
    monkeypatch.setattr(bib, "README_PATH", tmp_path / "reading-list.md")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{rn.TIMES_START}\nstale\n{rn.TIMES_END}\nrest\n")
    monkeypatch.setattr(rn, "README", readme)

    def in_place(nb, out, profile, results_dir, timeout=None, threads=None):   # what `results_dir = "results"` does
        calls.append((nb, out, results_dir))
        return kernel(nb, out, profile, root / "results", timeout, threads)
    monkeypatch.setattr(rn, "execute", in_place)
    assert rn.main(["--profile", "smoke", "--inplace"], root=root) == 0
    assert synced == ["00_a", "01_b", "01_b_solutions"], "each notebook is first synced from its .py twin"
    assert all(out == nb and results_dir is None for nb, out, results_dir in calls), "no injected parameters"
    assert (root / "results" / "SUMMARY.md").exists() and bib.README_PATH.exists()
    text = readme.read_text()
    assert "stale" not in text and text.startswith("intro\n") and text.endswith(f"{rn.TIMES_END}\nrest\n")
    assert "| 01_b | smoke |" in text, "the README's times come from the results files"


def test_readme_times_are_those_of_the_committed_results():
    """The README's table is the one the committed results files give (re-run --inplace to refresh it)."""
    readme = rn.README.read_text()
    assert rn.with_times(readme, rn.NOTEBOOKS / "results") == readme
    with pytest.raises(ValueError, match="no measured-times block"):
        rn.with_times("no markers here", rn.NOTEBOOKS / "results")


def test_one_line_for_an_error():
    e = PapermillExecutionError(0, 2, "src", "RuntimeError", "line one\nline two", ["a", "b"])
    assert rn.failure(e) == "RuntimeError in cell [2]: line one"
    assert rn.failure(TimeoutError("Cell execution timed out\n  after 60 s")) == "TimeoutError: Cell execution timed out after 60 s"


# ----------------------------------------------------------------------------- SUMMARY.md

def _verdict(claim, verdict, ours, says=None):
    c = bib.claims()[claim]
    return {"paper": c["paper"], "where": c["where"], "says": says or c["says"], "ours": ours, "rule": "r",
            "interval": None, "verdict": verdict}


def test_summary_is_one_sorted_table_of_every_verdict(tmp_path):
    claims = list(bib.claims())
    c1, c2 = sorted(claims)[:2]
    res = tmp_path / "results"
    long = "A very long claim | with a pipe " + "and many words " * 20
    _results(res, "02_b", verdicts={c2: _verdict(c2, "not reproduced", "BLEU 50 vs 52"),
                                    c1: _verdict(c1, "reproduced", "0.9 [0.8, 1.0]", says=long)},
             checks={"equal": True, "merge": False}, wall_time_s=412.0)
    _results(res, "00_a", device="NVIDIA H100", wall_time_s=30.0)
    (res / "baselines").mkdir()
    (res / "baselines" / "full-abc.json").write_text("{}")       # the baseline cache is not a notebook
    page = rn.summary(res, "smoke", {"03_c": "ValueError in cell [2]: x"})
    rows = [line for line in page.splitlines() if line.startswith("| ")]
    assert rows[0] == "| notebook | paper claim | ours | verdict | time | device |"
    assert rows[1] == "| 00_a | (no paper claim tested) | | | 30 s | NVIDIA H100 |"
    cite1 = f"{bib.cite(bib.claims()[c1]['paper'])}, {bib.claims()[c1]['where']}"
    assert rows[2].startswith(f"| 02_b | {cite1}: A very long claim \\| with a pipe and many words")
    assert rows[2].endswith(" … | 0.9 [0.8, 1.0] | **reproduced** | 6.9 min | cpu: Test CPU (1 threads) |")
    assert rows[3].startswith(f"| 02_b | {bib.cite(bib.claims()[c2]['paper'])}, ")
    assert rows[3].endswith("| BLEU 50 vs 52 | **not reproduced** | | |"), "time and device once per notebook"
    assert len(rows) == 4
    assert "- `02_b`: checks failed: `merge`" in page
    assert "- `03_c` did not finish in the last run of the suite: ValueError in cell [2]: x" in page
    assert rn.summary(res, "smoke", {"03_c": "ValueError in cell [2]: x"}) == page, "deterministic"


def test_summary_without_failures_has_no_failed_section(tmp_path):
    _results(tmp_path, "00_a")
    assert "## Failed" not in rn.summary(tmp_path, "smoke")
    _results(tmp_path, "01_b", profile="cpu")
    assert "| 01_b | (no paper claim tested) | | | 12 s (cpu profile) |" in rn.summary(tmp_path, "smoke")


# ----------------------------------------------------------------------------- end to end, with a kernel

TINY = '''# %% tags=["parameters"]
profile = "auto"
seed = 0
results_dir = "results"

# %%
from peft_from_scratch import verdicts
from peft_from_scratch.notebook import start
run = start("97_tiny", profile, seed, results_dir)

# %%
run.check("one_plus_one_is_two", 1 + 1 == 2)
run.verdict("{claim}", verdicts.exact(1.0), at_least=0.0, ours="1.0 exactly")
run.save(metrics={{"x": 1.0}})
'''


@pytest.mark.notebook
def test_a_tiny_notebook_end_to_end(tmp_path, capfd):
    """One real notebook through papermill: results, summary, the skip on a second pass, and no kernel warning."""
    import jupytext
    root, out = tmp_path / "nbs", tmp_path / "out"
    root.mkdir()
    claim = sorted(bib.claims())[0]
    nb = jupytext.reads(TINY.format(claim=claim), fmt="py:percent")
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    jupytext.write(nb, root / "97_tiny.ipynb")
    assert rn.main(["--profile", "smoke", "--out", str(out)], root=root) == 0
    first = capfd.readouterr()
    assert first.out.startswith("97_tiny (no recorded run) ... done in ")
    assert "Kernel is running over TCP" not in first.out + first.err, "the kernel should talk over IPC"
    result = json.loads((out / "results" / "97_tiny.json").read_text())
    assert result["profile"] == "smoke" and result["checks"] == {"one_plus_one_is_two": True}
    assert result["inputs_hash"] == notebook.inputs_hash("97_tiny")
    assert "| 1.0 exactly | **reproduced** |" in (out / "SUMMARY.md").read_text()
    assert rn.main(["--profile", "smoke", "--out", str(out)], root=root) == 0
    assert capfd.readouterr().out.startswith("97_tiny ... skipped (inputs unchanged since the run of ")
