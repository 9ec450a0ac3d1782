#!/usr/bin/env bash
# Torch tier: prove the torch-free ONNX conversion matches an independent torch reference.
# Creates an isolated .venv-torch (torch 2.13 CPU resolves from this machine's package index),
# installs the project, pytest and the reference architecture (efficientnet-lite-pytorch),
# then runs only the torch-marked tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv-torch/bin/python ]; then
  "$PY" -m venv .venv-torch
fi
VP=.venv-torch/bin/pip
if ! .venv-torch/bin/python -c "import torch, efficientnet_lite_pytorch, pytest, mining" 2>/dev/null; then
  $VP install -q --upgrade pip
  $VP install -q torch==2.13.0
  # the reference architecture only; its demo code needs nothing else
  $VP install -q --no-deps efficientnet-lite-pytorch==0.1.0
  if [ -f constraints.txt ]; then
    $VP install -q -c constraints.txt -e . pytest
  else
    $VP install -q -e . pytest
  fi
fi
exec .venv-torch/bin/python -m pytest -q -m torch tests/test_effnet_torch.py tests/test_finetune_torch.py "$@"
