# Sourced by the launchers and slurm/orpo.sh: with ORPO_CPU=1, set up a CPU-only multi-process run
# for the accelerate config in $ACCEL_CONFIG. Defines ORPO_CPU_ARGS (extra accelerate launch flags).
#   DDP:       ACCELERATE_USE_CPU=true gives real ranks over gloo (--cpu / MULTI_CPU would not connect them)
#   DeepSpeed: nothing; DeepSpeed picks its CPU accelerator, and ACCELERATE_USE_CPU would make it plain DDP
#   FSDP:      nothing, as DeepSpeed: ACCELERATE_USE_CPU would make it plain DDP; the trainer runs FSDP2 over
#              gloo (orpo_dist/distributed.py, docs/elastic-and-fsdp2.md)
ORPO_CPU_ARGS=()
if [[ ${ORPO_CPU:-0} == 1 ]]; then
    case $(sed -n 's/^distributed_type: *"\{0,1\}\([A-Z_]*\).*/\1/p' "$ACCEL_CONFIG") in
        DEEPSPEED|FSDP) ;;
        *) export ACCELERATE_USE_CPU=true ;;
    esac
    ORPO_CPU_ARGS=(--mixed_precision no)
fi

# orpo_exec LAUNCHER ARGS... -- TRAINER ARGS...: run `LAUNCHER ARGS -m orpo_dist.train [--config $CONFIG]
# TRAINER ARGS` (with DRY_RUN=1, print it instead). Every launcher ends the same way through this.
orpo_exec() {
    local cmd=()
    while [[ $1 != -- ]]; do cmd+=("$1"); shift; done
    shift
    cmd+=(-m orpo_dist.train)
    [[ -n ${CONFIG:-} ]] && cmd+=(--config "$CONFIG")
    cmd+=("$@")
    if [[ ${DRY_RUN:-0} == 1 ]]; then echo "${ACCELERATE_USE_CPU:+ACCELERATE_USE_CPU=$ACCELERATE_USE_CPU }${cmd[*]}"; exit 0; fi
    exec "${cmd[@]}"
}
