#!/usr/bin/env bash
# A simulated hypervisor host (DESIGN §5): a network namespace with a PRIVATE libvirtd in it.
#
#   simhost.sh start DIR NETNS   creates network namespace NETNS if missing and starts virtlogd and
#                                libvirtd inside it, in a private mount namespace in which
#                                /run/libvirt, /var/lib/libvirt, /var/cache/libvirt,
#                                /var/log/libvirt and /etc/libvirt are directories under DIR.
#                                libvirtd's sockets are in DIR/run (or, for a DIR too long for
#                                a socket path, under /run/karri-simhost), visible from the root
#                                namespace. Prints the connection URI as its last line.
#                                Idempotent: when the daemon already answers it only prints the URI.
#   simhost.sh stop DIR NETNS    destroys and undefines every domain of that libvirtd, stops the
#                                daemons, every dnsmasq whose pid file is under DIR and whatever
#                                else still runs in NETNS, then deletes NETNS.
#
# The taps libvirtd creates for <interface type='bridge'> land in NETNS; the system libvirtd (if
# any) is not touched. Needs root, iproute2, util-linux (unshare, taskset) and
# libvirt-daemon-system.
#
# Environment: KARRI_SIMHOST_CACHE (default /var/tmp/karri-simhost) holds QEMU capabilities
# shared between hosts; KARRI_SIMHOST_LOG_LEVEL (default 3, 1 = debug) is libvirtd's log level
# (DIR/libvirtd.log).
set -euo pipefail

usage() {
  echo "usage: $0 start|stop DIR NETNS" >&2
  exit 2
}
say() { printf 'simhost: %s\n' "$*" >&2; }
die() {
  say "$*"
  exit 1
}

[ $# -eq 3 ] || usage
action=$1
dir=$2
ns=$3
case "$ns" in
  '' | *[!A-Za-z0-9_.-]* | .*) die "bad network namespace name '$ns'" ;;
esac
case "$dir" in
  /*) ;;
  *) dir="$PWD/$dir" ;;
esac

# libvirtd's sockets: in DIR/run, or, where DIR is too long for a Unix socket's path (107 bytes
# with libvirtd's longest socket name, libvirt-admin-sock) or holds what a libvirt URI cannot
# carry as it is (a space, say), in a directory under /run named after DIR's hash (DIR/run
# then links to it).
sock_dir="$dir/run"
if [ $(($(printf '%s' "$sock_dir/libvirt-admin-sock" | wc -c))) -gt 107 ] ||
  [[ "$sock_dir" == *[!A-Za-z0-9/._-]* ]]; then
  sock_dir="/run/karri-simhost/$(realpath -m "$dir" | sha256sum | cut -c1-16)"
fi
uri="qemu+unix:///system?socket=$sock_dir/libvirt-sock"
# QEMU capabilities probed by one private libvirtd are reused by the next (probing takes seconds;
# libvirtd re-probes by itself when the cached ones no longer match QEMU or libvirt).
caps_cache="${KARRI_SIMHOST_CACHE:-/var/tmp/karri-simhost}/qemu-capabilities"
# How long the daemons get to answer, and to go away, in tenths of a second.
START_TENTHS=300
STOP_TENTHS=100

answers() { virsh -c "$uri" version >/dev/null 2>&1; }
ns_exists() { [ -e "/run/netns/$ns" ]; }

# The pid in pid file $1 if that process is alive and its command name is $2.
live_pid() {
  local pid
  [ -f "$1" ] || return 1
  pid="$(tr -dc '0-9' <"$1")"
  [ -n "$pid" ] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
  echo "$pid"
}

# Sends SIGTERM to the given pids at once, waits for them to go away, then SIGKILLs the rest.
stop_pids() {
  local pid i alive
  [ $# -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null || true
  for ((i = 0; i < STOP_TENTHS; i++)); do
    alive=0
    for pid in "$@"; do
      if kill -0 "$pid" 2>/dev/null; then alive=1; fi
    done
    [ "$alive" = 1 ] || return 0
    sleep 0.1
  done
  say "pids $* ignored SIGTERM; killing them"
  kill -KILL "$@" 2>/dev/null || true
}

write_configs() {
  # DIR/run is a directory or a link, whichever this DIR needs now (a DIR moved or renamed
  # since may have had the other).
  if [ "$sock_dir" = "$dir/run" ]; then
    if [ -L "$dir/run" ]; then rm -f "$dir/run"; fi
    mkdir -p "$sock_dir"
  else
    mkdir -p -m 0700 "$sock_dir"
    if [ -e "$dir/run" ] && [ ! -L "$dir/run" ]; then rm -rf "$dir/run"; fi
    ln -sfn "$sock_dir" "$dir/run"
  fi
  mkdir -p "$dir/etc" \
    "$dir/state/run" "$dir/state/lib" "$dir/state/cache" "$dir/state/log"
  # The machine's daemon settings and network filters with our qemu.conf, made once per DIR;
  # not the system libvirtd's domains, networks (the 'default' NAT network would start a
  # second dnsmasq), storage pools, secrets or hook scripts, which are that daemon's alone.
  if [ ! -f "$dir/etc/libvirt/.karri-simhost-2" ]; then
    rm -rf "$dir/etc/libvirt"
    mkdir -p "$dir/etc/libvirt/qemu"
    for conf in /etc/libvirt/*.conf; do
      if [ -f "$conf" ]; then cp -a "$conf" "$dir/etc/libvirt/"; fi
    done
    if [ -d /etc/libvirt/nwfilter ]; then
      cp -a /etc/libvirt/nwfilter "$dir/etc/libvirt/nwfilter"
    fi
    cat >"$dir/etc/libvirt/qemu.conf" <<'EOF'
# Written by scripts/simhost.sh: QEMU runs as root, no relabelling, no security driver,
# no cgroups and no per-domain /dev namespace (the daemon already lives in private namespaces).
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "logd"
EOF
    touch "$dir/etc/libvirt/.karri-simhost-2"
  fi
  mkdir -p "$dir/state/cache/qemu/capabilities"
  if [ -d "$caps_cache" ]; then
    cp -n "$caps_cache"/*.xml "$dir/state/cache/qemu/capabilities/" 2>/dev/null || true
  fi
  cat >"$dir/libvirtd.conf" <<EOF
# Written by scripts/simhost.sh.
unix_sock_dir = "$sock_dir"
unix_sock_rw_perms = "0700"
unix_sock_ro_perms = "0700"
unix_sock_admin_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_level = ${KARRI_SIMHOST_LOG_LEVEL:-3}
log_outputs = "${KARRI_SIMHOST_LOG_LEVEL:-3}:file:/var/log/libvirt/libvirtd.log"
# The node agent starts many domains at once over one connection (libvirtd's default is 5
# requests of a client at a time; agents on simulated hosts run with --libvirt-max-calls 31,
# one below this, so that the keepalive is always read).
max_client_requests = 32
max_workers = 20
EOF
  cat >"$dir/virtlogd.conf" <<EOF
# Written by scripts/simhost.sh.
log_outputs = "3:file:/var/log/libvirt/virtlogd.log"
EOF
  # The daemons log to their private /var/log/libvirt (DIR/state/log): libvirt's log_outputs
  # cannot name a path with a space. DIR/libvirtd.log and DIR/virtlogd.log lead there.
  ln -sfn state/log/libvirtd.log "$dir/libvirtd.log"
  ln -sfn state/log/virtlogd.log "$dir/virtlogd.log"
}

# Copies the probed QEMU capabilities to the shared cache, each file atomically.
save_caps() {
  local f
  mkdir -p "$caps_cache" 2>/dev/null || return 0
  for f in "$dir/state/cache/qemu/capabilities"/*.xml; do
    [ -f "$f" ] || continue
    if cp "$f" "$caps_cache/.$$.tmp" 2>/dev/null; then
      mv -f "$caps_cache/.$$.tmp" "$caps_cache/${f##*/}" || true
    fi
  done
}

# Stops this host's libvirtd and virtlogd; with argument 'dnsmasq' also every dnsmasq whose pid
# file is under DIR.
stop_daemons() {
  local pids=() pid pf
  if pid="$(live_pid "$dir/libvirtd.pid" libvirtd)"; then pids+=("$pid"); fi
  if pid="$(live_pid "$dir/virtlogd.pid" virtlogd)"; then pids+=("$pid"); fi
  if [ "${1:-}" = dnsmasq ] && [ -d "$dir" ]; then
    while read -r pf; do
      if pid="$(live_pid "$pf" dnsmasq)"; then pids+=("$pid"); fi
    done < <(find "$dir" -name '*.pid' -type f 2>/dev/null)
  fi
  stop_pids "${pids[@]}"
}

start() {
  if answers; then
    echo "$uri"
    return 0
  fi
  command -v libvirtd >/dev/null 2>&1 || die "libvirtd not found: install libvirt-daemon-system"
  command -v unshare >/dev/null 2>&1 || die "unshare not found: install util-linux"
  mkdir -p "$dir"
  write_configs
  if ! ns_exists; then
    say "creating network namespace $ns"
    ip netns add "$ns"
  fi
  ip -n "$ns" link set lo up
  # Leftovers of daemons that died: their namespace went with them, start afresh.
  stop_daemons
  # The daemons run on one CPU, always the same: libvirt re-probes QEMU (seconds) when the
  # CPUID it sees differs from the cached one's, and the vCPUs of a VM may differ.
  local cpu
  cpu="$(awk '/^Cpus_allowed_list/ { split($2, a, "[,-]"); print a[1] }' /proc/self/status)"
  say "starting virtlogd and libvirtd in $ns"
  # Both daemons share one private mount namespace: libvirtd finds virtlogd's socket in the
  # private /run/libvirt. The daemons keep that namespace alive after this shell exits.
  # shellcheck disable=SC2016 # expanded by the inner shell
  ip netns exec "$ns" unshare --mount --propagation private /bin/bash -euc '
    dir=$1
    bind() { mkdir -p "$2"; mount --bind "$1" "$2"; }
    bind "$dir/state/run" /run/libvirt
    bind "$dir/state/lib" /var/lib/libvirt
    bind "$dir/state/cache" /var/cache/libvirt
    bind "$dir/state/log" /var/log/libvirt
    bind "$dir/etc/libvirt" /etc/libvirt
    mkdir -p /var/lib/libvirt/qemu /var/lib/libvirt/images /var/log/libvirt/qemu \
      /var/cache/libvirt/qemu
    pin=()
    if [ -n "$2" ] && command -v taskset >/dev/null 2>&1; then pin=(taskset -c "$2"); fi
    "${pin[@]}" virtlogd -d -f "$dir/virtlogd.conf" -p "$dir/virtlogd.pid"
    "${pin[@]}" libvirtd -d -f "$dir/libvirtd.conf" -p "$dir/libvirtd.pid"
  ' simhost "$dir" "$cpu" </dev/null >>"$dir/simhost.log" 2>&1 ||
    die "starting the daemons failed; see $dir/simhost.log and $dir/libvirtd.log:
$(tail -n 20 "$dir/simhost.log" 2>/dev/null)"
  local i
  for ((i = 0; i < START_TENTHS; i++)); do
    if answers; then
      save_caps
      echo "$uri"
      return 0
    fi
    live_pid "$dir/libvirtd.pid" libvirtd >/dev/null || [ "$i" -lt 20 ] ||
      die "libvirtd exited; last lines of $dir/libvirtd.log:
$(tail -n 20 "$dir/libvirtd.log" 2>/dev/null)"
    sleep 0.1
  done
  die "libvirtd does not answer on $uri after 30 s; last lines of $dir/libvirtd.log:
$(tail -n 20 "$dir/libvirtd.log" 2>/dev/null)"
}

stop() {
  local d i pids
  if [ -d "$dir" ] && answers; then
    while read -r d; do
      [ -n "$d" ] || continue
      virsh -c "$uri" destroy "$d" >/dev/null 2>&1 || true
      virsh -c "$uri" undefine --managed-save --snapshots-metadata --nvram "$d" >/dev/null 2>&1 ||
        virsh -c "$uri" undefine "$d" >/dev/null 2>&1 || true
    done < <(virsh -c "$uri" list --all --name 2>/dev/null || true)
  fi
  stop_daemons dnsmasq
  # The sockets' directory under /run goes with the daemons (its parent stays: another host
  # may be making its own in it).
  if [ "$sock_dir" != "$dir/run" ]; then
    rm -rf "$sock_dir"
  fi
  if ns_exists; then
    # Whatever still runs in the namespace was started in it for this host (QEMU, helpers).
    for ((i = 0; i < STOP_TENTHS; i++)); do
      pids="$(ip netns pids "$ns" 2>/dev/null || true)"
      [ -n "$pids" ] || break
      # shellcheck disable=SC2086 # one pid per word
      kill -KILL $pids 2>/dev/null || true
      sleep 0.1
    done
    ip netns delete "$ns"
  fi
  say "stopped $ns"
}

case "$action" in
  start) start ;;
  stop) stop ;;
  *) usage ;;
esac
