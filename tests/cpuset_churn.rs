//! cpuset churn on the host: the real `wqd`, started inside a scratch cpuset cgroup holding CPUs
//! 0 and 1, keeps its contract while the test takes CPU 1 out of the cpuset and gives it back,
//! several times, under continuous load.
//!
//! What runs: the daemon with real topology and real pinning (no `--sysfs-root`), a 100 ms
//! rescan and netlink on; three workqueues, one per fallback policy (`widen`, `wait`, `reject`);
//! a submitter that every [`TICK`] sends one batch per workqueue to `cpu:1`, `cpu:0`,
//! `cpus:0-1` and `all` (`spin` and `noop` items) and starts a flush of that batch; a watcher of
//! the topology epochs. Each cycle: a burst of long `cpu:1` items (so some run on CPU 1 and
//! some wait for it), shrink the cpuset to CPU 0, wait until `GetTopology` shows the daemon saw
//! it, hold, grow it back to 0-1, wait until the daemon saw that, hold.
//!
//! What is checked ([`check`], a pure function with its own negative controls below):
//! every item terminal exactly once and none lost; every flush returned; no start on CPU 1 while
//! the cpuset excluded it; `cpu:1` items followed their workqueue's fallback while CPU 1 was out
//! (widen: ran on CPU 0 with the fallback recorded; wait: ran on CPU 1 after it returned;
//! reject: rejected); after each return items ran, and finished, on CPU 1 again.
//!
//! Skipped (with a printed reason) only when not root or when no writable cpuset hierarchy
//! exists. The scratch cgroup is removed by a drop guard, also on failure. The daemon binary is
//! found (or built) by [`wqd_e2e::binary`] (`WQD_E2E_WQD` overrides it); `WQD_CPUSET_CYCLES`
//! overrides the number of cycles.

#[path = "support/cpuset.rs"]
mod cpuset;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio_stream::StreamExt;
use wqd_client::proto as v1;
use wqd_client::{Batch, Client, Endpoint, FlushScope, Item};

use cpuset::{Cgroup, Daemon};

/// The CPU taken out and given back.
const DROP_CPU: u32 = 1;
/// The CPU that always stays.
const KEEP_CPU: u32 = 0;
const BOTH: &str = "0-1";
const ONLY_KEEP: &str = "0";

const CYCLES: usize = 5;
/// How long each phase lasts after the daemon saw it.
const HOLD: Duration = Duration::from_millis(700);
const TICK: Duration = Duration::from_millis(40);
/// Upper bound on submitter ticks (the loop is bounded even if the stop signal never came).
const MAX_TICKS: usize = 3000;
const SPIN_MS: &str = "3";
/// Items of the pre-shrink burst spin this long, so one is running on CPU 1 at the shrink.
const BURST_SPIN_MS: &str = "25";
/// The daemon must see a cpuset change within this.
const DETECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A flush not returned within this counts as hung.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_FLUSHES_IN_FLIGHT: usize = 128;
/// Allowed between the daemon's snapshot time (`taken_at`) and the engine applying it, and for
/// clock reads on either side.
const SLACK: Duration = Duration::from_millis(100);
/// Allowed between a worker's start check (`sched_getcpu` says CPU 1) and the `started_at` it
/// records, for the check-then-run window the engine README describes: a worker that passed the
/// check on CPU 1 just before the shrink is migrated to CPU 0 by the cpuset write and may wait
/// for CPU 0 before it reads the clock. A start on CPU 1 later than this after the write is a
/// violation. (A daemon without the check starts such items until it notices the change, up to
/// the 100 ms rescan later.)
const START_RACE: Duration = Duration::from_millis(30);

/// The three workqueues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Policy {
    Widen,
    Wait,
    Reject,
}

impl Policy {
    const ALL: [Policy; 3] = [Policy::Widen, Policy::Wait, Policy::Reject];

    fn wq(self) -> &'static str {
        match self {
            Policy::Widen => "churn-widen",
            Policy::Wait => "churn-wait",
            Policy::Reject => "churn-reject",
        }
    }

    fn proto(self) -> v1::FallbackPolicy {
        match self {
            Policy::Widen => v1::FallbackPolicy::Widen,
            Policy::Wait => v1::FallbackPolicy::Wait,
            Policy::Reject => v1::FallbackPolicy::Reject,
        }
    }
}

/// One submitted item, from its receipt.
#[derive(Debug, Clone)]
struct Sent {
    id: u64,
    policy: Policy,
    target: String,
    batch: u64,
}

/// How one flush ended.
#[derive(Debug, Clone)]
struct FlushRec {
    what: String,
    waited: Duration,
    /// `None`: returned with a summary; `Some`: error or timeout.
    error: Option<String>,
    covered: u64,
    expected: u64,
}

/// The daemon's snapshot that first showed a wanted live set.
#[derive(Debug, Clone, Copy)]
struct Seen {
    epoch: u64,
    /// The snapshot's `taken_at`: when the daemon published it.
    at: SystemTime,
}

/// One shrink/grow cycle, as the test did it.
#[derive(Debug, Clone)]
struct Phase {
    /// Just before `cpuset.cpus = 0` was written.
    shrink_begin: SystemTime,
    /// After the write returned: the kernel has moved every task off CPU 1.
    shrink_done: SystemTime,
    shrink_seen: Seen,
    /// Just before `cpuset.cpus = 0-1` was written.
    grow_begin: SystemTime,
    grow_seen: Seen,
    /// Workqueue counters summed just before the shrink.
    pending_at_shrink: u64,
    running_at_shrink: u64,
}

/// Everything a run produced; [`check`] judges it.
#[derive(Debug, Default)]
struct Run {
    sent: Vec<Sent>,
    /// Every result received from the batch flushes, duplicates included.
    results: Vec<v1::ItemResult>,
    /// `GetResults` at the end, by id.
    lookup: HashMap<u64, v1::ItemResult>,
    flushes: Vec<FlushRec>,
    phases: Vec<Phase>,
    /// Whether CPU 1 was live in each epoch the test learnt of.
    epochs: BTreeMap<u64, bool>,
    /// Per workqueue at the end: (pending, running, terminal total).
    wq_counts: BTreeMap<Policy, (u64, u64, u64)>,
    /// When the last item was submitted.
    end: Option<SystemTime>,
}

/// What [`check`] found.
#[derive(Debug, Default)]
struct Report {
    violations: Vec<String>,
    by_state: BTreeMap<String, u64>,
    fallbacks: u64,
    rebinds: u64,
    rebound_items: u64,
    migrated_mid_run: u64,
    waited_for_return: u64,
    rejected: u64,
    back_on_drop_cpu: u64,
    longest_flush: Duration,
    longest_flush_what: String,
}

fn ts(t: &Option<prost_types::Timestamp>) -> Option<SystemTime> {
    let t = t.as_ref()?;
    let secs = u64::try_from(t.seconds).ok()?;
    let nanos = u32::try_from(t.nanos).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos))
}

fn state_name(s: i32) -> String {
    v1::ItemState::try_from(s)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("ITEM_STATE_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| format!("state#{s}"))
}

fn is_terminal(s: i32) -> bool {
    !matches!(
        v1::ItemState::try_from(s),
        Ok(v1::ItemState::Pending | v1::ItemState::Running | v1::ItemState::Unspecified) | Err(_)
    )
}

/// Parses a kernel cpulist (`0-1,4`); `None` on nonsense.
fn cpulist(s: &str) -> Option<BTreeSet<u32>> {
    let mut out = BTreeSet::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                out.extend(a..=b);
            }
            None => {
                out.insert(part.parse().ok()?);
            }
        }
    }
    Some(out)
}

fn within(t: SystemTime, from: SystemTime, to: SystemTime) -> bool {
    t >= from && t <= to
}

/// Judges a run. Every rule names the item and what it saw.
fn check(run: &Run) -> Report {
    let mut r = Report::default();
    let mut v = Vec::new();
    let drop_target = format!("cpu:{DROP_CPU}");
    let keep_target = format!("cpu:{KEEP_CPU}");

    // Exactly once: each submitted id unique, one flush result each, nothing extra.
    let mut sent: HashMap<u64, &Sent> = HashMap::new();
    for s in &run.sent {
        if sent.insert(s.id, s).is_some() {
            v.push(format!("item id {} was handed out twice", s.id));
        }
    }
    let mut got: HashMap<u64, Vec<&v1::ItemResult>> = HashMap::new();
    for res in &run.results {
        got.entry(res.item_id).or_default().push(res);
    }
    for s in &run.sent {
        match got.get(&s.id).map(Vec::len) {
            None | Some(0) => v.push(format!(
                "item {} ({} on {}) lost: no flush result",
                s.id,
                s.target,
                s.policy.wq()
            )),
            Some(1) => {}
            Some(n) => v.push(format!(
                "item {} ({} on {}) reported {n} times",
                s.id,
                s.target,
                s.policy.wq()
            )),
        }
    }
    for id in got.keys() {
        if !sent.contains_key(id) {
            v.push(format!(
                "flush returned item {id}, which the test never submitted"
            ));
        }
    }

    // Every flush returned.
    for f in &run.flushes {
        if let Some(e) = &f.error {
            v.push(format!(
                "flush of {} did not return: {e} (after {:?})",
                f.what, f.waited
            ));
        } else if f.covered != f.expected {
            v.push(format!(
                "flush of {} covered {} items, expected {}",
                f.what, f.covered, f.expected
            ));
        }
        if f.waited > r.longest_flush {
            r.longest_flush = f.waited;
            r.longest_flush_what = f.what.clone();
        }
    }

    // The daemon's own counters agree: nothing pending or running, each terminal counted once.
    for p in Policy::ALL {
        let n = run.sent.iter().filter(|s| s.policy == p).count() as u64;
        match run.wq_counts.get(&p) {
            Some(&(pending, running, total)) => {
                if pending != 0 || running != 0 || total != n {
                    v.push(format!(
                        "{}: daemon counts pending {pending}, running {running}, terminal {total}; submitted {n}",
                        p.wq()
                    ));
                }
            }
            None => v.push(format!("{}: no counters from the daemon", p.wq())),
        }
    }

    let out_windows: Vec<(SystemTime, SystemTime)> = run
        .phases
        .iter()
        .map(|p| (p.shrink_done + START_RACE, p.grow_begin))
        .collect();
    let mut per_cycle = vec![[0u64; 5]; run.phases.len()]; // widen fb, wait waited, rejected, back on 1, finished on 1
    for s in &run.sent {
        let Some(res) = got.get(&s.id).and_then(|g| g.first()) else {
            continue;
        };
        let st = state_name(res.state);
        *r.by_state.entry(st.clone()).or_default() += 1;
        let tag = format!(
            "item {} ({} on {}, {})",
            s.id,
            s.target,
            s.policy.wq(),
            res.handler
        );
        if !is_terminal(res.state) {
            v.push(format!("{tag}: flush returned it in state {st}"));
        }
        match run.lookup.get(&s.id) {
            Some(l) if l.state == res.state && l.cpu_started == res.cpu_started => {}
            Some(l) => v.push(format!(
                "{tag}: GetResults says {} on {:?}, the flush said {st} on {:?}",
                state_name(l.state),
                l.cpu_started,
                res.cpu_started
            )),
            None => v.push(format!("{tag}: GetResults does not know it")),
        }
        if res.batch_id != s.batch || res.workqueue != s.policy.wq() {
            v.push(format!(
                "{tag}: result names batch {} workqueue {}",
                res.batch_id, res.workqueue
            ));
        }
        r.rebinds += u64::from(res.rebinds);
        if res.rebinds > 0 {
            r.rebound_items += 1;
        }
        let fallback = res.fallback_level != v1::FallbackLevel::Unspecified as i32;
        if fallback {
            r.fallbacks += 1;
        }
        let queued = ts(&res.queued_at);
        let started = ts(&res.started_at);
        let finished = ts(&res.finished_at);
        let ok = res.state == v1::ItemState::Ok as i32;
        let rejected = res.state == v1::ItemState::Rejected as i32;
        if rejected {
            r.rejected += 1;
        }
        let on_drop = s.target == drop_target;

        // Allowed end states.
        if !(ok || (rejected && on_drop && s.policy == Policy::Reject)) {
            v.push(format!("{tag}: ended {st} ({:?})", res.error));
        }
        if rejected && res.error.is_empty() {
            v.push(format!("{tag}: rejected without a reason"));
        }
        if ok && (res.cpu_started.is_none() || started.is_none()) {
            v.push(format!("{tag}: ok but no start recorded"));
        }
        if let (Some(a), Some(b)) = (res.cpu_started, res.cpu_finished) {
            if a != b {
                r.migrated_mid_run += 1;
            }
        }

        // The kernel's truth: nothing starts on CPU 1 while the cpuset excludes it, and the
        // epoch the start check saw had CPU 1 live.
        if let (Some(DROP_CPU), Some(at)) = (res.cpu_started, started) {
            if let Some(k) = out_windows.iter().position(|&(a, b)| within(at, a, b)) {
                let after = at
                    .duration_since(run.phases[k].shrink_done)
                    .unwrap_or_default();
                v.push(format!(
                    "{tag}: started on cpu {DROP_CPU} {} ms after cycle {k}'s shrink write (allowed {} ms), while the cpuset excluded it",
                    after.as_millis(),
                    START_RACE.as_millis()
                ));
            }
            match run.epochs.get(&res.topology_epoch) {
                Some(true) => {}
                Some(false) => v.push(format!(
                    "{tag}: started on cpu {DROP_CPU} in epoch {}, where it was not live",
                    res.topology_epoch
                )),
                None => v.push(format!(
                    "{tag}: started in epoch {}, which the test never saw",
                    res.topology_epoch
                )),
            }
        }

        // Targets that never need a fallback (CPU 0 is always live).
        if !on_drop {
            if fallback {
                v.push(format!(
                    "{tag}: fell back ({}) though CPU {KEEP_CPU} was always live",
                    res.fallback_reason
                ));
            }
            if s.target == keep_target && ok && res.cpu_started != Some(KEEP_CPU) {
                v.push(format!("{tag}: ran on cpu {:?}", res.cpu_started));
            }
        }

        // cpu:1 items and their workqueue's fallback.
        if on_drop {
            if ok && res.cpu_started == Some(KEEP_CPU) {
                if s.policy != Policy::Widen {
                    v.push(format!(
                        "{tag}: ran on cpu {KEEP_CPU}, but its workqueue does not widen"
                    ));
                } else if !fallback || res.fallback_reason.is_empty() {
                    v.push(format!(
                        "{tag}: ran on cpu {KEEP_CPU} without a recorded fallback"
                    ));
                } else {
                    // The start check's epoch must have lacked CPU 1, except in the race where
                    // CPU 1 came back between take and start (bounded by SLACK after the grow).
                    let justified = match run.epochs.get(&res.topology_epoch) {
                        Some(false) => true,
                        Some(true) => started.is_some_and(|at| {
                            run.phases
                                .iter()
                                .any(|p| within(at, p.grow_begin, p.grow_seen.at + SLACK))
                        }),
                        None => false,
                    };
                    if !justified {
                        v.push(format!(
                            "{tag}: fell back in epoch {} while cpu {DROP_CPU} was live ({})",
                            res.topology_epoch, res.fallback_reason
                        ));
                    }
                }
            }
            if ok && res.cpu_started == Some(DROP_CPU) && fallback {
                v.push(format!(
                    "{tag}: ran in its own group but records fallback {}",
                    res.fallback_reason
                ));
            }
            if rejected {
                // Only while the daemon believed CPU 1 gone.
                let t = finished.unwrap_or(SystemTime::UNIX_EPOCH);
                if !run
                    .phases
                    .iter()
                    .any(|p| within(t, p.shrink_seen.at - SLACK, p.grow_seen.at + SLACK))
                {
                    v.push(format!(
                        "{tag}: rejected at {t:?}, when cpu {DROP_CPU} was live"
                    ));
                }
            }
            // Queued well inside a window where the daemon knew CPU 1 was out.
            for (k, p) in run.phases.iter().enumerate() {
                let Some(q) = queued else { break };
                if !within(q, p.shrink_seen.at + SLACK, p.grow_seen.at - SLACK) {
                    continue;
                }
                match s.policy {
                    Policy::Reject if !rejected => v.push(format!(
                        "{tag}: queued while cpu {DROP_CPU} was out but ended {st}"
                    )),
                    Policy::Wait => {
                        let after = started.is_some_and(|at| at >= p.grow_begin);
                        if !(ok && res.cpu_started == Some(DROP_CPU) && after) {
                            v.push(format!(
                                "{tag}: queued while cpu {DROP_CPU} was out; must run on it after it returned, got {st} on {:?} at {started:?}",
                                res.cpu_started
                            ));
                        } else {
                            per_cycle[k][1] += 1;
                            r.waited_for_return += 1;
                        }
                    }
                    _ => {}
                }
            }
        }

        // Per-cycle evidence.
        for (k, p) in run.phases.iter().enumerate() {
            let next = run
                .phases
                .get(k + 1)
                .map(|n| n.shrink_begin)
                .or(run.end)
                .unwrap_or(p.grow_seen.at + HOLD);
            if on_drop
                && s.policy == Policy::Widen
                && fallback
                && started.is_some_and(|at| within(at, p.shrink_begin, p.grow_seen.at + SLACK))
            {
                per_cycle[k][0] += 1;
            }
            if rejected
                && finished.is_some_and(|t| within(t, p.shrink_begin, p.grow_seen.at + SLACK))
            {
                per_cycle[k][2] += 1;
            }
            if ok
                && res.cpu_started == Some(DROP_CPU)
                && started.is_some_and(|at| within(at, p.grow_seen.at, next))
            {
                per_cycle[k][3] += 1;
                r.back_on_drop_cpu += 1;
                if res.cpu_finished == Some(DROP_CPU) {
                    per_cycle[k][4] += 1;
                }
            }
        }
    }

    // The test must have exercised each rule in every cycle, or it proves nothing.
    for (k, p) in run.phases.iter().enumerate() {
        let c = per_cycle[k];
        let mut need = |what: &str, n: u64| {
            if n == 0 {
                v.push(format!("cycle {k}: no {what}"));
            }
        };
        need("item running at the shrink", p.running_at_shrink);
        need("item pending at the shrink", p.pending_at_shrink);
        need("widen fallback to cpu 0 while cpu 1 was out", c[0]);
        need("wait item that ran on cpu 1 after it returned", c[1]);
        need("reject item rejected while cpu 1 was out", c[2]);
        need("item started on cpu 1 after it returned", c[3]);
        need(
            "item that finished on cpu 1 after it returned (re-pinned worker)",
            c[4],
        );
    }
    if run.phases.is_empty() {
        v.push("no cycle ran".into());
    }
    r.violations = v;
    r
}

impl Report {
    fn summary(&self, run: &Run) -> String {
        let states: Vec<String> = self
            .by_state
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let detect: Vec<String> = run
            .phases
            .iter()
            .map(|p| {
                let d = |a: SystemTime, b: SystemTime| {
                    b.duration_since(a).unwrap_or_default().as_millis()
                };
                format!(
                    "{}/{}",
                    d(p.shrink_begin, p.shrink_seen.at),
                    d(p.grow_begin, p.grow_seen.at)
                )
            })
            .collect();
        format!(
            "cpuset churn: {} cycles, {} items ({}), {} flushes, longest flush {:?} ({})\n  \
             fallbacks {}, rejected {}, waited for cpu {DROP_CPU} {}, back on cpu {DROP_CPU} after growth {}, \
             re-binds {} over {} items, migrated mid-run {}\n  detection ms (shrink/grow) per cycle: {}",
            run.phases.len(),
            run.sent.len(),
            states.join(", "),
            run.flushes.len(),
            self.longest_flush,
            self.longest_flush_what,
            self.fallbacks,
            self.rejected,
            self.waited_for_return,
            self.back_on_drop_cpu,
            self.rebinds,
            self.rebound_items,
            self.migrated_mid_run,
            detect.join(" "),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The live run.

fn batch_items(policy: Policy) -> Vec<Item> {
    let _ = policy;
    let spin = |t: String| Item::new(t, "spin").arg("ms", SPIN_MS);
    let noop = |t: String| Item::new(t, "noop");
    let d = format!("cpu:{DROP_CPU}");
    let k = format!("cpu:{KEEP_CPU}");
    vec![
        spin(d.clone()),
        spin(d.clone()),
        noop(d),
        spin(k),
        spin(format!("cpus:{BOTH}")),
        noop(format!("cpus:{BOTH}")),
        spin("all".into()),
        noop("all".into()),
    ]
}

fn burst_items() -> Vec<Item> {
    let long = |t: String| Item::new(t, "spin").arg("ms", BURST_SPIN_MS);
    vec![
        long(format!("cpu:{DROP_CPU}")),
        long(format!("cpu:{DROP_CPU}")),
        long(format!("cpu:{DROP_CPU}")),
        long(format!("cpus:{BOTH}")),
    ]
}

/// Shared between the submitter, the flush tasks and the phase driver.
#[derive(Default)]
struct Shared {
    sent: Vec<Sent>,
    results: Vec<v1::ItemResult>,
    flushes: Vec<FlushRec>,
    epochs: BTreeMap<u64, bool>,
    submit_errors: Vec<String>,
}

type SharedRef = Arc<Mutex<Shared>>;

fn lock(s: &SharedRef) -> std::sync::MutexGuard<'_, Shared> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Submits one batch, records its items, and starts its flush.
async fn submit_and_flush(
    client: &Client,
    flusher: &Client,
    shared: &SharedRef,
    policy: Policy,
    items: Vec<Item>,
    permits: &Arc<tokio::sync::Semaphore>,
    flushes: &mut Vec<tokio::task::JoinHandle<()>>,
) {
    let targets: Vec<String> = items.iter().map(|i| i.as_proto().target.clone()).collect();
    let n = items.len() as u64;
    let resp = match client
        .submit(Batch::new().workqueue(policy.wq()).items(items))
        .await
    {
        Ok(r) => r,
        Err(e) => {
            lock(shared)
                .submit_errors
                .push(format!("submit to {}: {e}", policy.wq()));
            return;
        }
    };
    {
        let mut s = lock(shared);
        for (rcpt, target) in resp.items.iter().zip(targets) {
            s.sent.push(Sent {
                id: rcpt.item_id,
                policy,
                target,
                batch: resp.batch_id,
            });
        }
    }
    let batch = resp.batch_id;
    let flusher = flusher.clone();
    let shared = shared.clone();
    let permits = permits.clone();
    flushes.push(tokio::spawn(async move {
        let _permit = permits.acquire_owned().await;
        let t0 = Instant::now();
        let res =
            tokio::time::timeout(FLUSH_TIMEOUT, flusher.flush_all(FlushScope::Batch(batch))).await;
        let waited = t0.elapsed();
        let mut s = lock(&shared);
        let what = format!("batch {batch} ({})", policy.wq());
        let (error, covered) = match res {
            Ok(Ok((results, summary))) => {
                s.results.extend(results);
                (None, summary.items_covered)
            }
            Ok(Err(e)) => (Some(e.to_string()), 0),
            Err(_) => (Some(format!("timed out after {FLUSH_TIMEOUT:?}")), 0),
        };
        s.flushes.push(FlushRec {
            what,
            waited,
            error,
            covered,
            expected: n,
        });
    }));
}

/// Polls `GetTopology` until its live set is `want`; returns that snapshot's epoch and time.
async fn wait_live(client: &Client, shared: &SharedRef, want: &str) -> Result<Seen, String> {
    let want_set = cpulist(want).expect("cpulist");
    let deadline = Instant::now() + DETECT_TIMEOUT;
    let mut last = String::new();
    while Instant::now() < deadline {
        match client.topology().await {
            Ok(snap) => {
                let live = cpulist(&snap.live).unwrap_or_default();
                lock(shared)
                    .epochs
                    .insert(snap.epoch, live.contains(&DROP_CPU));
                if live == want_set {
                    let at = ts(&snap.taken_at).ok_or("snapshot without taken_at")?;
                    return Ok(Seen {
                        epoch: snap.epoch,
                        at,
                    });
                }
                last = format!(
                    "epoch {} live {:?} allowed {:?}",
                    snap.epoch, snap.live, snap.allowed
                );
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Err(format!(
        "the daemon did not show live = {want} within {DETECT_TIMEOUT:?} (last: {last})"
    ))
}

/// Sums (pending, running) over the three workqueues.
async fn load(client: &Client) -> Result<(u64, u64), String> {
    let mut out = (0, 0);
    for w in client
        .list_workqueues(None)
        .await
        .map_err(|e| e.to_string())?
    {
        if w.attrs
            .as_ref()
            .is_some_and(|a| a.name.starts_with("churn-"))
        {
            let s = w.stats.unwrap_or_default();
            out.0 += s.pending;
            out.1 += s.running;
        }
    }
    Ok(out)
}

async fn drive(cg: &Cgroup, socket: PathBuf, cycles: usize) -> Result<Run, String> {
    let endpoint = Endpoint::unix(&socket);
    let client = Client::connect(endpoint.clone())
        .await
        .map_err(|e| e.to_string())?;
    let flusher = Client::connect(endpoint).await.map_err(|e| e.to_string())?;

    let topo = client.topology().await.map_err(|e| e.to_string())?;
    println!(
        "cpuset churn: daemon sees live {:?} from {:?} (epoch {})",
        topo.live, topo.allowed_source, topo.epoch
    );
    if cpulist(&topo.live) != cpulist(BOTH) {
        return Err(format!(
            "the daemon starts with live {:?}, expected {BOTH}",
            topo.live
        ));
    }
    if !topo.allowed_source.contains("cgroup") {
        return Err(format!(
            "the daemon's allowed CPUs come from {:?}, not its cpuset cgroup",
            topo.allowed_source
        ));
    }
    for p in Policy::ALL {
        client
            .create_workqueue(v1::WorkqueueAttrs {
                name: p.wq().into(),
                max_active: 1,
                placement: v1::Placement::Spread as i32,
                fallback: p.proto() as i32,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("creating {}: {e}", p.wq()))?;
    }

    let shared: SharedRef = Arc::default();
    lock(&shared).epochs.insert(topo.epoch, true);

    // The epoch timeline.
    let mut watch = client.watch_topology().await.map_err(|e| e.to_string())?;
    let watch_shared = shared.clone();
    let watcher = tokio::spawn(async move {
        while let Some(Ok(snap)) = watch.next().await {
            let live = cpulist(&snap.live).unwrap_or_default();
            lock(&watch_shared)
                .epochs
                .insert(snap.epoch, live.contains(&DROP_CPU));
        }
    });

    // The submitter.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_FLUSHES_IN_FLIGHT));
    let sub = {
        let (client, flusher, shared, permits) = (
            client.clone(),
            flusher.clone(),
            shared.clone(),
            permits.clone(),
        );
        tokio::spawn(async move {
            let mut flushes = Vec::new();
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for _ in 0..MAX_TICKS {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop_rx.changed() => break,
                }
                for p in Policy::ALL {
                    submit_and_flush(
                        &client,
                        &flusher,
                        &shared,
                        p,
                        batch_items(p),
                        &permits,
                        &mut flushes,
                    )
                    .await;
                }
            }
            flushes
        })
    };

    let mut phases = Vec::new();
    let mut burst_flushes = Vec::new();
    let mut failure = None;
    tokio::time::sleep(HOLD).await;
    for k in 0..cycles {
        // Something running on CPU 1 and something waiting for it, at the moment of the shrink.
        for p in Policy::ALL {
            submit_and_flush(
                &client,
                &flusher,
                &shared,
                p,
                burst_items(),
                &permits,
                &mut burst_flushes,
            )
            .await;
        }
        let mut at_shrink = (0, 0);
        for _ in 0..100 {
            at_shrink = load(&client).await?;
            if at_shrink.0 > 0 && at_shrink.1 > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let shrink_begin = SystemTime::now();
        cg.set_cpus(ONLY_KEEP).map_err(|e| e.to_string())?;
        let shrink_done = SystemTime::now();
        let shrink_seen = match wait_live(&client, &shared, ONLY_KEEP).await {
            Ok(s) => s,
            Err(e) => {
                failure = Some(format!("cycle {k} shrink: {e}"));
                break;
            }
        };
        tokio::time::sleep(HOLD).await;
        let grow_begin = SystemTime::now();
        cg.set_cpus(BOTH).map_err(|e| e.to_string())?;
        let grow_seen = match wait_live(&client, &shared, BOTH).await {
            Ok(s) => s,
            Err(e) => {
                failure = Some(format!("cycle {k} grow: {e}"));
                break;
            }
        };
        println!(
            "cpuset churn: cycle {k}: {} pending / {} running at the shrink; seen in epochs {} and {}",
            at_shrink.0, at_shrink.1, shrink_seen.epoch, grow_seen.epoch
        );
        phases.push(Phase {
            shrink_begin,
            shrink_done,
            shrink_seen,
            grow_begin,
            grow_seen,
            pending_at_shrink: at_shrink.0,
            running_at_shrink: at_shrink.1,
        });
        tokio::time::sleep(HOLD).await;
    }
    let _ = stop_tx.send(true);
    let end = SystemTime::now();
    let mut flushes = sub.await.map_err(|e| format!("submitter: {e}"))?;
    flushes.extend(burst_flushes);
    // Every flush task is bounded by FLUSH_TIMEOUT.
    for f in flushes {
        f.await.map_err(|e| format!("flush task: {e}"))?;
    }
    if let Some(f) = failure {
        watcher.abort();
        return Err(f);
    }

    // Whole-workqueue flushes, then the daemon's counters and its stored results.
    let mut run = Run {
        phases,
        end: Some(end),
        ..Run::default()
    };
    for p in Policy::ALL {
        let t0 = Instant::now();
        let res = tokio::time::timeout(
            FLUSH_TIMEOUT,
            flusher.flush_all(FlushScope::Workqueue(p.wq().into())),
        )
        .await;
        run.flushes.push(FlushRec {
            what: format!("workqueue {}", p.wq()),
            waited: t0.elapsed(),
            error: match res {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("timed out".into()),
            },
            covered: 0,
            expected: 0,
        });
    }
    for w in client
        .list_workqueues(None)
        .await
        .map_err(|e| e.to_string())?
    {
        let Some(p) = Policy::ALL
            .into_iter()
            .find(|p| w.attrs.as_ref().is_some_and(|a| a.name == p.wq()))
        else {
            continue;
        };
        let s = w.stats.unwrap_or_default();
        let t = s.totals.unwrap_or_default();
        let total = t.ok + t.failed + t.cancelled + t.expired + t.rejected;
        run.wq_counts.insert(p, (s.pending, s.running, total));
    }
    watcher.abort();
    let mut s = std::mem::take(&mut *lock(&shared));
    if !s.submit_errors.is_empty() {
        return Err(format!(
            "{} submits failed, first: {}",
            s.submit_errors.len(),
            s.submit_errors[0]
        ));
    }
    let ids: Vec<u64> = s.sent.iter().map(|x| x.id).collect();
    for chunk in ids.chunks(1000) {
        let r = client
            .results(chunk.iter().copied())
            .await
            .map_err(|e| e.to_string())?;
        for l in r.items {
            if let Some(res) = l.result {
                run.lookup.insert(l.item_id, res);
            }
        }
    }
    run.sent = std::mem::take(&mut s.sent);
    run.results = std::mem::take(&mut s.results);
    run.flushes.extend(std::mem::take(&mut s.flushes));
    run.epochs = std::mem::take(&mut s.epochs);
    Ok(run)
}

/// Writes a line to the real stderr, past the test harness's capture, so the skip reason and
/// the summary show in CI logs of a passing run.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

#[test]
fn cpuset_churn() {
    let cg = match Cgroup::create(BOTH) {
        Ok(cg) => cg,
        Err(Ok(why)) => {
            say(&format!("SKIPPED cpuset_churn: {why}"));
            return;
        }
        Err(Err(e)) => panic!("cannot set up the scratch cpuset cgroup: {e}"),
    };
    let cycles = std::env::var("WQD_CPUSET_CYCLES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(CYCLES);
    let bin = wqd_e2e::binary("wqd", "wqd");
    // Removed on drop, after the daemon (declared later, dropped first).
    let tmp = tempfile::Builder::new()
        .prefix("wqd-cpuset-churn-")
        .tempdir()
        .expect("temp dir");
    let dir = tmp.path();
    let socket = dir.join("wqd.sock");
    // Our own config file, so a host's /etc/wqd/wqd.toml cannot change the run.
    let config = dir.join("wqd.toml");
    std::fs::write(&config, "[engine]\nresults_ttl = \"30m\"\n").expect("config");
    let mut cmd = cg.command_inside(&bin).expect("command");
    cmd.arg("--config")
        .arg(&config)
        .arg("--socket")
        .arg(&socket)
        .args([
            "--rescan",
            "100ms",
            "--pinning",
            "on",
            "--log-level",
            "info",
        ]);
    let mut daemon = Daemon::spawn(cmd).expect("spawn wqd");
    let ready = daemon.wait_for_line("listening on unix:", Duration::from_secs(30));
    if let Err(e) = &ready {
        panic!("wqd did not start: {e}");
    }
    let pids = cg.pids();
    assert!(
        pids.contains(&daemon.pid()),
        "wqd (pid {}) is not in {} (has {pids:?})",
        daemon.pid(),
        cg.path().display()
    );
    println!(
        "cpuset churn: wqd pid {} in {} ({:?}, effective {})",
        daemon.pid(),
        cg.path().display(),
        cg.version(),
        cg.effective_cpus().unwrap_or_default()
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let run = rt.block_on(drive(&cg, socket, cycles));
    drop(rt);
    let alive = daemon.running();
    let run = match run {
        Ok(run) => run,
        Err(e) => panic!(
            "cpuset churn failed: {e}\n--- wqd output ---\n{}",
            daemon.log_tail()
        ),
    };
    let report = check(&run);
    say(&report.summary(&run));
    assert!(alive, "wqd exited during the run:\n{}", daemon.log_tail());
    if !report.violations.is_empty() {
        let n = report.violations.len();
        let shown: Vec<&String> = report.violations.iter().take(40).collect();
        panic!(
            "cpuset churn: {n} violations (first {}):\n  {}\n--- wqd output ---\n{}",
            shown.len(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n  "),
            daemon.log_tail()
        );
    }
    drop(daemon);
    drop(cg);
}

/// Negative controls: [`check`] on a made-up run that is correct passes, and each kind of wrong
/// behaviour wqd could show is reported. These need no root and run everywhere.
mod negative_controls {
    use super::*;

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000) + Duration::from_millis(ms)
    }

    fn stamp(t: SystemTime) -> Option<prost_types::Timestamp> {
        let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        Some(prost_types::Timestamp {
            seconds: d.as_secs() as i64,
            nanos: d.subsec_nanos() as i32,
        })
    }

    struct It {
        policy: Policy,
        target: &'static str,
        state: v1::ItemState,
        cpu: Option<(u32, u32)>,
        queued: u64,
        started: Option<u64>,
        epoch: u64,
        fallback: bool,
    }

    /// One cycle: CPU 1 out from 1000 ms (seen at 1050, epoch 2) to 2000 ms (seen at 2050,
    /// epoch 3); the end at 3000 ms.
    fn good() -> Run {
        use v1::ItemState::{Ok as Done, Rejected};
        let items = [
            // widen, queued while out: ran on CPU 0 with the fallback recorded.
            It {
                policy: Policy::Widen,
                target: "cpu:1",
                state: Done,
                cpu: Some((0, 0)),
                queued: 1200,
                started: Some(1210),
                epoch: 2,
                fallback: true,
            },
            // wait, queued while out: ran on CPU 1 after it returned.
            It {
                policy: Policy::Wait,
                target: "cpu:1",
                state: Done,
                cpu: Some((1, 1)),
                queued: 1200,
                started: Some(2100),
                epoch: 3,
                fallback: false,
            },
            // reject, queued while out: rejected.
            It {
                policy: Policy::Reject,
                target: "cpu:1",
                state: Rejected,
                cpu: None,
                queued: 1200,
                started: None,
                epoch: 0,
                fallback: false,
            },
            // after the return: back on CPU 1, finished there.
            It {
                policy: Policy::Widen,
                target: "cpu:1",
                state: Done,
                cpu: Some((1, 1)),
                queued: 2200,
                started: Some(2210),
                epoch: 3,
                fallback: false,
            },
            // running on CPU 1 at the shrink: migrated by the kernel, finished on CPU 0.
            It {
                policy: Policy::Reject,
                target: "cpu:1",
                state: Done,
                cpu: Some((1, 0)),
                queued: 900,
                started: Some(950),
                epoch: 1,
                fallback: false,
            },
            It {
                policy: Policy::Wait,
                target: "cpu:0",
                state: Done,
                cpu: Some((0, 0)),
                queued: 1500,
                started: Some(1501),
                epoch: 2,
                fallback: false,
            },
            It {
                policy: Policy::Widen,
                target: "all",
                state: Done,
                cpu: Some((0, 0)),
                queued: 1500,
                started: Some(1501),
                epoch: 2,
                fallback: false,
            },
        ];
        let mut run = Run {
            phases: vec![Phase {
                shrink_begin: at(1000),
                shrink_done: at(1001),
                shrink_seen: Seen {
                    epoch: 2,
                    at: at(1050),
                },
                grow_begin: at(2000),
                grow_seen: Seen {
                    epoch: 3,
                    at: at(2050),
                },
                pending_at_shrink: 1,
                running_at_shrink: 1,
            }],
            epochs: BTreeMap::from([(1, true), (2, false), (3, true)]),
            end: Some(at(3000)),
            ..Run::default()
        };
        for (i, it) in items.iter().enumerate() {
            let id = i as u64 + 1;
            run.sent.push(Sent {
                id,
                policy: it.policy,
                target: it.target.into(),
                batch: id,
            });
            let res = v1::ItemResult {
                item_id: id,
                batch_id: id,
                workqueue: it.policy.wq().into(),
                state: it.state as i32,
                error: if it.state == v1::ItemState::Rejected {
                    "cpu:1 has no live CPU".into()
                } else {
                    String::new()
                },
                target: it.target.into(),
                cpu_started: it.cpu.map(|c| c.0),
                cpu_finished: it.cpu.map(|c| c.1),
                fallback_level: if it.fallback {
                    v1::FallbackLevel::All as i32
                } else {
                    0
                },
                fallback_reason: if it.fallback {
                    "cpu:1 has no live CPU".into()
                } else {
                    String::new()
                },
                queued_at: stamp(at(it.queued)),
                started_at: it.started.and_then(|s| stamp(at(s))),
                finished_at: stamp(at(it.started.unwrap_or(it.queued) + 3)),
                topology_epoch: it.epoch,
                handler: "spin".into(),
                ..Default::default()
            };
            run.lookup.insert(id, res.clone());
            run.results.push(res);
            run.flushes.push(FlushRec {
                what: format!("batch {id}"),
                waited: Duration::from_millis(5),
                error: None,
                covered: 1,
                expected: 1,
            });
            let c = run.wq_counts.entry(it.policy).or_default();
            c.2 += 1;
        }
        run
    }

    fn violations(run: &Run) -> Vec<String> {
        check(run).violations
    }

    #[track_caller]
    fn caught(run: &Run, needle: &str) {
        let v = violations(run);
        assert!(
            v.iter().any(|s| s.contains(needle)),
            "expected a violation containing {needle:?}, got {v:#?}"
        );
    }

    fn set(run: &mut Run, id: u64, f: impl Fn(&mut v1::ItemResult)) {
        for r in run.results.iter_mut().filter(|r| r.item_id == id) {
            f(r);
        }
        f(run.lookup.get_mut(&id).unwrap());
    }

    /// Removes an item from the run as if it had never been submitted.
    fn forget(run: &mut Run, id: u64) {
        let policy = run.sent.iter().find(|s| s.id == id).unwrap().policy;
        run.sent.retain(|s| s.id != id);
        run.results.retain(|r| r.item_id != id);
        run.lookup.remove(&id);
        run.wq_counts.get_mut(&policy).unwrap().2 -= 1;
    }

    #[test]
    fn a_correct_run_passes() {
        let v = violations(&good());
        assert!(v.is_empty(), "{v:#?}");
    }

    #[test]
    fn a_lost_item_is_caught() {
        let mut run = good();
        run.results.retain(|r| r.item_id != 2);
        caught(&run, "item 2 (cpu:1 on churn-wait) lost");
    }

    #[test]
    fn an_item_reported_twice_is_caught() {
        let mut run = good();
        let dup = run.results[0].clone();
        run.results.push(dup);
        caught(&run, "reported 2 times");
        let mut run = good();
        run.wq_counts.get_mut(&Policy::Widen).unwrap().2 += 1;
        caught(&run, "daemon counts");
    }

    #[test]
    fn a_hung_flush_or_a_stuck_item_is_caught() {
        let mut run = good();
        run.flushes[1].error = Some("timed out after 60s".into());
        caught(&run, "did not return");
        let mut run = good();
        set(&mut run, 2, |r| r.state = v1::ItemState::Pending as i32);
        caught(&run, "in state pending");
    }

    #[test]
    fn a_start_on_the_cpu_the_cpuset_removed_is_caught() {
        // What a worker without the start check would report: its thread was moved to CPU 0,
        // yet the result names CPU 1 (the pool's CPU) and a time inside the window.
        let mut run = good();
        set(&mut run, 4, |r| {
            r.started_at = stamp(at(1500));
            r.topology_epoch = 1;
        });
        caught(&run, "after cycle 0's shrink write");
    }

    #[test]
    fn a_start_just_before_the_shrink_is_the_allowed_race() {
        // The check passed on CPU 1, then the cpuset write migrated the worker before it read
        // the clock: started_at lands just after the write, the epoch still had CPU 1.
        let mut run = good();
        set(&mut run, 5, |r| {
            r.started_at = stamp(at(1001) + START_RACE - Duration::from_millis(1))
        });
        let v = violations(&run);
        assert!(v.is_empty(), "{v:#?}");
        set(&mut run, 5, |r| {
            r.started_at = stamp(at(1001) + START_RACE + Duration::from_millis(1))
        });
        caught(&run, "after cycle 0's shrink write");
    }

    #[test]
    fn a_widen_item_without_recorded_fallback_is_caught() {
        let mut run = good();
        set(&mut run, 1, |r| {
            r.fallback_level = 0;
            r.fallback_reason.clear();
        });
        caught(&run, "without a recorded fallback");
    }

    #[test]
    fn a_fallback_while_the_group_was_live_is_caught() {
        let mut run = good();
        set(&mut run, 1, |r| {
            r.topology_epoch = 3;
            r.started_at = stamp(at(2500));
        });
        caught(&run, "while cpu 1 was live");
    }

    #[test]
    fn a_wait_item_that_ran_elsewhere_or_early_is_caught() {
        let mut run = good();
        set(&mut run, 2, |r| {
            r.cpu_started = Some(0);
            r.started_at = stamp(at(1300));
        });
        caught(&run, "does not widen");
        let mut run = good();
        set(&mut run, 2, |r| r.state = v1::ItemState::Rejected as i32);
        caught(&run, "must run on it after it returned");
    }

    #[test]
    fn a_reject_item_that_ran_or_was_rejected_late_is_caught() {
        let mut run = good();
        set(&mut run, 3, |r| {
            r.state = v1::ItemState::Ok as i32;
            r.error.clear();
            r.cpu_started = Some(1);
            r.cpu_finished = Some(1);
            r.started_at = stamp(at(2100));
            r.topology_epoch = 3;
        });
        caught(&run, "was out but ended ok");
        let mut run = good();
        set(&mut run, 3, |r| r.finished_at = stamp(at(2600)));
        caught(&run, "when cpu 1 was live");
    }

    #[test]
    fn no_return_to_the_cpu_after_growth_is_caught() {
        // Workers never re-pinned: nothing ran on CPU 1 after it came back.
        let mut run = good();
        set(&mut run, 2, |r| r.cpu_finished = Some(0));
        set(&mut run, 4, |r| r.cpu_finished = Some(0));
        caught(&run, "finished on cpu 1 after it returned");
        let mut run = good();
        forget(&mut run, 2);
        set(&mut run, 4, |r| {
            r.cpu_started = Some(0);
            r.cpu_finished = Some(0);
            r.fallback_level = v1::FallbackLevel::All as i32;
            r.fallback_reason = "cpu:1 has no live CPU".into();
            r.topology_epoch = 2;
        });
        caught(&run, "started on cpu 1 after it returned");
    }
}
