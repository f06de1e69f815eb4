#!/usr/bin/env bash
# The GPU check, ready before the GPU: CUDA-marked tests, step throughput on PreActResNet-18 and
# WRN-28-10 (batch 512, --ablations --compile) and a 3-epoch CIFAR-shaped `scoretune train` on cuda,
# in <= 8 minutes on one GPU; everything in one JSON file, $OUT/gpu_check.json (default ./gpu_check_out).
#
#   benchmarks/gpu_check.sh              # on a machine with a CUDA GPU
#   benchmarks/gpu_check.sh --dry-run    # the same steps on CPU with tiny sizes (CI runs this)
#
# Python: $PYTHON, else the repository's .venv, else python3. See benchmarks/gpu_check.py.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
py="${PYTHON:-}"
if [ -z "$py" ]; then
    if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py="$(command -v python3)"; fi
fi
exec "$py" "$here/gpu_check.py" "$@"
