# The README's two commands: `make demo` (set up + end-to-end demo) and `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_out

.PHONY: setup demo test lint format test-demo test-journey test-paper test-all clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip==25.3"
	$(PY) -m pip install --quiet -e ".[test,interop,beam,tpu]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m echoclip_jax.demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q

# ruff (pinned in the test extra, configured in pyproject.toml): lint and format, checked by CI before the tests
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

test-demo: $(STAMP)
	$(PY) -m pytest -q -m slow tests/echoclip_jax/test_demo.py

# The paper's configs (ConvNeXt-Base at 224, bf16) through every job (test-journey, run by CI), and the
# echoclip train step compiled for a TPU pod slice.
test-journey: $(STAMP)
	$(PY) -m pytest -q -s -m slow tests/echoclip_jax/test_journey.py

test-paper: $(STAMP)
	$(PY) -m pytest -q -m slow tests/echoclip_jax/test_journey.py tests/echoclip_jax/test_aot.py::test_echoclip_compiles_for_v5e_and_fits

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

clean:
	rm -rf $(VENV) $(DEMO_OUT) *.egg-info
