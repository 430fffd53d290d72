#!/usr/bin/env bash
# Set up a fresh machine (only Python needed): a virtualenv in .venv with orpo_dist and its test deps, at
# the exact versions of constraints.txt (the ones the full suite last passed with). An older or newer
# package already in .venv is moved to the pinned version, so CI on a machine that has other versions
# tests what a new machine gets.
#   TORCH_SPEC="torch" bash scripts/setup.sh      # a GPU machine: the normal CUDA wheels (default: the CPU build CI uses)
#   ORPO_DIST_LATEST=1 bash scripts/setup.sh      # the newest releases the package's ranges allow (no constraints)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# torch first, pinned: a later unpinned requirement would otherwise pull the CUDA wheels (GBs)
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
if [ "${ORPO_DIST_LATEST:-0}" = 1 ]; then
  echo "setup: ORPO_DIST_LATEST=1: the newest releases, not constraints.txt"
  python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"
else
  python -m pip install -q -c constraints.txt -e ".[dev]"
fi
python -c "import orpo_dist, torch, transformers, trl, accelerate, deepspeed, peft; print('orpo_dist setup ok: torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__, '| accelerate', accelerate.__version__, '| deepspeed', deepspeed.__version__, '| peft', peft.__version__)"
