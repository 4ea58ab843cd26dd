#!/usr/bin/env bash
# Creates the KServe virtual environment that tests and bench/tensors.py run KServe's Python
# model server in: the third OIP v2 server, and the one whose REST endpoint speaks the binary
# tensor data extension (MLServer 1.7.1's REST does not). A venv of its own, as for MLServer.
#   usage: scripts/setup-kserve.sh              (idempotent: a complete venv is left alone)
#   env:   DSF_BRIDGE_KSERVE_VENV   where the venv lives (default .cache/kserve-venv)
#          PYTHON                   the interpreter to build it from (default python3)
# Exit status: 0 when the venv is ready.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
VENV=${DSF_BRIDGE_KSERVE_VENV:-$ROOT/.cache/kserve-venv}
# Pinned so every machine serves the model with the same server; bump deliberately.
KSERVE_VERSION=0.21.0
# Bumped whenever the packages below change, so that an older venv is rebuilt.
SETUP_REVISION=1
MARKER="$VENV/.dsf-bridge-kserve-$KSERVE_VERSION-$SETUP_REVISION"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ -f "$MARKER" ] && [ -x "$VENV/bin/python" ]; then
  echo "KServe $KSERVE_VERSION venv ready at $VENV"
  exit 0
fi

# A half-built venv from an interrupted run is rebuilt rather than trusted.
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# numpy and scipy: the reference model's tissue composition (dsf_bridge/sandbox/refmodel),
# served by a kserve.Model subclass (dsf_bridge/sandbox/refmodel/kserve_model.py).
"$VENV/bin/python" -m pip install --quiet "kserve==$KSERVE_VERSION" numpy scipy
"$VENV/bin/python" -c 'import kserve, numpy, scipy'
touch "$MARKER"
echo "KServe $KSERVE_VERSION venv ready at $VENV"
