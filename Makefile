# make demo   install, build the synthetic demo set, run a real search with torchrun, evaluate, plot
# make test   install if needed, lint (ruff, mypy), run the suite (interpreter-run Triton tests in their own pass)
# make mutation  mutmut over the numeric core, data, preflight, deploy, step, evaluate (not in CI;
#                hours on two cores: run it module by module as docs/testing.md says)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-install
# Tests see two cores on CI; keep torch from oversubscribing them.
export OMP_NUM_THREADS ?= 2
export PYTHONHASHSEED := 0

.PHONY: install test test-fast test-interpret test-slow lint format demo bench clean mutation

install: $(STAMP)

$(STAMP): requirements.txt requirements-extra.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation -r requirements-extra.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) tools/typecheck.py

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# pytest exits 5 when a selection holds no test; that is not a failure of the suite.
test-fast: install
	$(PY) -m pytest -m "not interpret and not slow" $(PYTEST_ARGS) || [ $$? -eq 5 ]

# TRITON_INTERPRET must be set before triton is first imported, hence its own process.
test-interpret: install
	TRITON_INTERPRET=1 $(PY) -m pytest -m "interpret and not slow" $(PYTEST_ARGS) || [ $$? -eq 5 ]

test: lint test-fast test-interpret

test-slow: install
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# Mutation testing (config: [tool.mutmut] in pyproject.toml); mutants and results in mutants/.
# Survivors: $(VENV)/bin/mutmut results, one diff: $(VENV)/bin/mutmut show NAME.
mutation: install
	$(VENV)/bin/mutmut run --max-children $${MUTATION_JOBS:-2}
	$(VENV)/bin/mutmut results

demo: install
	$(PY) launch/demo.py

bench: install
	$(PY) bench/kernels.py --json runs/bench/kernels.json
	$(PY) bench/pipeline.py --json runs/bench/pipeline.json

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
