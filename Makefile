# Two commands do everything from a fresh clone: `make quickstart` and `make test`.
# Each creates or updates the virtual environment (.venv) first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTHON ?= python3

.PHONY: venv quickstart test lint bench

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -c constraints.txt -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/debiaslab quickstart

test: lint
	$(PY) -m pytest -q -ra

lint: $(STAMP)
	$(VENV)/bin/ruff check platform jobs tests

bench: $(STAMP)
	$(PY) tests/benchmarks/bench_training.py
	$(PY) tests/benchmarks/bench_sampling.py
	$(PY) tests/benchmarks/bench_fid.py
	$(PY) tests/benchmarks/bench_ray_data.py
	$(PY) tests/benchmarks/bench_ray_train.py
	$(PY) tests/benchmarks/bench_guidance.py
	$(PY) tests/benchmarks/bench_map_memory.py
	$(PY) tests/benchmarks/bench_minority_score.py
	$(PY) tests/benchmarks/bench_tiw.py
