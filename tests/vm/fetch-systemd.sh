#!/usr/bin/env bash
# Fetch and cache the guest userland of the systemd VM scenario (tests/vm/run-systemd.sh):
# Debian's systemd, systemd-sysv, dbus, coreutils (install(1), which busybox lacks, for the
# steps of docs/operations.md) and every package they depend on (libc6 included: this is the
# guest's root, not the host's), downloaded with `apt-get download` and unpacked with
# `dpkg-deb -x` into $CACHE/sysroot. Nothing is installed on the host; maintainer scripts are
# not run (the guest's systemd creates its users and directories at boot from sysusers.d and
# tmpfiles.d, as on a real first boot).
#
# Usage: fetch-systemd.sh CACHE_DIR
# Exit status: 0 ready; 77 the packages cannot be fetched (no network, no apt); 1 other errors.
set -euo pipefail

cache=${1:?usage: fetch-systemd.sh CACHE_DIR}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
stamp="$cache/.fetched-systemd-v2"
if [[ -f $stamp && -x $cache/sysroot/lib/systemd/systemd ]]; then
    exit 0
fi

log() { printf 'fetch-systemd: %s\n' "$*" >&2; }
cannot_fetch() { log "cannot fetch packages: $*"; exit 77; }

command -v apt-get >/dev/null || cannot_fetch "apt-get not found (a Debian 12 host is expected)"
command -v dpkg-deb >/dev/null || cannot_fetch "dpkg-deb not found"

# The dependency closure, without the alternatives apt lists next to the real ones (elogind
# for libsystemd0, cdebconf for debconf), the packaging tools a booted guest never runs, and
# usrmerge with the perl it drags in (the guest keeps Debian 12's unmerged /lib and /bin).
mapfile -t pkgs < <(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
    --no-breaks --no-replaces --no-enhances systemd systemd-sysv dbus coreutils 2>/dev/null |
    grep -Ev '^[ <]' | sort -u |
    grep -Evx 'libelogind0|cdebconf|libdebian-installer4|libnewt0\.52|libslang2|libtextwrap1|install-info|dpkg|tar|debconf|adduser' |
    grep -Ev 'perl|^usrmerge$|^libgdbm|^libdb5' || true)
[[ ${#pkgs[@]} -gt 10 ]] || cannot_fetch "apt cannot resolve systemd's dependencies (package lists missing?)"

debs="$cache/sysdebs"
mkdir -p "$debs"
log "downloading ${#pkgs[@]} packages (systemd, systemd-sysv, dbus and their dependencies) into $debs"
(cd "$debs" && apt-get download -q "${pkgs[@]}" >"$cache/download-systemd.log" 2>&1) ||
    cannot_fetch "apt-get download failed (see $cache/download-systemd.log)"

rm -rf "$cache/sysroot"
mkdir -p "$cache/sysroot"
for p in "${pkgs[@]}"; do
    # apt-get download names files NAME_VERSION_ARCH.deb; take the newest of each name.
    deb=$(find "$debs" -maxdepth 1 -name "${p}_*.deb" | sort -V | tail -n1)
    [[ -n $deb ]] || { log "no .deb for $p in $debs"; exit 1; }
    dpkg-deb -x "$deb" "$cache/sysroot"
done
[[ -x $cache/sysroot/lib/systemd/systemd ]] || { log "no lib/systemd/systemd after unpacking"; exit 1; }
printf '%s\n' "${pkgs[@]}" >"$stamp"
log "ready: $(du -sh "$cache/sysroot" | cut -f1) in $cache/sysroot"
