#!/bin/bash
# The GPU work still pending across the open issues, in priority order, sized to one device call.
#
#   device tool:  run(command="bash experiments/gpu_next.sh", carry=[".carry"], timeout_s=590)
#   then here:    bash experiments/gpu_unpack.sh <files_at>    (then commit results/ and experiments/feature_cache/)
#   around both:  bash experiments/gpu_trim.sh aside / back   (the device tool's 64 MiB limit on tree + .carry;
#                 `back` before committing: while the CPU results are aside git sees them as deleted)
#
# Every step is skipped once its results are in the tree (they are committed between sessions), so the same
# call next session continues where this one stopped. No work starts after BUDGET seconds: compare and sweep
# get --time-budget, so runs already going finish. Results come back without checkpoints (too big to bring
# back): finished runs carry finished.json and their exported schedule, and the grid evaluation, which needs
# the weights, runs here in the session that trained them.
#   0 the CUDA tests (tests/test_cuda.py, test_schedules -k cuda), until their record (results/bench/cuda-tests-*) says passed;
#     then the fused optimizer's skipped step (tests/test_step_guard.py -k cuda, record cuda-tests-step-guard-*)
#   1 bench at batch 512 (and 128 once): eager vs compiled, cosine vs learned, sampling, profiled  issues 6, 3
#   2 fashion_mnist compare, then grid-eval of its cosine and laplace runs          issues 4, 8
#   3 fashion_mnist_cond compare (CFG at w = 1, 1.5, 2, 3)                          issue 9
#   4 Optuna studies on Fashion-MNIST, laplace then cauchy (30 trials each)         issue 5
#   5 fashion_tuned compare (the studies' best against defaults and learned)       issue 5
#   6 targets compare (eps / x0 / v x cosine / laplace)                           issue 4
#   7 bench concurrency (1, 2, 4, 8 processes), channels_last and CUDA graphs, learned overhead with channels_last
#     and under CUDA graphs (with their CUDA test), the issue's reference-size U-Net (bench_reference.toml) eager
#     and under CUDA graphs (all but concurrency run before step 2)                 issues 6, 3
# The steps are experiments/gpu_steps.sh, run under a hard timeout (HARD, default 560 s) so that the packing
# below always happens before the device call's own limit (keep timeout_s above HARD + 20).
# Knobs (environment): BUDGET (s, default 480), RUN_S (s a compare run may take once started, 150: a Fashion-MNIST
# run took 98 s on an H200), TRIAL_S (s a sweep trial may take, 90), JOBS (concurrent runs or sweep workers, 1:
# K runs sharing the GPU each take ~K times as long, and a run still going at the hard stop is lost), DEVICE
# (cuda), STEPS (the list of steps to
# run, default "0 1 2 3 4 5 6 7"), BENCH_ARGS (extra bench arguments, e.g. for a CPU smoke test), GRID_ARGS (extra
# grid-eval arguments, e.g. cheaper --ays-* settings for a CPU smoke test; grid-eval refuses a change of them into
# a folder that holds AYS rows).
set -uo pipefail
: "${OUT:?set OUT to the folder whose contents come back}"
export BUDGET=${BUDGET:-480} RUN_S=${RUN_S:-150} TRIAL_S=${TRIAL_S:-90} DEVICE=${DEVICE:-cuda} JOBS=${JOBS:-1}
export STEPS=${STEPS:-0 1 2 3 4 5 6 7} BENCH_ARGS=${BENCH_ARGS:-} GRID_ARGS=${GRID_ARGS:-} GPU_NEXT_START=$(date +%s)
HARD=${HARD:-560}
stamp=$(mktemp)
mkdir -p "$OUT"

{
  if compgen -G ".carry/whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
  fi
  [ -d .carry/data ] && export ADAPTIVE_SCHED_DATA=$PWD/.carry/data
  export ADAPTIVE_SCHED_CACHE=$PWD/experiments/feature_cache    # one FID network for every session
  export PYTHON=${PYTHON:-python3}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  echo "budget ${BUDGET}s (hard stop ${HARD}s); steps: $STEPS"
  # A follow-up call on a warm machine sees this checkout's results/, not what the earlier calls wrote there
  # (only ignored files, checkpoints and .gpu_calls/, survive): restore their packed results without replacing
  # this checkout's files, so their finished runs are skipped, not retrained. A run whose checkpoint is still
  # ahead of its metrics.csv cannot resume (train refuses it), so it is trained again from scratch.
  for call in .gpu_calls/*/; do
    [ -d "$call" ] && cat "$call"results.tgz.part* | tar -xzf - --skip-old-files && echo "restored ${call%/}"
  done
  "$PYTHON" -m adaptive_sched.run_checks --stale results/*/runs/*/* | while read -r run; do
    echo "leftover checkpoint ahead of its metrics: retraining $run"; rm -rf "$run"
  done
  timeout -k 15 "$HARD" bash experiments/gpu_steps.sh
  status=$?
  [ $status -eq 124 ] && echo "== hard stop at ${HARD}s: the runs still going are lost; lower BUDGET or RUN_S"

  echo "== packing results (no checkpoints)  $(date -u +%T), $(( $(date +%s) - GPU_NEXT_START ))s"
  find results experiments/feature_cache -type f -newer "$stamp" ! -name '*.pt' > "$OUT/files.txt" 2>/dev/null
  find experiments/feature_cache -type f -newer "$stamp" -name '*.pt' >> "$OUT/files.txt" 2>/dev/null
  tar -czf - -T "$OUT/files.txt" | split -b 15M -d - "$OUT/results.tgz.part" || status=1
  echo "$(wc -l < "$OUT/files.txt") files in $(ls "$OUT"/results.tgz.part* | wc -l) part(s)"
  mkdir -p ".gpu_calls/$GPU_NEXT_START" && cp "$OUT"/results.tgz.part* ".gpu_calls/$GPU_NEXT_START/"   # for follow-ups
  for f in results/fashion-mnist results/fashion-mnist-cond results/fashion-tuned results/targets; do
    [ -f "$f/results.md" ] && { echo "--- $f"; head -30 "$f/results.md"; }
  done
  for f in results/bench/*.jsonl; do
    [ "$f" -nt "$stamp" ] && "$PYTHON" -m adaptive_sched.bench_table "$f"
  done
  echo "== exit status $status"
  exit $status
} 2>&1 | tee "$OUT/log"
