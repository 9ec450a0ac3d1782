#!/usr/bin/env bash
# Browser tier: Debian's chromium renders the Mining view inside Airflow's UI (real results from
# the real pipeline on a replayed hour). Installs chromium when missing; screenshots land in
# test-artifacts/ (ui.png: the view inside Airflow, ui-page.png: the page alone).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
fi
mkdir -p test-artifacts
exec .venv/bin/python -m pytest -q -m browser tests/test_ui_browser.py "$@"
