#!/usr/bin/env bash
# Set up a fresh machine (only Python needed): a virtualenv in .venv with orpo_dist and its test deps.
# TORCH_SPEC picks the torch build: the default is the CPU build used by CI; on a GPU machine use
#   TORCH_SPEC="torch" bash scripts/setup.sh     (the normal CUDA wheels)
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
python -m pip install -q -e ".[dev]"
python -c "import orpo_dist, torch, transformers, trl, accelerate, deepspeed, peft; print('orpo_dist setup ok: torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__, '| accelerate', accelerate.__version__, '| deepspeed', deepspeed.__version__)"
