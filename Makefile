# Two commands do the whole set-up on a fresh machine:
#   make run    create .venv, install loopus, run the main job on the embedded Gemma 3 270M
#   make test   create .venv, install loopus, run the test suite
PYTHON ?= python3
VENV ?= .venv
LOOPUS_DATA ?= $(abspath ../shared/data)
export LOOPUS_DATA
# CPU wheel of PyTorch by default; GPU users: make TORCH_SPEC="torch==2.13.0" PIP_TORCH_INDEX=... (see README)
TORCH_SPEC ?= torch==2.13.0
PROFILE ?= quick

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/loopus run --profile $(PROFILE)

test: install
	$(VENV)/bin/python -m pytest -q

.PHONY: install run test
