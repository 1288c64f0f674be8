# Shared by the VM harnesses (run.sh, run-systemd.sh); sourced, not run. Each harness defines
# `say` (its log prefix) and the variables named below before calling these.

# Builds the release binaries `cargo build --release --locked "$@"` names, in $repo.
# From inside `cargo test` the environment carries the test's CARGO_MANIFEST_DIR, CARGO_PKG_*
# and the like. Build scripts that ask to rerun when those change (ring's) would then see a
# change and rebuild ring, rustls, tonic and the daemon: build with the environment a shell has.
vm_cargo_build() {
    (cd "$repo" &&
        for v in $(compgen -e); do
            if [[ $v =~ ^(CARGO_(PKG_|MANIFEST_|CRATE_NAME|PRIMARY_PACKAGE|TARGET_TMPDIR|BIN_)|OUT_DIR$) ]]; then
                unset "$v"
            fi
        done
        cargo build --release --locked "$@") >&2
}

# Boots the guest: qemu (TCG) from $qroot with $initrd and $cache/vmlinuz, the serial console
# to $log, under a hard $timeout_s; $mem MB; then the qemu arguments given ("-smp ..." and
# the like) and last the kernel command line's extra words in $VM_APPEND. Sets qrc (qemu's exit
# status, 124/137 on timeout), t_boot and t_end.
#
# With $VM_BOOT_MARK set, the guest must print that text on its console within
# $VM_BOOT_LIMIT seconds (default 180) of the start, or qemu is stopped and qrc is 200: a guest
# that never reached its test (the emulated kernel stalled while booting, which TCG on a busy
# host does now and then) is told apart from a test that failed, and the caller may boot again.
vm_boot() {
    t_boot=$(date +%s)
    set +e
    timeout --kill-after=10 "$timeout_s" "$qroot/usr/bin/qemu-system-x86_64" \
        -L "$qroot/usr/share/qemu" -L "$qroot/usr/share/seabios" \
        -accel tcg -m "$mem" "$@" \
        -nodefaults -no-user-config -nographic -no-reboot \
        -serial "file:$log" -monitor none -net none \
        -kernel "$cache/vmlinuz" -initrd "$initrd" \
        -append "console=ttyS0 panic=-1 quiet loglevel=4 mitigations=off${VM_APPEND:+ $VM_APPEND}" &
    local qpid=$! stalled=0
    if [[ -n ${VM_BOOT_MARK:-} ]]; then
        local limit=${VM_BOOT_LIMIT:-180}
        while kill -0 "$qpid" 2>/dev/null; do
            grep -qaF -- "$VM_BOOT_MARK" "$log" && break
            if (($(date +%s) - t_boot >= limit)); then
                say "the guest printed no '$VM_BOOT_MARK' within ${limit}s: stopping it (boot stalled)"
                stalled=1
                # timeout(1) passes the TERM on to qemu and reaps it.
                kill -TERM "$qpid" 2>/dev/null
                break
            fi
            sleep 2
        done
    fi
    wait "$qpid"
    qrc=$?
    [[ $stalled == 1 ]] && qrc=200
    set -e
    t_end=$(date +%s)
    say "qemu exited with status $qrc after $((t_end - t_boot)) s (total $((t_end - t_start)) s)"
}

# vm_boot, watching for MARK within LIMIT seconds (see above), and once more when the guest
# stalled while booting: that is no verdict on wqd (an emulated-kernel soft lockup before user
# space, which TCG on a busy 2-core host does now and then). The stalled log is kept as
# $log.stalled; two stalls in a row fail. Usage: vm_boot_retrying MARK LIMIT QEMU-ARGS...
vm_boot_retrying() {
    local mark=$1 limit=$2 attempt
    shift 2
    for attempt in 1 2; do
        VM_BOOT_MARK=$mark VM_BOOT_LIMIT=$limit vm_boot "$@"
        [[ $qrc == 200 && $attempt == 1 ]] || break
        tail_log 20
        cp "$log" "$log.stalled"
        say "boot stalled before the guest printed '$mark' (log kept as $log.stalled); booting again"
        : >"$log"
    done
    if [[ $qrc == 200 ]]; then
        say "FAIL: the guest stalled while booting twice"
        exit 1
    fi
}

tail_log() { say "last lines of $log:"; tail -n "${1:-60}" "$log" | tr -d '\r' >&2; }

# The verdict from the serial log: exits 1 on "MARKER: FAIL" (after calling `on_fail`, which
# prints what the harness wants, and the log's last $2 lines), on a timeout, or without a
# marker; returns after "MARKER: PASS" (after calling `on_pass`).
vm_verdict() {
    local marker=$1 fail_tail=$2
    if grep -q "$marker: FAIL" "$log"; then
        on_fail
        tail_log "$fail_tail"
        say "FAIL: $(grep -a -m1 "$marker: FAIL" "$log" | tr -d '\r')"
        exit 1
    fi
    if [[ $qrc == 124 || $qrc == 137 ]]; then
        tail_log
        say "FAIL: timeout after ${timeout_s}s without a marker"
        exit 1
    fi
    if ! grep -q "$marker: PASS" "$log"; then
        tail_log
        say "FAIL: no $marker marker in $log (qemu status $qrc)"
        exit 1
    fi
    on_pass
    say "PASS in $((t_end - t_boot)) s of VM time"
}
