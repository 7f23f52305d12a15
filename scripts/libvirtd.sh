#!/usr/bin/env bash
# Makes sure libvirtd (and virtlogd, which QEMU domains log through) answer on qemu:///system.
# On a systemd machine the packaged units are started; elsewhere (containers, CI) the daemons are
# started directly. Idempotent: does nothing when libvirtd already answers.
set -euo pipefail

say() { printf 'libvirtd: %s\n' "$*"; }

answers() { virsh -c qemu:///system version >/dev/null 2>&1; }

# Without udev (containers, CI machines) /dev/kvm keeps the kernel's root-only mode, where
# Debian's udev rule gives it to group kvm (0660), which QEMU's user is in. libvirtd's probe of
# QEMU (as root) then finds KVM, but its check of the cached probe (as QEMU's user) does not, so
# it probes QEMU again before every domain it defines: seconds each, and tens of seconds on a
# loaded machine, which the node agent's libvirt keepalive takes for a dead libvirtd.
if [ -c /dev/kvm ] && getent group kvm >/dev/null 2>&1 \
    && [ "$(stat -c '%G %a' /dev/kvm)" = "root 600" ]; then
  say "giving /dev/kvm to group kvm (0660), as Debian's udev rule does"
  chgrp kvm /dev/kvm
  chmod 0660 /dev/kvm
fi

if answers; then
  say "running"
  exit 0
fi
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  say "starting the libvirtd and virtlogd units"
  systemctl start virtlogd.socket libvirtd.socket libvirtd.service >/dev/null 2>&1 || true
fi
if ! answers; then
  say "starting virtlogd and libvirtd as daemons"
  # Not `pgrep`: the private daemons of simulated hosts (scripts/simhost.sh) run under the same
  # names. A second system daemon finds its pid file locked and exits, so starting is safe.
  # What they say when they cannot start (a lock, a bad config) is kept for the error below.
  log="${TMPDIR:-/tmp}/karri-libvirtd-start.log"
  : >"$log"
  virtlogd -d 2>>"$log" || true
  libvirtd -d 2>>"$log" || true
fi
for _ in $(seq 1 100); do
  answers && { say "running"; exit 0; }
  sleep 0.1
done
if ! command -v libvirtd >/dev/null 2>&1; then
  echo "libvirtd: not installed; run 'make setup' (libvirt-daemon-system)" >&2
else
  echo "libvirtd: it does not answer on qemu:///system; what the daemons said:" >&2
  tail -n 20 "${log:-/dev/null}" >&2 || true
  echo "libvirtd: see also /var/log/libvirt/libvirtd.log, or run 'libvirtd --verbose'" >&2
fi
exit 1
