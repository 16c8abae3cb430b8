#!/usr/bin/env bash
# Debian packages some tests use, installed on a clean CI machine (run by .ci/run):
#   chromium    headless browser for the MLflow UI test (tests/integration/test_tracking_story.py)
#   prometheus  promtool + server (tests/integration/test_serve_prometheus.py)
#   podman, runc, mmdebstrap (+ netavark, aardvark-dns, iptables for pod networks; catatonit for the
#               pods' pause image): the system tier's
#               containers and pods (tests/system/test_images.py, test_pods.py, test_deployments.py);
#               then scripts/podman_base.sh writes the containers.conf and makes the Debian base
#               image (cached under ~/.cache/llama_train/containers), so the tier only builds.
# Tolerant: when apt is unavailable or fails (no root, no network), the tests that need a package
# skip and say why; CI goes on.
set -uo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
{ command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; } || missing+=(prometheus)
for tool in podman runc mmdebstrap netavark; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/lib/podman/$tool" ] || missing+=("$tool")
done
[ -x /usr/lib/podman/aardvark-dns ] || missing+=(aardvark-dns)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
command -v catatonit >/dev/null 2>&1 || [ -x /usr/libexec/podman/catatonit ] || missing+=(catatonit)
base_image() {
  if command -v podman >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
    bash "$(dirname "$0")/podman_base.sh" >/dev/null || echo "ci_system_deps: scripts/podman_base.sh failed; the system tier will say why" >&2
  fi
}
if [ ${#missing[@]} -eq 0 ]; then
  base_image
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
base_image
exit 0
