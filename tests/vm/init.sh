#!/bin/sh
# /init of the torture VM (busybox ash). Mounts what the driver needs; in daemon mode starts the
# real wqd and waits for its ready line; runs wqd-torture with the settings the harness packed
# into /etc/torture.env; makes sure a WQD-TORTURE marker reaches the serial console whatever
# happens, and powers off.
export PATH=/usr/bin:/bin:/sbin:/usr/sbin
mount -t devtmpfs devtmpfs /dev
# The initramfs has no /dev/console node: take the console only now that devtmpfs is up.
exec 0</dev/console 1>/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
mkdir -p /run

finish() {
    sync
    poweroff -f
    sleep 5
    echo "WQD-TORTURE: FAIL poweroff did not stop the VM"
}

# shellcheck disable=SC1091
. /etc/torture.env

echo "init: kernel $(uname -r), CPUs present $(cat /sys/devices/system/cpu/present), online $(cat /sys/devices/system/cpu/online), uptime $(cut -d' ' -f1 /proc/uptime) s"
for n in /sys/devices/system/node/node*; do
    [ -e "$n/cpulist" ] && echo "init: ${n##*/} cpus $(cat "$n/cpulist")"
done

case "$MODE" in
    library)
        # shellcheck disable=SC2086
        /usr/bin/wqd-torture --mode library --allow-hotplug --duration "$DURATION" --seed "$SEED" $EXTRA
        rc=$?
        ;;
    daemon)
        if [ ! -x /usr/bin/wqd ]; then
            echo "WQD-TORTURE: FAIL daemon mode asked but no wqd binary was packed"
            finish
        fi
        # The real daemon: host topology, real pinning, netlink uevents, a short rescan, and
        # results kept long enough for a long run (/etc/wqd/wqd.toml, packed by run.sh).
        # shellcheck disable=SC2086
        set -- --socket /run/wqd/wqd.sock --config /etc/wqd/wqd.toml --pinning on \
            --rescan "$RESCAN" --shutdown-grace 2s --log-level "$WQD_LOG" $WQD_ARGS
        echo "init: starting wqd $*"
        /usr/bin/wqd "$@" >/tmp/wqd.log 2>&1 &
        wqd_pid=$!
        i=0
        while ! grep -q 'listening on unix:' /tmp/wqd.log && [ $i -lt 300 ]; do
            if ! kill -0 "$wqd_pid" 2>/dev/null; then
                cat /tmp/wqd.log
                echo "WQD-TORTURE: FAIL wqd exited before it listened"
                finish
            fi
            sleep 0.1
            i=$((i + 1))
        done
        echo "init: $(grep -m1 'listening on unix:' /tmp/wqd.log) after $((i / 10)).$((i % 10)) s"
        # Attached worker processes (wqd-client's wqd-worker-example) serve a share of the
        # items; the driver kills one every few seconds and starts it again.
        attached=""
        [ -x /usr/bin/wqd-worker-example ] && attached="--attached-worker /usr/bin/wqd-worker-example"
        # shellcheck disable=SC2086
        /usr/bin/wqd-torture --mode daemon --socket /run/wqd/wqd.sock --allow-hotplug --duration "$DURATION" --seed "$SEED" $attached $EXTRA
        rc=$?
        kill -TERM "$wqd_pid" 2>/dev/null
        wait "$wqd_pid"
        wqd_rc=$?
        echo "init: wqd exited with status $wqd_rc after SIGTERM; its last log lines:"
        tail -n 12 /tmp/wqd.log
        if [ "$wqd_rc" -ne 0 ]; then
            echo "WQD-TORTURE: FAIL wqd exited with status $wqd_rc after SIGTERM (expected 0)"
        fi
        ;;
    *)
        echo "WQD-TORTURE: FAIL unknown mode $MODE"
        finish
        ;;
esac
echo "init: driver exited with status $rc at uptime $(cut -d' ' -f1 /proc/uptime) s"
if [ "$rc" -ne 0 ]; then
    echo "WQD-TORTURE: FAIL driver exited with status $rc"
fi
finish
