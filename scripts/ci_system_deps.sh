#!/usr/bin/env bash
# Debian packages some tests use, installed on a clean CI machine (run by .ci/run):
#   chromium    headless browser for the MLflow UI test (tests/integration/test_tracking_story.py)
#   prometheus  promtool + server (tests/integration/test_serve_prometheus.py)
# Tolerant: when apt is unavailable or fails (no root, no network), the tests that need a package
# skip and say why; CI goes on.
set -uo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
{ command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; } || missing+=(prometheus)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ci_system_deps: apt-get not found; not installing ${missing[*]} (those tests will skip)" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "ci_system_deps: not root and no sudo; not installing ${missing[*]} (those tests will skip)" >&2
    exit 0
  fi
fi
start=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
if $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq \
   && $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
  echo "ci_system_deps: installed ${missing[*]} in $(( $(date +%s) - start )) s" >&2
else
  echo "ci_system_deps: apt-get install ${missing[*]} failed; those tests will skip" >&2
fi
exit 0
