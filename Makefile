# Two commands do the whole set-up on a fresh machine:
#   make run    create .venv, install loopus at the tested versions, run the main job on the embedded Gemma 3 270M
#   make test   create .venv, install loopus at the tested versions, run the test suite
# and one more, run by CI after `make test`:
#   make test-newest   a fresh .venv-newest with the newest releases pip resolves today, and the drift tests
PYTHON ?= python3
VENV ?= .venv
NEWEST_VENV ?= .venv-newest
LOOPUS_DATA ?= $(abspath ../shared/data)
export LOOPUS_DATA
# CPU wheel of PyTorch by default; GPU users: make TORCH_SPEC="torch==2.13.0" PIP_TORCH_INDEX=... (see README)
TORCH_SPEC ?= torch==2.13.0
# Exact versions of every other dependency, the lowest releases loopus supports (see README).
CONSTRAINTS ?= constraints.txt
PROFILE ?= quick
# What an upstream release is most likely to break: exactness, the cache, generation and adaptive exit,
# checkpoints, one training step, the lm-eval adapter and the reasoning tasks, SFT data (chat templates),
# refused input, and the server and chat (FastAPI, uvicorn, openai).
DRIFT_TESTS ?= tests/test_convert.py tests/test_checkpoint.py tests/test_cache.py tests/test_generate.py \
	tests/test_exit.py tests/test_train_objective.py tests/test_function_preserving.py tests/test_eval_lm_eval.py \
	tests/test_real_gemma.py tests/test_perplexity.py \
	tests/test_train_real.py "tests/test_train_trainer.py::test_killed_and_resumed_run_ends_bit_identical" \
	tests/test_serve.py tests/test_chat.py \
	tests/test_sft.py tests/test_reasoning_eval.py tests/test_bad_input.py tests/test_iterate_recipe.py \
	tests/test_reasoning_fewshot.py tests/test_reasoning_study.py

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --no-cache-dir --upgrade pip
	$(VENV)/bin/pip install --quiet --no-cache-dir "$(TORCH_SPEC)"
	$(VENV)/bin/pip install --quiet --no-cache-dir -c $(CONSTRAINTS) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/loopus run --profile $(PROFILE)

test: install
	$(VENV)/bin/python -m pytest -q

# Always a fresh environment without the constraints: every dependency at the newest release pip
# resolves today (torch stays TORCH_SPEC, so no CUDA build is pulled in).
test-newest:
	$(PYTHON) -m venv --clear $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/pip install --quiet --no-cache-dir --upgrade pip
	$(NEWEST_VENV)/bin/pip install --quiet --no-cache-dir "$(TORCH_SPEC)"
	$(NEWEST_VENV)/bin/pip install --quiet --no-cache-dir -e ".[dev]"
	$(NEWEST_VENV)/bin/pip list 2>/dev/null | grep -iE '^(torch|transformers|accelerate|peft|lm.eval|safetensors|tokenizers|fastapi|uvicorn|openai) '
	$(NEWEST_VENV)/bin/python -m pytest -q $(DRIFT_TESTS)

.PHONY: install run test test-newest
