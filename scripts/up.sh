#!/usr/bin/env bash
# Brings up Karri on this machine: etcd + api-gateway, state under $STATE_DIR (default
# <repo>/.state). Re-runnable: a running etcd from this state dir is kept, the gateway is
# restarted with the current binary. Stop everything with scripts/down.sh.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_DIR="${STATE_DIR:-$REPO/.state}"
ETCD_PORT="${KARRI_ETCD_PORT:-2379}"
ETCD_PEER_PORT="${KARRI_ETCD_PEER_PORT:-$((ETCD_PORT + 1))}"
API_PORT="${KARRI_API_PORT:-6443}"
ETCD_BIN="${KARRI_ETCD_BIN:-/usr/bin/etcd}"
BIN_DIR="${KARRI_BIN_DIR:-$REPO/target/debug}"
GATEWAY_BIN="$BIN_DIR/api-gateway"

mkdir -p "$STATE_DIR/logs" "$STATE_DIR/pids"
STATE_DIR="$(cd "$STATE_DIR" && pwd)"
LOGS="$STATE_DIR/logs"
PIDS="$STATE_DIR/pids"
ETCD_URL="http://127.0.0.1:$ETCD_PORT"
API_URL="https://127.0.0.1:$API_PORT"
PKI="$STATE_DIR/pki"

say() { printf 'up: %s\n' "$*"; }
die() { printf 'up: %s\n' "$*" >&2; exit 1; }
curl_q() { curl --noproxy '*' -fsS --max-time 2 "$@"; }

# running PIDFILE MARKER: the pid in PIDFILE is alive and its command line contains MARKER
# (guards against a recycled pid).
running() {
  local pid
  [ -f "$1" ] || return 1
  pid="$(cat "$1" 2>/dev/null)" || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$2"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# stop_pid PIDFILE: TERM, wait up to 10 s, then KILL.
stop_pid() {
  local pid i
  pid="$(cat "$1")"
  kill "$pid" 2>/dev/null || true
  for i in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$1"
}

# wait_http NAME URL PIDFILE LOG SECONDS [CURL ARGS]: poll URL until it answers 2xx; fail if
# the process dies.
wait_http() {
  local name="$1" url="$2" pidfile="$3" log="$4" secs="$5" deadline
  shift 5
  deadline=$((SECONDS + secs))
  until curl_q "$@" -o /dev/null "$url" 2>/dev/null; do
    if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      tail -n 30 "$log" >&2 || true
      die "$name exited during startup (log: $log)"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      tail -n 30 "$log" >&2 || true
      die "$name not ready at $url after ${secs}s (log: $log)"
    fi
    sleep 0.2
  done
}

# start_bg PIDFILE LOG CMD...: start CMD detached (own session, survives the shell), record pid.
start_bg() {
  local pidfile="$1" log="$2"
  shift 2
  printf '=== %s up.sh: starting %s\n' "$(date -Is)" "$*" >>"$log"
  setsid "$@" </dev/null >>"$log" 2>&1 &
  echo "$!" >"$pidfile"
}

# karri.env appears only once everything is ready.
rm -f "$STATE_DIR/karri.env"

# --- etcd ---------------------------------------------------------------------------------
ETCD_PID="$PIDS/etcd.pid"
if running "$ETCD_PID" "$STATE_DIR/etcd"; then
  say "etcd already running (pid $(cat "$ETCD_PID")) at $ETCD_URL"
else
  [ -x "$ETCD_BIN" ] || die "$ETCD_BIN missing: run 'make setup' (Debian etcd-server)"
  port_in_use "$ETCD_PORT" && die "port $ETCD_PORT is taken by another process (Debian's etcd service? 'systemctl disable --now etcd'; or set KARRI_ETCD_PORT)"
  say "starting etcd at $ETCD_URL (data $STATE_DIR/etcd)"
  start_bg "$ETCD_PID" "$LOGS/etcd.log" "$ETCD_BIN" \
    --name karri \
    --data-dir "$STATE_DIR/etcd" \
    --listen-client-urls "$ETCD_URL" \
    --advertise-client-urls "$ETCD_URL" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "karri=http://127.0.0.1:$ETCD_PEER_PORT"
fi
wait_http etcd "$ETCD_URL/health" "$ETCD_PID" "$LOGS/etcd.log" 30

# --- tokens -------------------------------------------------------------------------------
TOKENS="$STATE_DIR/tokens.yaml"
if [ ! -s "$TOKENS" ]; then
  say "generating $TOKENS"
  tok() { head -c 24 /dev/urandom | base64 | tr -d '/+='; }
  (
    umask 077
    cat >"$TOKENS.tmp" <<EOF
tokens:
  - token: $(tok)
    user: admin
    role: admin
  - token: $(tok)
    user: operator
    role: operator
  - token: $(tok)
    user: node-1
    role: node
    node: node-1
EOF
  )
  mv "$TOKENS.tmp" "$TOKENS"
fi
ADMIN_TOKEN="$(awk '$1 == "-" && $2 == "token:" { t = $3 } $1 == "user:" && $2 == "admin" { print t; exit }' "$TOKENS")"
[ -n "$ADMIN_TOKEN" ] || die "no admin token in $TOKENS"

# --- api-gateway --------------------------------------------------------------------------
[ -x "$GATEWAY_BIN" ] || die "$GATEWAY_BIN missing: run 'make build' (cargo build --workspace --bins)"
GW_PID="$PIDS/api-gateway.pid"
if running "$GW_PID" "$TOKENS"; then
  say "restarting api-gateway (pid $(cat "$GW_PID")) with the current binary"
  stop_pid "$GW_PID"
fi
port_in_use "$API_PORT" && die "port $API_PORT is taken by another process (set KARRI_API_PORT)"
say "starting api-gateway at $API_URL"
start_bg "$GW_PID" "$LOGS/api-gateway.log" "$GATEWAY_BIN" \
  --listen "127.0.0.1:$API_PORT" \
  --etcd-endpoints "$ETCD_URL" \
  --tokens-file "$TOKENS" \
  --cert-dir "$PKI"
# The gateway writes its CA into $PKI on first start; curl trusts exactly that CA.
wait_http api-gateway "$API_URL/readyz" "$GW_PID" "$LOGS/api-gateway.log" 60 --cacert "$PKI/ca.crt"

# --- kubeconfig, then karri.env (its presence means: up and ready) --------------------------
KUBECONFIG_FILE="$STATE_DIR/kubeconfig"
(
  umask 077
  cat >"$KUBECONFIG_FILE.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: karri
  cluster:
    server: $API_URL
    certificate-authority: $PKI/ca.crt
users:
- name: admin
  user:
    token: $ADMIN_TOKEN
contexts:
- name: karri
  context:
    cluster: karri
    user: admin
    namespace: default
current-context: karri
EOF
)
mv "$KUBECONFIG_FILE.tmp" "$KUBECONFIG_FILE"

{
  printf 'export KUBECONFIG=%q\n' "$KUBECONFIG_FILE"
  printf 'export PATH=%q:"$PATH"\n' "$REPO/.venv/bin"
  printf 'export KARRI_STATE_DIR=%q\n' "$STATE_DIR"
  printf 'export KARRI_API_URL=%q\n' "$API_URL"
  printf 'export KARRI_ETCD_ENDPOINTS=%q\n' "$ETCD_URL"
} >"$STATE_DIR/karri.env.tmp"
mv "$STATE_DIR/karri.env.tmp" "$STATE_DIR/karri.env"

cat <<EOF

Karri is up.
  etcd         $ETCD_URL   (data $STATE_DIR/etcd, log $LOGS/etcd.log)
  api-gateway  $API_URL   (log $LOGS/api-gateway.log)
  tokens       $TOKENS
  kubeconfig   $KUBECONFIG_FILE (user admin)

Use it:
  . $STATE_DIR/karri.env && kubectl get instances -A
  kubectl apply -f config/samples/

The EC2 endpoint (awscli/boto3 from .venv) comes with a later issue.
Stop everything with: make down
EOF
