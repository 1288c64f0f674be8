//! The daemon in-process on a temporary Unix socket over the `two-socket` fixture, driven
//! through `wqd-client`: every RPC round-trips and the error statuses name what was wrong.
//! Then the real binary: readiness line, refusal of a second instance, SIGTERM, exit codes.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::fixture;
use tokio_stream::StreamExt;
use tonic::Code;
use wqd::config::{Config, WorkqueueEntry};
use wqd::daemon::Daemon;
use wqd_client::proto as v1;
use wqd_client::{Batch, CancelScope, Client, Endpoint, FlushScope, Item};

fn config(dir: &Path) -> Config {
    let mut c = support::config(dir, &fixture("two-socket"));
    c.limits.max_batch_items = 50_000;
    c.limits.max_payload_bytes = 64;
    c.workqueues.push(WorkqueueEntry {
        max_queued: Some(2),
        ..support::workqueue("tiny")
    });
    c
}

async fn connect(d: &Daemon) -> Client {
    Client::connect(Endpoint::unix(d.socket_path()))
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_round_trips_over_the_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(config(dir.path())).await.expect("start");
    let c = connect(&d).await;

    // Topology: every CPU with its indexes, groups with live members.
    let t = c.topology().await.unwrap();
    assert_eq!(t.epoch, 1);
    assert_eq!(t.cpus.len(), 16);
    assert_eq!(t.possible, "0-15");
    assert_eq!(t.allowed_source, "sysfs-root");
    let cache1 = t.groups.iter().find(|g| g.target == "cache:1").unwrap();
    assert_eq!(cache1.level, v1::GroupLevel::Cache as i32);
    assert!(!cache1.live_members.is_empty());
    let mut watch = c.watch_topology().await.unwrap();
    assert_eq!(watch.next().await.unwrap().unwrap().epoch, 1);
    drop(watch);

    // Submit with wait: results in order, on CPUs of the group.
    let r = c
        .submit(
            Batch::new()
                .items((0..16).map(|_| Item::new("cache:1", "noop")))
                .wait(true),
        )
        .await
        .unwrap();
    assert_eq!(r.items.len(), 16);
    assert_eq!(r.results.len(), 16);
    let members = wqd_core::CpuSet::parse_list(&cache1.members).unwrap();
    for (rec, res) in r.items.iter().zip(&r.results) {
        assert_eq!(rec.item_id, res.item_id);
        assert_eq!(res.state, v1::ItemState::Ok as i32);
        assert!(members.contains(res.cpu_started.unwrap()));
        assert_eq!(res.target, "cache:1");
        assert!(res.topology_epoch >= 1);
    }

    // Refused batches: nothing is queued, and the message names index and field / limit.
    let before = c.stats().await.unwrap();
    let bad = |b: Batch| {
        let c = c.clone();
        async move { c.submit(b).await.unwrap_err() }
    };
    let e = bad(Batch::new()
        .item(Item::new("all", "noop"))
        .item(Item::new("cash:1", "noop")))
    .await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("items[1].target: "),
        "{}",
        e.message()
    );
    let e = bad(Batch::new().item(Item::new("all", "nope"))).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("items[0].handler: unknown handler"));
    let e = bad(Batch::new().item(Item::new("all", "sleep").arg("ms", "x"))).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("items[0]."), "{}", e.message());
    let e = bad(Batch::new().item(Item::new("all", "digest").payload(vec![0u8; 65]))).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("limits.max_payload_bytes"),
        "{}",
        e.message()
    );
    let e = bad(Batch::new()
        .workqueue("nope")
        .item(Item::new("all", "noop")))
    .await;
    assert_eq!(e.code(), Code::NotFound);
    let e = bad(Batch::new().items((0..50_001).map(|_| Item::new("all", "noop")))).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("limits.max_batch_items = 50000"),
        "{}",
        e.message()
    );
    let e = bad(Batch::new()
        .workqueue("tiny")
        .items((0..3).map(|_| Item::new("all", "noop"))))
    .await;
    assert_eq!(e.code(), Code::ResourceExhausted);
    let after = c.stats().await.unwrap();
    assert_eq!(after.batches_refused, before.batches_refused + 7);
    assert_eq!(
        after.items.unwrap().ok,
        before.items.unwrap().ok,
        "nothing of a refused batch ran"
    );

    // SubmitStream in several chunks, then a streamed flush of every result.
    let n = 20_000u64;
    let c64 = c.clone().with_chunk_bytes(64 * 1024);
    let s = c64
        .submit_stream("", (0..n).map(|_| Item::new("node:0", "noop")))
        .await
        .unwrap();
    assert_eq!(s.item_count, n);
    assert_eq!(s.queued_count, n);
    let (results, summary) = c.flush_all(FlushScope::Batch(s.batch_id)).await.unwrap();
    assert_eq!(results.len() as u64, n);
    assert_eq!(summary.items_covered, n);
    assert_eq!(summary.counts.unwrap().ok, n);
    let mut ids: Vec<u64> = results.iter().map(|r| r.item_id).collect();
    ids.sort_unstable();
    assert_eq!(ids.first(), Some(&s.first_item_id));
    assert_eq!(ids.last(), Some(&(s.first_item_id + n - 1)));

    // A streamed batch with a bad item is refused whole, with its global index.
    let e = c64
        .submit_stream(
            "",
            (0..10_000u64).map(|i| Item::new(if i == 9_999 { "bogus:" } else { "all" }, "noop")),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("items[9999].target"),
        "{}",
        e.message()
    );

    // Flush past the client deadline: DEADLINE_EXCEEDED, and the work goes on.
    let slow = c
        .submit(Batch::new().item(Item::new("cpu:3", "sleep").arg("ms", "600")))
        .await
        .unwrap();
    let id = slow.items[0].item_id;
    let short = c.clone().with_timeout(Some(Duration::from_millis(150)));
    let mut st = short
        .flush(FlushScope::Items(vec![id]), false)
        .await
        .unwrap();
    let mut got = None;
    while let Some(ev) = st.next().await {
        if let Err(e) = ev {
            got = Some(e.code());
            break;
        }
    }
    assert_eq!(got, Some(Code::DeadlineExceeded));
    let look = c.results([id, 999_999_999]).await.unwrap();
    let state = look.items[0].result.as_ref().unwrap().state;
    assert!(
        state == v1::ItemState::Running as i32 || state == v1::ItemState::Pending as i32,
        "still going: {state}"
    );
    assert_eq!(look.items[1].status, v1::LookupStatus::Unknown as i32);
    let (res, _) = c.flush_all(FlushScope::Items(vec![id])).await.unwrap();
    assert_eq!(res[0].state, v1::ItemState::Ok as i32);

    // Cancel: pending ones never run, running ones are waited for.
    let b = c
        .submit(Batch::new().items((0..4).map(|_| Item::new("cpu:5", "spin").arg("ms", "300"))))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cr = c.cancel(CancelScope::Batch(b.batch_id)).await.unwrap();
    assert_eq!(cr.items.len(), 4);
    let pending = cr
        .items
        .iter()
        .filter(|i| i.outcome == v1::CancelOutcome::CancelledPending as i32)
        .count();
    assert!(pending >= 2, "{cr:?}");
    for i in &cr.items {
        assert_ne!(i.state, v1::ItemState::Running as i32);
        assert_ne!(i.state, v1::ItemState::Pending as i32);
    }
    let e = c.cancel(CancelScope::Batch(987_654)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Flush scopes: unknown ids are reported, unknown batch is NOT_FOUND.
    let (_, s) = c
        .flush_all(FlushScope::Items(vec![1, 424_242]))
        .await
        .unwrap();
    assert_eq!(s.unknown_item_ids, vec![424_242]);
    let e = c
        .flush(FlushScope::Batch(424_242), false)
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Code::NotFound);

    // Workqueues: create, list, update, drain, delete.
    let a = c
        .create_workqueue(v1::WorkqueueAttrs {
            name: "w1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(a.max_active, 1);
    let e = c
        .create_workqueue(v1::WorkqueueAttrs {
            name: "w1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    let a = c
        .update_workqueue(v1::UpdateWorkqueueRequest {
            name: "w1".into(),
            max_active: Some(2),
            placement: Some(v1::Placement::LeastLoaded as i32),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(a.max_active, 2);
    let e = c
        .update_workqueue(v1::UpdateWorkqueueRequest {
            name: "w1".into(),
            nice: Some(99),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let list = c.list_workqueues(None).await.unwrap();
    let names: Vec<_> = list
        .iter()
        .map(|w| w.attrs.as_ref().unwrap().name.clone())
        .collect();
    assert_eq!(names, vec!["default", "tiny", "w1"]);
    c.submit(
        Batch::new()
            .workqueue("w1")
            .items((0..3).map(|_| Item::new("all", "sleep").arg("ms", "50"))),
    )
    .await
    .unwrap();
    let dr = c.drain("w1").await.unwrap();
    assert_eq!(dr.counts.unwrap().ok, 3);
    let del = c.delete_workqueue("w1", false).await.unwrap();
    assert!(del.counts.is_some());
    assert_eq!(
        c.list_workqueues(Some("w1".into()))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        c.delete_workqueue("default", false)
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );

    let st = c.stats().await.unwrap();
    assert!(st.handlers.contains(&"noop".to_string()));
    assert_eq!(st.workqueues, 2);

    let path = d.socket_path().to_path_buf();
    d.shutdown().await;
    assert!(!path.exists(), "socket file removed");
}

fn wqd_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wqd"))
}

/// Starts the binary and waits for its readiness line; returns the child.
fn start_bin(sock: &Path, extra: &[&str]) -> std::process::Child {
    use std::io::{BufRead, BufReader};
    let mut child = wqd_bin()
        .arg("--socket")
        .arg(sock)
        .arg("--sysfs-root")
        .arg(fixture("vm8-offline"))
        .args(["--no-netlink", "--log-level", "warn"])
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wqd");
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let want = format!("wqd: listening on unix:{}", sock.display());
    loop {
        match lines.next() {
            Some(Ok(l)) if l == want => break,
            Some(Ok(_)) => continue,
            other => panic!("wqd exited before listening: {other:?}"),
        }
    }
    // Keep draining stderr so the daemon never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    child
}

#[test]
fn the_binary_refuses_a_second_instance_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("run/wqd.sock");
    let mut first = start_bin(&sock, &[]);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o660);

    let out = wqd_bin()
        .arg("--socket")
        .arg(&sock)
        .arg("--sysfs-root")
        .arg(fixture("vm8-offline"))
        .arg("--no-netlink")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another wqd is already listening"), "{err}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let st = first.wait().unwrap();
    assert_eq!(st.code(), Some(0));
    assert!(!sock.exists());

    // A stale socket file (no daemon behind it) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let mut again = start_bin(&sock, &[]);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(again.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    assert_eq!(again.wait().unwrap().code(), Some(0));
}

#[test]
fn bad_flags_and_config_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("wqd.sock");
    let run = |args: &[&str]| {
        wqd_bin()
            .arg("--socket")
            .arg(&sock)
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["--tcp-listen", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-remote"));
    let out = run(&["--pinning", "sometimes"]);
    assert_eq!(out.status.code(), Some(64));
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[limits]\nmax_batch_items = 0\n").unwrap();
    let out = run(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("limits.max_batch_items"));
    let out = run(&["--sysfs-root", "/nonexistent/sys", "--no-netlink"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the CPU topology"));
    assert!(!sock.exists(), "a failed start leaves no socket file");
    let out = run(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--sysfs-root"));
}

/// `Submit(wait)` with full results encodes each result from the record the engine kept for
/// the waiter (no `ItemResult` made): every result in the response is, byte for byte, the
/// one `GetResults` reads from the store. A batch of several targets and handlers, with
/// output, errors and copies sharing one body. Fails if the waiter's copy or its encoding
/// loses or changes a field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_results_are_the_stored_ones() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(config(dir.path())).await.expect("start");
    let c = connect(&d).await;
    let batch = Batch::new()
        .item(Item::new("cache:1", "digest").payload(b"hello".to_vec()))
        .item(Item::new("cpus:2-3", "noop").arg("fail", "on purpose"))
        .item(Item::new("all", "sleep").arg("ms", "1"))
        .items((0..50).map(|_| Item::new("node:0", "noop")))
        .wait(true);
    let r = c.submit(batch).await.unwrap();
    assert_eq!(r.results.len(), 53);
    let looked = c.results(r.items.iter().map(|i| i.item_id)).await.unwrap();
    for (res, look) in r.results.iter().zip(&looked.items) {
        assert_eq!(look.status, v1::LookupStatus::Found as i32, "{look:?}");
        assert_eq!(Some(res), look.result.as_ref(), "item {}", res.item_id);
    }
    assert!(!r.results[0].output.is_empty(), "digest output");
    assert_eq!(r.results[1].error, "on purpose");
    assert_eq!(r.results[1].state, v1::ItemState::Failed as i32);
    assert_eq!(r.results[2].handler, "sleep");
    assert!(r.results[3..]
        .iter()
        .all(|x| x.target == "node:0" && x.workqueue == "default"));
    d.shutdown().await;
}
