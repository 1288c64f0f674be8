#!/usr/bin/env bash
# Fetch and cache what the VM torture needs, without installing anything on the host:
# qemu-system-x86 with the runtime libraries and firmware this host lacks, busybox-static and
# the Debian kernel image. Packages are downloaded with `apt-get download` and unpacked with
# `dpkg-deb -x` into $CACHE/root; the kernel lands in $CACHE/vmlinuz, busybox in
# $CACHE/busybox.
#
# Usage: fetch.sh CACHE_DIR
# Exit status: 0 ready; 77 the packages cannot be fetched (no network, no apt); 1 other errors.
set -euo pipefail

cache=${1:?usage: fetch.sh CACHE_DIR}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
stamp="$cache/.fetched-v1"
if [[ -f $stamp && -x $cache/root/usr/bin/qemu-system-x86_64 && -f $cache/vmlinuz && -x $cache/busybox ]]; then
    exit 0
fi

log() { printf 'fetch: %s\n' "$*" >&2; }
cannot_fetch() { log "cannot fetch packages: $*"; exit 77; }

command -v apt-get >/dev/null || cannot_fetch "apt-get not found (a Debian 12 host is expected)"
command -v dpkg-deb >/dev/null || cannot_fetch "dpkg-deb not found"

# Package lists: refresh them when we may (root), otherwise use what is there.
if [[ $(id -u) -eq 0 ]]; then
    apt-get update -qq >"$cache/apt-update.log" 2>&1 || log "apt-get update failed (see $cache/apt-update.log); using the existing lists"
fi

# The kernel package that linux-image-amd64 depends on (6.1.x on Debian 12).
kernel_pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[[ -n $kernel_pkg ]] || cannot_fetch "no kernel package found behind linux-image-amd64 (apt lists missing?)"

# What installing qemu-system-x86 would add to *this* host: the simulation lists exactly the
# packages (and versions) missing here. Nothing is installed; libc must never be shadowed.
mapfile -t qemu_pkgs < <(apt-get -s install --no-install-recommends qemu-system-x86 2>/dev/null |
    awk '$1 == "Inst" { v = $3; gsub(/[()]/, "", v); print $2 "=" v }' |
    grep -Ev '^(libc6|libc-bin|libgcc-s1|libstdc\+\+6)=' || true)
[[ ${#qemu_pkgs[@]} -gt 0 ]] || cannot_fetch "apt cannot resolve qemu-system-x86"

debs="$cache/debs"
mkdir -p "$debs"
log "downloading ${#qemu_pkgs[@]} qemu packages, busybox-static and $kernel_pkg into $debs"
(cd "$debs" && apt-get download -q "${qemu_pkgs[@]}" busybox-static "$kernel_pkg" >"$cache/download.log" 2>&1) ||
    cannot_fetch "apt-get download failed (see $cache/download.log)"

rm -rf "$cache/root" "$cache/kroot" "$cache/bbroot"
mkdir -p "$cache/root" "$cache/kroot" "$cache/bbroot"
for deb in "$debs"/*.deb; do
    case $(basename "$deb") in
        busybox-static_*) dpkg-deb -x "$deb" "$cache/bbroot" ;;
        linux-image-*) dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$cache/kroot" --wildcards './boot/vmlinuz-*' ;;
        *) dpkg-deb -x "$deb" "$cache/root" ;;
    esac
done
vmlinuz=$(find "$cache/kroot/boot" -name 'vmlinuz-*' | head -n1)
[[ -n $vmlinuz ]] || { log "no vmlinuz in $kernel_pkg"; exit 1; }
mv "$vmlinuz" "$cache/vmlinuz"
mv "$cache/bbroot/bin/busybox" "$cache/busybox"
rm -rf "$cache/kroot" "$cache/bbroot"

# Every library qemu needs must now resolve (host libraries plus the unpacked ones).
libdirs="$cache/root/usr/lib/x86_64-linux-gnu:$cache/root/lib/x86_64-linux-gnu"
missing=$(LD_LIBRARY_PATH=$libdirs ldd "$cache/root/usr/bin/qemu-system-x86_64" | grep 'not found' || true)
if [[ -n $missing ]]; then
    log "qemu still lacks libraries:"
    printf '%s\n' "$missing" >&2
    exit 1
fi
LD_LIBRARY_PATH=$libdirs "$cache/root/usr/bin/qemu-system-x86_64" --version | head -n1 >&2
printf '%s\n' "$kernel_pkg" "${qemu_pkgs[@]}" >"$stamp"
log "ready: $(du -sh "$cache" | cut -f1) in $cache"
