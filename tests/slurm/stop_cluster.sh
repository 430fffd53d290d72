#!/usr/bin/env bash
# Stop the test cluster that start_cluster.sh started (slurmd, slurmctld, munged), waiting for each to exit.
#   tests/slurm/stop_cluster.sh        (jobs still queued are kept in /var/spool/slurmctld)
set -uo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,3p' "$0" | sed 's/^# \{0,1\}//'; echo "Env: none."; exit 0; fi
for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
    pid=$(cat "$pidfile" 2>/dev/null) || continue
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
done
echo "slurm test cluster stopped"
