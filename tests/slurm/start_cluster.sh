#!/usr/bin/env bash
# Stand up a one-node SLURM (munged + slurmctld + slurmd, all local) for tests/test_slurm.py.
#
#   sudo tests/slurm/start_cluster.sh          # install if needed, configure, start, wait for idle
#   tests/slurm/start_cluster.sh --help
#
# Idempotent: returns in well under a second when the node is already up. Made for containers
# (gVisor, docker) without systemd or writable cgroups, so: daemons are started directly in the
# background, ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, no accounting, no cgroup.conf.
# Env: SLURM_PARTITION (default: debug), SLURM_CPUS (default: nproc), SLURM_TEST_LOGDIR
# (default: /var/log/slurm).
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi

PARTITION=${SLURM_PARTITION:-debug}
CPUS=${SLURM_CPUS:-$(nproc)}
LOGDIR=${SLURM_TEST_LOGDIR:-/var/log/slurm}
NODE=$(hostname -s)
CONF=/etc/slurm/slurm.conf

write_conf() {
    cat <<CONF
# Written by tests/slurm/start_cluster.sh: a one-node test cluster, no cgroups, no accounting.
ClusterName=orpotest
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds (default 120) before it may start again; keep tests quick.
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=30
MinJobAge=300
SlurmdTimeout=300
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
}

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1; }

# Fast path: already up with this exact config.
if command -v sinfo >/dev/null && cmp -s <(write_conf) "$CONF" && [[ $(node_state) =~ ^(idle|mixed|allocated)$ ]]; then
    echo "slurm: node $NODE is $(node_state)"
    exit 0
fi

if [[ $(id -u) != 0 ]]; then
    echo "start_cluster.sh: must run as root (installs packages, starts daemons)" >&2
    exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# munge: the package creates /etc/munge/munge.key; make one if it is missing.
mkdir -p /run/munge /var/log/munge /var/lib/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key && chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

mkdir -p /var/spool/slurmctld /var/spool/slurmd "$LOGDIR" /etc/slurm
write_conf >"$CONF.new"
changed=0
if ! cmp -s "$CONF.new" "$CONF"; then mv "$CONF.new" "$CONF"; changed=1; else rm "$CONF.new"; fi

if [[ $changed == 1 ]]; then
    # A new config: restart whatever is running so it is read.
    for daemon in slurmd slurmctld; do
        pid=$(cat "/run/$daemon.pid" 2>/dev/null || true)
        [[ -n $pid ]] && kill "$pid" 2>/dev/null || continue
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    done
fi
pgrep -x slurmctld >/dev/null || slurmctld
for _ in $(seq 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
pgrep -x slurmd >/dev/null || slurmd

for _ in $(seq 60); do
    state=$(node_state)
    case $state in
        idle|mixed|allocated) echo "slurm: node $NODE is $state"; exit 0 ;;
        *drain*|down*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.5
done
echo "start_cluster.sh: node $NODE did not become idle (state: ${state:-none}); logs in $LOGDIR" >&2
sinfo -R >&2 || true
exit 1
