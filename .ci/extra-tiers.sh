#!/usr/bin/env bash
# Tiers that need more than the venv: run each one whose setup script exists.
set -euo pipefail
cd "$(dirname "$0")/.."
for tier in torch-tier browser-tier postgres-tier; do
  if [ -f ".ci/$tier.sh" ]; then
    echo "=== $tier"
    bash ".ci/$tier.sh"
  fi
done
