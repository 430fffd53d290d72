#!/usr/bin/env bash
# The full test suite (CPU), what CI runs: sets up .venv if needed (constraints.txt), then every test not marked
# gpu: the fast tier that plain `pytest` runs plus the slow tier (launched processes, SLURM, cloud files, GGUF).
#   ORPO_DIST_LATEST=1 bash scripts/test.sh    # against the newest releases instead of constraints.txt
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TRL_EXPERIMENTAL_SILENCE=1
python -m pytest -m "not gpu" -q -ra --durations=20 "$@"
