#!/usr/bin/env bash
# Self-check of the micro image built by scripts/build-micro-image.sh: boots OUT_DIR/{vmlinuz,
# initrd.img,disk.img} under QEMU TCG (virtio NIC and disk, QEMU user-mode networking = slirp)
# with a fake IMDSv2 written in python3, reads the serial console as it arrives and fails unless
# every expected line shows up in time (KARRI_CHECK_TIMEOUT, default 180 s per boot).
#
# Two ways to put the fake IMDS behind 169.254.169.254:80 (slirp's guestfwd only accepts
# addresses inside its own virtual network, so a 172.31.0.0/20 guest cannot use it for
# 169.254.169.254):
#   netns     (default when `unshare --net` works; as root, or unprivileged with user namespaces)
#             the check re-executes itself in a new, empty network namespace, puts
#             169.254.169.254/32 on that namespace's lo and serves the IMDS there. The guest gets
#             172.31.0.5/20 from slirp (net=172.31.0.0/20) and reaches the IMDS through its
#             default route, like on a real VPC subnet. Nothing outside the namespace exists.
#   linklocal (fallback, or KARRI_CHECK_MODE=linklocal) slirp net=169.254.0.0/16, restrict=on,
#             guestfwd=tcp:169.254.169.254:80-cmd:<relay to the fake IMDS on 127.0.0.1>.
#
#   boot 1: public key + "#!" user-data script (exit 3); the metadata service starts listening only
#           after the guest reported it is waiting (exercises the retry); then an ACPI power-button
#           press (QMP system_powerdown) must power the guest off.
#   boot 2: no public key (404), user-data that is not a script.
#
# Usage: scripts/check-micro-image.sh OUT_DIR
# Env:   KARRI_CHECK_TIMEOUT  seconds allowed per boot (default 180)
#        KARRI_CHECK_MEM      guest memory in MiB (default 256)
#        KARRI_CHECK_MACHINE  QEMU machine type (default pc; q35 works too)
#        KARRI_CHECK_MODE     netns | linklocal (default: netns if possible)
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi
OUT="$(cd "$1" && pwd)"
for f in vmlinuz initrd.img disk.img; do
  [ -s "$OUT/$f" ] || { echo "check: missing $OUT/$f (run scripts/build-micro-image.sh first)" >&2; exit 1; }
done
command -v qemu-system-x86_64 >/dev/null 2>&1 || { echo "check: qemu-system-x86_64 not found" >&2; exit 1; }
PY="$(command -v python3)" || { echo "check: python3 not found" >&2; exit 1; }

if [ "${KARRI_CHECK_IN_NETNS:-}" = 1 ]; then
  # Inside the namespace created below: only lo exists.
  ip link set dev lo up
  ip addr add 169.254.169.254/32 dev lo
  export KARRI_CHECK_MODE=netns
elif [ "${KARRI_CHECK_MODE:-netns}" = netns ]; then
  uflags=(--net)
  [ "$(id -u)" -eq 0 ] || uflags+=(--map-root-user)
  if command -v unshare >/dev/null 2>&1 && command -v ip >/dev/null 2>&1 \
     && unshare "${uflags[@]}" true 2>/dev/null; then
    KARRI_CHECK_IN_NETNS=1 exec unshare "${uflags[@]}" "$BASH" "$0" "$OUT"
  fi
  echo "check: cannot create a network namespace (unshare --net); using linklocal mode" >&2
  export KARRI_CHECK_MODE=linklocal
elif [ "${KARRI_CHECK_MODE}" != linklocal ]; then
  echo "check: KARRI_CHECK_MODE must be netns or linklocal" >&2
  exit 2
fi

exec "$PY" - "$OUT" <<'PYEOF'
import http.server
import json
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

OUT = sys.argv[1]
TIMEOUT = float(os.environ.get("KARRI_CHECK_TIMEOUT", "180"))
MEM = os.environ.get("KARRI_CHECK_MEM", "256")
MACHINE = os.environ.get("KARRI_CHECK_MACHINE", "pc")
MODE = os.environ["KARRI_CHECK_MODE"]
CMDLINE = "console=ttyS0 quiet panic=-1"
if MODE == "netns":
    NET_RX = r"172\.31\.0\.5/20 via 172\.31\.0\.1"
else:
    NET_RX = r"169\.254\.0\.15/16 via none"   # restrict=on: slirp offers no router

RELAY = r'''
import os, select, socket, sys
try:
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
except OSError:
    sys.exit(0)          # metadata service not listening yet: the guest sees a closed connection
s.settimeout(None)
stdin_open = True
while True:
    r, _, _ = select.select(([0] if stdin_open else []) + [s], [], [], 30)
    if not r:
        break
    if 0 in r:
        d = os.read(0, 65536)
        if d:
            s.sendall(d)
        else:
            stdin_open = False
            s.shutdown(socket.SHUT_WR)
    if s in r:
        d = s.recv(65536)
        if not d:
            break
        while d:
            d = d[os.write(1, d):]
'''


class Imds(http.server.BaseHTTPRequestHandler):
    """Fake IMDSv2: PUT /latest/api/token, then token-guarded GETs."""
    protocol_version = "HTTP/1.0"
    server_version = "FakeIMDS/1"

    def log_message(self, fmt, *args):
        self.server.log.append("%s %s" % (self.command, self.path))

    def reply(self, code, body=b""):
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):
        if self.path != "/latest/api/token":
            return self.reply(404)
        ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return self.reply(400)
        self.server.puts += 1
        self.reply(200, self.server.token.encode())

    def do_GET(self):
        if self.headers.get("X-aws-ec2-metadata-token") != self.server.token:
            self.server.unauthorized += 1
            return self.reply(401)
        data = self.server.data.get(self.path)
        if data is None:
            return self.reply(404)
        self.reply(200, data)


def start_imds(data):
    addr = ("169.254.169.254", 80) if MODE == "netns" else ("127.0.0.1", 0)
    srv = http.server.ThreadingHTTPServer(addr, Imds, bind_and_activate=False)
    srv.daemon_threads = True
    srv.server_bind()            # port known now; listen() only when the test says so
    srv.token = secrets.token_urlsafe(24)
    srv.data = data
    srv.log, srv.puts, srv.unauthorized = [], 0, 0
    srv.active = False
    return srv


def activate(srv):
    srv.server_activate()
    srv.active = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()


def qmp(path, command):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        f = s.makefile("rwb")
        f.readline()                                    # greeting
        for cmd in ("qmp_capabilities", command):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            while True:
                msg = json.loads(f.readline())
                if "return" in msg or "error" in msg:
                    break
            if "error" in msg:
                raise RuntimeError("qmp %s: %s" % (cmd, msg["error"]))


def boot(name, data, expect, power_off, delay_imds):
    """Boot once; expect is a list of (label, regex). Returns (ok, seconds_to_ready)."""
    print("check: --- boot %s, %s mode ---" % (name, MODE), flush=True)
    srv = start_imds(data)
    tmp = tempfile.mkdtemp(prefix="karri-micro-check.")
    port = srv.server_address[1]
    relay = os.path.join(tmp, "relay.py")
    with open(relay, "w") as f:
        f.write(RELAY)
    qmp_path = os.path.join(tmp, "qmp.sock")
    if not delay_imds:
        activate(srv)
    if MODE == "netns":
        # The namespace holds nothing but lo with 127.0.0.1 and 169.254.169.254.
        netdev = "user,id=n0,net=172.31.0.0/20,host=172.31.0.1,dhcpstart=172.31.0.5"
    else:
        netdev = ("user,id=n0,restrict=on,net=169.254.0.0/16,dhcpstart=169.254.0.15,"
                  "guestfwd=tcp:169.254.169.254:80-cmd:%s %s %d" % (sys.executable, relay, port))
    argv = [
        "qemu-system-x86_64", "-machine", MACHINE, "-accel", "tcg", "-m", MEM, "-smp", "1",
        "-nographic", "-no-reboot",
        "-kernel", os.path.join(OUT, "vmlinuz"), "-initrd", os.path.join(OUT, "initrd.img"),
        "-append", CMDLINE,
        "-drive", "file=%s,format=raw,if=virtio,readonly=on" % os.path.join(OUT, "disk.img"),
        "-netdev", netdev,
        "-device", "virtio-net-pci,netdev=n0",
        "-qmp", "unix:%s,server=on,wait=off" % qmp_path,
    ]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    lines = queue.Queue()

    def reader():
        for raw in proc.stdout:
            lines.put(raw.decode("utf-8", "replace").rstrip("\r\n"))
        lines.put(None)
    threading.Thread(target=reader, daemon=True).start()

    pending = list(expect)
    if power_off:
        pending.append(("power-off message", r"^karri-micro: power button pressed, powering off$"))
    ready_at = None
    powered_down = False
    exited = False
    deadline = t0 + TIMEOUT
    ok = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                exited = True
                break
            print("  | " + line, flush=True)
            for item in list(pending):
                if re.search(item[1], line):
                    pending.remove(item)
            if delay_imds and "karri-micro: imds: waiting for the metadata service" in line:
                activate(srv)
                delay_imds = False
            if line == "karri-micro: ready" and ready_at is None:
                ready_at = time.monotonic() - t0
                if power_off:
                    qmp(qmp_path, "system_powerdown")
                    powered_down = True
                    deadline = min(deadline, time.monotonic() + 30)
                else:
                    break
        if power_off and powered_down and exited:
            try:
                proc.wait(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        ok = not pending and ready_at is not None
        if power_off:
            ok = ok and proc.poll() is not None
            if powered_down and proc.poll() is None:
                print("check: FAIL guest still running after the ACPI power button", flush=True)
        for label, rx in pending:
            print("check: FAIL missing %s (/%s/)" % (label, rx), flush=True)
        if ready_at is None:
            print("check: FAIL no 'karri-micro: ready' within %.0fs%s" %
                  (TIMEOUT, " (QEMU exited, rc %s)" % proc.poll() if exited else ""), flush=True)
        if srv.puts == 0:
            ok = False
            print("check: FAIL the metadata service never issued a token", flush=True)
        print("check: imds requests: %s" % ", ".join(srv.log), flush=True)
        if ready_at is not None:
            print("check: boot %s: ready %.1fs after QEMU start%s" %
                  (name, ready_at, ", powered off by ACPI" if power_off and proc.poll() is not None else ""),
                  flush=True)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if srv.active:
            srv.shutdown()        # stop serve_forever before closing, so port 80 is free again
        srv.server_close()
        shutil.rmtree(tmp, ignore_errors=True)
    return ok, ready_at


def main():
    iid = "i-" + secrets.token_hex(8) + "0"
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA%s karri-check" % secrets.token_urlsafe(32)
    nonce = secrets.token_hex(6)
    script = ("#!/bin/sh\necho \"hello from user-data $(cat /proc/sys/kernel/hostname) %s\"\n"
              "exit 3\n" % nonce).encode()
    common = [
        ("root disk", r"^karri-micro: root disk /dev/vda mounted$"),
        ("network line", r"^karri-micro: network \S+ %s$" % NET_RX),
        ("token", r"^karri-micro: imds: v2 token ok$"),
        ("instance-id", "^karri-micro: instance-id: %s$" % re.escape(iid)),
        ("ready", r"^karri-micro: ready$"),
    ]
    results = []
    ok1, t1 = boot("1 (key, script user-data, delayed IMDS, ACPI power-off)", {
        "/latest/meta-data/instance-id": iid.encode(),
        "/latest/meta-data/public-keys/0/openssh-key": (key + "\n").encode(),
        "/latest/user-data": script,
    }, common + [
        ("imds wait", r"^karri-micro: imds: waiting for the metadata service"),
        ("public key", "^karri-micro: public-key: %s$" % re.escape(key)),
        ("user-data start", r"^karri-micro: user-data: running script$"),
        ("user-data output", "^hello from user-data %s %s$" % (re.escape(iid), nonce)),
        ("user-data exit", r"^karri-micro: user-data: exit 3$"),
    ], power_off=True, delay_imds=True)
    results.append(ok1)
    text = b"just some cloud-config-ish text\n"
    ok2, t2 = boot("2 (no key, non-script user-data)", {
        "/latest/meta-data/instance-id": iid.encode(),
        "/latest/user-data": text,
    }, common + [
        ("no public key", r"^karri-micro: public-key: none$"),
        ("user-data not a script", r"^karri-micro: user-data: %d bytes, not a script$" % len(text)),
    ], power_off=False, delay_imds=False)
    results.append(ok2)
    for f in ("vmlinuz", "initrd.img", "disk.img"):
        print("check: %-10s %9d bytes" % (f, os.path.getsize(os.path.join(OUT, f))))
    if all(results):
        print("check: OK (ready after %.1fs and %.1fs under TCG)" % (t1, t2))
        return 0
    print("check: FAILED")
    return 1


sys.exit(main())
PYEOF
