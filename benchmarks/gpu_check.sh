#!/usr/bin/env bash
# One short GPU session: the CUDA tests, then the int8 and FP8 benchmarks on the GPU, results
# under $OUT (or ./gpu_results). Meant for a lent GPU machine: one command of at most 10 minutes
# (the steps' limits add up to 510 s, 560 s with their kill grace; give the run timeout_s 570,
# which leaves a 15-minute lease room for a fresh start and a short rerun). The first run, on an
# NVIDIA H200, took 245 s; its results are in docs/performance.md. Nothing here runs without a GPU.
# The second full run (312 s) ran out of time in the CUDA tests (90 s) and the Linear step (100 s)
# while the probe, the Conv2d step and the whole models took about 115 s together; the tests then
# took 82 s alone. The limits now follow that, untried, and status.txt gives each step's seconds.
#
# Every step runs whatever the one before did (a failing test must not cost the benchmarks),
# each under its own time limit, its stdout and stderr (warnings: a fallback to simulate) kept;
# status.txt lists each step's exit status (124: its time limit).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_results}"
mkdir -p "$out"
# The GPU image has torch, pytest and the other dependencies but no network: run from the source
# tree instead of installing the package.
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=python3
: > "$out/status.txt"
step() {  # step NAME SECONDS COMMAND...: run it, keep its output and exit status
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.txt" 2>&1
    echo "$name $? $((SECONDS - start))s" | tee -a "$out/status.txt"
}
# At most 8 files come back from a lent machine: the GPU and versions go into status.txt.
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} >> "$out/status.txt" 2>&1
step cuda_tests 120 $py -m pytest -q -m cuda tests -p no:cacheprovider --durations=10
# What cuBLASLt's int8 GEMM refuses, how _scaled_mm's FP8 sums round, where a step's GPU time goes.
step probe 40 $py benchmarks/gpu_probe.py
# int8 Conv2d on CUDA (issue 16): im2col + torch._int_mm; shapes _int_mm cannot run fall back to
# simulate, and the rows say so. Simulate beside it: backend="auto" keeps CUDA convolutions there.
conv='fp32,bf16*,fqt_simulate_psq5,fqt_simulate_psq5_fused,fqt_int8_psq5_fused'
step conv_step 80 $py benchmarks/conv_step.py --device cuda --repeats 5 \
    --layers r50_conv2,r50_stage3 --variants "$conv" --json "$out/conv_step.json"
# A few variants, not the full sweep: the first compiled step alone takes 12-50 s. backend="auto"
# (fused, as its default is) against simulate fused: the choice auto makes on CUDA, where it picks
# int8 for Linear layers. The Linear step's table is its text (no JSON: at most 8 files come
# back), without the int8 parts, whose own compiles outran the first run's limit. Eight variants
# outran 100 s in run 5; five took 77 s in run 6; these seven compile four of their steps.
variants='fp32,bf16*,fqt_simulate_psq5_fused,fqt_auto_psq5,fqt_simulate_bhq5_fused,fqt_auto_bhq5'
step linear_step 170 $py benchmarks/linear_step.py --device cuda --repeats 5 --no-breakdown \
    --shapes 8192x4096x1024 --variants "$variants,fqt_fp8_e4m3"
# Whole models with fewer variants: ResNet-18 alone took 120 s for six in the first runs.
step train_step 100 $py benchmarks/train_step.py --device cuda --repeats 5 \
    --models char_gpt,resnet18 --variants 'fp32,bf16*,fqt_simulate_psq5_fused,fqt_int8_psq5_fused' \
    --json "$out/train_step.json"
cat "$out/status.txt"
