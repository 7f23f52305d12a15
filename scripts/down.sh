#!/usr/bin/env bash
# Stops what scripts/up.sh started: every process named by a pid file in $STATE_DIR/pids
# (operator and node agent, then the gateway, etcd last). State (etcd data, tokens, kubeconfig) is kept.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_DIR="${STATE_DIR:-$REPO/.state}"
PIDS="$STATE_DIR/pids"

say() { printf 'down: %s\n' "$*"; }

if [ ! -d "$PIDS" ]; then
  say "nothing to stop ($PIDS does not exist)"
  exit 0
fi
STATE_DIR="$(cd "$STATE_DIR" && pwd)"
rm -f "$STATE_DIR/karri.env"

stop() {
  local pidfile="$1" name pid i
  name="$(basename "$pidfile" .pid)"
  pid="$(cat "$pidfile" 2>/dev/null || true)"
  if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
    say "$name not running"
    rm -f "$pidfile"
    return
  fi
  # Only stop it if it is ours: its command line names this state dir (pids get recycled).
  if ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$STATE_DIR"; then
    say "$name: pid $pid is not a process of $STATE_DIR; leaving it alone"
    rm -f "$pidfile"
    return
  fi
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
  rm -f "$pidfile"
}

shopt -s nullglob
# Clients of the gateway first, then the gateway, then anything else, etcd last.
for name in operator node-agent api-gateway; do
  [ -f "$PIDS/$name.pid" ] && stop "$PIDS/$name.pid"
done
for f in "$PIDS"/*.pid; do
  [ "$(basename "$f")" = etcd.pid ] || stop "$f"
done
[ -f "$PIDS/etcd.pid" ] && stop "$PIDS/etcd.pid"
say "done (state kept in $STATE_DIR)"
