#!/usr/bin/env bash
# The main job: set up (idempotent), then run the offline demo. Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh examples
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
exec .venv/bin/posthoc-tune demo "$@"
