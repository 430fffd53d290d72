#!/usr/bin/env bash
# CI, as root: install Debian's SLURM (slurm-wlm) and munge if missing, and start a one-node cluster on
# this machine (munged, slurmctld, slurmd in the background; no systemd, no cgroups needed), so that
# tests/test_slurm.py submits real jobs. Idempotent: ~0.1 s when the node is already up.
#   bash scripts/ci_slurm_setup.sh          (.ci/run calls it; the details are in tests/slurm/start_cluster.sh)
set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi
exec bash "$(dirname "$0")/../tests/slurm/start_cluster.sh" "$@"
