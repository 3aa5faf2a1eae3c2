#!/usr/bin/env bash
# The base image every tagstream image builds FROM, made here from Debian's packages with
# mmdebstrap (no registry is reachable from this machine): Debian 12 "minbase" with CA
# certificates, imported into podman as localhost/tagstream-base:bookworm.
#
#   deploy/container/base-image.sh            # once per machine; `make image` calls it
#
# A real deployment may build FROM debian:bookworm instead (--build-arg BASE=...).
set -euo pipefail
image=${TAGSTREAM_BASE_IMAGE:-localhost/tagstream-base:bookworm}
if podman image exists "$image"; then exit 0; fi
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
echo "base-image: building $image with mmdebstrap from $mirror" >&2
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
mmdebstrap --quiet --variant=minbase --include=ca-certificates \
  --aptopt='Acquire::Retries "3"' \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
  --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*' \
  bookworm "$tmp/rootfs.tar" "$mirror" "deb http://deb.debian.org/debian-security bookworm-security main"
podman import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' "$tmp/rootfs.tar" "$image" >/dev/null
podman image ls "$image"
