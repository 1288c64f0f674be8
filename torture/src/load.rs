//! The workload: submitter threads and the seed's scenario, and the ledger they fill.
//!
//! Submitters send batches of `spin`, `sleep` and `noop` items to every target of the [`Plan`]
//! across one workqueue per fallback policy, and at random flush an item subset, the batch or
//! the whole workqueue, or cancel part of the batch. The scenario, fixed by the seed, replays
//! every few seconds: one item per rcu_node leaf in each workqueue, then the leaves' CPUs are
//! taken offline (in the seed's order) while everything is flushed.
//!
//! Every accepted item id and every flush goes into the [`Ledger`]; the checks run on it at the
//! end. Nothing here decides pass or fail.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use crossbeam_channel::Sender;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use wqd_core::cpuset::CpuSet;
use wqd_core::groups::Fallback;
use wqd_core::target::Target;

use crate::backend::{Backend, Scope, Spec};
use crate::clock::Clock;
use crate::hotplug::Cmd;

/// The workqueues, one per fallback policy.
pub const WQS: [(&str, Fallback); 3] = [
    ("tw-widen", Fallback::Widen),
    ("tw-wait", Fallback::Wait),
    ("tw-reject", Fallback::Reject),
];

/// A target with the CPUs it names (read while every CPU was online).
#[derive(Debug, Clone)]
pub struct TargetInfo {
    pub target: Target,
    pub members: CpuSet,
}

/// What the workload aims at.
#[derive(Debug, Clone)]
pub struct Plan {
    /// `cpu:N`, `node:N`, the leaves as `cpus:`, and `all`.
    pub targets: Vec<TargetInfo>,
    /// Indexes into `targets` of the rcu_node leaves.
    pub leaves: Vec<usize>,
    /// CPUs the hotplug thread may take down, for the scenario.
    pub hotpluggable: Vec<u32>,
}

impl Plan {
    /// Targets for `cpus` CPUs, the given nodes, and leaves of `leaf` consecutive CPUs.
    pub fn new(cpus: u32, nodes: &[(u32, CpuSet)], leaf: u32, hotpluggable: Vec<u32>) -> Plan {
        let mut targets: Vec<TargetInfo> = (0..cpus)
            .map(|c| TargetInfo {
                target: Target::Cpu(c),
                members: CpuSet::single(c),
            })
            .collect();
        for (n, set) in nodes {
            targets.push(TargetInfo {
                target: Target::Node(*n),
                members: set.clone(),
            });
        }
        let mut leaves = Vec::new();
        let leaf = leaf.max(1);
        let mut lo = 0;
        while lo < cpus {
            let hi = (lo + leaf - 1).min(cpus - 1);
            let set = CpuSet::range(lo, hi);
            leaves.push(targets.len());
            targets.push(TargetInfo {
                target: Target::Cpus(set.clone()),
                members: set,
            });
            lo += leaf;
        }
        targets.push(TargetInfo {
            target: Target::All,
            members: CpuSet::range(0, cpus.saturating_sub(1)),
        });
        Plan {
            targets,
            leaves,
            hotpluggable,
        }
    }
}

/// One accepted item.
#[derive(Debug, Clone, Copy)]
pub struct Submitted {
    pub id: u64,
    /// Index into [`WQS`].
    pub wq: u8,
    /// Index into [`Plan::targets`].
    pub target: u16,
    /// Timeline time the submit returned.
    pub at: Duration,
    pub scenario: bool,
}

/// The workqueue a flush covered, for messages.
pub fn wq_name(wq: Option<u8>) -> &'static str {
    wq.and_then(|w| WQS.get(w as usize))
        .map_or("every workqueue", |w| w.0)
}

/// What a wait was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum WaitKind {
    Items,
    Batch,
    Workqueue,
    Cancel,
    Scenario,
    Final,
}

impl WaitKind {
    pub const ALL: [WaitKind; 6] = [
        WaitKind::Items,
        WaitKind::Batch,
        WaitKind::Workqueue,
        WaitKind::Cancel,
        WaitKind::Scenario,
        WaitKind::Final,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            WaitKind::Items => "item",
            WaitKind::Batch => "batch",
            WaitKind::Workqueue => "workqueue",
            WaitKind::Cancel => "cancel",
            WaitKind::Scenario => "scenario",
            WaitKind::Final => "final",
        }
    }
}

/// One flush (or a cancel's wait for running items).
#[derive(Debug, Clone)]
pub struct FlushRec {
    pub kind: WaitKind,
    /// Index into [`WQS`]; `None` when it covers items of every workqueue (the scenario).
    pub wq: Option<u8>,
    pub covered: usize,
    /// Timeline time it began.
    pub at: Duration,
    pub waited: Duration,
    pub error: Option<String>,
    /// What its answer got wrong (see [`crate::backend::Waited::bad`]).
    pub bad: Vec<String>,
}

/// Everything the workload did. Appended by many threads; read by the checks after they stop.
#[derive(Debug, Default)]
pub struct Ledger {
    pub items: Mutex<Vec<Submitted>>,
    pub flushes: Mutex<Vec<FlushRec>>,
    /// Submits refused for a reason other than a full workqueue (each is a failure).
    pub errors: Mutex<Vec<String>>,
    /// Ids a submit returned that an earlier submit had returned already.
    pub reused_ids: Mutex<Vec<u64>>,
    pub queue_full: AtomicU64,
    pub scenario_runs: AtomicU64,
    seen: Mutex<HashSet<u64>>,
}

impl Ledger {
    fn record(&self, wq: u8, target: &[u16], ids: &[u64], at: Duration, scenario: bool) {
        {
            let mut seen = self.seen.lock();
            let mut reused = self.reused_ids.lock();
            for id in ids {
                if !seen.insert(*id) {
                    reused.push(*id);
                }
            }
        }
        let mut items = self.items.lock();
        items.extend(ids.iter().zip(target).map(|(&id, &target)| Submitted {
            id,
            wq,
            target,
            at,
            scenario,
        }));
    }

    fn flushed(
        &self,
        kind: WaitKind,
        wq: Option<u8>,
        at: Duration,
        r: Result<crate::backend::Waited>,
    ) {
        let rec = match r {
            Ok(w) => FlushRec {
                kind,
                wq,
                covered: w.covered,
                at,
                waited: w.waited,
                error: None,
                bad: w.bad,
            },
            Err(e) => FlushRec {
                kind,
                wq,
                covered: 0,
                at,
                waited: Duration::ZERO,
                error: Some(format!("{e:#}")),
                bad: Vec::new(),
            },
        };
        self.flushes.lock().push(rec);
    }
}

/// What the workload threads share.
#[derive(Clone)]
pub struct Ctx {
    pub backend: Arc<dyn Backend>,
    pub clock: Arc<Clock>,
    pub plan: Arc<Plan>,
    pub ledger: Arc<Ledger>,
    pub stop: Arc<AtomicBool>,
    pub seed: u64,
    pub flush_bound: Duration,
    /// Where scenario offline requests go; `None` when hotplug is off.
    pub hotplug: Option<Sender<Cmd>>,
    /// Attached workers serve [`crate::attached::HANDLER`]: a share of the items go to it.
    pub attached: bool,
}

fn random_item(rng: &mut StdRng, target: Target, attached: bool) -> Spec {
    if attached && rng.gen_range(0..100) < 20 {
        return Spec {
            target,
            handler: crate::attached::HANDLER,
            args: Vec::new(),
        };
    }
    match rng.gen_range(0..100) {
        0..=44 => Spec {
            target,
            handler: "noop",
            args: Vec::new(),
        },
        45..=79 => Spec {
            target,
            handler: "spin",
            args: vec![("us", rng.gen_range(100..3000).to_string())],
        },
        _ => Spec {
            target,
            handler: "sleep",
            args: vec![("ms", rng.gen_range(1..20).to_string())],
        },
    }
}

/// One submitter thread's loop, until `stop`.
///
/// # Errors
/// A submit refused for a reason other than a full workqueue (also recorded in the ledger).
pub fn submitter(ctx: &Ctx, thread: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(ctx.seed.wrapping_mul(31).wrapping_add(thread + 1));
    let n_targets = ctx.plan.targets.len();
    while !ctx.stop.load(Ordering::Relaxed) {
        let wq = rng.gen_range(0..WQS.len());
        let wq_name = WQS[wq].0;
        let n = rng.gen_range(1..=24);
        let mut targets = Vec::with_capacity(n);
        let mut specs = Vec::with_capacity(n);
        for _ in 0..n {
            let t = rng.gen_range(0..n_targets);
            targets.push(t as u16);
            specs.push(random_item(
                &mut rng,
                ctx.plan.targets[t].target.clone(),
                ctx.attached,
            ));
        }
        let (batch, ids) = match ctx.backend.submit(wq_name, &specs) {
            Ok(Some(r)) => r,
            Ok(None) => {
                ctx.ledger.queue_full.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => {
                ctx.ledger.errors.lock().push(format!("{e:#}"));
                return Err(e);
            }
        };
        let now = ctx.clock.now();
        ctx.ledger.record(wq as u8, &targets, &ids, now, false);
        let roll = rng.gen_range(0..100);
        let at = ctx.clock.now();
        let wq8 = Some(wq as u8);
        match roll {
            0..=7 => {
                let r = ctx.backend.flush(Scope::Batch(batch), ctx.flush_bound);
                ctx.ledger.flushed(WaitKind::Batch, wq8, at, r);
            }
            8..=11 => {
                let k = rng.gen_range(1..=ids.len());
                let some: Vec<u64> = ids.choose_multiple(&mut rng, k).copied().collect();
                let r = ctx.backend.flush(Scope::Items(some), ctx.flush_bound);
                ctx.ledger.flushed(WaitKind::Items, wq8, at, r);
            }
            12..=13 => {
                let r = ctx
                    .backend
                    .flush(Scope::Workqueue(wq_name.to_string()), ctx.flush_bound);
                ctx.ledger.flushed(WaitKind::Workqueue, wq8, at, r);
            }
            14..=21 => {
                let k = rng.gen_range(1..=ids.len());
                let some: Vec<u64> = ids.choose_multiple(&mut rng, k).copied().collect();
                let r = ctx.backend.cancel(&some, ctx.flush_bound);
                ctx.ledger.flushed(WaitKind::Cancel, wq8, at, r);
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(2..12)));
    }
    Ok(())
}

/// The seed's scenario, replayed identically every `period`.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// (leaf target index, item) in submit order; each is submitted to every workqueue.
    pub items: Vec<(usize, Spec)>,
    /// The order the leaves' CPUs go offline.
    pub offline: Vec<u32>,
    pub period: Duration,
}

impl Scenario {
    /// Derives the scenario from the seed.
    pub fn from_seed(seed: u64, plan: &Plan) -> Scenario {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5ce4_a210);
        let mut leaves = plan.leaves.clone();
        leaves.shuffle(&mut rng);
        let items = leaves
            .iter()
            .map(|&l| {
                let target = plan.targets[l].target.clone();
                let spec = match rng.gen_range(0..3) {
                    0 => Spec {
                        target,
                        handler: "sleep",
                        args: vec![("ms", rng.gen_range(20..80).to_string())],
                    },
                    1 => Spec {
                        target,
                        handler: "spin",
                        args: vec![("us", rng.gen_range(2000..10000).to_string())],
                    },
                    _ => Spec {
                        target,
                        handler: "noop",
                        args: Vec::new(),
                    },
                };
                (l, spec)
            })
            .collect();
        let mut offline = Vec::new();
        for &l in &leaves {
            let mut cpus: Vec<u32> = plan.targets[l]
                .members
                .iter()
                .filter(|c| plan.hotpluggable.contains(c))
                .collect();
            cpus.shuffle(&mut rng);
            offline.extend(cpus);
        }
        Scenario {
            items,
            offline,
            period: Duration::from_millis(rng.gen_range(2500..4000)),
        }
    }

    /// One line describing it.
    pub fn describe(&self, plan: &Plan) -> String {
        let items: Vec<String> = self
            .items
            .iter()
            .map(|(l, s)| {
                let args: Vec<String> = s.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!(
                    "{} {} {}",
                    plan.targets[*l].target,
                    s.handler,
                    args.join(",")
                )
            })
            .collect();
        let off: Vec<String> = self.offline.iter().map(|c| format!("cpu{c}")).collect();
        format!(
            "every {:.1} s: [{}] on each workqueue, then offline {}, flush all",
            self.period.as_secs_f64(),
            items.join("; "),
            off.join(" ")
        )
    }
}

/// Replays the scenario every `period` until `stop`.
///
/// # Errors
/// A submit refused for a reason other than a full workqueue.
pub fn scenario(ctx: &Ctx, sc: &Scenario) -> Result<()> {
    loop {
        let deadline = ctx.clock.now() + sc.period;
        while ctx.clock.now() < deadline {
            if ctx.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut all = Vec::new();
        for (wq, (name, _)) in WQS.iter().enumerate() {
            let specs: Vec<Spec> = sc.items.iter().map(|(_, s)| s.clone()).collect();
            let targets: Vec<u16> = sc.items.iter().map(|(l, _)| *l as u16).collect();
            match ctx.backend.submit(name, &specs) {
                Ok(Some((_, ids))) => {
                    ctx.ledger
                        .record(wq as u8, &targets, &ids, ctx.clock.now(), true);
                    all.extend(ids);
                }
                Ok(None) => {
                    ctx.ledger.queue_full.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    ctx.ledger.errors.lock().push(format!("scenario: {e:#}"));
                    return Err(e);
                }
            }
        }
        if let Some(tx) = &ctx.hotplug {
            let _ = tx.send(Cmd::Offline(sc.offline.clone()));
        }
        let at = ctx.clock.now();
        let r = ctx.backend.flush(Scope::Items(all), ctx.flush_bound);
        ctx.ledger.flushed(WaitKind::Scenario, None, at, r);
        ctx.ledger.scenario_runs.fetch_add(1, Ordering::Relaxed);
    }
}

/// The final flush of every workqueue, after every CPU is back.
pub fn final_flush(ctx: &Ctx) {
    for (wq, (name, _)) in WQS.iter().enumerate() {
        let at = ctx.clock.now();
        let r = ctx
            .backend
            .flush(Scope::Workqueue(name.to_string()), ctx.flush_bound);
        ctx.ledger.flushed(WaitKind::Final, Some(wq as u8), at, r);
    }
}
