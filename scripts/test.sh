#!/usr/bin/env bash
# Set up (idempotent), then lint, format-check, type-check and run the whole test suite: two
# pytest-xdist workers (PHT_TEST_WORKERS), each with its own Ray, a time limit per test, and the
# slowest tests listed at the end. Extra arguments go to pytest (-n 0: one process).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -n "${PHT_TEST_WORKERS:-2}" --dist worksteal --durations=15 "$@"
