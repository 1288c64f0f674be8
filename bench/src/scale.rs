//! Scale: generated machines of 64 to 4096 CPUs (the tests' made-up layout: SMT pairs, 4 CPUs
//! per L3, 8 per node and package).
//!
//! - `GroupMap::resolve` per call for a low and a high CPU, a node, `all`, and a CPU whose
//!   whole package is offline (widening to `all`); the target is a flat cost from 64 to 4096.
//! - `GroupMap::build`, with and without 10k named groups.
//! - The rescan: `Reader::read` (full) and `Reader::rescan` (masks only, nothing changed) of
//!   sysfs trees (the committed fixtures and generated trees), and `LiveView::apply` of an
//!   unchanged reading.
//! - 1M pending items in 10k queues (one per named group, none of whose CPUs is live, on a
//!   `wait`-fallback workqueue, so everything stays pending): bytes per pending item from the
//!   counting allocator (the binary installs it), submit cost per item, and
//!   `Engine::apply_snapshot` with 10k queues.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use wqd_core::cpuset::CpuSet;
use wqd_core::engine::{Engine, EngineConfig, ItemSpec, WorkqueueAttrs};
use wqd_core::groups::{Fallback, GroupMap, GroupsConfig};
use wqd_core::handler::Registry;
use wqd_core::live::{LiveConfig, LiveView, Snapshot, Source};
use wqd_core::target::Target;
use wqd_core::topology::sysfs::Reader;
use wqd_core::topology::Topology;

use crate::alloc;
use crate::report::{self, Table, Verdict};
use crate::stats::{ns, Spread};
use crate::topo;

/// How much work the scale section does.
#[derive(Debug, Clone, Copy)]
pub struct Cfg {
    pub runs: usize,
    /// Resolutions per timed loop.
    pub resolve_iters: usize,
    pub groups: usize,
    pub pending: usize,
    /// Generated sysfs trees to read (CPUs).
    pub trees: [u32; 2],
}

impl Default for Cfg {
    fn default() -> Self {
        Cfg {
            runs: 5,
            resolve_iters: 200_000,
            groups: 10_000,
            pending: 1_000_000,
            trees: [1024, 4096],
        }
    }
}

/// `count` named groups `g0..` of 4 CPUs each, spread over CPUs `2..n` (never 0 or 1).
pub fn named_groups(n: u32, count: usize) -> GroupsConfig {
    let mut cfg = GroupsConfig::default();
    let span = n - 2;
    for i in 0..count as u32 {
        let lo = 2 + (i.wrapping_mul(7)) % span;
        let set: CpuSet = (0..4).map(|k| 2 + (lo - 2 + k) % span).collect();
        cfg.named.insert(format!("g{i}"), set);
    }
    cfg
}

/// A snapshot of `topo` with `groups` and `live`.
pub fn snapshot(
    topo: &Topology,
    groups: &GroupsConfig,
    epoch: u64,
    live: &CpuSet,
) -> Arc<Snapshot> {
    Arc::new(Snapshot {
        epoch,
        topology: Arc::new(topo.clone()),
        groups: Arc::new(GroupMap::build(topo, groups)),
        live: live.clone(),
        source: Source::Manual,
        at: SystemTime::now(),
    })
}

/// ns per `resolve` of `t` on `map` with `live`, averaged over `iters` calls.
pub fn resolve_ns(map: &GroupMap, t: &Target, live: &CpuSet, iters: usize) -> f64 {
    let t0 = Instant::now();
    for _ in 0..iters {
        std::hint::black_box(
            map.resolve(std::hint::black_box(t), live, Fallback::Widen)
                .expect("resolve"),
        );
    }
    ns(t0.elapsed()) / iters as f64
}

/// The targets whose resolution is timed on an `n`-CPU machine: (label, target, live).
pub fn resolve_cases(n: u32) -> Vec<(&'static str, Target, CpuSet)> {
    let all = CpuSet::range(0, n - 1);
    let p = |s: String| s.parse::<Target>().expect("target");
    // CPU n-1's package (8 CPUs) offline: cpu:n-1 widens through every level to `all`.
    let widen_live = all.difference(&CpuSet::range(n - 8, n - 1));
    vec![
        ("cpu:0", p("cpu:0".into()), all.clone()),
        ("cpu:N-1", p(format!("cpu:{}", n - 1)), all.clone()),
        ("node:N/16", p(format!("node:{}", n / 16)), all.clone()),
        ("all", p("all".into()), all.clone()),
        (
            "cpu:N-1, package offline (widens to all)",
            p(format!("cpu:{}", n - 1)),
            widen_live,
        ),
    ]
}

fn time<R>(f: impl FnOnce() -> R) -> (R, f64) {
    let t0 = Instant::now();
    let r = f();
    (r, ns(t0.elapsed()))
}

/// Resolution and build cost from 64 to 4096 CPUs.
fn resolution(cfg: &Cfg) -> (Table, Table, Verdict) {
    let sizes = [64u32, 256, 1024, 4096];
    let cases = resolve_cases(64).len();
    // per[case][size] = per-run ns
    let mut per = vec![vec![Vec::new(); sizes.len()]; cases];
    let mut build = vec![Vec::new(); sizes.len()];
    let mut build_named = vec![Vec::new(); sizes.len()];
    let maps: Vec<(Topology, GroupMap)> = sizes
        .iter()
        .map(|&n| {
            let t = topo::topology(n);
            let m = GroupMap::build(&t, &GroupsConfig::default());
            (t, m)
        })
        .collect();
    let named: Vec<GroupsConfig> = sizes.iter().map(|&n| named_groups(n, cfg.groups)).collect();
    for _ in 0..cfg.runs {
        for (si, &n) in sizes.iter().enumerate() {
            let (t, m) = &maps[si];
            for (ci, (_, target, live)) in resolve_cases(n).into_iter().enumerate() {
                per[ci][si].push(resolve_ns(m, &target, &live, cfg.resolve_iters));
            }
            build[si].push(time(|| GroupMap::build(t, &GroupsConfig::default())).1);
            build_named[si].push(time(|| GroupMap::build(t, &named[si])).1);
        }
    }
    let mut header = vec!["target".to_string()];
    header.extend(sizes.iter().map(|n| format!("{n} CPUs")));
    header.push("4096 ÷ 64 (per run)".into());
    let mut t = Table::new(
        "Scale: `GroupMap::resolve` per call (ns, lower is better)",
        &format!(
            "Made-up machines (SMT pairs, 4 CPUs per L3, 8 per node/package), live = all unless \
             said; {} calls per timing, min / median / max over {} runs.",
            cfg.resolve_iters, cfg.runs
        ),
        &[],
    );
    t.header = header;
    let mut worst = (String::new(), 0f64);
    for (ci, (label, _, _)) in resolve_cases(64).into_iter().enumerate() {
        let mut row = vec![format!("`{label}`")];
        for v in &per[ci] {
            row.push(report::spread(Spread::of(&mut v.clone()), 0));
        }
        let mut r: Vec<f64> = per[ci][sizes.len() - 1]
            .iter()
            .zip(&per[ci][0])
            .map(|(a, b)| a / b)
            .collect();
        let r = Spread::of(&mut r);
        if r.median > worst.1 {
            worst = (label.to_string(), r.median);
        }
        row.push(report::spread(r, 2));
        t.row(row);
    }
    let mut b = Table::new(
        "Scale: `GroupMap::build` (lower is better)",
        &format!(
            "Default groups config, and with {} named groups of 4 CPUs; min / median / max over \
             {} runs.",
            cfg.groups, cfg.runs
        ),
        &[
            "CPUs",
            "build",
            &format!("build with {} named groups", cfg.groups),
        ],
    );
    for (si, n) in sizes.iter().enumerate() {
        b.row(vec![
            n.to_string(),
            report::dur_spread(Spread::of(&mut build[si].clone())),
            report::dur_spread(Spread::of(&mut build_named[si].clone())),
        ]);
    }
    let v = Verdict::new(
        "resolution cost flat from 64 to 4096 CPUs (≤ 1.5x)",
        worst.1 <= 1.5,
        format!("worst case `{}`: {:.2}x", worst.0, worst.1),
    );
    (t, b, v)
}

/// The rescan: `Reader::read`, `Reader::rescan` and `LiveView::apply` of an unchanged reading.
fn rescan(cfg: &Cfg) -> Table {
    let mut t = Table::new(
        "Scale: rescan cost (lower is better)",
        &format!(
            "`Reader::read` of a sysfs tree (committed fixtures; generated trees in the made-up \
             layout, on the temp folder's file system: every online CPU's files), \
             `Reader::rescan` of the previous reading when nothing changed (the masks, nodes \
             and cpuset; what the monitor's periodic rescan does between full reads) and \
             `LiveView::apply` of the same, unchanged, reading (merge + compare; publishes \
             nothing); min / median / max over {} runs.",
            cfg.runs
        ),
        &[
            "tree",
            "online CPUs",
            "Reader::read",
            "Reader::rescan (no change)",
            "LiveView::apply (no change)",
        ],
    );
    let mut trees: Vec<(String, tempfile::TempDir)> = ["two-socket", "vm8-offline"]
        .iter()
        .map(|n| (format!("fixture `{n}`"), topo::copy_fixture(n)))
        .collect();
    for n in cfg.trees {
        trees.push((format!("generated, {n} CPUs"), topo::sysfs_tree(n)));
    }
    for (name, dir) in &trees {
        let reader = Reader::fixture(dir.path());
        let first = reader.read().expect("read");
        let online = first.online.len();
        let view = LiveView::new(first, LiveConfig::default());
        let (mut read, mut rescan, mut apply) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..cfg.runs {
            let (mut r, d) = time(|| reader.read().expect("read"));
            read.push(d);
            let (again, d) = time(|| reader.rescan(&mut r, &CpuSet::new()).expect("rescan"));
            assert!(again.is_empty(), "unchanged tree re-read CPUs {again}");
            rescan.push(d);
            let (changed, d) = time(|| view.apply(r, Source::Rescan));
            assert!(changed.is_none(), "unchanged tree published");
            apply.push(d);
        }
        t.row(vec![
            name.clone(),
            online.to_string(),
            report::dur_spread(Spread::of(&mut read)),
            report::dur_spread(Spread::of(&mut rescan)),
            report::dur_spread(Spread::of(&mut apply)),
        ]);
    }
    t
}

/// What a million pending items cost.
#[derive(Debug, Clone, Default)]
pub struct Pending {
    pub cpus: u32,
    pub shared_body: bool,
    pub items: usize,
    pub queues: usize,
    pub bytes_per_item: f64,
    pub allocs_per_item: f64,
    pub submit_ns_per_item: f64,
    pub apply_ns: Vec<f64>,
    pub shutdown_ns: f64,
}

/// Submits `cfg.pending` items that stay pending on an `n`-CPU machine with `cfg.groups`
/// named groups, in batches of `cfg.groups`. With `shared_body` every item of a batch is the
/// same (one target, one body, as `wqctl --count`); otherwise item i of a batch targets group
/// `g{i}` (10k queues, a body per item).
pub fn pending(n: u32, cfg: &Cfg, shared_body: bool) -> Pending {
    let topo = topo::topology(n);
    let groups = named_groups(n, cfg.groups);
    let two = CpuSet::range(0, 1);
    let mut cur = snapshot(&topo, &groups, 1, &two);
    let ecfg = EngineConfig {
        pinning: false,
        results_max: 1024,
        ..EngineConfig::default()
    };
    let engine = Engine::start(ecfg, Registry::with_builtins(None), cur.clone()).expect("engine");
    engine
        .create_workqueue(WorkqueueAttrs {
            fallback: Fallback::Wait,
            max_queued: cfg.pending.max(1),
            ..WorkqueueAttrs::named("scale")
        })
        .expect("workqueue");
    let targets: Vec<Target> = (0..cfg.groups)
        .map(|i| Target::named(&format!("g{i}")).expect("name"))
        .collect();
    let batches = cfg.pending / cfg.groups;
    let (b0, a0) = (alloc::live_bytes(), alloc::allocations());
    let mut submit = 0f64;
    for _ in 0..batches {
        let items: Vec<ItemSpec> = if shared_body {
            vec![ItemSpec::new(targets[0].clone(), "noop"); cfg.groups]
        } else {
            targets
                .iter()
                .map(|t| ItemSpec::new(t.clone(), "noop"))
                .collect()
        };
        let (r, d) = time(|| engine.submit("scale", items).expect("submit"));
        drop(r);
        submit += d;
    }
    let items = batches * cfg.groups;
    let (b1, a1) = (alloc::live_bytes(), alloc::allocations());
    let stats = engine.workqueues();
    let wq = stats.iter().find(|w| w.attrs.name == "scale").expect("wq");
    assert_eq!(wq.pending, items, "everything stays pending");
    let mut apply_ns = Vec::new();
    let one = CpuSet::single(0);
    for k in 0..cfg.runs * 2 {
        cur = topo::next(&cur, if k % 2 == 0 { &one } else { &two });
        apply_ns.push(time(|| engine.apply_snapshot(&cur)).1);
    }
    let shutdown_ns = time(|| engine.shutdown(Duration::ZERO)).1;
    Pending {
        cpus: n,
        shared_body,
        items,
        queues: if shared_body { 1 } else { cfg.groups },
        bytes_per_item: (b1 - b0) as f64 / items as f64,
        allocs_per_item: (a1 - a0) as f64 / items as f64,
        submit_ns_per_item: submit / items as f64,
        apply_ns,
        shutdown_ns,
    }
}

/// Runs every scale measurement; returns its tables and verdicts.
pub fn run(cfg: Cfg) -> (Vec<Table>, Vec<Verdict>) {
    let (res, build, flat) = resolution(&cfg);
    let rescan = rescan(&cfg);
    let mut p = Table::new(
        "Scale: pending items (lower is better)",
        &format!(
            "{} items submitted in batches of {} to a `wait`-fallback workqueue whose targets have \
             no live CPU (live = 0-1), {} named groups of 4 CPUs; bytes are live heap bytes \
             (counting global allocator) after minus before, divided by the items (empty payload, \
             no key). `apply_snapshot` alternates live 0-1 / 0 with all of them pending ({} \
             calls).",
            cfg.pending,
            cfg.groups,
            cfg.groups,
            cfg.runs * 2
        ),
        &[
            "CPUs",
            "queues",
            "bodies",
            "bytes / pending item",
            "allocations / item",
            "submit / item",
            "apply_snapshot (min / median / max)",
            "shutdown (cancels all)",
        ],
    );
    let mut worst_bytes = 0f64;
    let runs = [(1024, false), (4096, false), (1024, true)];
    for (n, shared) in runs {
        let r = pending(n, &cfg, shared);
        worst_bytes = worst_bytes.max(r.bytes_per_item);
        p.row(vec![
            r.cpus.to_string(),
            r.queues.to_string(),
            if r.shared_body {
                "one per batch"
            } else {
                "one per item"
            }
            .into(),
            if alloc::installed() {
                format!("{:.0}", r.bytes_per_item)
            } else {
                "(no counting allocator)".into()
            },
            format!("{:.2}", r.allocs_per_item),
            report::dur_ns(r.submit_ns_per_item),
            report::dur_spread(Spread::of(&mut r.apply_ns.clone())),
            report::dur_ns(r.shutdown_ns),
        ]);
    }
    let mem = Verdict::new(
        "at most 256 bytes per pending item (payload aside)",
        alloc::installed() && worst_bytes <= 256.0,
        format!("{worst_bytes:.0} bytes (worst case above)"),
    );
    (vec![res, build, rescan, p], vec![flat, mem])
}
