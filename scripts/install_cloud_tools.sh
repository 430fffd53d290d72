#!/usr/bin/env bash
# Test-only tools with which tests/test_cloud_launch.py checks the cloud launch files against the platforms'
# own code. scripts/test.sh (and so CI) runs this; idempotent, it skips what is already installed.
#   kubeflow-training  the Training Operator's Python SDK (PyTorchJob models), into the project's python
#                      (~10 s, ~40 MB with the kubernetes client; nothing it needs conflicts with .venv)
#   skypilot           `sky.Task.from_yaml`, into its own venv .venv-sky (~40 s, ~430 MB): it requires
#                      click<8.2, which this project's huggingface_hub and wandb refuse, so it cannot share .venv
#
#   bash scripts/install_cloud_tools.sh               # python on PATH (the activated .venv)
#   PYTHON=/path/to/python bash scripts/install_cloud_tools.sh
set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0; fi
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

if ! "$PY" -c "import kubeflow.training" 2>/dev/null; then
    if [ "${ORPO_DIST_LATEST:-0}" = 1 ]; then
        "$PY" -m pip install -q "kubeflow-training>=1.9,<2"
    else  # the versions the suite last passed with (constraints.txt), like scripts/setup.sh
        "$PY" -m pip install -q -c constraints.txt "kubeflow-training>=1.9,<2"
    fi
fi
if ! .venv-sky/bin/python -c "import sky" 2>/dev/null; then
    "$PY" -m venv --clear .venv-sky
    .venv-sky/bin/python -m pip install -q --upgrade pip >/dev/null
    if [ "${ORPO_DIST_LATEST:-0}" = 1 ]; then
        .venv-sky/bin/python -m pip install -q "skypilot>=0.14,<0.15"
    else
        .venv-sky/bin/python -m pip install -q "skypilot==0.14.1"  # the version the suite last passed with
    fi
fi
echo "cloud tools ok: kubeflow-training $("$PY" -c 'import importlib.metadata as m; print(m.version("kubeflow-training"))')" \
     "| skypilot $(.venv-sky/bin/python -c 'import sky; print(sky.__version__)') (.venv-sky)"
