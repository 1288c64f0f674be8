#!/usr/bin/env bash
# CPU hotplug torture of wqd in a VM: fetch qemu, the Debian kernel and busybox (cached, host
# packages untouched), build the release binaries, pack an initramfs, boot qemu (TCG) and grep
# the WQD-TORTURE marker the guest prints on its serial console. In daemon mode (the default)
# the guest runs the real wqd and wqd-torture drives it through wqd-client; in library mode
# wqd-torture runs the engine in-process.
#
# Usage: tests/vm/run.sh [--duration 30s] [--seed N] [--smp 4] [--numa] [--mode daemon|library]
#                        [--mem MB] [--timeout SECS] [--rescan 200ms] [--wqd-args 'ARGS']
#                        [--no-build] [--keep] [-- DRIVER-ARGS...]
# Every flag also has an environment variable: WQD_VM_DURATION, WQD_VM_SEED, WQD_VM_SMP,
# WQD_VM_NUMA=1, WQD_VM_MODE, WQD_VM_MEM, WQD_VM_TIMEOUT, WQD_VM_RESCAN, WQD_VM_WQD_ARGS,
# WQD_VM_NO_BUILD=1, WQD_VM_ARGS, WQD_VM_CACHE (download cache, default tests/vm/work),
# WQD_VM_LOG (serial log path). WQD_VM_WQD_LOG sets wqd's --log-level (default info).
# WQD_VM_BOOT_LIMIT: seconds for the guest's init to start before the boot counts as stalled
# and is retried once (default 120).
#
# Exit status: 0 PASS; 1 FAIL, no marker, or timeout (the log's tail is printed);
# 77 the packages cannot be fetched (no network): the caller may skip; 2 bad usage.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

duration=${WQD_VM_DURATION:-30s}
seed=${WQD_VM_SEED:-1}
smp=${WQD_VM_SMP:-4}
numa=${WQD_VM_NUMA:-0}
mode=${WQD_VM_MODE:-daemon}
rescan=${WQD_VM_RESCAN:-200ms}
wqd_args=${WQD_VM_WQD_ARGS:-}
wqd_log=${WQD_VM_WQD_LOG:-info}
mem=${WQD_VM_MEM:-512}
timeout_s=${WQD_VM_TIMEOUT:-}
no_build=${WQD_VM_NO_BUILD:-0}
cache=${WQD_VM_CACHE:-$here/work}
log=${WQD_VM_LOG:-}
keep=0
read -r -a extra <<<"${WQD_VM_ARGS:-}"

usage() { sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --duration) duration=$2; shift 2 ;;
        --seed) seed=$2; shift 2 ;;
        --smp) smp=$2; shift 2 ;;
        --numa) numa=1; shift ;;
        --mode) mode=$2; shift 2 ;;
        --mem) mem=$2; shift 2 ;;
        --timeout) timeout_s=$2; shift 2 ;;
        --rescan) rescan=$2; shift 2 ;;
        --wqd-args) wqd_args=$2; shift 2 ;;
        --no-build) no_build=1; shift ;;
        --keep) keep=1; shift ;;
        --) shift; extra+=("$@"); break ;;
        -h | --help) usage ;;
        *) echo "run.sh: unknown argument $1" >&2; usage ;;
    esac
done
[[ $mode == library || $mode == daemon ]] || { echo "run.sh: --mode is library or daemon" >&2; exit 2; }
if [[ $numa == 1 && $smp != 4 ]]; then
    echo "run.sh: --numa lays out 4 CPUs on two nodes; use --smp 4" >&2
    exit 2
fi

# Seconds of the duration (s, m or h suffix, or plain seconds), for the default timeout.
dur_s=$(awk -v d="$duration" 'BEGIN {
    n = d + 0; u = substr(d, length(d));
    if (u == "m") n *= 60; else if (u == "h") n *= 3600;
    print int(n) }')
# Boot (~3 s), the run, the final flush (bounded by 30 s) and shutdown, with room for a busy host.
timeout_s=${timeout_s:-$((dur_s + 120))}

say() { printf 'vm: %s\n' "$*" >&2; }
# shellcheck source=tests/vm/lib.sh
. "$here/lib.sh"
t_start=$(date +%s)

"$here/fetch.sh" "$cache" || exit $?   # 77 passes through: cannot fetch
cache=$(cd "$cache" && pwd)
qroot=$cache/root
export LD_LIBRARY_PATH=$qroot/usr/lib/x86_64-linux-gnu:$qroot/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

target_dir=$(cd "$repo" && cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
bins=("$target_dir/release/wqd-torture")
pkgs=(-p wqd-torture)
if [[ $mode == daemon ]]; then
    # The daemon as shipped (the workspace has no cargo features, so this is the binary the
    # caller's cargo test built). Cargo is incremental, so this is quick when nothing changed;
    # it also works from inside `cargo test` (the build lock is free while tests run).
    # And the attached workers the driver starts and kills (wqd-client's wqd-worker-example).
    bins+=("$target_dir/release/wqd" "$target_dir/release/wqd-worker-example")
    # Target flags apply to every selected package: `-p wqd --bin wqd -p wqd-torture` would
    # build no wqd-torture at all (that package has no bin named wqd), so name every bin.
    pkgs=(-p wqd -p wqd-torture -p wqd-client --bin wqd --bin wqd-torture --bin wqd-worker-example)
fi
if [[ $no_build != 1 ]]; then
    say "building ${pkgs[*]} (release)"
    vm_cargo_build "${pkgs[@]}"
fi
for b in "${bins[@]}"; do
    [[ -x $b ]] || { say "no $b; build first or drop --no-build"; exit 1; }
done

# --- initramfs -----------------------------------------------------------------------------
run_dir=$(mktemp -d "$cache/run.XXXXXX")
cleanup() { [[ $keep == 1 ]] || rm -rf "$run_dir"; }
trap cleanup EXIT
root=$run_dir/root
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,etc/wqd,usr/bin,usr/sbin}
cp "$cache/busybox" "$root/bin/busybox"
# Debian's busybox lists itself as an applet; linking it over itself breaks the boot.
for applet in $("$cache/busybox" --list); do
    [[ $applet == busybox ]] && continue
    ln -sf busybox "$root/bin/$applet"
done
for b in "${bins[@]}"; do
    cp "$b" "$root/usr/bin/"
    # Every shared library and the loader, at the path the binary looks for them.
    while read -r lib; do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done < <(ldd "$b" | awk '/=> \// { print $3 } /^\t\// { print $1 }')
done
install -m 0755 "$here/init.sh" "$root/init"
{
    printf 'MODE=%q\nDURATION=%q\nSEED=%q\nEXTRA=%q\n' "$mode" "$duration" "$seed" "${extra[*]:-}"
    printf 'RESCAN=%q\nWQD_ARGS=%q\nWQD_LOG=%q\n' "$rescan" "$wqd_args" "$wqd_log"
} >"$root/etc/torture.env"
# Results must outlive a long run (the default results_ttl is 10 minutes).
cat >"$root/etc/wqd/wqd.toml" <<'EOF'
[engine]
results_ttl = "6h"
EOF
initrd=$run_dir/initrd.gz
(cd "$root" && find . | "$cache/busybox" cpio -o -H newc -R 0:0 2>/dev/null) | gzip -1 >"$initrd"

# --- boot ----------------------------------------------------------------------------------
numa_tag=""
numa_words=""
if [[ $numa == 1 ]]; then
    numa_tag=-numa
    numa_words=", two NUMA nodes"
fi
log=${log:-$cache/serial-smp$smp$numa_tag-seed$seed.log}
: >"$log"
smp_args=(-smp "$smp")
if [[ $numa == 1 ]]; then
    half=$((mem / 2))
    # shellcheck disable=SC2054 # the commas belong to qemu's option values
    smp_args=(-smp 4,sockets=2,cores=2,threads=1
        -object "memory-backend-ram,id=m0,size=${half}M" -object "memory-backend-ram,id=m1,size=${half}M"
        -numa node,nodeid=0,cpus=0-1,memdev=m0 -numa node,nodeid=1,cpus=2-3,memdev=m1)
fi
say "booting: $smp vCPUs$numa_words, mode $mode, duration $duration, seed $seed, timeout ${timeout_s}s, initrd $(du -h "$initrd" | cut -f1), log $log"
on_fail() { :; }
on_pass() { sed -n '/^==== /,/WQD-TORTURE: PASS/p' "$log" | tr -d '\r' >&2; }
# The guest's init prints "init: kernel ..." first thing in user space (a few seconds under
# TCG); 120 s without it is a stalled boot, booted once more.
vm_boot_retrying "init: kernel " "${WQD_VM_BOOT_LIMIT:-120}" "${smp_args[@]}"
vm_verdict WQD-TORTURE 80
