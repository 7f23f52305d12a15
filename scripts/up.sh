#!/usr/bin/env bash
# Brings up Karri on this machine: etcd, api-gateway, operator and one node agent, state under
# $STATE_DIR (default <repo>/.state). The node agent node-1 runs on a simulated host
# (scripts/simhost.sh: network namespace $KARRI_NETNS, default karri-up, with a private libvirtd +
# QEMU, the guests' bridge, DHCP and metadata service), or on libvirt's test driver with
# HYPERVISOR=test. The micro image (scripts/build-micro-image.sh, built once into
# $STATE_DIR/micro-image) is registered as public EKI/ERI/EMI images in namespace karri-images, so
# `aws ec2 run-instances --image-id emi-...` boots a real guest. Re-runnable: a running etcd from
# this state dir is kept, the other services are restarted with the current binaries, the images
# are registered again only when the micro image changed. Stop everything with scripts/down.sh.
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
# The simulated host's network namespace (HYPERVISOR=qemu): guests, their bridge and DHCP live there.
NETNS="${KARRI_NETNS:-karri-up}"
# Public images every account may launch live in this namespace (karri-* is never an account).
IMAGES_NS="${KARRI_IMAGES_NAMESPACE:-karri-images}"
# How long the KVM probe may take before KVM is taken as unusable.
KVM_PROBE_SECONDS="${KARRI_KVM_PROBE_SECONDS:-15}"
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
# What was started before a failure keeps running (a re-run reuses it): say how to stop it.
die() {
  printf 'up: %s\n' "$*" >&2
  if compgen -G "$PIDS/*.pid" >/dev/null 2>&1; then
    printf 'up: what did start still runs; stop it with: STATE_DIR=%q make down\n' "$STATE_DIR" >&2
  fi
  exit 1
}
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
  if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
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

# check_netns_owner: dies when network namespace $NETNS holds the cloud of another state dir
# (/run/karri/NETNS.owner names it; the namespace is one per machine).
check_netns_owner() {
  local owner
  owner="$(cat "/run/karri/$NETNS.owner" 2>/dev/null || true)"
  if [ -n "$owner" ] && [ "$owner" != "$STATE_DIR" ] && [ -e "/run/netns/$NETNS" ]; then
    die "network namespace $NETNS is the cloud of $owner: stop it first (STATE_DIR=$owner make down), or pick another namespace with KARRI_NETNS"
  fi
}
if [ "$HYPERVISOR" = qemu ]; then
  # A simulated host is a network namespace with its own libvirtd: that needs root, and is
  # checked before anything is started.
  [ "$(id -u)" -eq 0 ] || die "HYPERVISOR=qemu makes a network namespace and runs libvirtd in it: run as root (or HYPERVISOR=test for a cloud without guests)"
  check_netns_owner
fi

# karri.env appears only once everything is ready.
rm -f "$STATE_DIR/karri.env"

# The simulated host's namespace name goes into paths under /run: a plain name only.
case "$NETNS" in
  '' | *[!A-Za-z0-9_.-]* | .*) die "bad network namespace name '$NETNS' (KARRI_NETNS)" ;;
esac
# Ctrl-C (or TERM) while the services start stops what started, as it does once they run.
trap 'echo; bash "$REPO/scripts/down.sh"; exit 130' INT TERM

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
say "starting api-gateway at $API_URL (EC2 at $AWS_URL/services/compute, S3 at $AWS_URL and $AWS_URL/services/objectstorage)"
start_bg "$GW_PID" "$LOGS/api-gateway.log" "$GATEWAY_BIN" \
  --listen "127.0.0.1:$API_PORT" \
  --aws-listen "127.0.0.1:$AWS_PORT" \
  --region "$REGION" \
  --secrets-key-file "$STATE_DIR/secrets.key" \
  --etcd-endpoints "$ETCD_URL" \
  --tokens-file "$TOKENS" \
  --s3-data-dir "$STATE_DIR/objects" \
  --cert-dir "$PKI"
# The gateway writes its CA into $PKI on first start; curl trusts exactly that CA.
wait_http api-gateway "$API_URL/readyz" "$GW_PID" "$LOGS/api-gateway.log" 60 --cacert "$PKI/ca.crt"

# --- kubeconfigs: admin (yours), operator and node-1 (for the services) ---------------------
token_of() { awk -v u="$1" '$1 == "-" && $2 == "token:" { t = $3 } $1 == "user:" && $2 == u { print t; exit }' "$TOKENS"; }
# write_kubeconfig FILE USER TOKEN [NAMESPACE]: the context's namespace defaults to `default`.
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
    namespace: ${4:-default}
current-context: karri
EOF
  )
  mv "$1.tmp" "$1"
}
KUBECONFIG_FILE="$STATE_DIR/kubeconfig"
# The admin's context is the admin account's namespace: an instance applied without one is
# the admin account's, seen by its EC2 calls too (`default` is no account's).
write_kubeconfig "$KUBECONFIG_FILE" admin "$ADMIN_TOKEN" admin
OPERATOR_TOKEN="$(token_of operator)"
NODE_TOKEN="$(token_of node-1)"
[ -n "$OPERATOR_TOKEN" ] && [ -n "$NODE_TOKEN" ] || die "no operator or node-1 token in $TOKENS"
write_kubeconfig "$STATE_DIR/kubeconfig-operator" operator "$OPERATOR_TOKEN"
write_kubeconfig "$STATE_DIR/kubeconfig-node-1" node-1 "$NODE_TOKEN"
# No kubectl call may wait on a stalled gateway for ever.
kc() { kubectl --kubeconfig "$KUBECONFIG_FILE" --request-timeout=30s "$@"; }

# --- the catalogue: zones and instance types ----------------------------------------------
kc apply -f "$REPO/config/samples/availability-zone.yaml" -f "$REPO/config/samples/instance-type.yaml" >/dev/null
zones="$(kc get availabilityzones -o name)"
types="$(kc get instancetypes -o name)"
say "catalogue: $(grep -c . <<<"$zones") zones, $(grep -c . <<<"$types") instance types"

# --- the admin account and its access key (the secret is shown once, so it is kept here) ------
KARRI_CLI="$BIN_DIR/karri"
[ -x "$KARRI_CLI" ] || die "$KARRI_CLI missing: run 'make build'"
"$KARRI_CLI" --kubeconfig "$KUBECONFIG_FILE" account create admin --if-missing \
  --display-name "Cloud administrators" >/dev/null
CREDS="$STATE_DIR/admin-credentials"
# A credentials file whose key is gone (etcd's data was reset, the key deleted) is made anew.
if [ -s "$CREDS" ]; then
  key_id="$(sed -n 's/^export AWS_ACCESS_KEY_ID=//p' "$CREDS")"
  known="$(kc get accesskeys -A -o jsonpath='{.items[*].status.accessKeyId}')" \
    || die "cannot list the access keys"
  if [ -z "$key_id" ] || ! grep -qw -- "$key_id" <<<"$known"; then
    say "the admin access key in $CREDS is not in the cloud any more: making a new one"
    rm -f "$CREDS"
  fi
fi
if [ ! -s "$CREDS" ]; then
  say "creating the admin account's access key ($CREDS)"
  (
    umask 077
    "$KARRI_CLI" --kubeconfig "$KUBECONFIG_FILE" access-key create --account admin --user admin --env >"$CREDS.tmp"
  ) || die "could not create the admin access key"
  mv "$CREDS.tmp" "$CREDS"
fi

# --- the micro image: built once, registered as public EKI/ERI/EMI --------------------------
MICRO_DIR="$STATE_DIR/micro-image"
IMAGE_STORE="$STATE_DIR/images"
say "micro image: building or checking $MICRO_DIR (log $LOGS/micro-image.log)"
bash "$REPO/scripts/build-micro-image.sh" "$MICRO_DIR" >>"$LOGS/micro-image.log" 2>&1 \
  || { tail -n 20 "$LOGS/micro-image.log" >&2; die "building the micro image failed (log: $LOGS/micro-image.log)"; }
# micro_sum FILE: the SHA-256 the manifest gives FILE.
micro_sum() { awk -v f="$1" '$1 == f { print $2 }' "$MICRO_DIR/manifest"; }
# The micro image's well-known IDs, which config/samples/instance.yaml and the docs use.
MICRO_EKI=eki-0123456789abcdef0
MICRO_ERI=eri-0123456789abcdef0
MICRO_EMI=emi-0123456789abcdef0
# ensure_image ID NAME TYPE FILE [KERNEL_ID RAMDISK_ID]: prints ID once the public image NAME in
# $IMAGES_NS with that ID holds FILE's content (and boots that kernel and ramdisk); registers it
# with `karri image register` when it does not, after deregistering an older image of that ID or
# name.
ensure_image() {
  local fixed="$1"
  shift
  local name="$1" type="$2" file="$3" kernel="${4:-}" ramdisk="${5:-}" want id stale args
  want="$(micro_sum "$(basename "$file")")"
  [ -n "$want" ] || die "the micro image manifest lists no $(basename "$file")"
  local listing
  listing="$(kc get images -n "$IMAGES_NS" -o jsonpath='{range .items[*]}{.spec.name}{"\t"}{.metadata.labels.karri\.dev/id}{"\t"}{.spec.checksumSha256}{"\t"}{.spec.kernelId}{"\t"}{.spec.ramdiskId}{"\t"}{.spec.public}{"\t"}{.spec.imageLocation}{"\n"}{end}')" \
    || die "cannot list the images of $IMAGES_NS"
  local found location
  found="$(awk -F'\t' -v n="$name" -v i="$fixed" -v s="$want" -v k="$kernel" -v r="$ramdisk" \
    '$1 == n && $2 == i && $3 == s && $4 == k && $5 == r && $6 == "true" { print $2 "\t" $7; exit }' <<<"$listing")"
  id="${found%%$'\t'*}"
  location="${found#*$'\t'}"
  # The record alone is not enough: its stored file must be there too (the store may have
  # been removed since).
  if [ -n "$id" ] && [ -f "$location" ]; then
    echo "$id"
    return 0
  fi
  # An older image of this ID or name (an earlier micro image) makes way for the new one.
  while read -r stale; do
    [ -n "$stale" ] || continue
    kc delete images -n "$IMAGES_NS" -l "karri.dev/id=$stale" >/dev/null \
      || die "could not deregister $stale, an older $name"
    say "deregistered $stale, an older $name" >&2
  done < <(awk -F'\t' -v n="$name" -v i="$fixed" '$1 == n || $2 == i { print $2 }' <<<"$listing")
  args=(--id "$fixed" --file "$file" --type "$type" --name "$name" --namespace "$IMAGES_NS" --public
    --store "$IMAGE_STORE" --description "Karri micro image ($(head -n 1 "$MICRO_DIR/packages" 2>/dev/null || echo busybox))")
  [ -z "$kernel" ] || args+=(--kernel-id "$kernel")
  [ -z "$ramdisk" ] || args+=(--ramdisk-id "$ramdisk")
  id="$("$KARRI_CLI" --kubeconfig "$KUBECONFIG_FILE" image register "${args[@]}" 2>>"$LOGS/images.log" | tail -n 1)" \
    || { tail -n 5 "$LOGS/images.log" >&2; die "registering $name failed (log: $LOGS/images.log)"; }
  [ -n "$id" ] || die "karri image register printed no ID for $name"
  say "registered $name as $id (public, namespace $IMAGES_NS)" >&2
  echo "$id"
}
EKI="$(ensure_image "$MICRO_EKI" karri-micro-kernel kernel "$MICRO_DIR/vmlinuz")"
ERI="$(ensure_image "$MICRO_ERI" karri-micro-ramdisk ramdisk "$MICRO_DIR/initrd.img")"
EMI="$(ensure_image "$MICRO_EMI" karri-micro machine "$MICRO_DIR/disk.img" "$EKI" "$ERI")"
say "micro image: $EMI (kernel $EKI, ramdisk $ERI)"

# --- hypervisor, operator, node agent -----------------------------------------------------
# domain_type: kvm when KVM really runs a guest here, else qemu (TCG). /dev/kvm opening is not
# enough: under nested virtualisation it opens and then hangs guest kernels. So the micro image's
# kernel is booted once with KVM, without a root disk and without a NIC, until it panics and
# QEMU exits (well under a second on working KVM); the verdict is kept in $STATE_DIR/kvm-probe
# for this host kernel and QEMU.
domain_type() {
  local qemu key verdict probe_log="$LOGS/kvm-probe.log"
  qemu="$(command -v qemu-system-x86_64 || true)"
  if [ -z "$qemu" ] || ! (: <>/dev/kvm) 2>/dev/null; then
    echo qemu
    return
  fi
  key="$(uname -r) $("$qemu" --version | head -n 1)"
  if [ -f "$STATE_DIR/kvm-probe" ] && [ "$(head -n 1 "$STATE_DIR/kvm-probe")" = "$key" ]; then
    sed -n 2p "$STATE_DIR/kvm-probe"
    return
  fi
  say "probing whether KVM runs guests here (at most ${KVM_PROBE_SECONDS}s, once)" >&2
  if timeout -k 5 "$KVM_PROBE_SECONDS" "$qemu" -accel kvm -m 128 -nographic -nodefaults -serial stdio \
      -no-reboot -nic none -kernel "$MICRO_DIR/vmlinuz" \
      -append "console=ttyS0 panic=-1 root=/dev/karri-probe" </dev/null >"$probe_log" 2>&1 \
      && grep -q "Kernel panic" "$probe_log"; then
    verdict=kvm
  else
    verdict=qemu
    say "KVM opens but does not run guests here (see $probe_log); guests use TCG" >&2
  fi
  printf '%s\n%s\n' "$key" "$verdict" >"$STATE_DIR/kvm-probe"
  echo "$verdict"
}
GUEST_ARGS=()
case "$HYPERVISOR" in
  qemu)
    # A simulated host: a private libvirtd in network namespace $NETNS (scripts/simhost.sh).
    # Its URI is the last line simhost.sh prints; its own messages go to the log. The namespace
    # is one per machine: /run/karri/NETNS.owner says which state dir's cloud holds it.
    check_netns_owner
    mkdir -p /run/karri
    echo "$STATE_DIR" >"/run/karri/$NETNS.owner"
    echo "$NETNS" >"$STATE_DIR/netns"
    LIBVIRT_URI="$(bash "$REPO/scripts/simhost.sh" start "$STATE_DIR/host" "$NETNS" 2>>"$LOGS/simhost.log" | tail -n 1)" \
      || { tail -n 20 "$LOGS/simhost.log" >&2; die "the simulated host did not start (log: $LOGS/simhost.log); install libvirt with 'make setup', or run 'HYPERVISOR=test make up' for libvirt's test driver"; }
    [ -n "$LIBVIRT_URI" ] || die "scripts/simhost.sh printed no URI (log: $LOGS/simhost.log)"
    say "simulated host: libvirtd in network namespace $NETNS at $LIBVIRT_URI"
    DOMAIN_TYPE="${KARRI_DOMAIN_TYPE:-$(domain_type)}"
    say "guests run on $DOMAIN_TYPE$([ "$DOMAIN_TYPE" = qemu ] && echo ' (TCG, software emulation)')"
    # The simulated host's libvirtd takes 32 requests of a client at once (scripts/simhost.sh).
    GUEST_ARGS=(--guest-netns "$NETNS" --domain-type "$DOMAIN_TYPE" --libvirt-max-calls 31) ;;
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
port_in_use "$OPERATOR_METRICS_PORT" && die "port $OPERATOR_METRICS_PORT is taken by another process (set KARRI_OPERATOR_METRICS_PORT)"
port_in_use "$AGENT_METRICS_PORT" && die "port $AGENT_METRICS_PORT is taken by another process (set KARRI_AGENT_METRICS_PORT)"
say "starting operator"
start_bg "$PIDS/operator.pid" "$LOGS/operator.log" "$BIN_DIR/operator" \
  --kubeconfig "$STATE_DIR/kubeconfig-operator" --identity "operator-$(hostname)" \
  --metrics-listen "127.0.0.1:$OPERATOR_METRICS_PORT"
wait_http operator "http://127.0.0.1:$OPERATOR_METRICS_PORT/metrics" "$PIDS/operator.pid" "$LOGS/operator.log" 30
say "starting node-agent node-1 on $LIBVIRT_URI"
start_bg "$PIDS/node-agent.pid" "$LOGS/node-agent.log" "$BIN_DIR/node-agent" \
  --kubeconfig "$STATE_DIR/kubeconfig-node-1" --node-name node-1 --zone karri-1a \
  --libvirt-uri "$LIBVIRT_URI" --data-dir "$STATE_DIR/node" ${GUEST_ARGS[@]+"${GUEST_ARGS[@]}"} \
  --metrics-listen "127.0.0.1:$AGENT_METRICS_PORT"
# The agent registers node-1 moments after it starts, and `kubectl wait --for=condition` fails
# at once on a record that does not exist yet (`--for=create` needs kubectl 1.31; Debian 12 has
# 1.20): poll for the record first.
node_deadline=$((SECONDS + 90))
until kc get node.karri.dev/node-1 >/dev/null 2>&1; do
  if [ "$SECONDS" -ge "$node_deadline" ] || ! running "$PIDS/node-agent.pid" "$STATE_DIR"; then
    tail -n 20 "$LOGS/node-agent.log" >&2
    die "node-agent did not register node-1"
  fi
  sleep 0.5
done
kubectl --kubeconfig "$KUBECONFIG_FILE" wait --for=condition=Ready node.karri.dev/node-1 --timeout=90s >/dev/null \
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
  # The same CA for clients that take it as a flag (rclone's --ca-cert, curl's --cacert).
  printf 'export KARRI_CA=%q\n' "$PKI/ca.crt"
  printf 'export EC2_URL=%q\n' "$AWS_URL/services/compute"
  printf 'export S3_URL=%q\n' "$AWS_URL/services/objectstorage"
  printf 'export KARRI_MICRO_EMI=%q\n' "$EMI"
  # virsh's default connection: the simulated host's libvirtd (the test driver lives inside
  # the agent, where no virsh reaches).
  if [ "$HYPERVISOR" != test ]; then
    printf 'export LIBVIRT_DEFAULT_URI=%q\n' "$LIBVIRT_URI"
  fi
} >"$STATE_DIR/karri.env.tmp"
)
mv "$STATE_DIR/karri.env.tmp" "$STATE_DIR/karri.env"

cat <<EOF

Karri is up.
  etcd         $ETCD_URL   (data $STATE_DIR/etcd, log $LOGS/etcd.log)
  api-gateway  $API_URL (resource API), $AWS_URL (EC2 and S3, region $REGION; objects in $STATE_DIR/objects)   (log $LOGS/api-gateway.log)
  operator     metrics http://127.0.0.1:$OPERATOR_METRICS_PORT/metrics   (log $LOGS/operator.log)
  node-agent   node-1 in karri-1a on $LIBVIRT_URI, metrics http://127.0.0.1:$AGENT_METRICS_PORT/metrics   (log $LOGS/node-agent.log)
  images       $EMI (karri-micro: kernel $EKI, ramdisk $ERI; public, namespace $IMAGES_NS)
  tokens       $TOKENS
  kubeconfig   $KUBECONFIG_FILE (user admin)

Use it:
  . $(printf %q "$STATE_DIR/karri.env") && aws ec2 describe-images
  printf '#!/bin/sh\necho hello from user-data\n' > script.sh
  aws ec2 run-instances --image-id $EMI --instance-type t1.micro --user-data file://script.sh
  aws ec2 describe-instances --query 'Reservations[].Instances[].[InstanceId,State.Name,PrivateIpAddress]' --output text
  aws ec2 get-console-output --instance-id i-... --output text    # "karri-micro: ready" once booted
  aws ec2 terminate-instances --instance-ids i-...
  aws s3 mb s3://my-bucket && aws s3 cp script.sh s3://my-bucket/ && aws s3 ls s3://my-bucket/
  kubectl get instances,buckets -A
  virsh list --all                  # the QEMU domains (karri.env sets LIBVIRT_DEFAULT_URI)
  $BIN_DIR/karri image register --file disk.qcow2 --name my-image --namespace admin   # your own (raw, qcow2, vmdk, ...)
  $BIN_DIR/karri account create research && $BIN_DIR/karri access-key create --account research
EOF
if [ "$HYPERVISOR" = qemu ]; then
  cat <<EOF
Guests live in network namespace $NETNS (bridge karri0; nothing of theirs is in this machine's
own network namespace). Reach them from there:
  ip netns exec $NETNS ping -c 1 <private IP>
  ip netns exec $NETNS ssh -i key.pem <user>@<private IP>   # images with sshd and --key-name (the micro image has none)
EOF
fi
if [ -n "${KARRI_DETACH:-}" ]; then
  echo "Left running in the background (KARRI_DETACH); stop everything with: make down"
  exit 0
fi
echo "Ctrl-C stops everything (the state stays in $STATE_DIR; 'make up' again reuses it)."
trap 'echo; bash "$REPO/scripts/down.sh"; exit 0' INT TERM
# The services are this shell's children: wait for them; Ctrl-C runs the trap.
wait
