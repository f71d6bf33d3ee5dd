# `make demo` trains the demo model on the embedded Shakespeare corpus;
# `make test` runs the test suite on 8 simulated CPU devices.
# Both create (or reuse) .venv and install salt into it first.
# `make test-tpu` compiles real TPU programs on this CPU machine (tests/tpu) in .venv-tpu,
# which holds salt with libtpu (the `tpu` extra, ~690 MB).
# `make test-hf` holds salt's import, prepare, score and export to transformers itself
# (tests/hf) in .venv-hf, which holds salt with torch, transformers and tokenizers
# (torch's CUDA build, ~5.6 GB, runs on CPU).

VENV := .venv
STAMP := $(VENV)/.installed
TPU_VENV := .venv-tpu
TPU_STAMP := $(TPU_VENV)/.installed
HF_VENV := .venv-hf
HF_STAMP := $(HF_VENV)/.installed
HF_PINS := torch==2.14.1 transformers==5.25.0 tokenizers==0.23.3 lm_eval==0.4.13 accelerate==1.16.0
# The first interpreter that is Python >= 3.12; pyenv users get it from .python-version.
PYTHON := $(shell for p in python3 python3.13 python3.12 python; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null \
	&& { echo $$p; break; }; done)
WORKDIR ?= runs/demo

.PHONY: demo test test-fast test-tpu test-hf install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@if [ -z "$(PYTHON)" ]; then \
		echo "salt needs Python >= 3.12 and found none on PATH."; \
		echo "Install one (e.g. 'pyenv install 3.12', 'apt install python3.12-venv' or 'brew install python@3.12') and re-run."; \
		exit 1; fi
	@[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test,demo]'
	@touch $@

demo: $(STAMP)
	$(VENV)/bin/salt demo --workdir $(WORKDIR)

test: $(STAMP)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu $(VENV)/bin/python -m pytest

# The edit-test loop: everything but the tests marked slow.
test-fast: $(STAMP)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu $(VENV)/bin/python -m pytest -m 'not slow'

$(TPU_STAMP): pyproject.toml $(STAMP)
	@[ -x $(TPU_VENV)/bin/python ] || $(PYTHON) -m venv $(TPU_VENV)
	$(TPU_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TPU_VENV)/bin/python -m pip install --quiet -e '.[tpu,test]'
	@touch $@

test-tpu: $(TPU_STAMP)
	JAX_PLATFORMS=cpu $(TPU_VENV)/bin/python -m pytest tests/tpu

$(HF_STAMP): pyproject.toml $(STAMP)
	@[ -x $(HF_VENV)/bin/python ] || $(PYTHON) -m venv $(HF_VENV)
	$(HF_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(HF_VENV)/bin/python -m pip install --quiet -e '.[test]' $(HF_PINS)
	@touch $@

test-hf: $(HF_STAMP)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu $(HF_VENV)/bin/python -m pytest tests/hf

clean:
	rm -rf $(VENV) $(TPU_VENV) $(HF_VENV) runs
