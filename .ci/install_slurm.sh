#!/usr/bin/env bash
# Install the Debian packages for a local Slurm test cluster (munge, slurmctld, slurmd, clients)
# and shellcheck (tests/test_slurm_script.py lints slurm/*.sh with it).
#
# Used by CI before the test suite and by tests/slurm_cluster.py when slurmctld is missing.
# Idempotent: does nothing when every needed program is already installed. Needs root and apt-get
# (Debian/Ubuntu). Nothing is started: the packages' systemd units stay unused, the test harness
# starts its own daemons. On Debian 12 (2026-11-28): 9 packages, 5.8 MB downloaded.
set -euo pipefail

packages=(slurmctld slurmd slurm-client munge shellcheck)
programs=(slurmctld slurmd sbatch srun scontrol munged mungekey shellcheck)

missing=0
for program in "${programs[@]}"; do
    if ! command -v "$program" >/dev/null 2>&1 && [[ ! -x "/usr/sbin/$program" ]]; then
        missing=1
    fi
done
if [[ $missing -eq 0 ]]; then
    echo "install_slurm: Slurm and munge already installed"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "install_slurm: needs root to install ${packages[*]} (run with sudo)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm: apt-get not found; install ${packages[*]} with this system's package manager" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}"
echo "install_slurm: installed ${packages[*]}"
