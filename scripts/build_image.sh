#!/usr/bin/env bash
# Builds the submission image from the unchanged Dockerfile with podman, on a machine with no Docker engine.
#
#   bash scripts/build_image.sh [NAME]        # NAME defaults to flare-lesion; the image is NAME:latest
#
# Where no container registry can be reached (these machines), it first makes a stand-in for the CUDA base
# image: a minimal Debian (debootstrap from the Debian mirror apt uses) with Python 3.11 and the CPU build
# of torch 2.13.0 (from the same local pip configuration the host uses), tagged
# localhost/flare-standin-base:<digest of its recipe>. The project image is then built on it with
# --build-arg BASE_IMAGE=... Both are cached: a second run that changes nothing makes nothing new.
#
# Base selection: BASE_IMAGE if set; else the Dockerfile's own base (the official pytorch/pytorch CUDA image)
# when it is already in podman's store or Docker Hub answers; else the stand-in. STANDIN=1 forces the
# stand-in, STANDIN=0 forbids it. With a Docker engine, `docker build -t NAME .` is all it takes
# (docs/docker.md).
#
# Package downloads inside the build go through the host's pip settings: its CA bundle (a TLS-inspecting
# proxy here), and its local wheel folders and file:// indexes, bind-mounted read-only for the build only
# (never committed into a layer).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/container/podman_env.sh

NAME=${1:-flare-lesion}
DEBIAN_SUITE=${DEBIAN_SUITE:-bookworm}              # bookworm's python3 is 3.11: the local torch wheel's
TORCH_REQUIREMENT=${TORCH_REQUIREMENT:-torch==2.13.0+cpu}
CACHE_DIR=${FLARE_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/flare-image}
REAL_BASE=$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile | head -n 1)
say() { echo "build_image: $*" >&2; }
seconds_since() { echo $(( $(date +%s) - $1 )); }

ensure_podman

# ------------------------------------------------------------------------- pip settings for build steps
BUILD_DIR=$(mktemp -d)
trap 'rm -rf "$BUILD_DIR"' EXIT
MOUNTS=()
PIP_FIND_LINKS_LIST=()
PIP_INDEXES=()
host_pip_values() {  # every value of a pip setting the host has, from any scope (file, env)
  python3 -m pip config list 2>/dev/null | sed -n "s/^[^.]*\.$1='\(.*\)'\$/\1/p" | tr ' ' '\n' | sed '/^$/d' | sort -u
}
add_local_source() {  # a host folder (or file:// URL) pip reads: mounted read-only at the same path
  local path=${1#file://}
  path=${path%/}
  [ -e "$path" ] || return 1
  # A file:// index (…/simple) links its files relative to itself (../../files/…): mount its parent.
  case $1 in file://*) path=$(dirname "$path") ;; esac
  MOUNTS+=(-v "$path:$path:ro")
}
for link in $(host_pip_values find-links); do
  if add_local_source "$link"; then PIP_FIND_LINKS_LIST+=("$link"); fi
done
for index in $(host_pip_values extra-index-url) $(host_pip_values index-url); do
  case $index in
    file://*) add_local_source "$index" && PIP_INDEXES+=("$index") ;;
    *) PIP_INDEXES+=("$index") ;;
  esac
done
{
  echo "[global]"
  echo "disable-pip-version-check = true"
  echo "timeout = 120"
  [ ${#PIP_FIND_LINKS_LIST[@]} -gt 0 ] && echo "find-links = ${PIP_FIND_LINKS_LIST[*]}"
  [ ${#PIP_INDEXES[@]} -gt 0 ] && echo "extra-index-url = ${PIP_INDEXES[*]}"
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then echo "cert = /run/host-ca.crt"; fi
} > "$BUILD_DIR/pip.conf"
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  MOUNTS+=(-v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro)
fi
# pip reads /etc/pip.conf in every image, so the unchanged Dockerfile's pip steps see these settings too.
MOUNTS+=(-v "$BUILD_DIR/pip.conf:/etc/pip.conf:ro")

# ---------------------------------------------------------------------------------------- the base image
registry_answers() {
  local code
  code=$(curl -s -m 5 -o /dev/null -w '%{http_code}' https://registry-1.docker.io/v2/ 2>/dev/null || true)
  [ "$code" = 401 ] || [ "$code" = 200 ]
}

local_torch_wheel() {  # the CPU torch wheel in one of the host's wheel folders, if any
  local folder
  for folder in "${PIP_FIND_LINKS_LIST[@]}"; do
    compgen -G "${folder#file://}/torch-${TORCH_REQUIREMENT#torch==}-cp311-*.whl" > /dev/null && return 0
  done
  return 1
}

build_standin_base() {
  local recipe_digest standin os_image rootfs_tar mirror started
  recipe_digest=$(cat scripts/container/standin-base.Containerfile <(echo "$DEBIAN_SUITE $TORCH_REQUIREMENT") \
                  | sha256sum | cut -c1-12)
  standin=localhost/flare-standin-base:$recipe_digest
  if podman image exists "$standin"; then
    say "stand-in base $standin (cached)"
    BASE_IMAGE=$standin
    return
  fi
  os_image=localhost/flare-standin-os:$DEBIAN_SUITE
  if ! podman image exists "$os_image"; then
    rootfs_tar=$CACHE_DIR/debian-$DEBIAN_SUITE-minbase-python3.tar
    if [ ! -s "$rootfs_tar" ]; then
      mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null \
               | head -n 1)
      mirror=${mirror:-http://deb.debian.org/debian}
      say "debootstrap $DEBIAN_SUITE (minbase + python3, pip) from $mirror (about 1-2 min)"
      started=$(date +%s)
      mkdir -p "$CACHE_DIR"
      rm -rf "$BUILD_DIR/rootfs"
      debootstrap --variant=minbase --include=python3,python3-pip,ca-certificates "$DEBIAN_SUITE" \
        "$BUILD_DIR/rootfs" "$mirror" > "$BUILD_DIR/debootstrap.log" 2>&1 \
        || { say "debootstrap failed; last lines:"; tail -n 5 "$BUILD_DIR/debootstrap.log" >&2; exit 1; }
      rm -rf "$BUILD_DIR"/rootfs/var/cache/apt/archives/*.deb "$BUILD_DIR"/rootfs/var/lib/apt/lists/*
      tar -C "$BUILD_DIR/rootfs" -cf "$rootfs_tar.partial" . && mv "$rootfs_tar.partial" "$rootfs_tar"
      rm -rf "$BUILD_DIR/rootfs"
      say "debootstrap done in $(seconds_since "$started") s ($rootfs_tar)"
    fi
    podman import --quiet "$rootfs_tar" "$os_image" > /dev/null
  fi
  local torch_index=()
  if ! local_torch_wheel; then
    say "no local $TORCH_REQUIREMENT wheel: using PyTorch's CPU index"
    torch_index=(--build-arg "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu")
  fi
  say "building the stand-in base $standin (Debian $DEBIAN_SUITE, $TORCH_REQUIREMENT)"
  podman build --network=host "${MOUNTS[@]}" "${torch_index[@]}" \
    --build-arg "OS_IMAGE=$os_image" --build-arg "TORCH_REQUIREMENT=$TORCH_REQUIREMENT" \
    -t "$standin" -f scripts/container/standin-base.Containerfile scripts/container > "$BUILD_DIR/base.log" 2>&1 \
    || { say "stand-in base build failed; last lines:"; tail -n 20 "$BUILD_DIR/base.log" >&2; exit 1; }
  BASE_IMAGE=$standin
  # Stand-ins of earlier recipes are no longer used by a new build: untag them (layers still used stay).
  podman images --format '{{.Repository}}:{{.Tag}}' | grep '^localhost/flare-standin-base:' \
    | grep -v ":$recipe_digest\$" | xargs -r podman rmi > /dev/null 2>&1 || true
}

if [ -n "${BASE_IMAGE:-}" ]; then
  say "base $BASE_IMAGE (BASE_IMAGE)"
elif [ "${STANDIN:-auto}" != 1 ] && { podman image exists "$REAL_BASE" || registry_answers; }; then
  say "base $REAL_BASE (the Dockerfile's own)"
elif [ "${STANDIN:-auto}" = 0 ]; then
  say "no registry reachable and STANDIN=0: cannot get $REAL_BASE"
  exit 1
else
  build_standin_base
fi

# ---------------------------------------------------------------------------------------- the image
started=$(date +%s)
BASE_ARG=()
[ -n "${BASE_IMAGE:-}" ] && BASE_ARG=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
say "building $NAME:latest from Dockerfile"
podman build --network=host "${MOUNTS[@]}" "${BASE_ARG[@]}" -t "$NAME:latest" -f Dockerfile . \
  > "$BUILD_DIR/build.log" 2>&1 || { say "podman build failed; last lines:"; tail -n 20 "$BUILD_DIR/build.log" >&2; exit 1; }
size=$(podman image inspect --format '{{.Size}}' "$NAME:latest")
say "built localhost/$NAME:latest in $(seconds_since "$started") s, $(numfmt --to=si --suffix=B "$size") uncompressed"
echo "$NAME:latest"
