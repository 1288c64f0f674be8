//! Attached workers at the engine level (`Engine::attach`, `RemoteWorker`): late binding to
//! slots of live CPUs of the item's group, credits, answers, hand-backs, cancels, lost
//! workers (fail and requeue), unserved handlers, and a stress test where worker threads,
//! topology changes, cancels and worker losses race while every item is counted.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use wqd_core::engine::{
    Engine, EngineConfig, EngineError, FlushEvent, FlushScope, ItemId, ItemResult, ItemSpec,
    RemoteAnswer, RemoteJob, RemoteSink, RemoteWorker, State, Unserved, WorkerLost, WorkerMeta,
    WorkqueueAttrs,
};
use wqd_core::handler::Registry;
use wqd_core::target::Target;

/// A sink that counts wake-ups and records cancels, and lets a thread wait for either.
#[derive(Default)]
struct Sink {
    wakes: Mutex<u64>,
    cancels: Mutex<Vec<ItemId>>,
    cv: Condvar,
}

impl RemoteSink for Sink {
    fn wake(&self) {
        *self.wakes.lock() += 1;
        self.cv.notify_all();
    }
    fn cancel(&self, id: ItemId) {
        self.cancels.lock().push(id);
        self.cv.notify_all();
    }
}

impl Sink {
    fn wait_wake(&self, seen: u64, d: Duration) -> u64 {
        let mut w = self.wakes.lock();
        let until = Instant::now() + d;
        while *w == seen && !self.cv.wait_until(&mut w, until).timed_out() {}
        *w
    }
}

fn engine(n: u32, live: &str, max_credits: u32) -> (Engine, Arc<wqd_core::live::Snapshot>) {
    let topo = common::topology(n);
    let snap = common::snapshot(&topo, 1, &live.parse().unwrap());
    let cfg = EngineConfig {
        pinning: false,
        max_credits,
        ..EngineConfig::default()
    };
    let e = Engine::start(cfg, Registry::with_builtins(None), snap.clone()).unwrap();
    (e, snap)
}

fn attach(e: &Engine, handlers: &[&str]) -> (RemoteWorker, Arc<Sink>) {
    let sink = Arc::new(Sink::default());
    let w = e
        .attach(
            WorkerMeta {
                pid: 42,
                name: "test".into(),
                ..WorkerMeta::default()
            },
            handlers.iter().map(|s| s.to_string()).collect(),
            sink.clone(),
        )
        .unwrap();
    (w, sink)
}

fn item(target: &str, handler: &str) -> ItemSpec {
    ItemSpec::new(target.parse::<Target>().unwrap(), handler)
}

fn take(w: &RemoteWorker) -> Vec<RemoteJob> {
    let mut v = Vec::new();
    w.take(&mut v);
    v
}

fn results(e: &Engine, ids: &[ItemId]) -> Vec<Arc<ItemResult>> {
    let mut f = e.flush(FlushScope::Items(ids.to_vec())).unwrap();
    let deadline = Some(Instant::now() + Duration::from_secs(20));
    let mut out = Vec::new();
    while let Some(ev) = f.next_blocking(deadline).expect("flush timed out") {
        if let FlushEvent::Done(r) = ev {
            out.push(r);
        }
    }
    out.sort_by_key(|r| r.id);
    out
}

#[test]
fn items_go_only_to_slots_of_live_cpus_of_their_group_within_credits() {
    let (e, _) = engine(8, "0-7", 4);
    let (w, _sink) = attach(&e, &["resize"]);
    // Slots on cpus 0 (cache 0) and 5 (cache 1).
    w.open_slot(0, 0).unwrap();
    w.open_slot(1, 5).unwrap();
    let r = e
        .submit(
            "default",
            (0..6)
                .map(|_| item("cache:1", "resize"))
                .collect::<Vec<_>>(),
        )
        .unwrap();
    assert!(take(&w).is_empty(), "no credits, nothing sent");
    w.credit(0, 4).unwrap();
    assert!(take(&w).is_empty(), "slot 0 is on cache 0: nothing for it");
    w.credit(1, 10).unwrap();
    let jobs = take(&w);
    // max_active 1 per CPU for the default workqueue: one at a time on cpu 5.
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!((jobs[0].slot, jobs[0].cpu), (1, 5));
    assert_eq!(&*jobs[0].handler, "resize");
    let mut done = 0;
    let mut next = jobs;
    while let Some(j) = next.pop() {
        w.answer(j.id, RemoteAnswer::Ok(vec![j.id as u8]), Some(5), 1)
            .unwrap();
        done += 1;
        next = take(&w);
        assert!(next.len() <= 1);
    }
    assert_eq!(done, 6);
    let ids: Vec<_> = r.items.iter().map(|s| s.id).collect();
    for res in results(&e, &ids) {
        assert_eq!(res.state, State::Ok);
        assert_eq!(res.cpu_started, Some(5));
        assert_eq!(res.output, vec![res.id as u8]);
        let wr = res.worker.expect("worker recorded");
        assert_eq!((wr.worker, wr.pid, wr.slot), (w.id(), 42, 1));
    }
    // Answering twice, or for an item never sent, is a protocol violation.
    let err = w
        .answer(ids[0], RemoteAnswer::Ok(vec![]), None, 0)
        .unwrap_err();
    assert!(matches!(err, EngineError::Worker(_)), "{err}");
}

#[test]
fn names_are_checked_and_builtins_cannot_be_shadowed() {
    let (e, _) = engine(4, "0-3", 1);
    let sink: Arc<dyn RemoteSink> = Arc::new(Sink::default());
    let meta = WorkerMeta::default;
    for (names, want) in [
        (vec!["noop"], "served by the daemon itself"),
        (vec![], "at least one"),
        (vec!["a", "a"], "repeated"),
        (vec!["bad name"], "must be 1-128 bytes"),
    ] {
        let err = e
            .attach(
                meta(),
                names.iter().map(|s| s.to_string()).collect(),
                sink.clone(),
            )
            .err()
            .unwrap_or_else(|| panic!("{names:?} accepted"));
        assert!(err.to_string().contains(want), "{names:?}: {err}");
    }
    // An unknown name is refused at submit; once served it is known, even after its worker
    // left.
    let err = e.submit("default", vec![item("all", "later")]).unwrap_err();
    assert!(matches!(err, EngineError::UnknownHandler { .. }), "{err}");
    let (w, _) = attach(&e, &["later"]);
    w.detach("test");
    e.submit("default", vec![item("all", "later")]).unwrap();
    e.declare_remote(&["declared".into()]).unwrap();
    e.submit("default", vec![item("all", "declared")]).unwrap();
    assert!(e.declare_remote(&["spin".into()]).is_err());
    // Slots on CPUs the machine does not have are refused.
    let (w, _) = attach(&e, &["x"]);
    assert!(w.open_slot(0, 99).is_err());
    w.open_slot(0, 3).unwrap();
    assert!(w.open_slot(0, 2).is_err(), "slot ids are unique");
    assert!(w.credit(7, 1).is_err(), "credit for an unopened slot");
}

#[test]
fn a_parked_slot_is_woken_when_its_cpu_comes_back_and_work_is_rebound_on_handback() {
    let (e, snap) = engine(8, "0-3", 1);
    let (w, sink) = attach(&e, &["h"]);
    w.open_slot(0, 4).unwrap(); // cpu 4 is not live yet
    w.credit(0, 1).unwrap();
    let ids: Vec<_> = e
        .submit("default", vec![item("cpus:4-5", "h")])
        .unwrap()
        .items
        .iter()
        .map(|s| s.id)
        .collect();
    // Widen: cpus 4-5 have no live CPU; the fallback widens (cache/node...) to live CPUs 0-3,
    // where this worker has no slot: nothing for slot 0.
    assert!(take(&w).is_empty());
    // A policy that waits keeps the next item for cpu 4.
    e.create_workqueue(WorkqueueAttrs {
        fallback: wqd_core::groups::Fallback::Wait,
        ..WorkqueueAttrs::named("w")
    })
    .unwrap();
    let waiting: Vec<_> = e
        .submit("w", vec![item("cpus:4", "h")])
        .unwrap()
        .items
        .iter()
        .map(|s| s.id)
        .collect();
    assert!(take(&w).is_empty());
    let seen = *sink.wakes.lock();
    e.apply_snapshot(&common::next(&snap, &"0-7".parse().unwrap()));
    assert!(sink.wait_wake(seen, Duration::from_secs(5)) > seen, "woken");
    let jobs = take(&w);
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].cpu, 4);
    // The worker hands it back (its thread was not on cpu 4), then takes it again.
    let first = jobs[0].id;
    w.answer(first, RemoteAnswer::HandBack("affinity".into()), None, 1)
        .unwrap();
    // Two items wait for cpu 4 now; the slot takes one of them (the queues take turns).
    let again = take(&w);
    assert_eq!(again.len(), 1);
    w.answer(again[0].id, RemoteAnswer::Ok(vec![]), None, 1)
        .unwrap();
    let mut rest = take(&w);
    while let Some(j) = rest.pop() {
        w.answer(j.id, RemoteAnswer::Ok(vec![]), None, 1).unwrap();
        rest.extend(take(&w));
    }
    let all: Vec<_> = ids.iter().chain(&waiting).copied().collect();
    let rs = results(&e, &all);
    assert!(rs.iter().all(|r| r.state == State::Ok), "{rs:?}");
    assert_eq!(rs.iter().map(|r| r.rebinds).sum::<u32>(), 1);
}

#[test]
fn a_lost_worker_fails_its_items_or_requeues_them_saying_so() {
    let (e, _) = engine(4, "0-3", 1);
    e.declare_remote(&["h".into()]).unwrap();
    e.create_workqueue(WorkqueueAttrs {
        on_worker_lost: WorkerLost::Requeue,
        ..WorkqueueAttrs::named("idem")
    })
    .unwrap();
    let a = e.submit("default", vec![item("cpu:0", "h")]).unwrap().items[0].id;
    let b = e.submit("idem", vec![item("cpu:1", "h")]).unwrap().items[0].id;
    let (w1, _) = attach(&e, &["h"]);
    w1.open_slot(0, 0).unwrap();
    w1.open_slot(1, 1).unwrap();
    w1.credit(0, 1).unwrap();
    w1.credit(1, 1).unwrap();
    assert_eq!(take(&w1).len(), 2);
    w1.detach("killed");
    let ra = &results(&e, &[a])[0];
    assert_eq!(ra.state, State::Failed);
    assert_eq!(ra.error, "worker lost: killed");
    assert_eq!(ra.cpu_started, Some(0));
    // b went back to its queue; a second worker runs it.
    let (w2, _) = attach(&e, &["h"]);
    w2.open_slot(0, 1).unwrap();
    w2.credit(0, 1).unwrap();
    let jobs = take(&w2);
    assert_eq!(jobs.len(), 1);
    assert_eq!((jobs[0].id, jobs[0].attempt), (b, 1));
    w2.answer(b, RemoteAnswer::Ok(b"again".to_vec()), None, 0)
        .unwrap();
    let rb = &results(&e, &[b])[0];
    assert_eq!(rb.state, State::Ok);
    assert_eq!(rb.worker_lost, 1);
    assert_eq!(rb.worker.map(|w| w.worker), Some(w2.id()));
}

#[test]
fn cancel_reaches_the_worker_and_the_item_ends_when_it_answers_or_is_lost() {
    let (e, _) = engine(4, "0-3", 1);
    let (w, sink) = attach(&e, &["h"]);
    w.open_slot(0, 0).unwrap();
    w.open_slot(1, 1).unwrap();
    w.credit(0, 1).unwrap();
    w.credit(1, 1).unwrap();
    let r = e
        .submit("default", vec![item("cpu:0", "h"), item("cpu:1", "h")])
        .unwrap();
    let (a, b) = (r.items[0].id, r.items[1].id);
    assert_eq!(take(&w).len(), 2);
    let rep = e.cancel(FlushScope::Items(vec![a, b])).unwrap();
    assert_eq!(rep.outcomes.len(), 2);
    let mut got = sink.cancels.lock().clone();
    got.sort();
    assert_eq!(got, vec![a, b]);
    // The worker stops a; b's worker is lost before it answers: cancelled either way.
    w.answer(a, RemoteAnswer::Cancelled, None, 0).unwrap();
    w.detach("gone");
    let rs = results(&e, &[a, b]);
    assert!(rs.iter().all(|r| r.state == State::Cancelled), "{rs:?}");
    // A cancelled item that is handed back never runs.
    let (w, _) = attach(&e, &["h"]);
    w.open_slot(0, 2).unwrap();
    w.credit(0, 1).unwrap();
    let c = e.submit("default", vec![item("cpu:2", "h")]).unwrap().items[0].id;
    assert_eq!(take(&w).len(), 1);
    e.cancel(FlushScope::Items(vec![c])).unwrap();
    w.answer(c, RemoteAnswer::HandBack("stopping".into()), None, 1)
        .unwrap();
    assert!(take(&w).is_empty());
    assert_eq!(results(&e, &[c])[0].state, State::Cancelled);
}

#[test]
fn unserved_items_wait_or_are_rejected_per_workqueue() {
    let (e, _) = engine(4, "0-3", 1);
    e.declare_remote(&["h".into()]).unwrap();
    e.create_workqueue(WorkqueueAttrs {
        unserved: Unserved::Reject,
        ..WorkqueueAttrs::named("strict")
    })
    .unwrap();
    let rejected = e.submit("strict", vec![item("all", "h")]).unwrap().items[0].id;
    let r = &results(&e, &[rejected])[0];
    assert_eq!(r.state, State::Rejected);
    assert!(
        r.error.contains("no attached worker serves handler \"h\""),
        "{}",
        r.error
    );
    // While a worker serves it, items are accepted; when the last one leaves, the pending
    // ones of a rejecting workqueue are rejected, those of a waiting one wait.
    let (w, _) = attach(&e, &["h"]);
    let s = e.submit("strict", vec![item("all", "h")]).unwrap().items[0].id;
    let d = e.submit("default", vec![item("all", "h")]).unwrap().items[0].id;
    w.detach("bye");
    assert_eq!(results(&e, &[s])[0].state, State::Rejected);
    let st = e.stats();
    assert_eq!(st.pending, 1, "the default workqueue's item waits");
    let (w, _) = attach(&e, &["h"]);
    w.open_slot(0, 3).unwrap();
    w.credit(0, 1).unwrap();
    let jobs = take(&w);
    assert_eq!(jobs.iter().map(|j| j.id).collect::<Vec<_>>(), vec![d]);
}

/// Several worker threads (each an attached worker with slots on some CPUs) take, run and
/// answer items, sometimes handing them back, while the topology changes, items are
/// cancelled and workers are lost and re-attach. Every item must end exactly once, started
/// only on a CPU of its group (or its recorded fallback) that was live in its start epoch.
#[test]
fn stress_workers_topology_cancels_and_losses_lose_nothing() {
    const N: usize = 6000;
    let (e, snap) = engine(8, "0-7", 2);
    let e = Arc::new(e);
    e.declare_remote(&["h".into(), "g".into()]).unwrap();
    e.create_workqueue(WorkqueueAttrs {
        on_worker_lost: WorkerLost::Requeue,
        max_active: 2,
        ..WorkqueueAttrs::named("idem")
    })
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(Mutex::new(HashMap::<ItemId, u32>::new()));
    let lost_runs = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for t in 0..4u32 {
        let (e, stop, answered, lost_runs) =
            (e.clone(), stop.clone(), answered.clone(), lost_runs.clone());
        threads.push(std::thread::spawn(move || {
            let mut rng = t as u64 * 7919 + 1;
            let mut rnd = move |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            while !stop.load(Ordering::Relaxed) {
                let (w, sink) = attach(&e, &["h", "g"]);
                for c in 0..8u32 {
                    if (c + t) % 2 == 0 || c == t {
                        w.open_slot(c, c).unwrap();
                        w.credit(c, 2).unwrap();
                    }
                }
                let life = 50 + rnd(400);
                let mut held: Vec<RemoteJob> = Vec::new();
                for _ in 0..life {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    w.take(&mut held);
                    if held.is_empty() {
                        let seen = *sink.wakes.lock();
                        sink.wait_wake(seen, Duration::from_millis(5));
                        continue;
                    }
                    let j = held.swap_remove(rnd(held.len() as u64) as usize);
                    let ans = match rnd(10) {
                        0 => RemoteAnswer::HandBack("affinity".into()),
                        1 => RemoteAnswer::Failed("nope".into()),
                        2 if sink.cancels.lock().contains(&j.id) => RemoteAnswer::Cancelled,
                        _ => RemoteAnswer::Ok(j.id.to_le_bytes().to_vec()),
                    };
                    if !matches!(ans, RemoteAnswer::HandBack(_)) {
                        *answered.lock().entry(j.id).or_default() += 1;
                    }
                    w.answer(j.id, ans, Some(j.cpu), 1).unwrap();
                }
                // Lost with whatever it holds (some of which may have "run").
                lost_runs.fetch_add(held.len() as u64, Ordering::Relaxed);
                w.detach("stress");
            }
        }));
    }
    // Topology churn.
    let churn = {
        let (e, stop) = (e.clone(), stop.clone());
        std::thread::spawn(move || {
            let sets = ["0-7", "0-3", "1,3,5,7", "4-7", "0,2,4,6", "0-7", "2-5"];
            let mut s = snap;
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                s = common::next(&s, &sets[i % sets.len()].parse().unwrap());
                e.apply_snapshot(&s);
                i += 1;
                std::thread::sleep(Duration::from_millis(3));
            }
            // End with everything live so the rest can drain.
            e.apply_snapshot(&common::next(&s, &"0-7".parse().unwrap()));
        })
    };
    let targets = [
        "cpu:1", "cache:0", "cache:1", "node:0", "cpus:2,6", "all", "core:3",
    ];
    let mut ids = Vec::new();
    let mut i = 0;
    while ids.len() < N {
        let wq = if i % 2 == 0 { "default" } else { "idem" };
        let h = if i % 3 == 0 { "g" } else { "h" };
        let batch: Vec<_> = (0..50)
            .map(|k| item(targets[(i + k) % targets.len()], h))
            .collect();
        ids.extend(e.submit(wq, batch).unwrap().items.iter().map(|s| s.id));
        if i % 7 == 0 {
            let c: Vec<_> = ids.iter().rev().step_by(13).take(5).copied().collect();
            e.cancel(FlushScope::Items(c)).unwrap();
        }
        i += 1;
        std::thread::sleep(Duration::from_micros(300));
    }
    let mut f = e.flush(FlushScope::Items(ids.clone())).unwrap();
    let deadline = Some(Instant::now() + Duration::from_secs(60));
    let mut seen: BTreeMap<ItemId, Arc<ItemResult>> = BTreeMap::new();
    let mut dup = 0;
    let mut stuck = false;
    loop {
        match f.next_blocking(deadline) {
            Ok(Some(FlushEvent::Done(r))) => {
                if seen.insert(r.id, r).is_some() {
                    dup += 1;
                }
            }
            Ok(Some(FlushEvent::Gone(id))) => panic!("result {id} gone"),
            Ok(Some(FlushEvent::Ended(id, _))) => {
                panic!("{id} ended without a result (results = full)")
            }
            Ok(None) => break,
            Err(()) => {
                stuck = true;
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    churn.join().unwrap();
    let want: HashSet<ItemId> = ids.iter().copied().collect();
    let lost = want.len() - seen.len();
    assert!(
        !stuck && lost == 0 && dup == 0,
        "stuck {stuck}, lost {lost}, duplicated {dup} of {}",
        want.len()
    );
    let answered = answered.lock();
    let groups = e.snapshot().groups.clone();
    let mut by_state: BTreeMap<State, usize> = BTreeMap::new();
    for r in seen.values() {
        *by_state.entry(r.state).or_default() += 1;
        if matches!(r.state, State::Ok) {
            // Answered exactly once unless a worker was lost holding it after answering
            // never happens: an answered item is no longer held.
            assert_eq!(answered.get(&r.id), Some(&1), "item {} answered", r.id);
            let cpu = r.cpu_started.expect("started");
            let members = groups.members(&r.target).expect("known target");
            assert!(
                members.contains(cpu) || r.fallback.is_some(),
                "item {} ran on {cpu} outside {} without a fallback",
                r.id,
                r.target
            );
            assert_eq!(r.output, r.id.to_le_bytes().to_vec());
        }
        if r.worker_lost > 0 {
            assert_eq!(&*r.workqueue, "idem", "only requeue workqueues requeue");
        }
    }
    eprintln!(
        "stress: {} items {by_state:?}, {} held when lost",
        seen.len(),
        lost_runs.load(Ordering::Relaxed)
    );
    assert!(by_state.get(&State::Ok).copied().unwrap_or(0) > N / 2);
}

/// A built-in item queued behind an attached worker's item on the same CPU and workqueue
/// (`max_active = 1`) starts when the worker answers, and the other way round: an attached
/// item behind a built-in one is sent when the built-in one ends. (Found by the Python worker
/// tests: nobody re-offered the freed `max_active` slot to the other kind of taker.)
#[test]
fn a_freed_max_active_slot_is_offered_to_the_other_kind_of_taker() {
    let (e, _) = engine(4, "0-3", 1);
    let (w, sink) = attach(&e, &["h"]);
    w.open_slot(0, 2).unwrap();
    w.credit(0, 1).unwrap();
    // The attached item holds the CPU's max_active slot; a built-in item queued behind it runs
    // when the answer frees the slot (the worker thread is woken). Submitted one after the
    // other: submitted together, the thread could take the noop before the slot takes anything.
    let remote = e.submit("default", vec![item("cpu:2", "h")]).unwrap().items[0].id;
    let jobs = take(&w);
    assert_eq!(jobs.iter().map(|j| j.id).collect::<Vec<_>>(), vec![remote]);
    let local = e
        .submit("default", vec![item("cpu:2", "noop")])
        .unwrap()
        .items[0]
        .id;
    w.answer(remote, RemoteAnswer::Ok(vec![]), None, 1).unwrap();
    assert_eq!(results(&e, &[local])[0].state, State::Ok, "the noop ran");

    // Now a slow built-in item runs first (spin holds the CPU's max_active slot); an attached
    // item for the same CPU waits, and is sent when the spin ends (the slot is woken).
    let spin = e
        .submit("default", vec![item("cpu:2", "spin").arg("ms", "200")])
        .unwrap()
        .items[0]
        .id;
    let deadline = Instant::now() + Duration::from_secs(10);
    while e.stats().running == 0 {
        assert!(Instant::now() < deadline, "the spin never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    let remote2 = e.submit("default", vec![item("cpu:2", "h")]).unwrap().items[0].id;
    assert!(take(&w).is_empty(), "the CPU's max_active slot is taken");
    let seen = *sink.wakes.lock();
    assert!(
        sink.wait_wake(seen, Duration::from_secs(10)) > seen,
        "woken"
    );
    let jobs = take(&w);
    assert_eq!(jobs.iter().map(|j| j.id).collect::<Vec<_>>(), vec![remote2]);
    assert_eq!(results(&e, &[spin])[0].state, State::Ok);
    w.answer(remote2, RemoteAnswer::Ok(vec![]), None, 1)
        .unwrap();
}
