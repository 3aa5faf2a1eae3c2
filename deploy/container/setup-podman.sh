#!/usr/bin/env bash
# podman on this machine (and a fresh Debian 12 one): the packages, and a containers.conf that
# uses runc (crun fails on this machine's hybrid cgroup setup) with open-file limits the host
# allows. Idempotent; called by `make image` and `make deploy-test`.
set -euo pipefail
need=()
# catatonit: the pause process of the pods `podman kube play` makes
for pkg in podman runc mmdebstrap uidmap slirp4netns containernetworking-plugins catatonit; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
if [ ${#need[@]} -gt 0 ]; then
  echo "setup-podman: installing ${need[*]} with apt-get" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
conf=/etc/containers/containers.conf
nofile=$(ulimit -Hn)
want="# tagstream: deploy/container/setup-podman.sh
[containers]
default_ulimits = [\"nofile=${nofile}:${nofile}\", \"nproc=32768:32768\"]

[engine]
runtime = \"runc\""
if [ ! -f "$conf" ] || ! grep -q "^# tagstream: deploy/container/setup-podman.sh" "$conf"; then
  if [ -f "$conf" ] && [ -s "$conf" ]; then
    echo "setup-podman: $conf exists and is not ours; leaving it (set runtime = \"runc\" there if crun fails)" >&2
  else
    echo "$want" | $sudo tee "$conf" >/dev/null
  fi
fi
