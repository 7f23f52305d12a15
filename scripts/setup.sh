#!/usr/bin/env bash
# Installs what Karri needs to build, test and run on Debian 12. Idempotent and fast when
# everything is present: every step checks before it installs. Run as root (or with sudo).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
export DEBIAN_FRONTEND=noninteractive

APT_PKGS=(
  etcd-server
  libvirt-daemon-system libvirt-clients libvirt-dev
  qemu-system-x86 qemu-utils
  pkg-config protobuf-compiler libprotobuf-dev
  python3-venv
  iproute2 nftables curl jq
  dnsmasq-base busybox e2fsprogs util-linux
  libxml2-utils
  gcc libc6-dev
)

say() { printf 'setup: %s\n' "$*"; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=(sudo); fi
fi

# --- Debian packages ---------------------------------------------------------------------
# The packages of APT_PKGS that are not installed.
missing_pkgs() {
  local installed p
  installed="$(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${APT_PKGS[@]}" 2>/dev/null || true)"
  for p in "${APT_PKGS[@]}"; do
    grep -qx "$p installed" <<<"$installed" || echo "$p"
  done
}
mapfile -t missing < <(missing_pkgs)
if ! command -v kubectl >/dev/null 2>&1; then
  missing+=(kubernetes-client)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Installing may remove a package that was there: a qemu-utils from backports conflicts
  # with Debian 12's qemu-system-x86, and apt resolves it by removing qemu-utils (and with it
  # qemu-img, which image registration needs). Install what is gone again: apt's default
  # candidate is Debian 12's own, backports being pinned lower.
  mapfile -t removed < <(missing_pkgs)
  if [ "${#removed[@]}" -gt 0 ]; then
    say "installing again what the install removed: ${removed[*]}"
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${removed[@]}" >/dev/null
  fi
  mapfile -t still < <(missing_pkgs)
  if [ "${#still[@]}" -gt 0 ]; then
    echo "setup: these Debian packages could not be installed: ${still[*]}" >&2
    exit 1
  fi
else
  say "debian packages present"
fi
command -v kubectl >/dev/null 2>&1 || { echo "setup: kubectl still missing" >&2; exit 1; }
say "kubectl: $(command -v kubectl)"

# --- Debian 12's own kubectl (1.20), unpacked (not installed) for the test that what `make up`
# asks of kubectl works with the kubectl a machine without another one gets above ---
DEB_KUBECTL_DIR="$REPO/.cache/debian-kubectl"
if [ -x "$DEB_KUBECTL_DIR/usr/bin/kubectl" ]; then
  say "Debian's kubectl unpacked in .cache/debian-kubectl"
else
  say "unpacking Debian's kubectl (kubernetes-client) into .cache/debian-kubectl"
  deb_tmp="$(mktemp -d)"
  # Only a test needs it: a machine that cannot fetch it still sets up (that test then fails
  # saying so).
  if (cd "$deb_tmp" && apt-get download -qq kubernetes-client >/dev/null 2>&1) \
     || { "${SUDO[@]}" apt-get update -qq && (cd "$deb_tmp" && apt-get download -qq kubernetes-client >/dev/null 2>&1); }; then
    mkdir -p "$DEB_KUBECTL_DIR"
    dpkg-deb -x "$deb_tmp"/kubernetes-client_*.deb "$DEB_KUBECTL_DIR" \
      || say "warning: could not unpack Debian's kubernetes-client"
  else
    say "warning: could not fetch Debian's kubernetes-client; the test of Debian's kubectl will fail"
  fi
  rm -rf "$deb_tmp"
fi

# --- Debian's etcd service must not hold 2379: Karri runs its own etcd -----------------------
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  if systemctl is-enabled --quiet etcd 2>/dev/null || systemctl is-active --quiet etcd 2>/dev/null; then
    say "disabling the Debian etcd service"
    "${SUDO[@]}" systemctl disable --now etcd >/dev/null 2>&1 || true
  else
    say "etcd service disabled"
  fi
elif [ -x /etc/init.d/etcd ] && /etc/init.d/etcd status >/dev/null 2>&1; then
  say "stopping the Debian etcd service (sysvinit)"
  "${SUDO[@]}" /etc/init.d/etcd stop >/dev/null 2>&1 || true
  "${SUDO[@]}" update-rc.d etcd disable >/dev/null 2>&1 || true
else
  say "etcd service not running"
fi

# --- Python venv with the AWS clients (awscli, boto3, s3cmd; and moto's server, the peer of
# `make bench`'s EC2 run) and the official Kubernetes client (what Ansible's modules use) ---
if [ -x "$VENV/bin/python" ] && [ -x "$VENV/bin/aws" ] && [ -x "$VENV/bin/moto_server" ] \
   && [ -x "$VENV/bin/s3cmd" ] \
   && "$VENV/bin/python" -c 'import boto3, awscli, moto.server, S3.S3, kubernetes' >/dev/null 2>&1; then
  say "venv .venv has awscli, boto3, s3cmd, moto[server] and kubernetes"
else
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating venv .venv"
    # Prefer Debian's python3 (python3-venv is installed for it); fall back to PATH's.
    py=/usr/bin/python3
    [ -x "$py" ] || py="$(command -v python3)"
    "$py" -m venv --clear "$VENV"
  fi
  say "installing awscli, boto3, s3cmd, moto[server] and kubernetes into .venv"
  # One resolve for them all, so moto's botocore fits the one awscli pins.
  "$VENV/bin/pip" install --quiet --disable-pip-version-check awscli boto3 s3cmd 'moto[server]' \
    kubernetes
fi

# --- cargo-nextest ------------------------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install a Rust toolchain (rustup, >= 1.92) first" >&2
  exit 1
fi
if cargo nextest --version >/dev/null 2>&1; then
  say "cargo-nextest present"
else
  say "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi

say "done"
