#!/usr/bin/env bash
# Create .venv (if missing) and install nmtkit with its test tools. torch is installed first,
# pinned, so that pip never resolves a newer torch with its CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
if ! python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
    python -m pip install -q torch==2.13.0
fi
python -m pip install -q -e ".[test]"
