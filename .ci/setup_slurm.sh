#!/usr/bin/env bash
# Install what tests/test_slurm.py and tests/test_multinode.py need (Debian/Ubuntu): slurm-wlm
# (slurmctld, slurmd, sbatch, srun, ...), munge, and iproute2 (`ip`: the multi-host cluster's
# bridge, veth pairs and addresses; unshare/nsenter come with util-linux, which Debian always
# has). Idempotent and quick when already installed; tests/slurm_cluster.py
# starts private daemons itself, so nothing is enabled or started here, and no SLURM config is
# written: the fixture never reads /etc/slurm (a host's own slurm.conf, if any, is left alone and
# ignored; the version is taken from `slurmd -V`). Needs root; without it
# (or without apt-get) it says so and exits 0, and the SLURM tests skip with that reason.
set -euo pipefail

need=() packages=()
for bin in munged slurmctld slurmd sbatch srun scontrol; do
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || need+=("$bin")
done
[ "${#need[@]}" -eq 0 ] || packages+=(slurm-wlm munge)
if ! command -v ip >/dev/null 2>&1 && [ ! -x /usr/sbin/ip ] && [ ! -x /sbin/ip ]; then
    need+=(ip) packages+=(iproute2)
fi
if [ "${#need[@]}" -eq 0 ]; then
    echo "setup_slurm: slurm-wlm, munge and iproute2 already installed ($(dpkg-query -W -f='slurm-wlm ${Version}' slurm-wlm 2>/dev/null || true))"
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_slurm: missing ${need[*]} and cannot install (needs root and apt-get); SLURM tests will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# --no-install-recommends keeps it to the daemons and clients; policy-rc.d keeps the package
# scripts from starting the system munge/slurm services.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created_policy=1
fi
trap 'if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi' EXIT
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
echo "setup_slurm: installed ${packages[*]} ($(dpkg-query -W -f='slurm-wlm ${Version}' slurm-wlm))"
