# pureopt: `make demo` and `make test` work on a fresh machine with nothing else done.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is pinned first and in every later install: the CPU build of 2.13.0 is on local disk; an unpinned torch (or a
# test extra that asks for another one) would pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
XDIST ?= -n 2

.PHONY: venv demo test lint unit unit-avx2 unit-cuda bench docs clean
DOCS_STAMP := $(VENV)/.docs-installed

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[test]" $(TORCH_PIN)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

unit: $(STAMP)
	$(PY) -m pytest $(XDIST) -q

# The tests marked `bitwise` (bitwise equality between two different computations) again on torch's AVX2 kernels:
# on an AVX-512 machine this reproduces the narrower vector width, so an assertion that holds on one x86 width only
# fails here too. One process (-n 0): starting workers costs more than these ~180 tests (under a minute).
unit-avx2: $(STAMP)
	ATEN_CPU_CAPABILITY=avx2 $(PY) -m pytest -n 0 -q -m bitwise

# On a machine with a CUDA device, the suite again with CUDA as the tests' default device (tests/_device.py);
# tests/test_cuda.py runs in `unit` (it skips without a GPU). Elsewhere this prints a line and does nothing.
unit-cuda: $(STAMP)
	@if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		PUREOPT_TEST_DEVICE=cuda $(PY) -m pytest $(XDIST) -q --ignore=tests/test_adapters_ddp.py \
			--ignore=tests/test_examples.py --ignore=tests/test_examples_func.py --ignore=tests/test_docs_pages.py \
			--ignore=tests/test_docs_composing.py --ignore=tests/test_cuda.py; \
	else echo "unit-cuda: no CUDA device here, skipped"; fi

test: lint unit unit-avx2 unit-cuda docs

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[docs]" $(TORCH_PIN)
	touch $(DOCS_STAMP)

# The documentation site (docs/, mkdocs.yml; API reference from the docstrings); warnings are errors.
docs: $(DOCS_STAMP)
	$(PY) -m mkdocs build --strict -q

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]" $(TORCH_PIN)
	$(PY) benchmarks/step.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist site *.egg-info
