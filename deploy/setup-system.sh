#!/usr/bin/env bash
# System packages tagstream needs on a fresh Debian machine: Java 17+ (the broker), Maven
# (fetches the pinned Kafka jars) and Python 3.11+ with venv. Installs only what is missing.
set -euo pipefail
need=()
command -v java >/dev/null || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need+=(maven)
command -v openssl >/dev/null || need+=(openssl)        # the secured cluster's certificates
python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null || need+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
for flag in "$@"; do
  case "$flag" in
    --with-prometheus) command -v prometheus >/dev/null || need+=(prometheus) ;;   # also brings promtool
    --with-chromium) command -v chromium >/dev/null || need+=(chromium) ;;          # make dashboard-png
    --with-hey) command -v hey >/dev/null || need+=(hey) ;;                         # make bench-ingest's HTTP load
    *) echo "setup-system.sh: unknown flag $flag (use --with-prometheus, --with-chromium, --with-hey)" >&2; exit 2 ;;
  esac
done
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
echo "setup: installing ${need[*]} with apt-get" >&2
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
