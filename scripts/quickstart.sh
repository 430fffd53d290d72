#!/usr/bin/env bash
# One command from a fresh machine to a trained model: set up, then train the built-in quickstart
# (tiny local model + built-in preference task, CPU) and print held-out accuracy before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m orpo_dist.train --config quickstart "$@"
