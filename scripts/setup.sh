#!/usr/bin/env bash
# Create the virtual environment at .venv/ (repo root) and install dsnet into it, with every extra.
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh [--with-data]
#   --with-data   also install Fashion-MNIST (Debian package dataset-fashion-mnist) when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
echo "[setup] installing dsnet (editable) with extras export, deploy, serve, data, convert, detection, viz, dev"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[export,deploy,serve,data,convert,detection,viz,dev]"

if [ "${1:-}" = "--with-data" ]; then
  if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    echo "[setup] installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  fi
fi
echo "[setup] ready: $(.venv/bin/python -c 'import dsnet, torch, timm; print(f"dsnet {dsnet.__version__}, torch {torch.__version__}, timm {timm.__version__}")')"
