#!/usr/bin/env bash
# One-shot GPU check; see benchmarks/gpu/check.py for what it measures and the wheels it needs.
#   bash benchmarks/gpu/check.sh            # one GPU, <= 8 minutes on an H100
#   bash benchmarks/gpu/check.sh --dry-run  # CPU, tiny shape, < 1 minute
# Offline installs: a wheels/ folder at the repository root (or STAGEWISE_WHEELS=<dir>) is installed first with
# pip install --no-index --find-links, for whatever of trl / liger-kernel / the project's deps the image lacks.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
wheels="${STAGEWISE_WHEELS:-$repo/wheels}"
if [ -d "$wheels" ] && ! python -c "import trl, stagewise" 2>/dev/null; then
  extras=(trl)
  ls "$wheels" | grep -qi '^liger_kernel' && extras+=(liger-kernel)
  pip install --no-index --find-links "$wheels" --no-build-isolation -e "$repo" "${extras[@]}"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
exec python "$here/check.py" "$@"
