#!/usr/bin/env bash
# Build localhost/tagstream:VERSION (and :latest) from this checkout with podman.
#
#   deploy/container/build.sh [--base IMAGE]      # make image
#
# 1. podman set up (setup-podman.sh), the local base made (base-image.sh) unless --base;
# 2. tagstream's wheel built from the checkout with the dev venv (make setup);
# 3. `podman build` on a context of the lock and that wheel, with the host's CA bundle
#    mounted read-only for pip (a proxy's CA: never copied into the image).
set -euo pipefail
cd "$(dirname "$0")/../.."
base=localhost/tagstream-base:bookworm
while [ $# -gt 0 ]; do
  case "$1" in
    --base) base=$2; shift 2 ;;
    *) echo "build.sh: unknown argument $1 (use --base IMAGE)" >&2; exit 2 ;;
  esac
done
deploy/container/setup-podman.sh
[ "$base" != localhost/tagstream-base:bookworm ] || deploy/container/base-image.sh
version=$(.venv/bin/python -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
ctx=$(mktemp -d); trap 'rm -rf "$ctx"' EXIT
.venv/bin/pip wheel --quiet --no-deps --wheel-dir "$ctx" . >/dev/null
rm -rf build
cp deploy/container/requirements.lock "$ctx/"
ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
mount=(); [ -s "$ca" ] && mount=(--volume "$ca:/run/host-ca.crt:ro")
podman build --pull=never --quiet "${mount[@]}" --build-arg "BASE=$base" --build-arg "VERSION=$version" \
  --build-arg "REVISION=$revision" -f deploy/container/Containerfile -t "localhost/tagstream:$version" \
  -t localhost/tagstream:latest "$ctx" >/dev/null
podman image ls localhost/tagstream:"$version" --format '{{.Repository}}:{{.Tag}} {{.Size}}'
