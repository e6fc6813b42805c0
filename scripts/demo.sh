#!/usr/bin/env bash
# The main job, end to end on a fresh machine: set up, then show the model zoo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --with-data
.venv/bin/dsnet info
