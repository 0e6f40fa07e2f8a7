# Two commands do all set-up on a fresh machine: `make run` (the main job) and `make test`.
# torch is installed pinned first: an unpinned requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

.PHONY: install run test bench-deps
install: $(VENV)/.installed

# The main job. Until `rung bench` lands: the lineage side by side, from the shipped presets.
run: install
	$(VENV)/bin/rung arch gpt2 smollm2-135m qwen3-0.6b qwen3-30b-a3b gpt-oss-20b gemma3-270m

test: install
	$(PY) -m pytest -n 2 -p no:cacheprovider

# Benchmark peers (llama-cpp-python compiles for several minutes): kept out of the test install.
bench-deps: install
	$(PY) -m pip install -q -e ".[bench]"
