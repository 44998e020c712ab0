# The two README commands: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines: take the CPU wheel of torch before anything can pull a multi-GB CUDA build.
# Machines with an NVIDIA driver keep whatever torch>=2.4 pip picks (the library itself is not capped).
TORCH_CPU ?= torch==2.13.0

.PHONY: setup demo test lint fmt bench clean

$(BIN)/autopar: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "NVIDIA driver found: installing torch with CUDA as pip resolves it"; \
	else \
		$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_CPU)"; \
	fi
	$(BIN)/pip install -q -e ".[dev,highs,hf]"
	@touch $@

setup: $(BIN)/autopar

demo: setup
	$(BIN)/python -m autopar.cli.demo

lint: setup
	$(BIN)/ruff check autopar cost_models tests benchmarks examples
	$(BIN)/ruff format --check autopar cost_models tests benchmarks examples

fmt: setup
	$(BIN)/ruff format autopar cost_models tests benchmarks examples
	$(BIN)/ruff check --fix autopar cost_models tests benchmarks examples

test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

bench: setup
	$(BIN)/python benchmarks/fidelity.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
