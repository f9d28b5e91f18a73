# Sourced by the container scripts: makes podman usable on a machine without a Docker engine or systemd.
#   . scripts/container/podman_env.sh && ensure_podman && start_docker_api
# ensure_podman   installs podman, runc, buildah, debootstrap from Debian when missing (root only) and points
#                 podman at this folder's containers.conf (CONTAINERS_CONF; nothing under /etc is changed).
# start_docker_api  serves podman's Docker-compatible API on a socket and exports DOCKER_HOST, so the `docker`
#                 command-line client (no engine) runs containers through podman, as `docker run` would.
CONTAINER_TOOLS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export CONTAINERS_CONF=${CONTAINERS_CONF:-$CONTAINER_TOOLS_DIR/containers.conf}

container_say() { echo "$(basename "$0"): $*" >&2; }

ensure_podman() {
  local missing=()
  local tool
  for tool in podman runc debootstrap; do
    command -v "$tool" > /dev/null || missing+=("$tool")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get > /dev/null; then
    container_say "needs ${missing[*]} (Debian: apt-get install podman buildah runc debootstrap uidmap fuse-overlayfs)"
    return 1
  fi
  container_say "installing podman, runc, debootstrap from Debian (about 30 s)"
  apt-get update -qq > /dev/null \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah runc debootstrap uidmap \
       fuse-overlayfs slirp4netns > /dev/null \
    || { container_say "apt-get could not install podman"; return 1; }
}

# The Docker-compatible API of podman on a socket of our own, started afresh each time: a service left
# running by an earlier run answered the docker client's attach with HTTP 409 ("unable to upgrade to tcp")
# on every later run (podman 4.3, 2026-12-01), while a fresh one worked.
start_docker_api() {
  local socket=${PODMAN_DOCKER_SOCKET:-/run/flare-podman/docker.sock}
  export DOCKER_HOST=unix://$socket
  if [ -f "$socket.pid" ]; then
    kill "$(cat "$socket.pid")" 2>/dev/null
    rm -f "$socket.pid"
  fi
  mkdir -p "$(dirname "$socket")"
  rm -f "$socket"
  # --time=0: serve until killed; it is left running after this run (the next start replaces it).
  nohup podman system service --time=0 "unix://$socket" > "$(dirname "$socket")/service.log" 2>&1 &
  echo $! > "$socket.pid"
  local tries
  for tries in $(seq 50); do
    [ -S "$socket" ] && return 0
    sleep 0.2
  done
  container_say "podman's Docker API did not start (see $(dirname "$socket")/service.log)"
  return 1
}
