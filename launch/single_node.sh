#!/usr/bin/env bash
# One node, N processes, any strategy in configs/accelerate/:
#   launch/single_node.sh [trainer flags ...]      e.g.  launch/single_node.sh --lr 1e-5 --max_steps 100
# runs  accelerate launch --config_file $ACCEL_CONFIG [--num_processes $NUM_PROCESSES] -m orpo_dist.train [--config $CONFIG] "$@"
# Env:
#   ACCEL_CONFIG   accelerate config (default configs/accelerate/multi_gpu.yaml; e.g. .../zero3.yaml)
#   NUM_PROCESSES  processes on this node (default: the GPUs nvidia-smi lists, else the config's value)
#   CONFIG         trainer YAML passed as --config (default: none; no flags at all = the built-in quickstart)
#   ORPO_CPU=1     CPU only (tests; ranks talk over gloo): --mixed_precision no, and ACCELERATE_USE_CPU=true
#                  unless the config is DeepSpeed or FSDP (which run over gloo without it)
#   PYTHON         interpreter with orpo_dist installed (default: python)
#   DRY_RUN=1      print the command instead of running it
set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0; fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
ACCEL_CONFIG=${ACCEL_CONFIG:-$ROOT/configs/accelerate/multi_gpu.yaml}
NUM_PROCESSES=${NUM_PROCESSES:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}

cmd=("${PYTHON:-python}" -m accelerate.commands.launch --config_file "$ACCEL_CONFIG")
(( NUM_PROCESSES > 0 )) && cmd+=(--num_processes "$NUM_PROCESSES")
source "$ROOT/launch/lib/cpu_env.sh"
orpo_exec "${cmd[@]}" "${ORPO_CPU_ARGS[@]}" -- "$@"
