#!/usr/bin/env bash
# Install the Debian packages the real-cluster tests need (tests/test_cluster_slurm.py,
# tests/test_cluster_ssh.py): a one-host Slurm (munge, slurmctld, slurmd, slurm-client), openssh
# and pdsh for DeepSpeed's multi-node runner, and ps (procps). Needs root and apt-get; does nothing
# when all are installed. The packages' own services are kept from starting (the tests run their
# own daemons, with temporary state, and stop them).
set -euo pipefail
PKGS=(munge slurmctld slurmd slurm-client openssh-server openssh-client pdsh procps)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then echo "needs root to install ${missing[*]}" >&2; exit 1; fi
if ! command -v apt-get >/dev/null; then echo "needs apt-get to install ${missing[*]}" >&2; exit 1; fi
start=$SECONDS
guard=
if [ ! -e /usr/sbin/policy-rc.d ]; then  # installing must not start sshd, slurmd, ... system-wide
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && guard=1
fi
trap '[ -z "$guard" ] || rm -f /usr/sbin/policy-rc.d' EXIT
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
if ! { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
  tail -n 5 "$log" >&2; rm -f "$log"; echo "apt-get install ${missing[*]} failed" >&2; exit 1
fi
rm -f "$log"
echo "cluster tests: installed ${missing[*]} in $((SECONDS - start)) s"
