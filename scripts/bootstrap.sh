#!/usr/bin/env bash
# Create .venv and install posthoc-tune with its test and example extras; idempotent.
#
# PyTorch is installed first from PHT_TORCH_SPEC (default: the CPU build torch==2.13.0), so the
# package's plain "torch>=2.2" requirement does not pull a multi-GB CUDA build. On a GPU
# machine set PHT_TORCH_SPEC to the build you want (e.g. "torch" or "torch==2.13.0+cu128").
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${PHT_TORCH_SPEC:-torch==2.13.0}
VENV=.venv
STAMP=$VENV/.posthoc-tune-installed

want="$(cat pyproject.toml) $TORCH_SPEC"
want_hash=$(printf '%s' "$want" | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_hash" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
"$VENV/bin/python" -m pip install --quiet -e ".[test,examples]"
echo "$want_hash" > "$STAMP"
