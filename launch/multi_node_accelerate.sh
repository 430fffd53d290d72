#!/usr/bin/env bash
# Many nodes with accelerate: run this once on EVERY node (same env, its own NODE_RANK):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/multi_node_accelerate.sh --config my.yaml [trainer flags ...]
# runs  accelerate launch --config_file $ACCEL_CONFIG --num_machines $NNODES --machine_rank $NODE_RANK
#         --main_process_ip $MASTER_ADDR --main_process_port $MASTER_PORT --rdzv_backend c10d
#         --num_processes $((NNODES * GPUS_PER_NODE)) -m orpo_dist.train "$@"   (c10d only when NNODES > 1)
# Env:
#   NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1: the head node), MASTER_PORT (29500)
#   GPUS_PER_NODE  processes per node (default: the GPUs nvidia-smi lists, else 1)
#   ACCEL_CONFIG   accelerate config (default configs/accelerate/zero3.yaml); its num_machines,
#                  num_processes, machine_rank and main_process_ip are overridden by the values above
#   CONFIG         trainer YAML passed as --config (default: none)
#   ORPO_CPU=1     CPU only (tests; ranks talk over gloo): --mixed_precision no, and ACCELERATE_USE_CPU=true
#                  unless the config is DeepSpeed or FSDP (which run over gloo without it)
#   PYTHON (python), DRY_RUN=1 (print the command instead of running it)
set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0; fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
NNODES=${NNODES:-1} NODE_RANK=${NODE_RANK:-0} MASTER_ADDR=${MASTER_ADDR:-127.0.0.1} MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
(( GPUS_PER_NODE > 0 )) || GPUS_PER_NODE=1

ACCEL_CONFIG=${ACCEL_CONFIG:-$ROOT/configs/accelerate/zero3.yaml}
cmd=("${PYTHON:-python}" -m accelerate.commands.launch --config_file "$ACCEL_CONFIG"
     --num_machines "$NNODES" --machine_rank "$NODE_RANK" --num_processes $((NNODES * GPUS_PER_NODE))
     --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
     --deepspeed_multinode_launcher standard)  # torchrun on each node, not pdsh from the head node
(( NNODES > 1 )) && cmd+=(--rdzv_backend c10d)  # one node: torchrun's static rendezvous on MASTER_PORT
source "$ROOT/launch/lib/cpu_env.sh"
orpo_exec "${cmd[@]}" "${ORPO_CPU_ARGS[@]}" -- "$@"
