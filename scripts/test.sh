#!/usr/bin/env bash
# Install everything the test suite needs (venv, extras, Fashion-MNIST, the PaddleClas reference) and run it.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --with-data
# The real PaddleClas DS-Net, for the converter's parity tests. paddleclas goes in without its dependencies:
# its model file needs only paddle, and the package's other dependencies are unrelated to the backbones.
# (the wheel installs its code as paddleclas/ppcls, so check the distribution, not `import ppcls`)
if ! .venv/bin/python -c "import paddle, importlib.metadata as m; assert m.version('paddleclas') == '2.6.0'" \
    >/dev/null 2>&1; then
  echo "[test] installing the PaddleClas reference (paddlepaddle, paddleclas 2.6.0 --no-deps)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check paddlepaddle
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps paddleclas==2.6.0
fi
echo "[test] ruff"
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
echo "[test] timm's own tests/test_models.py on the zoo (contract subset; scripts/timm_suite.sh --full for all)"
bash scripts/timm_suite.sh
echo "[test] pytest"
exec .venv/bin/python -m pytest "$@"
