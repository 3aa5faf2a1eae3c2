#!/usr/bin/env bash
# Build tagstream's images with podman, from this checkout:
#
#   deploy/container/build.sh [--base IMAGE] [tagstream|kafka|prometheus|all]   # make image / make images
#
#   tagstream   localhost/tagstream:VERSION      the Containerfile: locked wheels + tagstream's wheel
#   kafka       localhost/tagstream-kafka:VER    Containerfile.kafka: deploy/kafka's pinned jars, Debian's JRE
#   prometheus  localhost/tagstream-prometheus   Containerfile.prometheus: Debian's Prometheus + the alerts
#
# Each is also tagged :latest. podman is set up first (setup-podman.sh) and, unless --base
# names another (e.g. debian:bookworm where a registry is reachable), the local base made
# (base-image.sh). The host's CA bundle is mounted read-only for pip (a proxy's CA here),
# never copied into an image.
set -euo pipefail
cd "$(dirname "$0")/../.."
base=localhost/tagstream-base:bookworm
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --base) base=$2; shift 2 ;;
    tagstream|kafka|prometheus) targets+=("$1"); shift ;;
    all) targets+=(tagstream kafka prometheus); shift ;;
    *) echo "build.sh: unknown argument $1 (use --base IMAGE, then tagstream, kafka, prometheus or all)" >&2; exit 2 ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(tagstream)
deploy/container/setup-podman.sh
[ "$base" != localhost/tagstream-base:bookworm ] || deploy/container/base-image.sh
ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
mount=(); [ -s "$ca" ] && mount=(--volume "$ca:/run/host-ca.crt:ro")
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT

build() {  # build CONTAINERFILE CONTEXT VERSION NAME [BUILD-ARGS...]
  local file=$1 ctx=$2 version=$3 name=$4; shift 4
  podman build --pull=never --quiet "${mount[@]}" --build-arg "BASE=$base" "$@" -f "$file" \
    -t "localhost/$name:$version" -t "localhost/$name:latest" "$ctx" >/dev/null
  podman image ls "localhost/$name:$version" --format '{{.Repository}}:{{.Tag}} {{.Size}}'
}

for target in "${targets[@]}"; do
  ctx="$work/$target"; mkdir -p "$ctx"
  case "$target" in
    tagstream)
      version=$(.venv/bin/python -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
      .venv/bin/pip wheel --quiet --no-deps --wheel-dir "$ctx" . >/dev/null
      rm -rf build
      cp deploy/container/requirements.lock "$ctx/"
      build deploy/container/Containerfile "$ctx" "$version" tagstream \
        --build-arg "VERSION=$version" --build-arg "REVISION=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" ;;
    kafka)
      deploy/kafka/kafka.sh install
      version=$(sed -n 's#.*<kafka.version>\(.*\)</kafka.version>.*#\1#p' deploy/kafka/pom.xml)
      mkdir "$ctx/lib"; cp deploy/kafka/lib/*.jar "$ctx/lib/"
      cp deploy/kafka/server.properties deploy/kafka/log4j2.yaml deploy/container/kafka-entrypoint.sh "$ctx/"
      build deploy/container/Containerfile.kafka "$ctx" "$version" tagstream-kafka --build-arg "KAFKA_VERSION=$version" ;;
    prometheus)
      cp deploy/prometheus/alerts.yml "$ctx/"
      build deploy/container/Containerfile.prometheus "$ctx" latest tagstream-prometheus ;;
  esac
done
