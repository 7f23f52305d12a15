#!/usr/bin/env bash
# Builds Karri's default guest image, a CirrOS-like "micro image", from Debian 12 packages only:
#
#   OUT_DIR/vmlinuz      the kernel of linux-image-cloud-amd64 (override: KARRI_MICRO_KERNEL=<pkg>)
#   OUT_DIR/initrd.img   gzip'd newc cpio: busybox-static, the virtio/ACPI-button modules, and
#                        image/micro/init as /init
#   OUT_DIR/disk.img     8 MiB raw ext2 root disk (README + marker); the guest mounts it read-only
#   OUT_DIR/manifest     "input-sha256 <hash>" then "<name> <sha256> <size_bytes>" per file
#   OUT_DIR/packages     "<package> <version>" of the Debian packages used
#   OUT_DIR/debs/        cache of the downloaded .deb files
#
# Packages are fetched with `apt-get download` and unpacked with `dpkg-deb -x` (nothing is
# installed on the host). Idempotent: when the manifest's input hash (this script, the init, the
# package versions) matches and the files are intact it prints "micro image: up to date".
#
# Usage: scripts/build-micro-image.sh OUT_DIR
# Host tools: apt-get, apt-cache, dpkg-deb, gzip, mke2fs (e2fsprogs), sha256sum, flock;
# xz/zstd only if the kernel's modules are compressed.
set -euo pipefail

if [ $# -ne 1 ] || [ -z "$1" ]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$REPO/scripts/$(basename "${BASH_SOURCE[0]}")"
INIT_SRC="$REPO/image/micro/init"
KERNEL_META="${KARRI_MICRO_KERNEL:-linux-image-cloud-amd64}"
BUSYBOX_PKG=busybox-static
# Modules the init loads (listed in /etc/karri-micro-modules; dependencies are added
# automatically, built-in ones are skipped).
WANT_MODULES=(virtio_pci virtio_net virtio_blk button evdev ext4)
REQUIRED_MODULES=(virtio_net)   # the image is useless without these
DISK_SIZE=8M

export PATH="$PATH:/usr/sbin:/sbin"
export LC_ALL=C

say() { printf 'micro image: %s\n' "$*"; }
die() { printf 'micro image: error: %s\n' "$*" >&2; exit 1; }

for tool in apt-get apt-cache dpkg-deb gzip mke2fs sha256sum flock; do
  command -v "$tool" >/dev/null 2>&1 || die "missing host tool: $tool"
done
[ -f "$INIT_SRC" ] || die "missing $INIT_SRC"

mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
DEBS="$OUT/debs"
mkdir -p "$DEBS"

# One build at a time per OUT_DIR.
exec 9>"$OUT/.lock"
flock 9

SUDO=()
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO=(sudo); fi
apt_updated=0
apt_update() {
  [ "$apt_updated" -eq 0 ] || return 1
  apt_updated=1
  say "running apt-get update"
  "${SUDO[@]}" apt-get update -qq >/dev/null || die "apt-get update failed"
}

# --- resolve package names and versions --------------------------------------------------------
KPKG="" KVERSION="" BVERSION=""
# One apt-cache call (it is the slow part of the up-to-date check): the candidates of the kernel
# (meta) package and busybox; a meta package pins its image package with "Depends: pkg (= ver)".
resolve() {
  local info pkg ver dep
  info="$(apt-cache show --no-all-versions "$KERNEL_META" "$BUSYBOX_PKG" 2>/dev/null \
    | awk -F': ' '$1 == "Package" { p = $2 } $1 == "Version" { v = $2 } $1 == "Depends" { d = $2 }
                  /^$/ { if (p != "") print p "\t" v "\t" d; p = v = d = "" }
                  END { if (p != "") print p "\t" v "\t" d }')" || return 1
  KPKG="" KVERSION="" BVERSION=""
  while IFS=$'\t' read -r pkg ver dep; do
    if [ "$pkg" = "$BUSYBOX_PKG" ]; then
      BVERSION="$ver"
    elif [ "$pkg" = "$KERNEL_META" ]; then
      if [[ "$pkg" =~ ^linux-image-[0-9] ]]; then
        KPKG="$pkg" KVERSION="$ver"
      elif [[ "$dep" =~ (^|,\ *)(linux-image-[0-9][^ ,]*)\ \(=\ ([^\)]+)\) ]]; then
        KPKG="${BASH_REMATCH[2]}" KVERSION="${BASH_REMATCH[3]}"
      fi
    fi
  done <<< "$info"
  [ -n "$KPKG" ] && [ -n "$KVERSION" ] && [ -n "$BVERSION" ]
}
if ! resolve; then
  apt_update
  resolve || die "cannot resolve $KERNEL_META / $BUSYBOX_PKG with apt-cache"
fi

input_hash() {
  {
    echo "script $(sha256sum < "$SELF" | cut -d' ' -f1)"
    echo "init $(sha256sum < "$INIT_SRC" | cut -d' ' -f1)"
    echo "package $KPKG $KVERSION"
    echo "package $BUSYBOX_PKG $BVERSION"
  } | sha256sum | cut -d' ' -f1
}
INPUT="$(input_hash)"

# --- up to date? -------------------------------------------------------------------------------
up_to_date() {
  [ -f "$OUT/manifest" ] || return 1
  [ "$(sed -n 's/^input-sha256 //p' "$OUT/manifest")" = "$INPUT" ] || return 1
  local name sum size n=0
  while read -r name sum size; do
    case "$name" in vmlinuz|initrd.img|disk.img) ;; *) continue ;; esac
    [ -f "$OUT/$name" ] || return 1
    [ "$(stat -c %s "$OUT/$name")" = "$size" ] || return 1
    [ "$(sha256sum < "$OUT/$name" | cut -d' ' -f1)" = "$sum" ] || return 1
    n=$((n + 1))
  done < "$OUT/manifest"
  [ "$n" -eq 3 ]
}
if up_to_date; then
  say "up to date"
  exit 0
fi

# --- fetch -------------------------------------------------------------------------------------
deb_path() { printf '%s/%s_%s.deb' "$DEBS" "$1" "${2//:/%3a}"; }
fetch() { # pkg version
  local pkg="$1" ver="$2" dst tmp
  dst="$(deb_path "$pkg" "$ver")"
  if [ -f "$dst" ] && dpkg-deb -f "$dst" Package >/dev/null 2>&1; then return 0; fi
  tmp="$(mktemp -d "$DEBS/.dl.XXXXXX")"
  if (cd "$tmp" && apt-get download -q "$pkg=$ver") >"$tmp.log" 2>&1; then
    mv "$tmp"/*.deb "$dst"
    rm -rf "$tmp" "$tmp.log"
    # Drop other cached versions of the same package.
    find "$DEBS" -maxdepth 1 -name "${pkg}_*.deb" ! -path "$dst" -delete
    return 0
  fi
  sed 's/^/  /' "$tmp.log" >&2
  rm -rf "$tmp" "$tmp.log"
  return 1
}
fetch_all() { fetch "$KPKG" "$KVERSION" && fetch "$BUSYBOX_PKG" "$BVERSION"; }
if ! fetch_all; then
  apt_update || die "download failed"
  resolve || die "cannot resolve packages after apt-get update"
  INPUT="$(input_hash)"
  fetch_all || die "download failed after apt-get update"
fi
say "kernel $KPKG $KVERSION, $BUSYBOX_PKG $BVERSION"

# --- unpack ------------------------------------------------------------------------------------
WORK="$(mktemp -d "$OUT/.build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
KROOT="$WORK/kernel-pkg"
BROOT="$WORK/busybox-pkg"
ROOT="$WORK/initramfs"
dpkg-deb -x "$(deb_path "$KPKG" "$KVERSION")" "$KROOT"
dpkg-deb -x "$(deb_path "$BUSYBOX_PKG" "$BVERSION")" "$BROOT"

shopt -s nullglob
vmlinuz=("$KROOT"/boot/vmlinuz-*)
[ "${#vmlinuz[@]}" -eq 1 ] || die "expected one /boot/vmlinuz-* in $KPKG"
KVER="${vmlinuz[0]##*/vmlinuz-}"
KMOD="$KROOT/lib/modules/$KVER"
[ -d "$KMOD" ] || die "no /lib/modules/$KVER in $KPKG"
BB="$BROOT/bin/busybox"
[ -x "$BB" ] || die "no /bin/busybox in $BUSYBOX_PKG"

# --- initramfs: busybox ------------------------------------------------------------------------
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,tmp,etc,root,mnt/root,var/log}
chmod 1777 "$ROOT/tmp"
install -m 0755 "$BB" "$ROOT/bin/busybox"
while read -r applet; do
  [ "$applet" = bin/busybox ] && continue
  mkdir -p "$ROOT/$(dirname "$applet")"
  ln -sf /bin/busybox "$ROOT/$applet"
done < <("$BB" --list-full)
ln -sf /proc/mounts "$ROOT/etc/mtab"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$ROOT/etc/passwd"
printf 'root:x:0:\n' > "$ROOT/etc/group"
printf '127.0.0.1 localhost\n' > "$ROOT/etc/hosts"
install -m 0755 "$INIT_SRC" "$ROOT/init"
{
  echo "karri-micro"
  echo "kernel $KPKG $KVERSION ($KVER)"
  echo "busybox $BUSYBOX_PKG $BVERSION"
  echo "input-sha256 $INPUT"
} > "$ROOT/etc/karri-micro-release"

# --- initramfs: kernel modules (closure over modinfo depends=, decompressed) --------------------
declare -A MODPATH=()
while IFS= read -r -d '' f; do
  rel="${f#"$KMOD"/}"
  n="${rel##*/}"; n="${n%%.ko*}"; n="${n//-/_}"
  MODPATH["$n"]="$rel"
done < <(find "$KMOD" -type f \( -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz' \) -print0)
builtin_module() { [ -f "$KMOD/modules.builtin" ] && tr '-' '_' < "$KMOD/modules.builtin" | grep -q "/$1\.ko\$"; }
is_required() { local r; for r in "${REQUIRED_MODULES[@]}"; do [ "$r" = "$1" ] && return 0; done; return 1; }

declare -A SEEN=()
queue=("${WANT_MODULES[@]}")
DST_MOD="$ROOT/lib/modules/$KVER"
mkdir -p "$DST_MOD"
included=()
softdeps=()
while [ "${#queue[@]}" -gt 0 ]; do
  m="${queue[0]//-/_}"
  queue=("${queue[@]:1}")
  [ -n "$m" ] && [ -z "${SEEN[$m]:-}" ] || continue
  SEEN["$m"]=1
  rel="${MODPATH[$m]:-}"
  if [ -z "$rel" ]; then
    builtin_module "$m" && continue
    is_required "$m" && die "kernel module $m not found in $KPKG"
    say "warning: kernel module $m neither built in nor present; skipped"
    continue
  fi
  dst="$DST_MOD/${rel%.ko*}.ko"
  mkdir -p "$(dirname "$dst")"
  case "$rel" in
    *.ko) cp "$KMOD/$rel" "$dst" ;;
    *.ko.xz) xz -dc "$KMOD/$rel" > "$dst" ;;
    *.ko.zst) zstd -dcq "$KMOD/$rel" > "$dst" ;;
    *.ko.gz) gzip -dc "$KMOD/$rel" > "$dst" ;;
  esac
  included+=("$m")
  deps="$(tr '\0' '\n' < "$dst" | sed -n 's/^depends=//p')"   # no early exit: pipefail+SIGPIPE
  deps="${deps%%$'\n'*}"
  IFS=, read -r -a more <<< "$deps"
  queue+=("${more[@]}")
  # softdep=pre: crypto-crc32c (ext4 of the generic kernel): load those too, resolving
  # "[crypto-]x" to a module file "x" or "x_generic"; modprobe of busybox ignores softdeps, so they go first in the list.
  soft="$(tr '\0' '\n' < "$dst" | sed -n 's/^softdep=//p')"
  for s in $soft; do
    case "$s" in *:) continue ;; esac
    s="${s#crypto-}"; s="${s//-/_}"
    for c in "$s" "${s}_generic"; do
      if [ -n "${MODPATH[$c]:-}" ]; then queue+=("$c"); softdeps+=("$c"); break; fi
    done
  done
done
for f in modules.builtin modules.builtin.modinfo modules.order; do
  [ -f "$KMOD/$f" ] && cp "$KMOD/$f" "$DST_MOD/"
done
# The init modprobes these (the wanted ones that are modules in this kernel, not built in).
for m in "${softdeps[@]}" "${WANT_MODULES[@]}"; do
  for i in "${included[@]}"; do if [ "$i" = "$m" ]; then echo "$m"; fi; done
done | awk '!seen[$0]++' > "$ROOT/etc/karri-micro-modules"
"$BB" depmod -b "$ROOT" "$KVER"
[ -s "$DST_MOD/modules.dep" ] || die "depmod produced no modules.dep"
say "modules: ${included[*]}"

# --- outputs -----------------------------------------------------------------------------------
STAGE="$WORK/out"
mkdir -p "$STAGE"
cp "${vmlinuz[0]}" "$STAGE/vmlinuz"

# newc cpio with root ownership, fixed mtimes and sorted names, via busybox cpio.
find "$ROOT" -exec touch -h -d @0 {} +
(cd "$ROOT" && find . -mindepth 1 | sort | "$BB" cpio -o -H newc -R 0:0 2>/dev/null) \
  | gzip -9 -n > "$STAGE/initrd.img"
gzip -t "$STAGE/initrd.img"

DISK_SRC="$WORK/disk"
mkdir -p "$DISK_SRC"
cat > "$DISK_SRC/README" <<EOF
Karri micro image root disk.

The micro image boots from its kernel and initramfs (vmlinuz, initrd.img); this small ext2 disk
is the machine image an instance gets a copy-on-write overlay of. The guest mounts it read-only
at /mnt/root and prints "karri-micro: root disk /dev/vda mounted".
EOF
printf 'karri-micro root disk (kernel %s, %s %s)\n' "$KVER" "$BUSYBOX_PKG" "$BVERSION" > "$DISK_SRC/karri-micro-root"
cp "$ROOT/etc/karri-micro-release" "$DISK_SRC/"
find "$DISK_SRC" -exec touch -h -d @0 {} +
mke2fs -q -F -t ext2 -m 0 -L karri-micro -E root_owner=0:0 \
  -d "$DISK_SRC" "$STAGE/disk.img" "$DISK_SIZE" >/dev/null

# Install atomically-ish: files first, manifest last (its absence or mismatch means rebuild).
rm -f "$OUT/manifest"
for f in vmlinuz initrd.img disk.img; do
  mv -f "$STAGE/$f" "$OUT/$f"
done
printf '%s %s\n' "$KPKG" "$KVERSION" "$BUSYBOX_PKG" "$BVERSION" > "$OUT/packages"
{
  echo "input-sha256 $INPUT"
  for f in vmlinuz initrd.img disk.img; do
    echo "$f $(sha256sum < "$OUT/$f" | cut -d' ' -f1) $(stat -c %s "$OUT/$f")"
  done
} > "$OUT/manifest.tmp"
mv -f "$OUT/manifest.tmp" "$OUT/manifest"
say "built in $OUT:"
sed 's/^/  /' "$OUT/manifest"
