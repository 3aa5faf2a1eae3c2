#!/usr/bin/env bash
# System packages tagstream needs on a fresh Debian machine: Java 17+ (the broker), Maven
# (fetches the pinned Kafka jars) and Python 3.11+ with venv. Installs only what is missing.
set -euo pipefail
need=()
command -v java >/dev/null || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need+=(maven)
python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null || need+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
[ "${1:-}" = "--with-prometheus" ] && { command -v prometheus >/dev/null || need+=(prometheus); }
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
echo "setup: installing ${need[*]} with apt-get" >&2
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
