#!/bin/sh
# The guest side of the systemd VM scenario (tests/vm/run-systemd.sh; docs/torture.md).
# Runs as wqd-vmtest.service once the guest's systemd (PID 1) reached multi-user.target. It
# installs wqd exactly as docs/operations.md says (/src/install.sh, extracted from that page by
# the harness), then checks items 1-8 of issue 14 against the shipped units, with CPU hotplug
# churn running during 3, 5 and 7. Each failed check prints `CHECK FAIL ...` and counts as an
# anomaly; the last line is a WQD-SYSTEMD marker with the numbers, PASS only with 0 anomalies.
# Settings come from /etc/wqd-vmtest.env (ROUNDS, CHURN_MS).
export PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
# shellcheck disable=SC1091
. /etc/wqd-vmtest.env
ROUNDS=${ROUNDS:-1}
CHURN_MS=${CHURN_MS:-150}

anomalies=0
checks=0
items=0
restarts=0
hp_writes=0
ac_writes=0
partition=untried
boot_s=$(cut -d' ' -f1 /proc/uptime)
ncpu=$(grep -c '^processor' /proc/cpuinfo)
last=$((ncpu - 1))

log() { echo "sd: $*"; }
up() { cut -d' ' -f1 /proc/uptime; }
fail() {
    anomalies=$((anomalies + 1))
    echo "CHECK FAIL [$1] $2"
}
# ck ITEM DESCRIPTION COMMAND...: the command's status is the check.
ck() {
    it=$1
    what=$2
    shift 2
    checks=$((checks + 1))
    if "$@"; then
        echo "check ok   [$it] $what"
    else
        fail "$it" "$what"
    fi
}
has() { printf '%s' "$1" | grep -q -- "$2"; }
fatal() {
    fail "$1" "$2 (fatal: the scenario cannot go on)"
    marker
}
marker() {
    wqd_journal=$(journalctl -u wqd --no-pager -q 2>/dev/null | wc -l)
    summary="boot_s=$boot_s systemd_s=${systemd_s:-?} target_s=${target_s:-?} restarts=$restarts items=$items hotplug_writes=$hp_writes allowedcpus_writes=$ac_writes checks=$checks partition=$partition anomalies=$anomalies journal_lines=$wqd_journal uptime_s=$(up)"
    if [ "$anomalies" -eq 0 ]; then
        echo "WQD-SYSTEMD: PASS $summary"
    else
        echo "--- journalctl -u wqd (last 60 lines) ---"
        journalctl -u wqd --no-pager -q -n 60 -o short-monotonic
        echo "WQD-SYSTEMD: FAIL $summary"
    fi
    sync
    sleep 1
    systemctl --force --force poweroff
    sleep 10
    echo "WQD-SYSTEMD: FAIL poweroff did not stop the VM"
    exit 1
}

W="wqctl --timeout 60s"
# The item count of a `wqctl -o json` answer ("items":N in its summary).
count_items() { sed -n 's/.*"items":\([0-9]*\).*/\1/p' "$1" | head -n1; }
jfield() { sed -n "s/.*\"$2\":\"\\([^\"]*\\)\".*/\\1/p" "$1" | head -n1; }
mainpid() { systemctl show -p MainPID --value wqd.service; }
nrestarts() { systemctl show -p NRestarts --value wqd.service; }
topo() { $W -o json topology >/tmp/topo.json 2>/tmp/topo.err; }
# wait_allowed SET SECONDS: until wqd's topology says its allowed CPUs are SET.
wait_allowed() {
    n=0
    while [ $n -lt $(($2 * 10)) ]; do
        if topo && [ "$(jfield /tmp/topo.json allowed)" = "$1" ]; then
            return 0
        fi
        sleep 0.1
        n=$((n + 1))
    done
    log "wqd's allowed set is $(jfield /tmp/topo.json allowed), not $1, after $2 s"
    return 1
}

# --- CPU hotplug churn (item 8) --------------------------------------------------------------
churn_pid=""
churn_start() {
    rm -f /tmp/churn.count
    (
        n=0
        trap 'echo $n >/tmp/churn.count; exit 0' TERM
        while :; do
            c=$(( (RANDOM % last) + 1 ))
            f=/sys/devices/system/cpu/cpu$c/online
            if [ "$(cat $f)" = 1 ]; then
                # Keep one CPU besides cpu0 online, so the service's cpuset never empties.
                online=$(cat /sys/devices/system/cpu/cpu[1-9]*/online | grep -c 1)
                [ "$online" -gt 1 ] && echo 0 >$f && n=$((n + 1))
            else
                echo 1 >$f && n=$((n + 1))
            fi
            sleep "$(printf '0.%03d' $(( CHURN_MS / 2 + RANDOM % CHURN_MS )))"
        done
    ) &
    churn_pid=$!
}
churn_stop() {
    [ -n "$churn_pid" ] || return 0
    kill -TERM "$churn_pid"
    wait "$churn_pid"
    churn_pid=""
    w=$(cat /tmp/churn.count 2>/dev/null || echo 0)
    hp_writes=$((hp_writes + w))
    for f in /sys/devices/system/cpu/cpu[1-9]*/online; do
        [ "$(cat "$f")" = 1 ] || { echo 1 >"$f" && hp_writes=$((hp_writes + 1)); }
    done
    log "hotplug churn stopped: $w writes; online $(cat /sys/devices/system/cpu/online)"
}

# --- install, as docs/operations.md says -----------------------------------------------------
log "systemd $(systemctl --version | head -n1 | cut -d' ' -f2) is PID 1 ($(cat /proc/1/comm)); test unit started at uptime ${boot_s} s; $ncpu CPUs; $(systemctl is-system-running 2>/dev/null)"
[ "$(cat /proc/1/comm)" = systemd ] || fatal 0 "PID 1 is $(cat /proc/1/comm), not systemd"
# Boot: the kernel started systemd (PID 1) at systemd_s, which reached multi-user.target at
# target_s (seconds since the kernel started; systemd-analyze time would wait for this unit).
systemd_s=$(systemctl show -p UserspaceTimestampMonotonic --value | awk '{ printf "%.2f", $1 / 1e6 }')
target_s=$(systemctl show -p ActiveEnterTimestampMonotonic --value multi-user.target | awk '{ printf "%.2f", $1 / 1e6 }')
log "boot: the kernel started systemd at $systemd_s s, multi-user.target at $target_s s"
cgv2=$(awk '$2 == "/sys/fs/cgroup" { print $3 }' /proc/mounts)
[ "$cgv2" = cgroup2 ] || fatal 0 "/sys/fs/cgroup is $cgv2, not cgroup v2"
useradd -M alice && useradd -M bob || fatal 0 "useradd alice/bob failed"
log "installing: /src/install.sh (the block of docs/operations.md)"
(cd /src && sh -ex ./install.sh) || fatal 0 "the install steps of docs/operations.md failed"
id alice

# --- 1. socket activation ----------------------------------------------------------------------
ck 1 "wqd.socket is active after install" systemctl -q is-active wqd.socket
ck 1 "wqd.service is not running before the first client" sh -c '! systemctl -q is-active wqd.service'
sock_meta=$(stat -c '%U %G %a' /run/wqd/wqd.sock)
ck 1 "socket /run/wqd/wqd.sock is root wqd 660 (got $sock_meta)" [ "$sock_meta" = "root wqd 660" ]
t0=$(up)
$W -o json topology >/tmp/topo.json 2>/tmp/topo.err
rc=$?
ck 1 "the first wqctl call succeeds through the socket (status $rc: $(cat /tmp/topo.err))" [ $rc -eq 0 ]
ck 1 "wqd.service is active after it" systemctl -q is-active wqd.service
log "first call answered after $(awk -v a="$t0" -v b="$(up)" 'BEGIN{printf "%.2f", b-a}') s"
ck 1 "the journal shows systemd starting wqd.service (nothing but the socket asked it to)" sh -c 'journalctl -q --no-pager -u wqd.service | grep -q "Starting wqd.service\|Started wqd.service"'
ck 1 "wqd.service is triggered by wqd.socket" has "$(systemctl show -p TriggeredBy --value wqd.service)" wqd.socket
systemd-run -q --wait --pipe -p User=alice wqctl --socket /run/wqd/wqd.sock submit -t cpu:0 --handler noop --wait >/tmp/alice.out 2>&1
rc=$?
ck 1 "alice (wqd group, usermod step 6) may submit (status $rc)" [ $rc -eq 0 ]
items=$((items + 1))
systemd-run -q --wait --pipe -p User=bob wqctl --socket /run/wqd/wqd.sock topology >/tmp/bob.out 2>&1
rc=$?
ck 1 "bob (not in wqd) cannot connect (status $rc: $(head -c 200 /tmp/bob.out))" [ $rc -eq 1 ]

# --- 2. Type=notify ---------------------------------------------------------------------------
systemctl restart wqd.service
ck 2 "systemctl restart wqd returns with the unit active" systemctl -q is-active wqd.service
pid=$(mainpid)
# When wqd said it serves (its own log line, stamped by its clock before it sends READY=1)
# and when systemd made the unit active (the same CLOCK_REALTIME), as seconds of the day.
serving=$(journalctl -q --no-pager -o cat _PID="$pid" | grep 'wqd::daemon: wqd serving' | tail -n1 |
    sed -n 's/^[0-9-]*T\([0-9:.]*\)Z.*/\1/p')
active=$(systemctl show -p ActiveEnterTimestamp --value --timestamp=us+utc wqd.service | awk '{ print $3 }')
started=$(systemctl show -p ExecMainStartTimestamp --value --timestamp=us+utc wqd.service | awk '{ print $3 }')
sod() { echo "$1" | awk -F: '{ printf "%.6f", $1 * 3600 + $2 * 60 + $3 }'; }
log "pid $pid: exec at $started, serving at ${serving:-?}, active at $active (UTC)"
ck 2 "wqd logged that it serves (under socket activation too)" [ -n "$serving" ]
ck 2 "the unit turned active only after wqd served (started $started <= serving $serving <= active $active)" \
    awk -v a="$(sod "$started")" -v s="$(sod "${serving:-99:00:00}")" -v b="$(sod "$active")" 'BEGIN { exit !(a <= s && s <= b) }'
sleep 6 # the status line is sent every few seconds
st=$(systemctl status --no-pager wqd.service 2>&1)
ck 2 "systemctl status shows wqd's STATUS line ($(printf '%s' "$st" | grep -m1 'Status:'))" has "$st" 'Status: ".*live CPUs'
ck 2 "StatusText names the live CPUs" has "$(systemctl show -p StatusText --value wqd.service)" "live CPUs"

# --- 6. the sandbox does not break the job (before the reload changes anything) --------------
pid=$(mainpid)
topo
ck 6 "wqd reads sysfs: $ncpu CPUs live ($(jfield /tmp/topo.json live))" [ "$(jfield /tmp/topo.json live)" = "0-$last" ]
ck 6 "wqd reads its cgroup ($(jfield /tmp/topo.json allowed_source))" [ "$(jfield /tmp/topo.json allowed_source)" = "cgroup-v2:cpuset.cpus.effective" ]
ck 6 "wqd runs as user wqd" [ "$(stat -c %U /proc/"$pid")" = wqd ]
$W -o json submit -t each:cpu --handler spin -a ms=5 --wait >/tmp/each.json 2>&1
ck 6 "an item per CPU ran ($(head -c 300 /tmp/each.json))" grep -q '"all_ok":true' /tmp/each.json
items=$((items + ncpu))
pinned=0
for t in /proc/"$pid"/task/*; do
    a=$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' "$t/status")
    case $a in *[,-]*) ;; *) pinned=$((pinned + 1)) ;; esac
done
ck 6 "worker threads are pinned to one CPU each ($pinned threads)" [ "$pinned" -ge "$ncpu" ]
ck 6 "the uevent thread runs (wqd-topo-uevent)" grep -qx 'wqd-topo-uevent' /proc/"$pid"/task/*/comm
ck 6 "no 'no uevent socket' warning" sh -c '! journalctl -q --no-pager -u wqd | grep -q "no uevent socket"'

# --- 4. reload -------------------------------------------------------------------------------
cp /etc/wqd/wqd.toml /tmp/wqd.toml.orig
# [live] keys: the log level (so the uevent debug lines show, for item 6), max_batch_items and
# the exec allowlist.
sed -i 's/^#= level = "info"/level = "info,wqd_core::live=debug"/; s/^max_batch_items = .*/max_batch_items = 5/' /etc/wqd/wqd.toml
cat >>/etc/wqd/wqd.toml <<'EOF'

[exec.commands.wc]
path = "/usr/bin/wc"
args = ["-c"]
EOF
pid=$(mainpid)
systemctl reload wqd.service
rc=$?
# The status line says what the reload did (right after it, and at the end of every periodic
# status since: "; last reload: ..."). systemd 252 has no Type=notify-reload: `systemctl
# reload` returns once ExecReload's kill sent SIGHUP, so poll.
wait_status() {
    n=0
    while st=$(systemctl show -p StatusText --value wqd.service) && ! has "$st" "$1" && [ $n -lt 40 ]; do
        sleep 0.1
        n=$((n + 1))
    done
}
wait_status "reloaded ("
ck 4 "systemctl reload wqd succeeds (status $rc)" [ $rc -eq 0 ]
ck 4 "the status line says what the reload changed ($st)" has "$st" "reloaded (new limits; new exec allowlist; new log level)"
n=0
while ! journalctl -q --no-pager _PID="$pid" | grep -q 'config reloaded' && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
ck 4 "the journal says the [live] change was applied" sh -c "journalctl -q --no-pager _PID=$pid | grep -q 'config reloaded'"
$W submit -t cpu:0 --handler noop -n 6 >/tmp/six.out 2>&1
rc=$?
ck 4 "max_batch_items = 5 is in force: 6 items refused (status $rc: $(head -c 200 /tmp/six.out))" sh -c "[ $rc -eq 1 ] && grep -q max_batch_items /tmp/six.out"
printf 'hello wqd\n' | $W -o json submit -t cpu:1 --handler exec -a cmd=wc --payload-file - --wait >/tmp/exec.json 2>&1
items=$((items + 1))
ck 6 "exec runs the allowlisted /usr/bin/wc under the sandbox ($(head -c 300 /tmp/exec.json))" grep -q '"all_ok":true' /tmp/exec.json
$W -o json results "$(sed -n 's/.*"item_ids":\[\([0-9]*\).*/\1/p' /tmp/exec.json)" >/tmp/exec-r.json 2>&1
ck 6 "exec's output is wc -c of the payload (\"10\\n\", base64 MTAK)" grep -q '"output":"MTAK"' /tmp/exec-r.json
# Netlink uevents under RestrictAddressFamilies: one offline/online, seen as debug lines.
echo 0 >/sys/devices/system/cpu/cpu$last/online && echo 1 >/sys/devices/system/cpu/cpu$last/online
hp_writes=$((hp_writes + 2))
n=0
while ! journalctl -q --no-pager _PID="$pid" | grep -q 'cpu uevent' && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
ck 6 "wqd receives netlink CPU uevents (journal: cpu uevent)" sh -c "journalctl -q --no-pager _PID=$pid | grep -q 'cpu uevent'"
# A restart-only key: refused as a whole, the running config stays.
sed -i 's/^results_max = .*/results_max = 1000/' /etc/wqd/wqd.toml
systemctl reload wqd.service
wait_status "reload refused"
ck 4 "the status line says the reload was refused ($st)" has "$st" "reload refused: config key engine.results_max"
n=0
while ! journalctl -q --no-pager _PID="$pid" | grep -q 'config reload refused' && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
ck 4 "the journal says the restart-only change was refused" sh -c "journalctl -q --no-pager _PID=$pid | grep 'config reload refused' | grep -q results_max"
ck 4 "wqd is still the same process, active" sh -c "[ $(mainpid) = $pid ] && systemctl -q is-active wqd.service"
$W submit -t cpu:0 --handler noop -n 6 >/tmp/six.out 2>&1
ck 4 "the live change stays in force after the refused reload" grep -q max_batch_items /tmp/six.out
cp /tmp/wqd.toml.orig /etc/wqd/wqd.toml
systemctl reload wqd.service
sleep 1

round=1
while [ $round -le "$ROUNDS" ]; do
    log "=== round $round of $ROUNDS (items 3, 5, 7 under hotplug churn) at uptime $(up) s"
    # --- 3. watchdog ------------------------------------------------------------------------
    churn_start
    pid=$(mainpid)
    r0=$(nrestarts)
    wsec=$(systemctl show -p WatchdogUSec --value wqd.service)
    log "kill -STOP $pid (WatchdogSec $wsec)"
    t0=$(up)
    kill -STOP "$pid"
    sleep 1
    # A client that connects while wqd hangs: the socket (held by systemd) keeps its connection
    # queued across the restart, and the new wqd answers it.
    wqctl --timeout 90s -o json submit -t cpu:0 --handler noop -n 3 --wait >/tmp/hung.json 2>&1 &
    hung=$!
    n=0
    while [ "$(mainpid)" = "$pid" ] || ! systemctl -q is-active wqd.service; do
        sleep 0.5
        n=$((n + 1))
        [ $n -lt 200 ] || break
    done
    t1=$(up)
    wait $hung
    rc=$?
    items=$((items + 3))
    r1=$(nrestarts)
    restarts=$((restarts + r1 - r0))
    log "restarted as $(mainpid) after $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}') s; NRestarts $r0 -> $r1"
    ck 3 "systemd restarted wqd after the watchdog timeout (NRestarts $r0 -> $r1)" [ "$r1" -gt "$r0" ]
    wd=$(journalctl -q --no-pager -u wqd | grep -c "Watchdog timeout")
    ck 3 "the journal shows the watchdog timeout (one a round so far: $wd)" [ "$wd" -ge "$round" ]
    # WatchdogSignal=SIGKILL (deploy/wqd.service says why): no thread of the stopped wqd may run
    # on after the kill and take the queued client with it.
    wk=$(journalctl -q --no-pager -u wqd | grep -c "Main process exited, code=killed, status=9/KILL")
    ck 3 "the watchdog killed wqd with SIGKILL (WatchdogSignal=$(systemctl show -p WatchdogSignal --value wqd.service); one a round so far: $wk)" [ "$wk" -ge "$round" ]
    ck 3 "the client queued during the hang got its answer from the new wqd (status $rc: $(head -c 200 /tmp/hung.json))" grep -q '"all_ok":true' /tmp/hung.json
    $W -o json submit -t all --handler noop -n 4 --wait >/tmp/after.json 2>&1
    ck 3 "new clients connect after the restart" grep -q '"all_ok":true' /tmp/after.json
    items=$((items + 4))
    churn_stop

    # --- 5. stop with work pending and a flush waiting -----------------------------------------
    churn_start
    $W wq create sd-stop --max-active 1 >/dev/null 2>&1
    # One item runs on cpu0 (never offlined) for 8 s (under the 10 s shutdown_grace), three wait
    # for its slot (spin holds a max_active slot; sleep would not).
    $W -o json submit -w sd-stop -t cpu:0 --handler spin -a ms=8000 -n 4 >/tmp/stop-sub.json 2>&1
    items=$((items + 4))
    batch=$(sed -n 's/.*"batch_id":\([0-9]*\).*/\1/p' /tmp/stop-sub.json)
    $W -o json flush --batch "$batch" >/tmp/stop-flush.json 2>/tmp/stop-flush.err &
    fl=$!
    sleep 1
    pid=$(mainpid)
    t0=$(up)
    systemctl stop wqd.service
    rc=$?
    t1=$(up)
    wait $fl
    frc=$?
    log "systemctl stop took $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}') s; flush exit $frc: $(head -c 400 /tmp/stop-flush.json) $(cat /tmp/stop-flush.err)"
    ck 5 "systemctl stop succeeds (status $rc)" [ $rc -eq 0 ]
    ck 5 "the unit is inactive, not failed ($(systemctl is-active wqd.service), Result=$(systemctl show -p Result --value wqd.service))" sh -c '[ "$(systemctl is-active wqd.service)" = inactive ] && [ "$(systemctl show -p Result --value wqd.service)" = success ]'
    ck 5 "the flush client got its summary, exit 3 (not all ok), as documented" sh -c "[ $frc -eq 3 ] && grep -q '\"items_covered\":4' /tmp/stop-flush.json"
    ck 5 "the running item got its grace and ended ok" grep -q '"ok":1' /tmp/stop-flush.json
    ck 5 "the three waiting items were cancelled" grep -q '"cancelled":3' /tmp/stop-flush.json
    ck 5 "the journal says how many were cancelled" sh -c "journalctl -q --no-pager _PID=$pid | grep -q 'stopped cancelled=3'"
    ck 5 "wqd.socket stays active" systemctl -q is-active wqd.socket
    churn_stop
    # The next client starts wqd again through the socket.
    ck 5 "a client after the stop starts wqd again" sh -c "$W topology >/dev/null"

    # --- 7. AllowedCPUs ----------------------------------------------------------------------
    churn_start
    pid=$(mainpid)
    cg=/sys/fs/cgroup$(sed -n 's/^0:://p' /proc/"$pid"/cgroup)
    $W wq create sd-widen --fallback widen >/dev/null 2>&1
    $W wq create sd-wait --fallback wait >/dev/null 2>&1
    # Work runs while the cpuset changes: every CPU, for a few seconds.
    $W -o json submit -t each:cpu --handler spin -a ms=400 --wait >/dev/null 2>&1 &
    $W -o json submit -t all --handler sleep -a ms=20 -n 200 --wait >/tmp/bg.json 2>&1 &
    bg=$!
    items=$((items + ncpu + 200))
    systemctl set-property --runtime wqd.service AllowedCPUs=0-1
    ac_writes=$((ac_writes + 1))
    eff=$(cat "$cg/cpuset.cpus.effective")
    # (0 alone when the churn has cpu1 offline at that moment)
    ck 7 "set-property AllowedCPUs=0-1 shrank the service's cpuset (effective $eff)" sh -c "[ '$eff' = 0-1 ] || [ '$eff' = 0 ]"
    churn_stop
    ck 7 "wqd follows: allowed 0-1" wait_allowed 0-1 5
    ck 7 "wqd's live set is 0-1" [ "$(jfield /tmp/topo.json live)" = 0-1 ]
    $W -o json submit -w sd-widen -t cpu:$last --handler noop -n 4 --wait >/tmp/widen.json 2>&1
    items=$((items + 4))
    ck 7 "items for cpu:$last fell back (widen) and ran on 0-1 ($(head -c 300 /tmp/widen.json))" sh -c "grep -q '\"all_ok\":true' /tmp/widen.json && grep -q '\"fallback_items\":4' /tmp/widen.json && ! grep -q '\"per_cpu\":{[^}]*\"$last\"' /tmp/widen.json"
    $W -o json submit -w sd-wait -t cpu:$last --handler noop -n 3 >/tmp/wait.json 2>&1
    items=$((items + 3))
    wbatch=$(sed -n 's/.*"batch_id":\([0-9]*\).*/\1/p' /tmp/wait.json)
    sleep 1
    $W -o json flush --batch "$wbatch" --timeout 1s >/tmp/wait1.json 2>&1
    ck 7 "items of a wait workqueue for cpu:$last wait while it is outside AllowedCPUs" sh -c "! grep -q '\"ok\":3' /tmp/wait1.json"
    systemctl set-property --runtime wqd.service AllowedCPUs=0-$last
    ac_writes=$((ac_writes + 1))
    ck 7 "set-property AllowedCPUs=0-$last grew it back ($(cat "$cg/cpuset.cpus.effective"))" [ "$(cat "$cg/cpuset.cpus.effective")" = "0-$last" ]
    ck 7 "wqd follows: allowed 0-$last" wait_allowed "0-$last" 5
    $W -o json flush --batch "$wbatch" >/tmp/wait2.json 2>&1
    ck 7 "nothing stranded: the waiting items ran once cpu$last came back ($(head -c 300 /tmp/wait2.json))" sh -c "grep -q '\"ok\":3' /tmp/wait2.json && grep -q '\"per_cpu\":{\"$last\":3}' /tmp/wait2.json"
    # The 6.1 kernel does not restore a thread's own affinity when a cpuset grows back: a thread
    # pinned to cpu$last now is wqd's doing.
    repinned=0
    for t in /proc/"$pid"/task/*; do
        [ "$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' "$t/status")" = "$last" ] && repinned=$((repinned + 1))
    done
    ck 7 "a worker thread is pinned to cpu$last again ($repinned)" [ "$repinned" -ge 1 ]
    wait $bg
    ck 7 "the work running across the changes all ended ok ($(head -c 300 /tmp/bg.json))" grep -q '"all_ok":true' /tmp/bg.json
    log "fallbacks during the shrink: $(sed -n 's/.*"fallbacks":\({[^}]*}\).*/\1/p' /tmp/widen.json); background run: $(sed -n 's/.*"per_cpu":\({[^}]*}\).*/\1/p' /tmp/bg.json)"
    # An isolated partition made by a sibling cgroup takes a CPU away the same way.
    if [ "$partition" != unsupported ]; then
        iso=/sys/fs/cgroup/wqd-vmtest-iso
        mkdir -p $iso
        grep -q cpuset /sys/fs/cgroup/cgroup.subtree_control || echo +cpuset >/sys/fs/cgroup/cgroup.subtree_control
        echo "$last" >$iso/cpuset.cpus
        if echo isolated >$iso/cpuset.cpus.partition 2>/dev/null && [ "$(cat $iso/cpuset.cpus.partition)" = isolated ]; then
            ac_writes=$((ac_writes + 1))
            ck 7 "an isolated sibling partition takes cpu$last from wqd.service ($(cat "$cg/cpuset.cpus.effective"))" sh -c "! grep -q '$last' $cg/cpuset.cpus.effective"
            ck 7 "wqd follows: allowed 0-$((last - 1))" wait_allowed "0-$((last - 1))" 5
            $W -o json submit -w sd-widen -t cpu:$last --handler noop -n 2 --wait >/tmp/iso.json 2>&1
            items=$((items + 2))
            ck 7 "items for cpu$last fall back while it is isolated ($(head -c 200 /tmp/iso.json))" grep -q '"fallback_items":2' /tmp/iso.json
            echo member >$iso/cpuset.cpus.partition
            rmdir $iso
            ac_writes=$((ac_writes + 1))
            ck 7 "wqd follows the partition's removal: allowed 0-$last" wait_allowed "0-$last" 5
            partition=ok
        else
            partition=unsupported
            log "isolated partition refused: $(cat $iso/cpuset.cpus.partition 2>&1)"
            rmdir $iso 2>/dev/null
        fi
    fi
    round=$((round + 1))
done

ck 0 "wqd.service never ended failed" sh -c '! systemctl -q is-failed wqd.service'
# What systemd itself said about the units: warnings would mean a directive it ignores or
# cannot apply here (the unit would then be less hardened than it claims).
journalctl -q --no-pager -p warning _PID=1 -o cat | grep -i 'wqd\.' | grep -v 'Watchdog timeout\|Killing process\|Main process exited\|Failed with result .watchdog.' >/tmp/sd-warn.txt
ck 0 "systemd logged no warning about the wqd units ($(head -c 400 /tmp/sd-warn.txt | tr '\n' ';'))" [ ! -s /tmp/sd-warn.txt ]
log "systemd-analyze security wqd.service: $(systemd-analyze security --no-pager wqd.service 2>/dev/null | tail -n1)"
log "done at uptime $(up) s"
marker
