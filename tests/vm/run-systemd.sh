#!/usr/bin/env bash
# wqd under a real systemd in a VM (issue 14; docs/torture.md, "systemd scenario"): the guest
# boots Debian 12's kernel with Debian's systemd as PID 1 (the whole root in the initramfs, no
# modules needed), installs wqd exactly as docs/operations.md says (the install block is taken
# from that page, so the page cannot drift from what is tested), and runs
# tests/vm/systemd-test.sh as a unit: socket activation, Type=notify, watchdog restart, reload,
# stop, the sandbox, AllowedCPUs (and an isolated partition), with CPU hotplug churn. The host
# greps the WQD-SYSTEMD marker on the serial console.
#
# Usage: tests/vm/run-systemd.sh [--rounds N] [--churn-ms MS] [--smp 4] [--mem MB]
#                                [--timeout SECS] [--no-build] [--keep]
# Every flag also has an environment variable: WQD_VM_SD_ROUNDS (rounds of items 3, 5 and 7,
# default 1), WQD_VM_SD_CHURN_MS (mean pause between hotplug writes, default 150),
# WQD_VM_SMP, WQD_VM_MEM, WQD_VM_TIMEOUT, WQD_VM_NO_BUILD=1, WQD_VM_CACHE (download cache,
# default tests/vm/work), WQD_VM_SD_LOG (serial log path), WQD_VM_BOOT_LIMIT (seconds for the
# guest to reach its test before the boot counts as stalled and is retried once, default 180).
#
# Exit status: 0 PASS; 1 FAIL, no marker, or timeout (the log's tail is printed);
# 77 the packages cannot be fetched (no network): the caller may skip; 2 bad usage.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

rounds=${WQD_VM_SD_ROUNDS:-1}
churn_ms=${WQD_VM_SD_CHURN_MS:-150}
smp=${WQD_VM_SMP:-4}
mem=${WQD_VM_MEM:-768}
timeout_s=${WQD_VM_TIMEOUT:-}
no_build=${WQD_VM_NO_BUILD:-0}
cache=${WQD_VM_CACHE:-$here/work}
log=${WQD_VM_SD_LOG:-}
keep=0

usage() { sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --rounds) rounds=$2; shift 2 ;;
        --churn-ms) churn_ms=$2; shift 2 ;;
        --smp) smp=$2; shift 2 ;;
        --mem) mem=$2; shift 2 ;;
        --timeout) timeout_s=$2; shift 2 ;;
        --no-build) no_build=1; shift ;;
        --keep) keep=1; shift ;;
        -h | --help) usage ;;
        *) echo "run-systemd.sh: unknown argument $1" >&2; usage ;;
    esac
done
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "run-systemd.sh: --rounds is a positive number" >&2; exit 2; }
[[ $churn_ms =~ ^[0-9]+$ && $churn_ms -ge 20 && $churn_ms -le 660 ]] || { echo "run-systemd.sh: --churn-ms is 20..660" >&2; exit 2; }
[[ $smp =~ ^[0-9]+$ && $smp -ge 3 ]] || { echo "run-systemd.sh: --smp is at least 3" >&2; exit 2; }
# Boot and install (~30 s under TCG), then per round the watchdog (WatchdogSec=30s plus the
# restart), the stop (3 s) and the cpuset changes; room for a busy host.
timeout_s=${timeout_s:-$((240 + 120 * rounds))}

say() { printf 'vm-systemd: %s\n' "$*" >&2; }
# shellcheck source=tests/vm/lib.sh
. "$here/lib.sh"
t_start=$(date +%s)

"$here/fetch.sh" "$cache" || exit $?   # 77 passes through: cannot fetch
"$here/fetch-systemd.sh" "$cache" || exit $?
cache=$(cd "$cache" && pwd)
qroot=$cache/root
export LD_LIBRARY_PATH=$qroot/usr/lib/x86_64-linux-gnu:$qroot/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

target_dir=$(cd "$repo" && cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
if [[ $no_build != 1 ]]; then
    # Step 1 of docs/operations.md, the same binaries. The package selection is run.sh's (plus
    # wqctl's bin), so that cargo unifies the same features as the workspace's test build and
    # builds nothing new after `cargo test --workspace --release`. See run.sh for why the cargo
    # test environment is dropped (lib.sh).
    say "building wqd and wqctl (release), as docs/operations.md step 1 does"
    vm_cargo_build -p wqd -p wqd-torture -p wqd-client --bin wqd --bin wqctl
fi
for b in wqd wqctl; do
    [[ -x $target_dir/release/$b ]] || { say "no $target_dir/release/$b; build first or drop --no-build"; exit 1; }
done

# --- the guest's root (an initramfs) ---------------------------------------------------------
run_dir=$(mktemp -d "$cache/run-systemd.XXXXXX")
cleanup() { [[ $keep == 1 ]] || rm -rf "$run_dir"; }
trap cleanup EXIT
root=$run_dir/root
mkdir -p "$root"
# Debian's systemd, dbus and their libraries, without documentation.
(cd "$cache/sysroot" && tar -c --exclude=./usr/share/doc --exclude=./usr/share/man \
    --exclude=./usr/share/locale --exclude=./usr/share/info --exclude=./usr/lib/x86_64-linux-gnu/gconv .) |
    tar -x -C "$root"
mkdir -p "$root"/{dev,proc,sys,run,tmp,var/tmp,var/log,home,root,src,usr/local/bin,usr/local/sbin,etc/systemd/system/multi-user.target.wants}
chmod 1777 "$root/tmp" "$root/var/tmp"
# busybox supplies the shell and the small tools the packages do not (sh, cp, sed, grep,
# kill for ExecReload=/bin/kill, wc for the exec allowlist): an applet only where no packaged
# program has the name.
cp "$cache/busybox" "$root/bin/busybox"
for applet in $("$cache/busybox" --list); do
    [[ $applet == busybox || $applet == init || $applet == poweroff || $applet == reboot || $applet == halt ]] && continue
    exists=0
    for d in bin sbin usr/bin usr/sbin; do [[ -e $root/$d/$applet || -L $root/$d/$applet ]] && exists=1; done
    [[ $exists == 1 ]] || ln -s busybox "$root/bin/$applet"
done
# What base-files and base-passwd would put there.
cat >"$root/etc/os-release" <<'EOF'
PRETTY_NAME="Debian GNU/Linux 12 (bookworm), wqd systemd test guest"
NAME="Debian GNU/Linux"
VERSION_ID="12"
ID=debian
EOF
echo wqd-vm >"$root/etc/hostname"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\nusers:x:100:\n' >"$root/etc/group"
printf 'root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n' >"$root/etc/shadow"
printf 'root:*::\nnogroup:*::\nusers:*::\n' >"$root/etc/gshadow"
chmod 0640 "$root/etc/shadow" "$root/etc/gshadow"
: >"$root/etc/machine-id"
printf 'proc /proc proc defaults 0 0\n' >"$root/etc/fstab"
# No gettys, no udev settle: the test unit is all the guest runs.
rm -f "$root"/etc/systemd/system/getty.target.wants/* 2>/dev/null || true
# The repository as an operator checks it out: the binaries step 1 built, deploy/, and the
# install block of docs/operations.md (steps 2-6; step 5 enables the socket only, so that item
# 1 can see wqd start on the first connection, as the page describes for that choice).
mkdir -p "$root/src/target/release"
cp "$target_dir/release/wqd" "$target_dir/release/wqctl" "$root/src/target/release/"
cp -r "$repo/deploy" "$root/src/deploy"
block=$(awk '/^## Install from source/ { f = 1 } f && /^```sh/ { b = 1; next } b && /^```/ { exit } b { print }' "$repo/docs/operations.md")
for want in 'cargo build --release -p wqd -p wqd-client' 'systemctl enable --now wqd.socket wqd.service' 'usermod -aG wqd alice'; do
    grep -qF -- "$want" <<<"$block" || { say "docs/operations.md's install block no longer has: $want (update run-systemd.sh with it)"; exit 1; }
done
{
    echo "# From docs/operations.md, 'Install from source (systemd)'; step 1 ran on the host."
    sed -e '/^cargo build /d' \
        -e 's/^systemctl enable --now wqd.socket wqd.service/systemctl enable --now wqd.socket/' <<<"$block"
} >"$root/src/install.sh"
# The guest test and its unit, started once the system is up.
install -m 0755 "$here/systemd-test.sh" "$root/usr/local/sbin/wqd-vmtest"
printf 'ROUNDS=%q\nCHURN_MS=%q\n' "$rounds" "$churn_ms" >"$root/etc/wqd-vmtest.env"
cat >"$root/etc/systemd/system/wqd-vmtest.service" <<'EOF'
[Unit]
Description=wqd systemd scenario (tests/vm/systemd-test.sh)
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/wqd-vmtest
StandardOutput=tty
StandardError=tty
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
EOF
ln -s ../wqd-vmtest.service "$root/etc/systemd/system/multi-user.target.wants/wqd-vmtest.service"
ln -sf /lib/systemd/system/multi-user.target "$root/etc/systemd/system/default.target"

initrd=$run_dir/initrd.gz
(cd "$root" && find . | "$cache/busybox" cpio -o -H newc -R 0:0 2>/dev/null) | gzip -1 >"$initrd"

# --- boot ----------------------------------------------------------------------------------
log=${log:-$cache/serial-systemd-smp$smp.log}
: >"$log"
say "booting: $smp vCPUs, systemd as PID 1, rounds $rounds, churn ${churn_ms} ms, timeout ${timeout_s}s, initrd $(du -h "$initrd" | cut -f1), log $log"
on_fail() { grep -a 'CHECK FAIL\|sd: ' "$log" | tr -d '\r' >&2; }
on_pass() { grep -a 'sd: \|check ok\|WQD-SYSTEMD: PASS' "$log" | tr -d '\r' >&2; }
# The test unit's first line ("sd: systemd N is PID 1 ...") says the guest reached its test;
# boot takes ~30 s under TCG, so 180 s without it is a stalled boot (seen once in four CI runs
# of session 8), booted once more.
VM_APPEND="rdinit=/sbin/init systemd.getty_auto=0 systemd.show_status=0" \
    vm_boot_retrying "sd: systemd " "${WQD_VM_BOOT_LIMIT:-180}" -smp "$smp"
vm_verdict WQD-SYSTEMD 90
