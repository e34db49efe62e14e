#!/usr/bin/env bash
# GPU check: the GPU tests (tests/test_gpu.py, `pytest -m gpu`) and a short benchmark of edge
# attribution on a GPT-2-small-shaped random model in bfloat16 and float32, printed as one table.
# Needs a CUDA device; downloads nothing; about 1-3 minutes on one modern GPU.
#
#   scripts/gpu_check.sh            # uses .venv/bin/python
#   PYTHON=python scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device visible to $PYTHON (torch.cuda.is_available() is False); nothing to check" >&2
    exit 1
fi
"$PYTHON" -c 'import torch; print("GPUs:", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))'

echo "== GPU tests"
"$PYTHON" -m pytest -m gpu tests/test_gpu.py -rs -p no:cacheprovider

echo "== GPU benchmark (GPT-2-small-shaped random model, 8 pairs x 64 tokens)"
"$PYTHON" benchmarks/gpu.py --device cuda --dtypes bfloat16,float32 --pairs 8 --tokens 64 --repeats 3
