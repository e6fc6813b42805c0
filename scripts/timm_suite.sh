#!/usr/bin/env bash
# timm's own model test suite (tests/test_models.py of the installed timm's source distribution) run against the
# dsnet zoo, so that a timm upgrade that changes the model contract is caught. Usage:
#   bash scripts/timm_suite.sh [--full] [pytest args...]
#   (default: the contract subset, API/config checks for every model and forward/backward for the smallest of each
#    family; --full: every test for every zoo model). Tests that need TorchScript or download weights are left out.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
case "$PY" in /*) ;; *) PY="$PWD/$PY" ;; esac
ROOT=$PWD
MODE=contract
if [ "${1:-}" = "--full" ]; then MODE=full; shift; fi
VERSION=$("$PY" -c 'import timm; print(timm.__version__)')
SRC=${TIMM_SRC_CACHE:-.cache/timm-src}/timm-$VERSION
if [ ! -f "$SRC/tests/test_models.py" ]; then
  echo "[timm-suite] fetching the timm $VERSION sdist from PyPI"
  mkdir -p "$(dirname "$SRC")"
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: "timm==$VERSION" \
    -d "$(dirname "$SRC")"
  tar -xzf "$(dirname "$SRC")/timm-$VERSION.tar.gz" -C "$(dirname "$SRC")"
fi
echo "[timm-suite] timm $VERSION tests/test_models.py on the dsnet zoo ($MODE)"
# run timm's tests against the installed timm (not the sdist's copy of the package), from its tests folder
cd "$SRC/tests"
DSNET_TIMM_SUITE=$MODE PYTHONPATH="$ROOT/scripts${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m pytest \
  -p timm_contract_plugin -p no:cacheprovider -q test_models.py "$@"
