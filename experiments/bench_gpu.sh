#!/bin/bash
# Issue 6 on one GPU: `adaptive-sched bench` for the standard 32x32x1 U-Net (channels 64/128/128, 2 blocks per
# level; 4.62M parameters) on Fashion-MNIST padded 28 -> 32, bf16 autocast, fused AdamW, data on the GPU.
# Run from the project root on the GPU machine, with .carry brought along (see /work/shared/GPU.md):
#     OUT=/some/folder bash experiments/bench_gpu.sh
# Writes $OUT/results/bench/<date>-<device>.jsonl (copy it to results/bench/) and $OUT/log.
#
# Budget: about 5.5 minutes on an H100, at most ~7 (each call is cut off by `timeout`; lines already written stay):
#   A  batch 128: eager and compiled x cosine and learned: each measurement 1 FLOP-count step + 10 warm-up steps
#      (compilation happens there) + 5 timed windows of 20 steps = 111 steps; then 50-step DDIM sampling of 512
#      images per mode (1 warm-up + 5 timed calls).                                        ~2.3 min, limit 160 s
#   B  batch 512: the same four training measurements, no sampling.                       ~1.8 min, limit 130 s
#   C  concurrency at batch 128, eager cosine: 1, 2, 4 and 8 processes (seeds 0..K-1) timing at the same moment,
#      each 5 warm-up steps + 3 windows of 10 steps = 35 steps (+1 FLOP count).           ~1.3 min, limit 110 s
set -uo pipefail
: "${OUT:?set OUT to the folder whose contents come back}"
mkdir -p "$OUT/results/bench"

{
  if compgen -G ".carry/whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/whl/*.whl || exit 1
  fi
  export PYTHONPATH=/tmp/site:$PWD ADAPTIVE_SCHED_DATA=$PWD/.carry/data
  device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -cs 'A-Za-z0-9' '-')
  jsonl="$OUT/results/bench/$(date -u +%Y-%m-%d)-${device:-gpu}.jsonl"
  config=$(mktemp --suffix=.toml)
  printf '[data]\nname = "fashion-mnist"\npad = 2\n\n[model]\nname = "unet"\n' > "$config"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  bench=(python3 -m adaptive_sched.bench --config "$config" --device cuda --quiet --out "$jsonl")
  status=0

  echo "== A: batch 128, eager vs compiled, cosine vs learned, sampling  $(date -u +%T)"
  timeout 160 "${bench[@]}" --batch-size 128 --compare-schedules cosine,learned --modes eager,compiled \
    --warmup 10 --steps 20 --repeats 5 --sample-steps 50 --sample-n 512 || status=1
  echo "== B: batch 512, eager vs compiled, cosine vs learned  $(date -u +%T)"
  timeout 130 "${bench[@]}" --batch-size 512 --compare-schedules cosine,learned --modes eager,compiled \
    --warmup 10 --steps 20 --repeats 5 --no-sample || status=1
  echo "== C: concurrency 1,2,4,8 at batch 128  $(date -u +%T)"
  timeout 110 "${bench[@]}" --batch-size 128 --schedule cosine --concurrent 1,2,4,8 \
    --warmup 5 --steps 10 --repeats 3 || status=1
  echo "== done $(date -u +%T): $jsonl"

  python3 -m adaptive_sched.bench_table "$jsonl"
  exit $status
} 2>&1 | tee "$OUT/log"
