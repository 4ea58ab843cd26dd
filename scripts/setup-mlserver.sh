#!/usr/bin/env bash
# Creates the MLServer virtual environment that tests and `dsf-bridge demo` run the reference
# model in (DESIGN section 7). MLServer gets a venv of its own because its pins clash with ours.
#   usage: scripts/setup-mlserver.sh            (idempotent: a complete venv is left alone)
#   env:   DSF_BRIDGE_MLSERVER_VENV  where the venv lives (default .cache/mlserver-venv)
#          PYTHON                    the interpreter to build it from (default python3)
# Exit status: 0 when the venv is ready.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
VENV=${DSF_BRIDGE_MLSERVER_VENV:-$ROOT/.cache/mlserver-venv}
# Pinned so every machine serves the model with the same server; bump deliberately.
MLSERVER_VERSION=1.7.1
# Bumped whenever the packages below change, so that an older venv is rebuilt.
SETUP_REVISION=2
MARKER="$VENV/.dsf-bridge-mlserver-$MLSERVER_VERSION-$SETUP_REVISION"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ -f "$MARKER" ] && [ -x "$VENV/bin/mlserver" ]; then
  echo "MLServer $MLSERVER_VERSION venv ready at $VENV"
  exit 0
fi

# A half-built venv from an interrupted run is rebuilt rather than trusted.
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# numpy and scipy: the reference model's tissue composition (dsf_bridge/sandbox/refmodel);
# mlserver-sklearn and scikit-learn: the stock runtime of the density classifier, trained when
# a test or the demo starts MLServer (dsf_bridge/sandbox/refmodel/density.py).
"$VENV/bin/python" -m pip install --quiet "mlserver==$MLSERVER_VERSION" \
  "mlserver-sklearn==$MLSERVER_VERSION" scikit-learn numpy scipy
"$VENV/bin/mlserver" --help >/dev/null
touch "$MARKER"
echo "MLServer $MLSERVER_VERSION venv ready at $VENV"
