#!/usr/bin/env bash
# Create .venv and install posthoc-tune with the extras named by $1 (default "test,examples");
# idempotent.
#
# PyTorch is installed first from PHT_TORCH_SPEC (default: the CPU build torch==2.13.0), so the
# package's plain "torch>=2.2" requirement does not pull a multi-GB CUDA build. On a GPU
# machine set PHT_TORCH_SPEC to the build you want (e.g. "torch" or "torch==2.13.0+cu128").
# The demo asks for "examples" only: the test tools (moto's server, mypy, ...) would add a
# minute to its first run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${PHT_TORCH_SPEC:-torch==2.13.0}
EXTRAS=${1:-test,examples}
VENV=.venv

want_hash=$(printf '%s' "$(cat pyproject.toml) $TORCH_SPEC" | sha256sum | cut -d' ' -f1)
installed() {  # the venv holds this pyproject's install with these extras
  [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.posthoc-tune-installed-$1" 2>/dev/null)" = "$want_hash" ]
}
if installed "$EXTRAS" || installed test,examples; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
"$VENV/bin/python" -m pip install --quiet -e ".[$EXTRAS]"
echo "$want_hash" > "$VENV/.posthoc-tune-installed-$EXTRAS"
