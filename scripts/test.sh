#!/usr/bin/env bash
# The default test suite (CPU): sets up .venv if needed, then runs every test not marked gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
bash scripts/install_cloud_tools.sh  # kubeflow-training + skypilot (.venv-sky) for tests/test_cloud_launch.py
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TRL_EXPERIMENTAL_SILENCE=1
python -m pytest -m "not gpu" -q -ra --durations=15 "$@"
