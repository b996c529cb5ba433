#!/usr/bin/env bash
# The GPU check (issue 7): the reporter's per-epoch overhead next to a ResNet-18 epoch with
# mixed precision on CIFAR-sized synthetic tensors, on the first visible GPU (about a minute on
# a data-centre GPU). Needs torch with CUDA, ray[tune], optuna, pyarrow and pandas; uses
# $PYTHON, else the project's .venv, else python3. Extra arguments go to gpu_overhead.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else
    "gpu_check.sh: torch.cuda.is_available() is False: no GPU or a CPU-only torch build")'
exec "$PYTHON" benchmarks/gpu_overhead.py --device cuda "$@"
