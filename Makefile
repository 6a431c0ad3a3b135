# The README's two commands: `make demo` (set up + end-to-end demo) and `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
AOT_STAMP := $(VENV)/.installed-aot
DEMO_OUT ?= demo_out

.PHONY: setup setup-aot accel demo test lint format test-demo test-journey test-paper test-all test-setup \
	test-py312 test-bucket clean

# What `make setup` installs JAX for: cpu (jaxlib alone), gpu (the `gpu` extra: JAX's CUDA 12 plugin, NVIDIA)
# or tpu (the `tpu` extra: libtpu, a Cloud TPU VM); beside the test, interop and beam extras. Left out: what
# $(VENV) was set up for, else detected (`make accel` says what and why). Given and not what $(VENV) was set
# up for, $(VENV) is made anew.
ACCEL ?=
BASE_EXTRAS := test,interop,beam
SUPPORTED_PYTHONS := 3.11 3.12 3.13
INSTALLED_ACCEL := $(shell cat $(STAMP) 2>/dev/null)
ifneq ($(filter-out cpu gpu tpu,$(ACCEL)),)
$(error ACCEL=$(ACCEL): use cpu, gpu or tpu, or leave ACCEL out to detect this machine's (make accel))
endif
ifneq ($(ACCEL),)
ifneq ($(ACCEL),$(INSTALLED_ACCEL))
.PHONY: $(STAMP)
endif
endif

# Detection, first found: a TPU chip on the PCI bus (Google's vendor id 0x1ae0 with a TPU device id, JAX's own
# test) or a TPU v2-v4 device $(DEV)/accelN -> tpu; nvidia-smi on PATH or $(DEV)/nvidia0 -> gpu; GCE's metadata
# server naming an accelerator-type (a TPU VM; 2 s at most, elsewhere it fails at once) -> tpu; else cpu.
# Prints the choice and why. The locations are variables so that tests can point them elsewhere.
PCI_DEVICES ?= /sys/bus/pci/devices
DEV ?= /dev
NVIDIA_SMI ?= nvidia-smi
TPU_METADATA ?= http://metadata.google.internal/computeMetadata/v1/instance/attributes/accelerator-type
TPU_PCI_IDS := 0x0027 0x0056 0x005e 0x0062 0x0063 0x006f 0x0076
DETECT_ACCEL = ( \
	for d in $(PCI_DEVICES)/*; do \
		grep -qsx 0x1ae0 "$$d/vendor" && grep -qsx $(addprefix -e ,$(TPU_PCI_IDS)) "$$d/device" \
			&& { echo "tpu (a TPU chip on the PCI bus: $$d)"; exit 0; }; \
	done; \
	for a in $(DEV)/accel[0-9]*; do [ -e "$$a" ] && { echo "tpu (a TPU device: $$a)"; exit 0; }; done; \
	command -v $(NVIDIA_SMI) >/dev/null 2>&1 && { echo "gpu (nvidia-smi: $$(command -v $(NVIDIA_SMI)))"; exit 0; }; \
	[ -e $(DEV)/nvidia0 ] && { echo "gpu ($(DEV)/nvidia0)"; exit 0; }; \
	t=$$(curl -fsS -m 2 -H Metadata-Flavor:Google $(TPU_METADATA) 2>/dev/null) && [ -n "$$t" ] \
		&& { echo "tpu (GCE metadata: accelerator-type $$t)"; exit 0; }; \
	echo "cpu (no TPU chip, no nvidia-smi or $(DEV)/nvidia0, no accelerator-type in GCE metadata)" )

# Before a venv is made: $(PYTHON) must be one setup.py supports (a stock Cloud TPU VM's python3 is older).
CHECK_PYTHON = v=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true); \
	case " $(SUPPORTED_PYTHONS) " in *" $$v "*) ;; *) \
	echo "make setup: $(PYTHON) is $${v:+Python }$${v:-not found}; echoclip-jax needs Python 3.11, 3.12 or 3.13." >&2; \
	echo "  One installed already (e.g. the image's own python3.12):  make setup PYTHON=python3.12" >&2; \
	echo "  Or with uv:  python3 -m pip install --user uv && ~/.local/bin/uv python install 3.12" >&2; \
	echo "               make setup PYTHON=\"\$$(~/.local/bin/uv python find 3.12)\"" >&2; \
	echo "  Or with pyenv:  pyenv install 3.12 && make setup PYTHON=\"\$$(pyenv root)/versions/3.12.<x>/bin/python3.12\"" >&2; \
	exit 1;; esac

$(STAMP): setup.py
	@set -e; accel="$(or $(ACCEL),$(INSTALLED_ACCEL))"; \
	if [ -z "$$accel" ]; then \
		set -- $$( $(DETECT_ACCEL) ); accel=$$1; shift; \
		echo "make setup: ACCEL=$$accel, detected: $$*; to choose: make setup ACCEL=cpu|gpu|tpu"; \
	fi; \
	if [ -n "$(INSTALLED_ACCEL)" ] && [ "$$accel" != "$(INSTALLED_ACCEL)" ]; then \
		echo "make setup: $(VENV) was set up for $(INSTALLED_ACCEL); making it anew for $$accel"; rm -rf $(VENV); \
	fi; \
	if [ ! -x $(PY) ]; then $(CHECK_PYTHON); $(PYTHON) -m venv $(VENV); fi; \
	extras=$(BASE_EXTRAS); [ "$$accel" = cpu ] || extras=$$extras,$$accel; \
	echo "make setup: pip install -e \".[$$extras]\" into $(VENV)"; \
	$(PY) -m pip install --quiet --upgrade "pip==25.3"; \
	$(PY) -m pip install --quiet -e ".[$$extras]"; \
	echo $$accel > $(STAMP)

setup: $(STAMP)

accel:
	@$(if $(ACCEL),echo "$(ACCEL) (ACCEL given)",$(DETECT_ACCEL))

# libtpu where there is no TPU: compiles the train step for TPU topologies (python -m echoclip_jax.aot,
# tests/echoclip_jax/test_aot.py), so `make test` installs it too. On a TPU VM `make setup` has it already.
$(AOT_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[tpu]"
	touch $(AOT_STAMP)

setup-aot: $(AOT_STAMP)

demo: $(STAMP)
	$(PY) -m echoclip_jax.demo --out $(DEMO_OUT)

test: $(AOT_STAMP)
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

# Training on a bucket (a real GCS server on 127.0.0.1): killed mid-save and resumed bit-identical, with one
# process and with two sharing the gs:// workdir; the server stopped mid-save; `evaluate --watch` beside training.
test-bucket: $(STAMP)
	$(PY) -m pytest -q -m slow tests/echoclip_jax/test_bucket_runs.py

test-paper: $(AOT_STAMP)
	$(PY) -m pytest -q -m slow tests/echoclip_jax/test_journey.py tests/echoclip_jax/test_aot.py::test_echoclip_compiles_for_v5e_and_fits

# The gpu and tpu extras resolve against PyPI to their pins, with everything `make setup` installs beside them
# (run by CI; needs PyPI).
test-setup: $(STAMP)
	$(PY) -m pytest -q -m slow tests/test_setup.py

# A fast subset on Python 3.12 in its own venv with the test extra only (run by CI). PYTHON312: python3.12
# when it runs, else pyenv's.
PYTHON312 ?= $(shell for p in python3.12 $(HOME)/.pyenv/versions/3.12*/bin/python3.12; do \
	"$$p" -c "" 2>/dev/null && { echo "$$p"; break; }; done)
VENV312 ?= $(VENV)/py312
PY312_TESTS ?= tests/echoclip_jax/config tests/echoclip_jax/tokenizers tests/echoclip_jax/runtime/test_storage.py \
	tests/test_layout.py tests/test_setup.py

$(VENV312)/.installed: setup.py
	@test -n "$(PYTHON312)" || { echo "make test-py312: no Python 3.12 found: make test-py312 PYTHON312=/path/to/python3.12" >&2; exit 1; }
	$(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/python -m pip install --quiet --upgrade "pip==25.3"
	$(VENV312)/bin/python -m pip install --quiet -e ".[test]"
	touch $@

test-py312: $(VENV312)/.installed
	$(VENV312)/bin/python -m pytest -q $(PY312_TESTS)

test-all: $(AOT_STAMP)
	$(PY) -m pytest -q -m ""

clean:
	rm -rf $(VENV) $(DEMO_OUT) *.egg-info
