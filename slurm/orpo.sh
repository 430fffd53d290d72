#!/usr/bin/env bash
# ORPO on SLURM, any number of nodes: one `accelerate launch` per node, c10d rendezvous at the first node,
# checkpoints on preemption, requeues itself, and every (re)start resumes with --resume auto.
#
#   mkdir -p logs    # sbatch opens logs/%x-%j.out before the script runs: the folder must exist
#   sbatch slurm/orpo.sh CONFIG.yaml [trainer flags ...]
#   sbatch --nodes=4 --time=48:00:00 slurm/orpo.sh configs/my_run.yaml --lr 1e-5 --output_dir /shared/runs/a
#   CPU-only test cluster:  ORPO_CPU=1 GPUS_PER_NODE=2 ACCEL_CONFIG=configs/accelerate/multi_gpu.yaml \
#       sbatch --nodes=1 --gpus-per-node=0 --cpus-per-task=2 slurm/orpo.sh tests/configs/tiny.yaml
# Submit from the repository root (or set ORPO_ROOT). `output_dir` must be on storage every node shares.
#
# Env knobs (sbatch passes the submitting shell's environment to the job):
#   ACCEL_CONFIG   accelerate config (default configs/accelerate/zero3.yaml); nodes/ranks/address come from SLURM
#   GPUS_PER_NODE  processes per node (default $SLURM_GPUS_ON_NODE, else 8; with ORPO_CPU=1, 1)
#   MASTER_ADDR    rendezvous host (default: first node of the job); MASTER_PORT (default from the job id)
#   ORPO_CPU=1     CPU-only cluster (ranks talk over gloo): --mixed_precision no, and ACCELERATE_USE_CPU=true
#                  unless ACCEL_CONFIG is DeepSpeed (which finds the CPU itself); FSDP is refused
#   SP_SIZE        long pairs: split each row over this many ranks (passed as --sequence_parallel_size; needs a
#                  DeepSpeed ACCEL_CONFIG, and nodes x GPUS_PER_NODE a multiple of it). Or
#                  ACCEL_CONFIG=configs/accelerate/zero3_sp.yaml, which sets it (8) for the launcher
#   VENV           virtualenv to activate (default ORPO_ROOT/.venv if present); PYTHON (default python)
#
# Preemption. `--signal=USR1@120` makes SLURM send SIGUSR1 to every process of the job steps 120 s before
# the time limit. On each node the launcher chain (accelerate launch -> torchrun agent) is started with
# USR1 ignored, so only the trainer reacts: it finishes the optimizer step, saves
# <output_dir>/checkpoint-<step>/ and exits 3. accelerate turns a worker's 3 into 1, so the per-node
# wrapper remembers that a signal came and exits 3 itself; on 3 this script runs `scontrol requeue`, and
# the requeued job (same id, same log, appended) resumes from that checkpoint. A USR1 sent to this batch
# shell instead (`scancel --signal=USR1 --full|--batch`, or `--signal=B:USR1@...`) is forwarded to the
# step. SIGTERM (scancel, time limit, preemption) also makes the trainer save, within KillWait; the job
# is not requeued by this script then (SLURM requeues jobs it preempts with PreemptMode=REQUEUE).
#
#SBATCH --job-name=orpo
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

# Networking (set to match the cluster; left unset the NCCL defaults apply):
#   export NCCL_SOCKET_IFNAME=ib0,eth0   # interface(s) for NCCL's bootstrap / socket transport (not lo, docker0)
#   export GLOO_SOCKET_IFNAME=eth0       # same for gloo (CPU runs, and torch's store traffic)
#   export NCCL_IB_DISABLE=1             # no InfiniBand / RoCE: use TCP sockets between nodes
#   export NCCL_DEBUG=INFO               # print the transports and topology NCCL picked (WARN: quieter)
# A hung or lost rank (a stuck GPU, a node that stopped answering): every collective waits at most the
# trainer's `ddp_timeout` (seconds, default 1800; set it in the config or as --ddp_timeout 600), then fails,
# and the job ends instead of hanging until the time limit; the requeued run resumes from the last checkpoint.
#   export TORCH_NCCL_ASYNC_ERROR_HANDLING=3  # torch's default (>= 2.2): NCCL's watchdog kills the process when a
#                                        # collective fails or exceeds ddp_timeout (1: abort communicators first;
#                                        # 0 would leave ranks hanging); srun --kill-on-bad-exit ends the job
#   export TORCH_NCCL_ENABLE_MONITORING=1 TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC=480  # defaults: if the watchdog
#                                        # thread itself is stuck (driver hang) for that long, kill the process
#   export TORCH_NCCL_DUMP_ON_TIMEOUT=1 TORCH_NCCL_TRACE_BUFFER_SIZE=2000  # debugging a hang: dump the last
#                                        # collectives of each rank (flight recorder) when the timeout fires
#   export TORCH_NCCL_BLOCKING_WAIT=0    # (leave it: 1 makes the waiting rank raise instead, slower)
set -uo pipefail
# Trap first: SIGUSR1's default action would end this shell, and with it the job, without a checkpoint.
srun_pid='' signalled=0 terminated=0
trap 'signalled=1; echo "[orpo.sh] batch shell got SIGUSR1: forwarding to the step"; [[ -n $srun_pid ]] && kill -USR1 "$srun_pid"' USR1
trap 'terminated=1' TERM

if [[ ${1:-} == -h || ${1:-} == --help || -z ${SLURM_JOB_ID:-} ]]; then
    sed -n '2,/^#SBATCH --output/p' "$0" | grep -v '^#SBATCH' | sed 's/^# \{0,1\}//'
    [[ ${1:-} == -h || ${1:-} == --help ]] && exit 0
    echo "orpo.sh: not inside a SLURM job; submit it with sbatch" >&2
    exit 2
fi
if [[ $# -lt 1 || ! -f $1 ]]; then
    echo "orpo.sh: first argument must be the trainer config YAML (got '${1:-}')" >&2
    exit 2
fi
CONFIG=$1
shift

cd "${ORPO_ROOT:-$SLURM_SUBMIT_DIR}"
if [[ -n ${VENV:-} ]]; then
    source "$VENV/bin/activate"
elif [[ -z ${VIRTUAL_ENV:-} && -f .venv/bin/activate ]]; then
    source .venv/bin/activate
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHON=${PYTHON:-python}
export ACCEL_CONFIG=${ACCEL_CONFIG:-configs/accelerate/zero3.yaml}
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
export MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}
source launch/lib/cpu_env.sh  # ORPO_CPU=1: ACCELERATE_USE_CPU for DDP configs, FSDP refused
if [[ ${ORPO_CPU:-0} == 1 ]]; then
    export GPUS_PER_NODE=${GPUS_PER_NODE:-1}
else
    export GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
fi
SP_ARGS=()
[[ -n ${SP_SIZE:-} ]] && SP_ARGS=(--sequence_parallel_size "$SP_SIZE")
echo "[orpo.sh] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $SLURM_JOB_NUM_NODES node(s) x" \
     "$GPUS_PER_NODE process(es), rendezvous $MASTER_ADDR:$MASTER_PORT, $ACCEL_CONFIG," \
     "${SP_SIZE:+sequence parallel $SP_SIZE, }config $CONFIG $*"

# Runs once on every node. Single-quoted: $SLURM_NODEID etc. are expanded there, not in this shell.
read -r -d '' NODE_SCRIPT <<'NODE'
launch=("$PYTHON" -m accelerate.commands.launch --config_file "$ACCEL_CONFIG"
        --num_machines "$SLURM_JOB_NUM_NODES" --machine_rank "$SLURM_NODEID"
        --num_processes $((SLURM_JOB_NUM_NODES * GPUS_PER_NODE))
        --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
        --deepspeed_multinode_launcher standard)
# c10d rendezvous across nodes; one node keeps torchrun's static rendezvous on MASTER_PORT
(( SLURM_JOB_NUM_NODES > 1 )) && launch+=(--rdzv_backend c10d)
[[ ${ORPO_CPU:-0} == 1 ]] && launch+=(--mixed_precision no)
launch+=(-m orpo_dist.train "$@")
echo "[orpo.sh] node $SLURM_NODEID ($(hostname -s)): ${launch[*]}"
signalled=0
trap 'signalled=1' USR1 TERM
# The launchers must survive SIGUSR1 (its default action is to exit); the trainer installs its own handler.
( trap '' USR1; exec "${launch[@]}" ) &
pid=$!
rc=0; wait "$pid" || rc=$?
while kill -0 "$pid" 2>/dev/null; do rc=0; wait "$pid" || rc=$?; done
if [[ $rc != 0 && $signalled == 1 ]]; then
    echo "[orpo.sh] node $SLURM_NODEID: stopped after a signal (launcher exit $rc): preempted"
    exit 3
fi
exit "$rc"
NODE

srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
     ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
     bash -c "$NODE_SCRIPT" orpo-node --config "$CONFIG" --resume auto "${SP_ARGS[@]}" "$@" &
srun_pid=$!
rc=0; wait "$srun_pid" || rc=$?
while kill -0 "$srun_pid" 2>/dev/null; do rc=0; wait "$srun_pid" || rc=$?; done

if [[ $rc == 3 || ($rc != 0 && $signalled == 1) ]] && [[ $terminated == 0 ]]; then
    echo "[orpo.sh] preempted (exit $rc): checkpoint saved; requeueing job $SLURM_JOB_ID to resume"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "[orpo.sh] requeue failed: submit again; --resume auto continues from the checkpoint" >&2
    exit 3
fi
echo "[orpo.sh] finished with exit code $rc"
exit "$rc"
