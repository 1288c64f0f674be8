//! Attached workers through the Rust worker library (`wqd_client::worker`) and the
//! `wqd-worker-example` binary, against the real daemon: items reach only slots of CPUs in
//! their group; a worker sees only its handlers; workqueue rules (flush, drain, ordered,
//! max_active, keys, delays, deadlines) hold for attached handlers; CPUs leave and return
//! while items flow and every item ends exactly once; `kill -9` of a worker fails or re-queues
//! what it held; a slow worker holds back only itself; a hostile session is cut off alone;
//! cancel reaches a running item; `unserved = reject`; a built-in name cannot be shadowed;
//! graceful stops finish or hand back what a worker holds; a daemon that stops ends workers
//! with an error (no reconnect); `wqctl workers` names the workers. The raw protocol and its refusals message by message are
//! `tests/attach.rs`.
//!
//! On `two-socket` the LLCs are cache:0 = 0-1,8-9, cache:1 = 2-3,10-11, cache:2 = 4-5,12-13.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hasher;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use wqd_client::proto::{self, daemon_message, worker_message, ItemResult, ItemState};
use wqd_client::worker::{Graceful, WorkItem, Worker, WorkerError, WorkerHandle};
use wqd_client::{Batch, CancelScope, Client, FlushScope, Item};
use wqd_e2e::{parse_cpulist, wait_for, wait_states, worker_example_bin, wq_attrs, Daemon};

const LONG: Duration = Duration::from_secs(60);

/// Names a submit may use before a worker serving them attaches.
const CONFIG: &str = r#"
[workers]
handlers = ["checksum", "other", "rec", "wait", "ghost"]
max_credits = 2
"#;

fn daemon() -> Daemon {
    Daemon::builder("two-socket").config(CONFIG).start()
}

/// The example worker's digest: `DefaultHasher` over the payload, 16 hex digits.
fn digest(payload: &[u8]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(payload);
    format!("{:016x}", h.finish())
}

fn members(t: &proto::TopologySnapshot, target: &str) -> BTreeSet<u32> {
    let g = t.groups.iter().find(|g| g.target == target);
    parse_cpulist(&g.unwrap_or_else(|| panic!("no group {target}")).members)
}

async fn flush(c: &Client, batch: u64) -> Vec<ItemResult> {
    let (r, s) = c
        .clone()
        .with_timeout(Some(LONG))
        .flush_all(FlushScope::Batch(batch))
        .await
        .expect("flush");
    assert_eq!(s.items_covered as usize, r.len(), "{s:?}");
    r
}

fn ids(r: &proto::SubmitResponse) -> Vec<u64> {
    r.items.iter().map(|x| x.item_id).collect()
}

fn ms(t: Option<&prost_types::Timestamp>) -> i128 {
    let t = t.expect("timestamp");
    i128::from(t.seconds) * 1000 + i128::from(t.nanos) / 1_000_000
}

// ---------------------------------------------------------------------------------------------
// The example binary as a child process

/// A running `wqd-worker-example`; dropping it kills it (and, in a failing test, prints its
/// stderr).
struct ExampleWorker {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    name: String,
    worker_id: u64,
}

impl ExampleWorker {
    fn start(d: &Daemon, target: &str, name: &str, extra: &[&str]) -> ExampleWorker {
        let mut child = Command::new(worker_example_bin())
            .arg("--socket")
            .arg(d.socket())
            .args(["--target", target, "--handler", "checksum", "--name", name])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start wqd-worker-example");
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().expect("piped stderr");
        let log = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
                l.push_str(&line);
                l.push('\n');
            }
        });
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let out = child.stdout.take().expect("piped stdout");
        let l = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(id) = line
                    .strip_prefix("attached worker_id=")
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|x| x.parse::<u64>().ok())
                {
                    let _ = tx.send(id);
                }
                l.lock().unwrap().push(line);
            }
        });
        let worker_id = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("{name} did not attach within 30 s"));
        ExampleWorker {
            child,
            lines,
            stderr,
            name: name.to_string(),
            worker_id,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: plain syscall on our own child, not reaped yet.
        unsafe { libc::kill(pid, sig) };
    }

    /// The item ids it printed, in order.
    fn items(&self) -> Vec<u64> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.strip_prefix("item "))
            .filter_map(|r| r.split_whitespace().next()?.parse().ok())
            .collect()
    }

    /// Whether it printed a line starting with `prefix`, waiting up to 10 s for it (the line
    /// is printed before the item's Done, but read from the pipe by another thread).
    fn printed(&self, prefix: &str) -> bool {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if self
                .lines
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.starts_with(prefix))
            {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The item ids it printed, once it has printed at least `n` of them (bounded: 10 s).
    fn items_at_least(&self, n: usize) -> Vec<u64> {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let items = self.items();
            if items.len() >= n || Instant::now() >= end {
                return items;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends SIGTERM and waits (bounded) for the exit code.
    fn term(mut self) -> i32 {
        self.signal(libc::SIGTERM);
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                let code = s.code().unwrap_or(-1);
                if code != 0 {
                    eprintln!(
                        "---- {} exited {code}; stderr ----\n{}",
                        self.name,
                        self.stderr.lock().unwrap_or_else(|e| e.into_inner())
                    );
                }
                return code;
            }
            assert!(Instant::now() < end, "worker did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for ExampleWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- {} (wqd-worker-example) stderr ----\n{}",
                self.name,
                self.stderr.lock().unwrap_or_else(|e| e.into_inner())
            );
        }
    }
}

async fn workers(c: &Client) -> Vec<proto::WorkerInfo> {
    c.list_workers().await.expect("ListWorkers")
}

async fn wait_detached(c: &Client, worker_id: u64) {
    wait_for(&format!("worker {worker_id} to detach"), LONG, || async {
        (!workers(c).await.iter().any(|w| w.worker_id == worker_id)).then_some(())
    })
    .await;
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_reach_only_slots_of_their_group_and_workers_see_only_their_handlers() {
    let d = daemon();
    let c = d.client().await;
    let topo = c.topology().await.expect("topology");
    let a = ExampleWorker::start(&d, "cache:1", "wa", &[]);
    let b = ExampleWorker::start(&d, "cache:2", "wb", &["--prefetch", "2"]);
    let other_seen = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&other_seen);
    let lib = Worker::builder(&c)
        .target("cache:0")
        .name("lib")
        .handler("other", move |i: &WorkItem| {
            seen.lock().unwrap().push((i.id, i.handler.clone(), i.cpu));
            Ok(b"other".to_vec())
        })
        .start()
        .await
        .expect("library worker attaches");
    let lib_slots = lib.info().expect("attached").slots.clone();
    let lib_cpus: BTreeSet<u32> = lib_slots.iter().map(|s| s.1).collect();
    assert_eq!(lib_cpus, members(&topo, "cache:0"));

    let payload = |i: u32| format!("payload-{i}").into_bytes();
    let r = c
        .submit(
            Batch::new()
                .items((0..20).map(|i| Item::new("cache:1", "checksum").payload(payload(i))))
                .items((20..40).map(|i| Item::new("cache:2", "checksum").payload(payload(i))))
                .items((0..10).map(|_| Item::new("cache:0", "other"))),
        )
        .await
        .expect("submit");
    let all = ids(&r);
    let results = flush(&c, r.batch_id).await;
    let by_id: HashMap<u64, &ItemResult> = results.iter().map(|x| (x.item_id, x)).collect();
    for (n, id) in all.iter().enumerate() {
        let x = by_id[id];
        assert_eq!(x.state(), ItemState::Ok, "{x:?}");
        let cpu = x.cpu_started.expect("started");
        let (group, pid, wid) = match n {
            0..20 => ("cache:1", a.pid(), a.worker_id),
            20..40 => ("cache:2", b.pid(), b.worker_id),
            _ => ("cache:0", std::process::id(), lib.worker_id()),
        };
        assert!(
            members(&topo, group).contains(&cpu),
            "item {n} of {group} started on cpu {cpu}: {x:?}"
        );
        assert_eq!((x.worker_pid, x.worker_id), (pid, wid), "{x:?}");
        // The worker ran it on the slot the daemon names, and that slot is on cpu_started.
        let line = format!("item {id} cpu {cpu} slot {} ", x.worker_slot);
        match n {
            0..20 => assert!(a.printed(&line), "{line}"),
            20..40 => assert!(b.printed(&line), "{line}"),
            _ => assert!(lib_slots.contains(&(x.worker_slot, cpu)), "{x:?}"),
        }
        if n < 40 {
            assert_eq!(x.output, digest(&payload(n as u32)).into_bytes(), "{x:?}");
        } else {
            assert_eq!(x.output, b"other");
        }
        assert_eq!(x.worker_lost, 0);
    }
    // Each worker ran exactly its items, and the library worker only its handler.
    let mut a_items = a.items_at_least(20);
    a_items.sort_unstable();
    assert_eq!(a_items, all[..20].to_vec());
    let mut b_items = b.items_at_least(20);
    b_items.sort_unstable();
    assert_eq!(b_items, all[20..40].to_vec());
    let other = other_seen.lock().unwrap().clone();
    assert_eq!(other.len(), 10);
    assert!(other
        .iter()
        .all(|(_, h, cpu)| h == "other" && lib_cpus.contains(cpu)));

    // wqctl workers --output json names them, their pids and slots.
    let ran = d.wqctl(&["workers", "-o", "json"]);
    ran.expect_code(0);
    let v = ran.json();
    let list = v["workers"].as_array().expect("workers array");
    assert_eq!(list.len(), 3, "{v}");
    let find = |name: &str| {
        list.iter()
            .find(|w| w["name"] == name)
            .unwrap_or_else(|| panic!("{name} listed: {v}"))
    };
    assert_eq!(find("wa")["pid"], a.pid());
    assert_eq!(find("wa")["worker_id"], a.worker_id);
    assert_eq!(find("wa")["handlers"], serde_json::json!(["checksum"]));
    let slot_cpus = |w: &serde_json::Value| -> BTreeSet<u32> {
        w["slots"]
            .as_array()
            .expect("slots")
            .iter()
            .map(|s| s["cpu"].as_u64().expect("cpu") as u32)
            .collect()
    };
    assert_eq!(slot_cpus(find("wa")), members(&topo, "cache:1"));
    assert_eq!(slot_cpus(find("wb")), members(&topo, "cache:2"));
    assert_eq!(find("wa")["done"], 20);
    assert_eq!(find("lib")["pid"], std::process::id());
    let text = d.wqctl(&["workers"]);
    text.expect_code(0);
    assert!(
        text.stdout.contains("wa") && text.stdout.contains("checksum"),
        "{}",
        text.stdout
    );

    // SIGTERM: a graceful stop and exit 0; the daemon lists only the library worker after.
    let (aid, bid) = (a.worker_id, b.worker_id);
    assert_eq!(a.term(), 0);
    assert_eq!(b.term(), 0);
    wait_detached(&c, aid).await;
    wait_detached(&c, bid).await;
    lib.stop(Graceful::Finish);
    let rep = lib.wait().await.expect("graceful stop");
    assert_eq!(rep.ok, 10);
    assert!(workers(&c).await.is_empty());
}

/// (item id, cpu, start, end) of every run of the `rec` handler.
type Runs = Arc<Mutex<Vec<(u64, u32, Instant, Instant)>>>;

fn recording_worker(c: &Client, cpus: &[u32], sleep: Duration, runs: &Runs) -> WorkerHandle {
    let runs = Arc::clone(runs);
    Worker::builder(c)
        .cpus(cpus.iter().copied())
        .name("rec")
        .handler("rec", move |i: &WorkItem| {
            let t0 = Instant::now();
            std::thread::sleep(sleep);
            runs.lock().unwrap().push((i.id, i.cpu, t0, Instant::now()));
            Ok(Vec::new())
        })
        .spawn()
        .expect("attach")
}

fn overlaps(runs: &[(u64, u32, Instant, Instant)]) -> usize {
    let mut n = 0;
    for (i, a) in runs.iter().enumerate() {
        for b in &runs[i + 1..] {
            if a.2 < b.3 && b.2 < a.3 {
                n += 1;
            }
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workqueue_rules_hold_for_attached_handlers() {
    let d = daemon();
    let c = d.client().await;
    let runs: Runs = Arc::default();
    // Two workers with a slot each on CPU 2, one more on CPU 3 and 10.
    let w1 = recording_worker(&c, &[2, 3, 10], Duration::from_millis(30), &runs);
    let w2 = recording_worker(&c, &[2], Duration::from_millis(30), &runs);

    // max_active = 1: one item of the workqueue at a time on CPU 2, however many slots it has.
    c.create_workqueue(proto::WorkqueueAttrs {
        max_active: 1,
        ..wq_attrs("ma")
    })
    .await
    .expect("create ma");
    let r = c
        .submit(
            Batch::new()
                .workqueue("ma")
                .items((0..8).map(|_| Item::new("cpu:2", "rec"))),
        )
        .await
        .expect("submit");
    let res = flush(&c, r.batch_id).await;
    assert!(res
        .iter()
        .all(|x| x.state() == ItemState::Ok && x.cpu_started == Some(2)));
    let on2: Vec<_> = runs.lock().unwrap().clone();
    assert_eq!(on2.len(), 8);
    assert_eq!(overlaps(&on2), 0, "max_active 1 on CPU 2: {on2:?}");
    let served_by: BTreeSet<u64> = res.iter().map(|x| x.worker_id).collect();
    assert!(served_by
        .iter()
        .all(|&w| w == w1.worker_id() || w == w2.worker_id()));

    // ordered: strict FIFO, one at a time, across the group's slots.
    runs.lock().unwrap().clear();
    c.create_workqueue(proto::WorkqueueAttrs {
        ordered: true,
        ..wq_attrs("ord")
    })
    .await
    .expect("create ord");
    let r = c
        .submit(
            Batch::new()
                .workqueue("ord")
                .items((0..8).map(|_| Item::new("cache:1", "rec"))),
        )
        .await
        .expect("submit");
    let want = ids(&r);
    flush(&c, r.batch_id).await;
    let mut ord = runs.lock().unwrap().clone();
    ord.sort_by_key(|x| x.2);
    assert_eq!(ord.iter().map(|x| x.0).collect::<Vec<_>>(), want, "FIFO");
    assert_eq!(overlaps(&ord), 0, "one at a time");

    // Keys: a second pending item with the same key is not queued; delays hold it back;
    // a deadline that passes while no slot is free expires it.
    // (A flush queues a batch's delayed items at once: the delayed item is polled instead.)
    let delayed = ids(&c
        .submit(
            Batch::new()
                .workqueue("ord")
                .item(Item::new("cpu:2", "rec").delay(Duration::from_millis(400))),
        )
        .await
        .expect("submit delayed"));
    let r = c
        .submit(
            Batch::new()
                .workqueue("ord")
                .item(Item::new("cpu:2", "rec").key("k"))
                .item(Item::new("cpu:2", "rec").key("k"))
                .items((0..6).map(|_| Item::new("cpu:2", "rec")))
                .item(Item::new("cpu:2", "rec").deadline(Duration::from_millis(50))),
        )
        .await
        .expect("submit");
    assert!(r.items[0].queued && !r.items[1].queued, "{:?}", r.items);
    assert_eq!(r.items[1].duplicate_of, r.items[0].item_id);
    let res = flush(&c, r.batch_id).await;
    let by: HashMap<u64, &ItemResult> = res.iter().map(|x| (x.item_id, x)).collect();
    wait_states(&c, &delayed, ItemState::Ok, LONG).await;
    let got = c.results(delayed.clone()).await.expect("results");
    let dx = got.items[0].result.as_ref().expect("a result");
    assert!(
        ms(dx.started_at.as_ref()) - ms(dx.queued_at.as_ref()) >= 390,
        "the delay holds for an attached handler: {dx:?}"
    );
    assert_eq!(dx.worker_pid, std::process::id());
    let late = by[&r.items[8].item_id];
    assert_eq!(
        late.state(),
        ItemState::Expired,
        "behind 7 ordered 30 ms items: {late:?}"
    );
    assert_eq!(late.worker_id, 0, "never sent to a worker");

    // Drain: returns when nothing is pending or running; the items all ran on their slots.
    let r = c
        .submit(
            Batch::new()
                .workqueue("ma")
                .items((0..6).map(|_| Item::new("cache:1", "rec"))),
        )
        .await
        .expect("submit");
    c.clone()
        .with_timeout(Some(LONG))
        .drain("ma")
        .await
        .expect("drain");
    assert!(wqd_e2e::states(&c, &ids(&r))
        .await
        .iter()
        .all(|s| *s == ItemState::Ok));

    w1.stop(Graceful::Finish);
    w2.stop(Graceful::Finish);
    w1.wait().await.expect("stop");
    w2.wait().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpus_leave_and_return_while_items_flow_and_every_item_ends_once() {
    let d = daemon();
    let c = d.client().await;
    let worker = ExampleWorker::start(&d, "cache:1", "hot", &["--sleep-ms", "2"]);
    let group: BTreeSet<u32> = [2, 3, 10, 11].into();
    // The live CPUs of every epoch, as WatchTopology reports them.
    let live_by_epoch: Arc<Mutex<BTreeMap<u64, BTreeSet<u32>>>> = Arc::default();
    let mut watch = c.watch_topology().await.expect("watch");
    let first = watch.next().await.expect("a snapshot").expect("snapshot");
    live_by_epoch
        .lock()
        .unwrap()
        .insert(first.epoch, parse_cpulist(&first.live));
    let recorder = {
        let map = Arc::clone(&live_by_epoch);
        tokio::spawn(async move {
            while let Some(Ok(t)) = watch.next().await {
                map.lock().unwrap().insert(t.epoch, parse_cpulist(&t.live));
            }
        })
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let submitter = {
        let c = c.clone();
        tokio::spawn(async move {
            let mut all = Vec::new();
            for round in 0..30u32 {
                let r = c
                    .submit(Batch::new().items((0..20).map(|i| {
                        Item::new("cache:1", "checksum")
                            .payload(format!("{round}-{i}").into_bytes())
                    })))
                    .await
                    .expect("submit");
                all.extend(ids(&r));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = tx.send(all);
        })
    };
    // CPUs 3 and 11 leave and return three times while the batches flow (2 and 10 stay).
    for _ in 0..3 {
        for cpu in [3, 11] {
            d.fixture().set_offline(cpu);
            tokio::time::sleep(Duration::from_millis(120)).await;
            d.fixture().set_online(cpu);
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
    }
    submitter.await.expect("submitter");
    let all = rx.recv().await.expect("ids");
    assert_eq!(all.len(), 600);
    let (results, summary) = c
        .clone()
        .with_timeout(Some(LONG))
        .flush_all(FlushScope::Items(all.clone()))
        .await
        .expect("flush");
    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    for x in &results {
        *seen.entry(x.item_id).or_default() += 1;
    }
    let lost = all.iter().filter(|id| !seen.contains_key(id)).count();
    let duplicated = seen.values().filter(|&&n| n > 1).count();
    let stuck = results
        .iter()
        .filter(|x| matches!(x.state(), ItemState::Pending | ItemState::Running))
        .count();
    assert_eq!((lost, duplicated, stuck), (0, 0, 0), "{summary:?}");
    assert_eq!(summary.counts.expect("counts").ok, 600, "{results:?}");
    // Ran once each at the worker (a hand-back is not a run).
    let mut ran: BTreeMap<u64, usize> = BTreeMap::new();
    for id in worker.items_at_least(600) {
        *ran.entry(id).or_default() += 1;
    }
    assert_eq!(ran.len(), 600);
    assert!(ran.values().all(|&n| n == 1));
    // Started only on the group's CPUs, each live in the epoch the daemon chose it from (the
    // daemon's own view: it sees a fixture change at its next 50 ms rescan).
    let epochs = live_by_epoch.lock().unwrap().clone();
    let mut checked = 0;
    for x in &results {
        let cpu = x.cpu_started.expect("started");
        assert!(group.contains(&cpu), "{x:?}");
        if let Some(live) = epochs.get(&x.topology_epoch) {
            assert!(
                live.contains(&cpu),
                "item started on cpu {cpu}, not live in epoch {}: {x:?}",
                x.topology_epoch
            );
            checked += 1;
        }
    }
    assert!(
        checked > 500,
        "most epochs were seen by the watcher: {checked}"
    );
    // The premise: the daemon saw the CPUs go and come back (6 changes each way), and the
    // toggled CPUs did take items between their absences.
    let epoch = c.topology().await.expect("topology").epoch;
    assert!(epoch >= 7, "the daemon saw the toggles: epoch {epoch}");
    let on_toggled = results
        .iter()
        .filter(|x| matches!(x.cpu_started, Some(3 | 11)))
        .count();
    assert!(on_toggled > 0, "items also ran on CPUs 3 and 11");
    recorder.abort();
    assert_eq!(worker.term(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_fails_held_items_or_requeues_them_for_the_next_worker() {
    let d = daemon();
    let c = d.client().await;
    c.create_workqueue(proto::WorkqueueAttrs {
        on_worker_lost: proto::WorkerLostPolicy::Requeue as i32,
        ..wq_attrs("rq")
    })
    .await
    .expect("create rq");

    // on_worker_lost = fail (default): the held item fails "worker lost".
    let mut p1 = ExampleWorker::start(&d, "cpus:2", "p1", &["--sleep-ms", "20000"]);
    let r = c
        .submit(Batch::new().item(Item::new("cpu:2", "checksum")))
        .await
        .expect("submit");
    let x = ids(&r);
    wait_states(&c, &x, ItemState::Running, LONG).await;
    p1.kill9();
    let res = flush(&c, r.batch_id).await;
    assert_eq!(res[0].state(), ItemState::Failed, "{:?}", res[0]);
    assert!(res[0].error.contains("worker lost"), "{:?}", res[0]);
    assert_eq!(res[0].worker_pid, p1.pid());
    wait_detached(&c, p1.worker_id).await;

    // requeue: the item goes back to the queue and a second worker runs it.
    let mut p2 = ExampleWorker::start(&d, "cpus:2", "p2", &["--sleep-ms", "20000"]);
    let r = c
        .submit(
            Batch::new()
                .workqueue("rq")
                .item(Item::new("cpu:2", "checksum").payload(b"again".to_vec())),
        )
        .await
        .expect("submit");
    let y = ids(&r);
    wait_states(&c, &y, ItemState::Running, LONG).await;
    p2.kill9();
    wait_states(&c, &y, ItemState::Pending, LONG).await;
    let p3 = ExampleWorker::start(&d, "cpus:2", "p3", &[]);
    let res = flush(&c, r.batch_id).await;
    let x = &res[0];
    assert_eq!(x.state(), ItemState::Ok, "{x:?}");
    assert_eq!(x.worker_lost, 1, "{x:?}");
    assert_eq!((x.worker_pid, x.worker_id), (p3.pid(), p3.worker_id));
    assert_eq!(x.output, digest(b"again").into_bytes());
    assert!(p3.printed(&format!("item {} cpu 2 slot 0 attempt 1 ", x.item_id)));
    assert_eq!(p3.term(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_worker_holds_back_only_itself() {
    let d = daemon();
    let c = d.client().await;
    let w = Worker::builder(&c)
        .cpus([2])
        .prefetch(64) // clamped to the daemon's max_credits (2 here)
        .handler("rec", |_: &WorkItem| {
            std::thread::sleep(Duration::from_millis(50));
            Ok(Vec::new())
        })
        .spawn()
        .expect("attach");
    assert_eq!(w.info().expect("info").max_credits, 2);
    let r = c
        .submit(Batch::new().items((0..20).map(|_| Item::new("cpu:2", "rec"))))
        .await
        .expect("submit");
    // Meanwhile built-in items elsewhere run at once.
    let t0 = Instant::now();
    let other = c
        .submit(
            Batch::new()
                .items((0..20).map(|_| Item::new("cpu:5", "noop")))
                .wait(true),
        )
        .await
        .expect("noops");
    assert!(other.results.iter().all(|x| x.state() == ItemState::Ok));
    assert!(t0.elapsed() < Duration::from_secs(5));
    // While it works through them: never more in flight than its credits; the rest pending.
    let mut max_in_flight = 0;
    let mut saw_pending = false;
    let end = Instant::now() + LONG;
    loop {
        let list = workers(&c).await;
        let s = &list[0].slots[0];
        assert!(s.in_flight + s.credits <= 2, "{s:?}");
        max_in_flight = max_in_flight.max(s.in_flight);
        let st = wqd_e2e::states(&c, &ids(&r)).await;
        let pending = st.iter().filter(|s| **s == ItemState::Pending).count();
        saw_pending |= pending > 10;
        if st.iter().all(|s| *s == ItemState::Ok) {
            break;
        }
        assert!(Instant::now() < end, "items did not finish");
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    assert!((1..=2).contains(&max_in_flight), "{max_in_flight}");
    assert!(saw_pending, "items wait in the daemon, not at the worker");
    w.stop(Graceful::HandBack);
    assert_eq!(w.wait().await.expect("stop").ok, 20);
}

/// A raw session (generated stub) whose first message is `first`; `Err` when the daemon
/// refuses the call itself.
async fn raw(
    d: &Daemon,
    first: worker_message::Msg,
) -> Result<
    (
        mpsc::Sender<proto::WorkerMessage>,
        tonic::Streaming<proto::DaemonMessage>,
    ),
    tonic::Status,
> {
    let c = d.client().await;
    let (tx, rx) = mpsc::channel(16);
    tx.send(proto::WorkerMessage { msg: Some(first) })
        .await
        .expect("queue");
    match c.attach(ReceiverStream::new(rx)).await {
        Ok(s) => Ok((tx, s)),
        Err(e) => Err(e.status().cloned().expect("a status")),
    }
}

async fn next(
    s: &mut tonic::Streaming<proto::DaemonMessage>,
) -> Result<daemon_message::Msg, tonic::Status> {
    match tokio::time::timeout(LONG, s.next()).await {
        Ok(Some(Ok(m))) => Ok(m.msg.expect("body")),
        Ok(Some(Err(st))) => Err(st),
        Ok(None) => Err(tonic::Status::ok("ended")),
        Err(_) => panic!("nothing from the daemon within {LONG:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_session_is_cut_off_alone() {
    let d = daemon();
    let c = d.client().await;
    let good = ExampleWorker::start(&d, "cache:1", "good", &[]);
    let wm = |m: worker_message::Msg| proto::WorkerMessage { msg: Some(m) };

    // No Hello: OpenSlot first. Refused as the call's status or as the stream's first.
    let e = match raw(
        &d,
        worker_message::Msg::OpenSlot(proto::OpenSlot { slot: 0, cpu: 4 }),
    )
    .await
    {
        Err(e) => e,
        Ok((_tx, mut s)) => next(&mut s).await.expect_err("refused"),
    };
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    // Holds an item, then answers one it was not given, and credits an unopened slot.
    let hello = worker_message::Msg::Hello(proto::Hello {
        handlers: vec!["checksum".into()],
        pid: std::process::id(),
        name: "hostile".into(),
    });
    let (tx, mut s) = raw(&d, hello).await.expect("attach");
    assert!(matches!(
        next(&mut s).await,
        Ok(daemon_message::Msg::Welcome(_))
    ));
    tx.send(wm(worker_message::Msg::OpenSlot(proto::OpenSlot {
        slot: 0,
        cpu: 4,
    })))
    .await
    .expect("send");
    tx.send(wm(worker_message::Msg::Credit(proto::Credit {
        slot: 0,
        credits: 1,
    })))
    .await
    .expect("send");
    let r = c
        .submit(
            Batch::new()
                .item(Item::new("cpu:4", "checksum"))
                .items((0..10).map(|_| Item::new("cache:1", "checksum"))),
        )
        .await
        .expect("submit");
    let held = match next(&mut s).await {
        Ok(daemon_message::Msg::Work(w)) => w,
        other => panic!("expected Work, got {other:?}"),
    };
    assert_eq!(held.item_id, r.items[0].item_id);
    tx.send(wm(worker_message::Msg::Done(proto::Done {
        item_id: held.item_id + 1_000_000,
        outcome: Some(proto::done::Outcome::Ok(vec![])),
        cpu_finished: None,
        credits: 0,
    })))
    .await
    .expect("send");
    let e = next(&mut s).await.expect_err("cut off");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("not hold"), "{e:?}");

    // Its held item is lost per policy (fail); the good worker's items are untouched.
    let res = flush(&c, r.batch_id).await;
    let by: HashMap<u64, &ItemResult> = res.iter().map(|x| (x.item_id, x)).collect();
    let lost = by[&held.item_id];
    assert_eq!(lost.state(), ItemState::Failed);
    assert!(lost.error.contains("worker lost"), "{lost:?}");
    for it in &r.items[1..] {
        let x = by[&it.item_id];
        assert_eq!(x.state(), ItemState::Ok, "{x:?}");
        assert_eq!(x.worker_id, good.worker_id);
    }

    // Credit for a slot never opened.
    let hello = worker_message::Msg::Hello(proto::Hello {
        handlers: vec!["checksum".into()],
        pid: std::process::id(),
        name: "hostile2".into(),
    });
    let (tx, mut s) = raw(&d, hello).await.expect("attach");
    assert!(matches!(
        next(&mut s).await,
        Ok(daemon_message::Msg::Welcome(_))
    ));
    tx.send(wm(worker_message::Msg::Credit(proto::Credit {
        slot: 9,
        credits: 1,
    })))
    .await
    .expect("send");
    let e = next(&mut s).await.expect_err("cut off");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let list = workers(&c).await;
    assert_eq!(list.len(), 1, "only the good worker is left: {list:?}");
    assert_eq!(good.term(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_a_running_remote_item() {
    let d = daemon();
    let c = d.client().await;
    let w = Worker::builder(&c)
        .cpus([2])
        .handler("wait", |i: &WorkItem| {
            if i.wait_cancelled(Duration::from_secs(30)) {
                Err("stopped on cancel".into())
            } else {
                Ok(Vec::new())
            }
        })
        .spawn()
        .expect("attach");
    let r = c
        .submit(Batch::new().item(Item::new("cpu:2", "wait")))
        .await
        .expect("submit");
    let x = ids(&r);
    wait_states(&c, &x, ItemState::Running, LONG).await;
    let t0 = Instant::now();
    c.clone()
        .with_timeout(Some(LONG))
        .cancel(CancelScope::Items(x.clone()))
        .await
        .expect("cancel");
    let res = flush(&c, r.batch_id).await;
    assert_eq!(res[0].state(), ItemState::Cancelled, "{:?}", res[0]);
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "the handler saw the flag"
    );
    w.stop(Graceful::Finish);
    let rep = w.wait().await.expect("stop");
    assert_eq!(rep.cancelled, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unserved_reject_and_a_builtin_name_cannot_be_shadowed() {
    let d = daemon();
    let c = d.client().await;
    c.create_workqueue(proto::WorkqueueAttrs {
        unserved: proto::UnservedPolicy::Reject as i32,
        ..wq_attrs("strict")
    })
    .await
    .expect("create");
    let r = c
        .submit(
            Batch::new()
                .workqueue("strict")
                .item(Item::new("cpu:2", "ghost")),
        )
        .await
        .expect("submit");
    let res = flush(&c, r.batch_id).await;
    assert_eq!(res[0].state(), ItemState::Rejected, "{:?}", res[0]);
    // On the default (wait) workqueue it waits for a worker, then runs.
    let r = c
        .submit(Batch::new().item(Item::new("cpu:2", "ghost")))
        .await
        .expect("submit");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        wqd_e2e::states(&c, &ids(&r)).await,
        vec![ItemState::Pending]
    );
    let w = Worker::builder(&c)
        .cpus([2])
        .handler("ghost", |_: &WorkItem| Ok(b"boo".to_vec()))
        .spawn()
        .expect("attach");
    let res = flush(&c, r.batch_id).await;
    assert_eq!(res[0].output, b"boo");
    w.stop(Graceful::HandBack);
    w.wait().await.expect("stop");

    // A built-in name is refused at Hello.
    let e = Worker::builder(&c)
        .cpus([2])
        .handler("noop", |_: &WorkItem| Ok(Vec::new()))
        .start()
        .await
        .expect_err("noop is built in");
    assert!(matches!(e, WorkerError::Ended(_)), "{e:?}");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
}

/// A worker on CPU 2 whose `rec` handler takes `ms` and records the ids it started (first
/// vector) and ran (second).
fn slow_worker(c: &Client, ms: u64, ran: &Arc<Mutex<(Vec<u64>, Vec<u64>)>>) -> WorkerHandle {
    let ran = Arc::clone(ran);
    Worker::builder(c)
        .cpus([2])
        .prefetch(2)
        .handler("rec", move |i: &WorkItem| {
            ran.lock().unwrap().0.push(i.id);
            std::thread::sleep(Duration::from_millis(ms));
            ran.lock().unwrap().1.push(i.id);
            Ok(Vec::new())
        })
        .spawn()
        .expect("attach")
}

/// Waits until `ran` records `n` started items.
async fn wait_started(ran: &Arc<Mutex<(Vec<u64>, Vec<u64>)>>, n: usize) {
    wait_for(&format!("{n} items started"), LONG, || async {
        (ran.lock().unwrap().0.len() >= n).then_some(())
    })
    .await
}

/// Waits until worker `id`'s slot holds `n` items.
async fn wait_in_flight(c: &Client, id: u64, n: u32) {
    wait_for(&format!("worker {id} to hold {n} items"), LONG, || async {
        workers(c)
            .await
            .iter()
            .find(|w| w.worker_id == id)
            .is_some_and(|w| w.slots.iter().map(|s| s.in_flight).sum::<u32>() == n)
            .then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stops_finish_or_hand_back_what_a_worker_holds() {
    let d = daemon();
    let c = d.client().await;
    let ran: Arc<Mutex<(Vec<u64>, Vec<u64>)>> = Arc::default();
    // max_active 2: a CPU may run two items of the workqueue, so a slot with 2 credits holds
    // two (with the default 1, the daemon sends a CPU's slots one item at a time).
    c.create_workqueue(proto::WorkqueueAttrs {
        max_active: 2,
        ..wq_attrs("two")
    })
    .await
    .expect("create");

    // HandBack: the running item finishes, the one waiting at the worker goes back to the
    // daemon ("stopping") and a second worker runs it; nothing is lost or run twice.
    let w1 = slow_worker(&c, 400, &ran);
    let r = c
        .submit(
            Batch::new()
                .workqueue("two")
                .items((0..4).map(|_| Item::new("cpu:2", "rec"))),
        )
        .await
        .expect("submit");
    wait_in_flight(&c, w1.worker_id(), 2).await;
    wait_started(&ran, 1).await;
    w1.stop(Graceful::HandBack);
    let rep = w1.wait().await.expect("a graceful stop ends Ok");
    assert_eq!((rep.ok, rep.handed_back), (1, 1), "{rep:?}");
    let st = wqd_e2e::states(&c, &ids(&r)).await;
    assert_eq!(
        st.iter().filter(|s| **s == ItemState::Pending).count(),
        3,
        "the handed-back item waits in the daemon again: {st:?}"
    );
    let w2 = slow_worker(&c, 10, &ran);
    let res = flush(&c, r.batch_id).await;
    assert!(res.iter().all(|x| x.state() == ItemState::Ok), "{res:?}");
    let handed = res.iter().filter(|x| x.rebinds > 0).count();
    assert_eq!(handed, 1, "the handed-back item counts a re-bind: {res:?}");
    assert_eq!(
        res.iter().filter(|x| x.worker_id == w2.worker_id()).count(),
        3
    );

    // Finish: both items the worker holds run before it detaches (w2 gone first, so w3 is
    // the only taker).
    w2.stop(Graceful::HandBack);
    w2.wait().await.expect("stop");
    let r = c
        .submit(
            Batch::new()
                .workqueue("two")
                .items((0..2).map(|_| Item::new("cpu:2", "rec"))),
        )
        .await
        .expect("submit");
    let w3 = slow_worker(&c, 300, &ran);
    wait_in_flight(&c, w3.worker_id(), 2).await;
    w3.stop(Graceful::Finish);
    let rep = w3.wait().await.expect("stop");
    assert_eq!((rep.ok, rep.handed_back), (2, 0), "{rep:?}");
    let res = flush(&c, r.batch_id).await;
    assert!(res
        .iter()
        .all(|x| x.state() == ItemState::Ok && x.worker_id == rep.worker_id));
    let mut all = ran.lock().unwrap().1.clone();
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!((n, all.len()), (6, 6), "each item ran once");
    assert!(workers(&c).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_stops_ends_workers_with_an_error_and_no_reconnect() {
    let mut d = daemon();
    let c = d.client().await;
    let mut p = ExampleWorker::start(&d, "cpus:2", "lost", &[]);
    let w = Worker::builder(&c)
        .cpus([3])
        .handler("rec", |_: &WorkItem| Ok(Vec::new()))
        .spawn()
        .expect("attach");
    d.stop();
    let e = tokio::time::timeout(LONG, w.wait())
        .await
        .expect("join returns")
        .expect_err("a lost session is an error");
    assert!(matches!(e, WorkerError::Ended(_)), "{e:?}");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    // The example exits 1 on its own (no reconnect, no signal needed).
    let end = Instant::now() + LONG;
    let code = loop {
        if let Ok(Some(s)) = p.child.try_wait() {
            break s.code();
        }
        assert!(Instant::now() < end, "the example did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(code, Some(1));
    assert!(p.stderr.lock().unwrap().contains("worker session ended"));
}
