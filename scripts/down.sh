#!/usr/bin/env bash
# Stops what scripts/up.sh started: every process named by a pid file in $STATE_DIR/pids
# (operator and node agent, then the gateway, etcd last) and the simulated host (its libvirtd,
# guests, DHCP server and network namespace: scripts/simhost.sh stop). Without pid files (the
# directory was removed) it finds those processes by their command lines, which name the state
# directory. State (etcd data, tokens, kubeconfig, images, instance disks) is kept; `make up`
# starts the guests of running instances again.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_DIR="${STATE_DIR:-$REPO/.state}"
PIDS="$STATE_DIR/pids"

say() { printf 'down: %s\n' "$*"; }

if [ ! -d "$STATE_DIR" ]; then
  say "nothing to stop ($STATE_DIR does not exist)"
  exit 0
fi
STATE_DIR="$(cd "$STATE_DIR" && pwd)"
rm -f "$STATE_DIR/karri.env"

# Whether process $1's command line names this state directory (pids get recycled).
ours() {
  tr '\0' '\n' <"/proc/$1/cmdline" 2>/dev/null | grep -qF -- "$STATE_DIR/"
}

# The pids of this state directory's processes named $1 (for when their pid files are gone).
found() {
  local pid
  for pid in $(pgrep -x "$1" 2>/dev/null || true); do
    if ours "$pid"; then echo "$pid"; fi
  done
}

stop() {
  local pidfile="$1" name pid
  name="$(basename "$pidfile" .pid)"
  pid="$(cat "$pidfile" 2>/dev/null || true)"
  if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
    say "$name not running"
    rm -f "$pidfile"
    return
  fi
  if ! ours "$pid"; then
    say "$name: pid $pid is not a process of $STATE_DIR; leaving it alone"
    rm -f "$pidfile"
    return
  fi
  stop_pid "$name" "$pid"
  rm -f "$pidfile"
}

# Stops the services named $@ of this state directory: by pid file, or found by command line
# when the pid files are gone.
stop_named() {
  local name pid
  for name in "$@"; do
    if [ -d "$PIDS" ]; then
      if [ -f "$PIDS/$name.pid" ]; then stop "$PIDS/$name.pid"; fi
    else
      for pid in $(found "$name"); do stop_pid "$name" "$pid"; done
    fi
  done
}

stop_pid() {
  local name="$1" pid="$2" i
  say "stopping $name (pid $pid)"
  kill "$pid" 2>/dev/null || true
  for i in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    say "$name did not exit after 10s; killing"
    kill -9 "$pid" 2>/dev/null || true
  fi
}

shopt -s nullglob
if [ ! -d "$PIDS" ]; then
  say "no pid files ($PIDS does not exist): looking for the processes of $STATE_DIR"
fi
# Clients of the gateway first, then the gateway, then anything else, etcd last.
stop_named operator node-agent api-gateway
# The simulated host, once its node agent is gone (nothing recreates its domains any more).
# Only this state dir's: the namespace may hold another state dir's cloud (/run/karri/NETNS.owner).
netns="$(cat "$STATE_DIR/netns" 2>/dev/null || echo "${KARRI_NETNS:-karri-up}")"
owner="$(cat "/run/karri/$netns.owner" 2>/dev/null || true)"
host_pid="$(cat "$STATE_DIR/host/libvirtd.pid" 2>/dev/null || true)"
if [ -n "$owner" ] && [ "$owner" != "$STATE_DIR" ]; then
  [ ! -d "$STATE_DIR/host" ] || say "network namespace $netns is the cloud of $owner; leaving it alone"
elif [ -d "$STATE_DIR/host" ] && { [ -e "/run/netns/$netns" ] || { [ -n "$host_pid" ] && kill -0 "$host_pid" 2>/dev/null; }; }; then
  say "stopping the simulated host (network namespace $netns)"
  if bash "$REPO/scripts/simhost.sh" stop "$STATE_DIR/host" "$netns"; then
    rm -f "/run/karri/$netns.owner"
  else
    say "scripts/simhost.sh stop failed; see $STATE_DIR/host/libvirtd.log"
    failed=1
  fi
fi
for f in "$PIDS"/*.pid; do
  [ "$(basename "$f")" = etcd.pid ] || stop "$f"
done
stop_named etcd
if [ -n "${failed:-}" ]; then
  say "the simulated host did not stop (network namespace $netns); the rest is stopped"
  exit 1
fi
say "done (state kept in $STATE_DIR)"
