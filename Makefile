# pureopt: `make demo` and `make test` work on a fresh machine with nothing else done.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is pinned first: the CPU build of 2.13.0 is on local disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
XDIST ?= -n 2

.PHONY: venv demo test lint unit bench docs clean
DOCS_STAMP := $(VENV)/.docs-installed

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

unit: $(STAMP)
	$(PY) -m pytest $(XDIST) -q

test: lint unit docs

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[docs]"
	touch $(DOCS_STAMP)

# The documentation site (docs/, mkdocs.yml; API reference from the docstrings); warnings are errors.
docs: $(DOCS_STAMP)
	$(PY) -m mkdocs build --strict -q

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/step.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist site *.egg-info
