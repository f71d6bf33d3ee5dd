# `make demo` trains the demo model on the embedded Shakespeare corpus;
# `make test` runs the test suite on 8 simulated CPU devices.
# Both create (or reuse) .venv and install salt into it first.

VENV := .venv
STAMP := $(VENV)/.installed
# The first interpreter that is Python >= 3.12; pyenv users get it from .python-version.
PYTHON := $(shell for p in python3 python3.13 python3.12 python; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null \
	&& { echo $$p; break; }; done)
WORKDIR ?= runs/demo

.PHONY: demo test install clean

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

clean:
	rm -rf $(VENV) runs
