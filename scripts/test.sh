#!/usr/bin/env bash
# Lint, then every test tier this machine can run. Exit status is pytest's: 5 (no tests) fails.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check mining dags plugins tests bench
.venv/bin/python -m pytest -q -m "not torch and not postgres and not browser and not slow" "$@"
