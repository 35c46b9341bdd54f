#!/usr/bin/env bash
# Start or stop a private Docker engine for tests, and make the local base image.
#
#   .ci/engine.sh start STATE_DIR   starts dockerd (unless one answers at STATE_DIR/docker.sock)
#   .ci/engine.sh stop STATE_DIR    stops the dockerd this script started, by its PID
#   .ci/engine.sh base-image NAME   builds a Debian bookworm + python3 base image with mmdebstrap
#   .ci/engine.sh runtime-base-image NAME   the same, slim: interpreter and stdlib only (runtime images)
#
# Facts behind this (../shared/environment.md): no systemd, Debian's docker.io 20.10, a
# private bridge so we never fight another daemon over docker0, and no registry to pull
# a base image from, so the base image is made with mmdebstrap and `docker import`.
set -euo pipefail

cmd=${1:?usage: engine.sh start|stop STATE_DIR | base-image|runtime-base-image NAME}
bridge=${OLIVE_BUILDER_TEST_BRIDGE:-obr0}
bridge_cidr=${OLIVE_BUILDER_TEST_BRIDGE_CIDR:-172.31.251.1/24}

case "$cmd" in
start)
  state=$(realpath -m "${2:?state dir}")
  mkdir -p "$state"
  export DOCKER_HOST="unix://$state/docker.sock"
  if [ -S "$state/docker.sock" ] && docker version >/dev/null 2>&1; then
    echo "dockerd already answers at $DOCKER_HOST"; exit 0
  fi
  if ! ip link show "$bridge" >/dev/null 2>&1; then
    ip link add "$bridge" type bridge
    ip addr add "$bridge_cidr" dev "$bridge"
  fi
  ip link set "$bridge" up
  # setsid: the daemon must not die with this script's process group; stop() ends it by PID.
  setsid dockerd --data-root "$state/data" --exec-root "$state/exec" \
    --pidfile "$state/dockerd.pid" -H "$DOCKER_HOST" --bridge="$bridge" \
    --storage-driver=overlay2 >"$state/dockerd.log" 2>&1 < /dev/null &
  for _ in $(seq 1 100); do
    if docker version >/dev/null 2>&1; then echo "dockerd ready at $DOCKER_HOST"; exit 0; fi
    sleep 0.2
  done
  echo "dockerd did not start; its log:" >&2; tail -n 30 "$state/dockerd.log" >&2; exit 1
  ;;
stop)
  state=$(realpath -m "${2:?state dir}")
  pidfile="$state/dockerd.pid"
  [ -f "$pidfile" ] || { echo "no dockerd pidfile in $state"; exit 0; }
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$pidfile"
  echo "dockerd $pid stopped"
  ;;
base-image|runtime-base-image)
  name=${2:?image name}
  if docker image inspect "$name" >/dev/null 2>&1; then echo "$name exists"; exit 0; fi
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/obase.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  if [ "$cmd" = base-image ]; then
    # For builders and build stages: python3 with venv and pip.
    packages=ca-certificates,python3,python3-venv; slim=()
  else
    # For runtime images: the interpreter and its standard library, no pip, no docs.
    packages=ca-certificates,python3-minimal,libpython3.11-stdlib
    slim=(--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*'
          --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*')
  fi
  TMPDIR=$tmp mmdebstrap --quiet --variant=minbase --include="$packages" "${slim[@]}" \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --setup-hook='mkdir -p "$1/usr/local/share/ca-certificates" && cp /usr/local/share/ca-certificates/*.crt "$1/usr/local/share/ca-certificates/" 2>/dev/null || true' \
    bookworm - "deb http://deb.debian.org/debian bookworm main" \
    "deb http://deb.debian.org/debian bookworm-updates main" \
    "deb http://deb.debian.org/debian-security bookworm-security main" \
    | docker import -c 'CMD ["/bin/bash"]' -c 'ENV LANG=C.UTF-8' - "$name" >/dev/null
  echo "built base image $name"
  ;;
*)
  echo "unknown command $cmd" >&2; exit 2;;
esac
