#!/usr/bin/env bash
# One short GPU session: the CUDA tests, then the int8 benchmarks on the GPU, results under $OUT
# (or ./gpu_results). Meant for a lent GPU machine; nothing here runs on a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_results}"
mkdir -p "$out"
# The GPU image has torch, pytest and the other dependencies but no network: run from the source
# tree instead of installing the package.
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python() { python3 "$@"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python -m pytest -q -m cuda tests 2>&1 | tee "$out/cuda_tests.txt"
python benchmarks/linear_step.py --device cuda --json "$out/linear_step.json" | tee "$out/linear_step.txt"
python benchmarks/train_step.py --device cuda --json "$out/train_step.json" | tee "$out/train_step.txt"
# int8 Conv2d on CUDA: im2col + torch._int_mm (never run on a GPU before this script; its
# CUDA tests are in the pytest run above); shapes _int_mm cannot run fall back to simulate.
python benchmarks/conv_step.py --device cuda --json "$out/conv_step.json" | tee "$out/conv_step.txt"
