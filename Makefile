# `make demo` and `make test` work on a fresh clone: they create .venv and install requirements.txt first.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: venv demo test lint bench clean validate-data

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: venv
	$(PY) train.py experiment=demo

# check a dataset before training; same overrides as train.py: make validate-data ARGS="experiment=demo"
validate-data: venv
	$(PY) validate_data.py $(ARGS)

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -m "not slow" -q

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: venv
	$(PY) -m benchmarks.speed $(BENCH_ARGS)

clean:
	rm -rf .venv outputs multirun .pytest_cache .ruff_cache
