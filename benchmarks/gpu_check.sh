#!/usr/bin/env bash
# The GPU check of issue 11: Triton kernels vs torch vs copy, DataParallel world 1 on NCCL, every
# shard stage with bf16 on CUDA. Prints ONE JSON on stdout (progress and warnings go to stderr).
#
#   bash benchmarks/gpu_check.sh              # one CUDA GPU; sized for well under 8 minutes on an H200
#   bash benchmarks/gpu_check.sh --dry-run    # CPU, gloo, tiny sizes, Triton under its interpreter (CI)
#   ... [--json PATH]                         # also write the JSON to PATH
# Python: $PYTHON, else the repository's .venv, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-}
if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
# Triton's interpreter is switched at its first import: on for a dry run (the kernels run on CPU
# tensors in numpy), off on a GPU (it would run them there too, on host copies of the tensors)
dry=0
for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done
if [ "$dry" = 1 ]; then export TRITON_INTERPRET=${TRITON_INTERPRET:-1}; else unset TRITON_INTERPRET; fi
# the script keeps its own 420 s budget; this hard stop is the backstop at 8 minutes
exec timeout --signal=TERM --kill-after=10 470 "$py" -m benchmarks.gpu_check "$@"
