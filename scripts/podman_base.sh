#!/usr/bin/env bash
# Rootful podman set up the way this project's system tier (tests/system) and scripts/build_images.sh
# use it, then the Python base image built from Debian packages (no container registry is reachable
# on CI machines, so python:3.11-slim cannot be pulled):
#   - containers.conf: runtime runc (crun refuses hybrid cgroup hierarchies) and explicit
#     default_ulimits (the defaults fail without CAP_SYS_RESOURCE);
#   - storage.conf: podman's layers under the cache directory, so a CI cache of it keeps them;
#   - the base image localhost/debian-py311:bookworm from `mmdebstrap` (bookworm minbase + python3),
#     the rootfs tarball cached too (~3 min to make, ~30 s to import).
# Run it (`bash scripts/podman_base.sh`) to prepare everything; it prints the variables. Source it
# (`. scripts/podman_base.sh`) to export CONTAINERS_CONF / CONTAINERS_STORAGE_CONF /
# LLAMA_TRAIN_BASE_IMAGE into your shell (and write the two files) without building anything.
# Cache: $LLAMA_TRAIN_CACHE (default ~/.cache/llama_train)/containers.
_lt_cache="${LLAMA_TRAIN_CACHE:-$HOME/.cache/llama_train}/containers"
mkdir -p "$_lt_cache/storage"
export CONTAINERS_CONF="$_lt_cache/containers.conf"
export CONTAINERS_STORAGE_CONF="$_lt_cache/storage.conf"
export LLAMA_TRAIN_BASE_IMAGE="${LLAMA_TRAIN_BASE_IMAGE:-localhost/debian-py311:bookworm}"
cat > "$CONTAINERS_CONF" <<CONF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
CONF
cat > "$CONTAINERS_STORAGE_CONF" <<CONF
[storage]
driver = "overlay"
graphroot = "$_lt_cache/storage"
runroot = "/run/containers/storage"
CONF
if [ "${BASH_SOURCE[0]}" != "$0" ]; then
  return 0  # sourced: the environment only (no `set -e` leaking into an interactive shell)
fi
set -euo pipefail

for tool in podman runc mmdebstrap; do
  command -v "$tool" >/dev/null || { echo "podman_base: $tool is not installed (bash scripts/ci_system_deps.sh installs it)" >&2; exit 3; }
done

if ! podman image exists "$LLAMA_TRAIN_BASE_IMAGE"; then
  rootfs="$_lt_cache/rootfs-bookworm-py311.tar"
  if [ ! -s "$rootfs" ]; then
    start=$(date +%s)
    # The host's Debian mirror (a deb822 URIs line), else the default one.
    mirror=$(sed -n 's/^URIs: *\([^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
    mmdebstrap --quiet --format=tar --variant=minbase \
      --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
      bookworm "$rootfs.part" "deb ${mirror:-http://deb.debian.org/debian} bookworm main"
    mv "$rootfs.part" "$rootfs"
    echo "podman_base: rootfs made in $(( $(date +%s) - start )) s" >&2
  fi
  start=$(date +%s)
  podman import --change 'CMD ["/bin/bash"]' "$rootfs" "$LLAMA_TRAIN_BASE_IMAGE" >/dev/null
  echo "podman_base: imported $LLAMA_TRAIN_BASE_IMAGE in $(( $(date +%s) - start )) s" >&2
fi
echo "export CONTAINERS_CONF=$CONTAINERS_CONF CONTAINERS_STORAGE_CONF=$CONTAINERS_STORAGE_CONF LLAMA_TRAIN_BASE_IMAGE=$LLAMA_TRAIN_BASE_IMAGE"
