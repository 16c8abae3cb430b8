#!/usr/bin/env bash
# Build the trainer and server images with podman from k8s/docker/Dockerfile (one shared base stage,
# two targets), on the Debian base image of scripts/podman_base.sh, using this host's pip setup:
# its CA bundle, its wheel directory (the CPU torch==2.13.0 wheel) and local indexes, and the
# versions installed here as constraints (the image runs what the tests ran on the host).
#   bash scripts/build_images.sh              # -> localhost/llama-train-{trainer,server}:0.1.0
# A rebuild after a code change reuses every layer up to `COPY llama_train` (podman's layer cache,
# kept under ~/.cache/llama_train/containers/storage).
# On a Docker host with a registry: docker build -f k8s/docker/Dockerfile --target server ... (README).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
bash "$repo/scripts/podman_base.sh" >/dev/null  # containers.conf, storage.conf, the base image
. "$repo/scripts/podman_base.sh"               # their variables, here
tag="${LLAMA_TRAIN_IMAGE_TAG:-0.1.0}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# pip config for the build: what the host's pip uses (find-links, extra indexes, CA bundle).
mounts=()
pipconf="$work/pip.conf"
printf '[global]\n' > "$pipconf"
cert="$(python -m pip config get global.cert 2>/dev/null || true)"
cert="${PIP_CERT:-${cert:-/etc/ssl/certs/ca-certificates.crt}}"
if [ -f "$cert" ]; then
  mounts+=(-v "$cert:/etc/llama-train-build/ca.crt:ro")
  printf 'cert = /etc/llama-train-build/ca.crt\n' >> "$pipconf"
fi
links="${PIP_FIND_LINKS:-$(python -m pip config get global.find-links 2>/dev/null || true)}"
extra="${PIP_EXTRA_INDEX_URL:-$(python -m pip config get global.extra-index-url 2>/dev/null || true)}"
for d in $links ${extra//file:\/\//}; do
  d="${d%/simple}"
  [ -d "$d" ] && mounts+=(-v "$d:$d:ro")
done
[ -n "$links" ] && printf 'find-links = %s\n' "$links" >> "$pipconf"
[ -n "$extra" ] && printf 'extra-index-url = %s\n' "$extra" >> "$pipconf"
python -m pip list --format=freeze --exclude-editable 2>/dev/null > "$work/constraints.txt" || true
mounts+=(-v "$work/constraints.txt:/etc/llama-train-build/constraints.txt:ro")
printf 'constraint = /etc/llama-train-build/constraints.txt\n' >> "$pipconf"
mounts+=(-v "$pipconf:/etc/pip.conf:ro")

# torch from PyPI's index name plus the host's find-links: pip prefers the local 2.13.0+cpu wheel
# (a local version sorts above the public one) and never fetches the CUDA one.
torch_index=https://download.pytorch.org/whl/cpu
ls $links 2>/dev/null | grep -q '^torch-.*+cpu' && torch_index=https://pypi.org/simple

# The build context: only what the Dockerfile copies, with fixed modes and timestamps. Buildah's
# layer cache key for COPY includes the files' mtimes, so a fresh clone (new mtimes) would otherwise
# reinstall every dependency; the content still decides (a changed file changes the key).
ctx="$work/context"
mkdir -p "$ctx"
cp "$repo/pyproject.toml" "$repo/README.md" "$repo/.dockerignore" "$ctx/"
tar -C "$repo" --exclude=__pycache__ --exclude='*.pyc' -cf - llama_train | tar -C "$ctx" -xf -
chmod -R u=rwX,go=rX "$ctx"
find "$ctx" -exec touch -h -d @0 {} +

for target in trainer server; do
  start=$(date +%s)
  podman build --format docker --layers -f "$repo/k8s/docker/Dockerfile" --target "$target" \
    --build-arg PYTHON_IMAGE="$LLAMA_TRAIN_BASE_IMAGE" --build-arg TORCH_INDEX="$torch_index" \
    "${mounts[@]}" -t "localhost/llama-train-$target:$tag" "$ctx"
  echo "build_images: localhost/llama-train-$target:$tag in $(( $(date +%s) - start )) s" >&2
done
# Drop layers no tag or current build step uses any more (older dependency sets), so the cached
# storage does not grow with every change; the layers of this build stay cached (checked).
podman image prune -f >/dev/null
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep llama-train >&2
