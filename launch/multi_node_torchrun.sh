#!/usr/bin/env bash
# Many nodes with plain torchrun (DDP; for ZeRO / FSDP use multi_node_accelerate.sh). On EVERY node:
#   NNODES=2 MASTER_ADDR=node0 launch/multi_node_torchrun.sh --config my.yaml [trainer flags ...]
# runs  torchrun --nnodes $NNODES --nproc_per_node $GPUS_PER_NODE --rdzv_backend c10d
#         --rdzv_endpoint $MASTER_ADDR:$MASTER_PORT --rdzv_id $RDZV_ID -m orpo_dist.train "$@"
# c10d rendezvous assigns node ranks as nodes join, so no NODE_RANK is needed.
# Env:
#   NNODES (1), MASTER_ADDR (127.0.0.1: the head node), MASTER_PORT (29500), RDZV_ID (orpo)
#   GPUS_PER_NODE  processes per node (default: the GPUs nvidia-smi lists, else 1)
#   CONFIG         trainer YAML passed as --config (default: none)
#   ORPO_CPU=1     CPU only (tests): ACCELERATE_USE_CPU=true; ranks talk over gloo
#   PYTHON (python), DRY_RUN=1 (print the command instead of running it)
set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0; fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
(( GPUS_PER_NODE > 0 )) || GPUS_PER_NODE=1
[[ ${ORPO_CPU:-0} == 1 ]] && export ACCELERATE_USE_CPU=true

cmd=("${PYTHON:-python}" -m torch.distributed.run --nnodes "${NNODES:-1}" --nproc_per_node "$GPUS_PER_NODE"
     --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" --rdzv_id "${RDZV_ID:-orpo}"
     -m orpo_dist.train)
[[ -n ${CONFIG:-} ]] && cmd+=(--config "$CONFIG")
cmd+=("$@")

if [[ ${DRY_RUN:-0} == 1 ]]; then echo "${ACCELERATE_USE_CPU:+ACCELERATE_USE_CPU=$ACCELERATE_USE_CPU }${cmd[*]}"; exit 0; fi
exec "${cmd[@]}"
