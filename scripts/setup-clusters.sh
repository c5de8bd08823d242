#!/usr/bin/env bash
# System packages for the launcher tests that start real clusters on this machine: SLURM
# (slurm-wlm: slurmctld, slurmd, sbatch) and munge. Quick when they are already there; where
# apt or root is missing it says so, and those tests skip with the reason.
set -euo pipefail
if command -v sbatch >/dev/null && [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && [ -x /usr/sbin/munged ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "distgen: slurm-wlm and munge are not installed (needs root and apt); the SLURM launcher tests will skip"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq slurm-wlm munge >/dev/null
echo "distgen: installed slurm-wlm and munge for the SLURM launcher tests"
