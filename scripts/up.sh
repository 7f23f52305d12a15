#!/usr/bin/env bash
# Brings up Karri on this machine: etcd, api-gateway, operator and one node agent (node-1 on
# libvirtd + QEMU, or libvirt's test driver with HYPERVISOR=test), state under $STATE_DIR (default
# <repo>/.state). Re-runnable: a running etcd from this state dir is kept, the gateway is
# restarted with the current binary. Stop everything with scripts/down.sh.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_DIR="${STATE_DIR:-$REPO/.state}"
ETCD_PORT="${KARRI_ETCD_PORT:-2379}"
ETCD_PEER_PORT="${KARRI_ETCD_PEER_PORT:-$((ETCD_PORT + 1))}"
API_PORT="${KARRI_API_PORT:-6443}"
AWS_PORT="${KARRI_AWS_PORT:-8773}"
REGION="${KARRI_REGION:-karri-1}"
OPERATOR_METRICS_PORT="${KARRI_OPERATOR_METRICS_PORT:-9464}"
AGENT_METRICS_PORT="${KARRI_AGENT_METRICS_PORT:-9465}"
HYPERVISOR="${HYPERVISOR:-qemu}"
ETCD_BIN="${KARRI_ETCD_BIN:-/usr/bin/etcd}"
BIN_DIR="${KARRI_BIN_DIR:-$REPO/target/debug}"
GATEWAY_BIN="$BIN_DIR/api-gateway"

mkdir -p "$STATE_DIR/logs" "$STATE_DIR/pids"
STATE_DIR="$(cd "$STATE_DIR" && pwd)"
LOGS="$STATE_DIR/logs"
PIDS="$STATE_DIR/pids"
ETCD_URL="http://127.0.0.1:$ETCD_PORT"
API_URL="https://127.0.0.1:$API_PORT"
AWS_URL="https://127.0.0.1:$AWS_PORT"
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
port_in_use "$AWS_PORT" && die "port $AWS_PORT is taken by another process (set KARRI_AWS_PORT)"
say "starting api-gateway at $API_URL (EC2 at $AWS_URL/services/compute)"
start_bg "$GW_PID" "$LOGS/api-gateway.log" "$GATEWAY_BIN" \
  --listen "127.0.0.1:$API_PORT" \
  --aws-listen "127.0.0.1:$AWS_PORT" \
  --region "$REGION" \
  --secrets-key-file "$STATE_DIR/secrets.key" \
  --etcd-endpoints "$ETCD_URL" \
  --tokens-file "$TOKENS" \
  --cert-dir "$PKI"
# The gateway writes its CA into $PKI on first start; curl trusts exactly that CA.
wait_http api-gateway "$API_URL/readyz" "$GW_PID" "$LOGS/api-gateway.log" 60 --cacert "$PKI/ca.crt"

# --- kubeconfigs: admin (yours), operator and node-1 (for the services) ---------------------
token_of() { awk -v u="$1" '$1 == "-" && $2 == "token:" { t = $3 } $1 == "user:" && $2 == u { print t; exit }' "$TOKENS"; }
# write_kubeconfig FILE USER TOKEN
write_kubeconfig() {
  (
    umask 077
    cat >"$1.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: karri
  cluster:
    server: $API_URL
    certificate-authority: $PKI/ca.crt
users:
- name: $2
  user:
    token: $3
contexts:
- name: karri
  context:
    cluster: karri
    user: $2
    namespace: default
current-context: karri
EOF
  )
  mv "$1.tmp" "$1"
}
KUBECONFIG_FILE="$STATE_DIR/kubeconfig"
write_kubeconfig "$KUBECONFIG_FILE" admin "$ADMIN_TOKEN"
OPERATOR_TOKEN="$(token_of operator)"
NODE_TOKEN="$(token_of node-1)"
[ -n "$OPERATOR_TOKEN" ] && [ -n "$NODE_TOKEN" ] || die "no operator or node-1 token in $TOKENS"
write_kubeconfig "$STATE_DIR/kubeconfig-operator" operator "$OPERATOR_TOKEN"
write_kubeconfig "$STATE_DIR/kubeconfig-node-1" node-1 "$NODE_TOKEN"
kc() { kubectl --kubeconfig "$KUBECONFIG_FILE" "$@"; }

# --- the catalogue: zones and instance types ----------------------------------------------
kc apply -f "$REPO/config/samples/availability-zone.yaml" -f "$REPO/config/samples/instance-type.yaml" >/dev/null
say "catalogue: $(kc get availabilityzones -o name | wc -l) zones, $(kc get instancetypes -o name | wc -l) instance types"

# --- the admin account and its access key (the secret is shown once, so it is kept here) ------
KARRI_CLI="$BIN_DIR/karri"
[ -x "$KARRI_CLI" ] || die "$KARRI_CLI missing: run 'make build'"
"$KARRI_CLI" --kubeconfig "$KUBECONFIG_FILE" account create admin --if-missing \
  --display-name "Cloud administrators" >/dev/null
CREDS="$STATE_DIR/admin-credentials"
if [ ! -s "$CREDS" ]; then
  say "creating the admin account's access key ($CREDS)"
  (
    umask 077
    "$KARRI_CLI" --kubeconfig "$KUBECONFIG_FILE" access-key create --account admin --user admin --env >"$CREDS.tmp"
  ) || die "could not create the admin access key"
  mv "$CREDS.tmp" "$CREDS"
fi

# --- hypervisor, operator, node agent -----------------------------------------------------
case "$HYPERVISOR" in
  qemu)
    bash "$REPO/scripts/libvirtd.sh" || die "libvirtd is needed for HYPERVISOR=qemu: install it with 'make setup', or run 'HYPERVISOR=test make up' for libvirt's test driver"
    LIBVIRT_URI="qemu:///system" ;;
  test) LIBVIRT_URI="test:///default" ;;
  *) die "HYPERVISOR must be qemu or test, not '$HYPERVISOR'" ;;
esac
for svc in operator node-agent; do
  [ -x "$BIN_DIR/$svc" ] || die "$BIN_DIR/$svc missing: run 'make build'"
  if running "$PIDS/$svc.pid" "$STATE_DIR"; then
    say "restarting $svc (pid $(cat "$PIDS/$svc.pid")) with the current binary"
    stop_pid "$PIDS/$svc.pid"
  fi
done
say "starting operator"
start_bg "$PIDS/operator.pid" "$LOGS/operator.log" "$BIN_DIR/operator" \
  --kubeconfig "$STATE_DIR/kubeconfig-operator" --identity "operator-$(hostname)" \
  --metrics-listen "127.0.0.1:$OPERATOR_METRICS_PORT"
say "starting node-agent node-1 on $LIBVIRT_URI"
start_bg "$PIDS/node-agent.pid" "$LOGS/node-agent.log" "$BIN_DIR/node-agent" \
  --kubeconfig "$STATE_DIR/kubeconfig-node-1" --node-name node-1 --zone karri-1a \
  --libvirt-uri "$LIBVIRT_URI" --metrics-listen "127.0.0.1:$AGENT_METRICS_PORT"
kc wait --for=condition=Ready node.karri.dev/node-1 --timeout=90s >/dev/null \
  || { tail -n 20 "$LOGS/node-agent.log" "$LOGS/operator.log" >&2; die "node-1 did not become Ready"; }
say "node-1 is Ready"

# karri.env carries the admin account's secret key: only its owner may read it.
(
umask 077
{
  printf 'export KUBECONFIG=%q\n' "$KUBECONFIG_FILE"
  printf 'export PATH=%q:"$PATH"\n' "$REPO/.venv/bin"
  printf 'export KARRI_STATE_DIR=%q\n' "$STATE_DIR"
  printf 'export KARRI_API_URL=%q\n' "$API_URL"
  printf 'export KARRI_ETCD_ENDPOINTS=%q\n' "$ETCD_URL"
  cat "$CREDS"
  printf 'export AWS_ENDPOINT_URL=%q\n' "$AWS_URL"
  printf 'export AWS_DEFAULT_REGION=%q\n' "$REGION"
  printf 'export AWS_CA_BUNDLE=%q\n' "$PKI/ca.crt"
  printf 'export EC2_URL=%q\n' "$AWS_URL/services/compute"
} >"$STATE_DIR/karri.env.tmp"
)
mv "$STATE_DIR/karri.env.tmp" "$STATE_DIR/karri.env"

cat <<EOF

Karri is up.
  etcd         $ETCD_URL   (data $STATE_DIR/etcd, log $LOGS/etcd.log)
  api-gateway  $API_URL (resource API), $AWS_URL (EC2, region $REGION)   (log $LOGS/api-gateway.log)
  operator     metrics http://127.0.0.1:$OPERATOR_METRICS_PORT/metrics   (log $LOGS/operator.log)
  node-agent   node-1 in karri-1a on $LIBVIRT_URI, metrics http://127.0.0.1:$AGENT_METRICS_PORT/metrics   (log $LOGS/node-agent.log)
  tokens       $TOKENS
  kubeconfig   $KUBECONFIG_FILE (user admin)

Use it:
  . $STATE_DIR/karri.env && kubectl get instances -A
  kubectl apply -f config/samples/instance.yaml && kubectl get instances -w
  virsh -c $LIBVIRT_URI list --all
  aws ec2 describe-availability-zones && aws ec2 describe-instances
  $BIN_DIR/karri account create research && $BIN_DIR/karri access-key create --account research
EOF
if [ -n "${KARRI_DETACH:-}" ]; then
  echo "Left running in the background (KARRI_DETACH); stop everything with: make down"
  exit 0
fi
echo "Ctrl-C stops everything (the state stays in $STATE_DIR; 'make up' again reuses it)."
trap 'echo; bash "$REPO/scripts/down.sh"; exit 0' INT TERM
# The services are this shell's children: wait for them; Ctrl-C runs the trap.
wait
