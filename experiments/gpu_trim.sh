#!/bin/bash
# Keep the device call's copy under its 64 MiB limit (working tree + .carry): move the results folders that no GPU
# step reads (results/*-cpu*, results/demo) out of the tree before the call, and back after it.
#
#   bash experiments/gpu_trim.sh aside    # before run(command="bash experiments/gpu_next.sh", carry=[".carry"], ...)
#   bash experiments/gpu_trim.sh back     # after the call(s) and gpu_unpack.sh
#   bash experiments/gpu_trim.sh size     # what the device tool would copy now, in MiB
#
# HELD (default /tmp/adaptive_sched_held-<hash of this checkout's path>, one per checkout) holds the folders in
# between; `back` refuses to overwrite a folder that reappeared in results/ (git checkout -- results restores the
# committed ones too). Run `back` before committing: while the folders are aside git sees them as deleted.
set -euo pipefail
[ -z "${HELD:-}" ] || HELD=$(realpath -m "$HELD")            # a relative HELD means from where it was called
cd "$(dirname "$0")/.."
HELD=${HELD:-/tmp/adaptive_sched_held-$(pwd -P | md5sum | cut -c1-8)}
case "$HELD/" in "$(pwd -P)/"*) echo "error: HELD ($HELD) must be outside the checkout" >&2; exit 2 ;; esac

size() {   # tracked files present + untracked files git does not ignore + .carry, in MiB
  { git ls-files -z; git ls-files -z --others --exclude-standard; } | python3 -c '
import os, sys
files = [f for f in sys.stdin.read().split("\0") if f and os.path.isfile(f)]
tree = sum(os.path.getsize(f) for f in files)
carry = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(".carry") for f in fs) if os.path.isdir(".carry") else 0
print(f"tree {tree / 2**20:.1f} MiB + .carry {carry / 2**20:.1f} MiB = {(tree + carry) / 2**20:.1f} MiB (limit 64)")'
}

case "${1:-}" in
  aside)
    mkdir -p "$HELD"
    shopt -s nullglob
    dirs=()
    for dir in results/*-cpu results/*-cpu-* results/demo; do
      [ -d "$dir" ] || continue
      name=$(basename "$dir")
      if [ -e "$HELD/$name" ]; then echo "error: $HELD/$name exists already (run 'back' first)" >&2; exit 2; fi
      dirs+=("$dir")
    done
    for dir in ${dirs[@]+"${dirs[@]}"}; do                    # (all checked first: nothing moves on a refusal)
      name=$(basename "$dir")
      mv "$dir" "$HELD/$name"
      echo "moved $dir -> $HELD/$name"
    done
    size ;;
  back)
    shopt -s nullglob
    for held in "$HELD"/*; do
      name=$(basename "$held")
      if [ -e "results/$name" ]; then echo "error: results/$name is back already; left $held" >&2; exit 2; fi
      mv "$held" "results/$name"
      echo "restored results/$name"
    done ;;
  size) size ;;
  *) echo "usage: bash experiments/gpu_trim.sh aside | back | size" >&2; exit 2 ;;
esac
