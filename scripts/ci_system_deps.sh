#!/usr/bin/env bash
# System packages some tests need, installed from Debian on a clean CI machine (run by .ci/run):
#   prometheus (promtool + server): tests/integration/test_serve_prometheus.py
# Skipped (with a message; those tests then skip, saying why) when apt-get is not usable here.
set -euo pipefail
if command -v promtool >/dev/null && command -v prometheus >/dev/null; then
  exit 0
fi
if ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then
  echo "ci_system_deps: no apt-get or not root: install Debian's 'prometheus' by hand (Prometheus tests will skip)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=600 update -qq
apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends prometheus >/dev/null
