#!/bin/bash
# Unpack what experiments/gpu_next.sh brought back from the GPU machine into this checkout.
#   bash experiments/gpu_unpack.sh FILES_AT     (the device tool's files_at: results.tgz.part*, files.txt, log)
# Then look at `git status results experiments/feature_cache` and commit what the call produced.
set -euo pipefail
src=${1:?usage: bash experiments/gpu_unpack.sh FILES_AT}
if ! compgen -G "$src/results.tgz.part*" >/dev/null; then
  echo "error: no results.tgz.part* in $src (did the call reach its packing step? see $src/log)" >&2
  exit 2
fi
cat "$src"/results.tgz.part* | tar -xzf - --no-same-owner
echo "unpacked $(cat "$src"/results.tgz.part* | tar -tzf - | wc -l) files from $src"
git status --short results experiments/feature_cache 2>/dev/null | head -40 || true
