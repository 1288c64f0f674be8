//! The daemon as a process: one instance per live socket, stale sockets replaced, the socket's
//! mode, client deadlines, clients that go away mid-flush, a clean SIGTERM exit after all of
//! that, and how many threads serve the API.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::{Duration, Instant};

use tokio_stream::StreamExt;
use wqd_client::proto::{self, FallbackPolicy, ItemState};
use wqd_client::{Batch, CancelScope, Client, FlushScope, Item};
use wqd_e2e::{stats, wait_for, wait_states, wq_attrs, Daemon};

const LONG: Duration = Duration::from_secs(30);

async fn settled(c: &Client) {
    wait_for("nothing pending or running in GetStats", LONG, || async {
        let s = stats(c).await.items.unwrap();
        (s.pending == 0 && s.running == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_on_a_live_socket_refuses_to_start() {
    let first = Daemon::start("two-socket");
    let c = first.client().await;
    let meta = std::fs::metadata(first.socket()).expect("socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o660,
        "the socket gets mode 0660"
    );

    let t0 = Instant::now();
    let second = Daemon::builder("two-socket")
        .socket(first.socket())
        .try_start();
    let e = match second {
        Ok(_) => panic!("a second daemon started on a live socket"),
        Err(e) => e,
    };
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "refusing took {:?}",
        t0.elapsed()
    );
    assert!(!e.status.success(), "exit status {}", e.status);
    let msg = e.stderr.to_lowercase();
    assert!(
        e.stderr.contains(&first.socket().display().to_string()),
        "the message names the socket: {}",
        e.stderr
    );
    assert!(
        ["already", "in use", "another", "running"]
            .iter()
            .any(|w| msg.contains(w)),
        "the message says a daemon is already there: {}",
        e.stderr
    );
    // The first daemon is untouched: its socket is still there and a new connection works.
    assert!(std::fs::metadata(first.socket())
        .expect("socket still exists")
        .file_type()
        .is_socket());
    let c2 = first.client().await;
    c2.submit(Batch::new().item(Item::new("cpu:0", "noop")).wait(true))
        .await
        .expect("the first daemon still serves new connections");
    c.stats().await.expect("and old ones");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stale.sock");
    // A socket file nobody listens on, as a crashed daemon leaves behind.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(std::os::unix::net::UnixStream::connect(&path).is_err());
    let d = Daemon::builder("two-socket").socket(&path).start();
    let c = d.client().await;
    let r = c
        .submit(Batch::new().item(Item::new("cpu:1", "noop")).wait(true))
        .await
        .expect("the daemon serves on the replaced socket");
    assert_eq!(r.results[0].state(), ItemState::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_flush_leaves_nothing_behind() {
    let mut d = Daemon::start("two-socket");
    let c = d.client().await;
    c.create_workqueue(proto::WorkqueueAttrs {
        fallback: FallbackPolicy::Wait as i32,
        ..wq_attrs("held")
    })
    .await
    .expect("create");
    let r = c
        .submit(
            Batch::new()
                .items((0..8).map(|i| Item::new(format!("cpu:{i}"), "sleep").arg("ms", "800"))),
        )
        .await
        .expect("Submit");
    let ids: Vec<u64> = r.items.iter().map(|x| x.item_id).collect();
    // Items that can never run until cancelled: cpu:14 is isolated, fallback wait.
    let held = c
        .submit(
            Batch::new()
                .workqueue("held")
                .items((0..3).map(|_| Item::new("cpu:14", "noop"))),
        )
        .await
        .expect("Submit held");

    // Separate connections flush and go away: one mid-stream, one before any result.
    for scope in [
        FlushScope::Batch(r.batch_id),
        FlushScope::Workqueue("default".into()),
        FlushScope::Batch(held.batch_id),
    ] {
        let other = d.client().await;
        let mut s = other.flush(scope.clone(), false).await.expect("Flush");
        if scope == FlushScope::Batch(r.batch_id) {
            // Read one result group, then vanish.
            let first = tokio::time::timeout(LONG, s.next())
                .await
                .expect("a first result group")
                .expect("stream open")
                .expect("event");
            assert!(matches!(first, wqd_client::FlushEvent::Results(_)));
        }
        drop(s);
        drop(other);
    }

    // The work still finishes.
    wait_states(&c, &ids, ItemState::Ok, LONG).await;
    // The held items are still pending (no flush touched them) and can be cancelled.
    let out = c
        .cancel(CancelScope::Batch(held.batch_id))
        .await
        .expect("Cancel");
    assert!(out.items.iter().all(|i| i.state() == ItemState::Cancelled));
    settled(&c).await;
    // A new flush of the same batch answers at once with everything.
    let (res, sm) = c
        .clone()
        .with_timeout(Some(Duration::from_secs(5)))
        .flush_all(FlushScope::Batch(r.batch_id))
        .await
        .expect("Flush again");
    assert_eq!((res.len(), sm.counts.unwrap().ok), (8, 8));

    // Nothing is left holding the daemon: it exits promptly and cleanly on SIGTERM.
    drop(c);
    let t0 = Instant::now();
    let status = d.stop().expect("exit status");
    assert!(
        status.success(),
        "SIGTERM after abandoned flushes: {status}; stderr:\n{}",
        d.stderr()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "shutdown took {:?}",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_deadlines_end_the_wait_not_the_work() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;
    let short = c.clone().with_timeout(Some(Duration::from_millis(300)));

    // Submit with wait: DEADLINE_EXCEEDED, and the items stay queued and finish.
    let e = short
        .submit(
            Batch::new()
                .items((0..3).map(|_| Item::new("cpu:2", "sleep").arg("ms", "1200")))
                .wait(true),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e}");
    wait_for("the waited batch to finish anyway", LONG, || async {
        let s = stats(&c).await.items.unwrap();
        (s.ok == 3).then_some(())
    })
    .await;

    // Flush: the stream ends with DEADLINE_EXCEEDED; the work goes on.
    let r = c
        .submit(Batch::new().items((0..3).map(|_| Item::new("cpu:3", "sleep").arg("ms", "1200"))))
        .await
        .expect("Submit");
    let ids: Vec<u64> = r.items.iter().map(|x| x.item_id).collect();
    let t0 = Instant::now();
    let e = short
        .flush_all(FlushScope::Batch(r.batch_id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e}");
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert_ne!(
        wqd_e2e::states(&c, &ids).await,
        vec![ItemState::Cancelled; 3]
    );
    wait_states(&c, &ids, ItemState::Ok, LONG).await;
    settled(&c).await;
}

/// The daemon's threads named `wqd-rpc` (its runtime's workers, and blocking threads once a
/// request needed one).
fn rpc_threads(d: &Daemon) -> usize {
    let tasks = std::fs::read_dir(format!("/proc/{}/task", d.pid())).expect("/proc/PID/task");
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.trim_end() == "wqd-rpc")
        .count()
}

/// `--rpc-threads N` starts N threads serving the API; without it (nor `[listen]
/// rpc_threads`), one per four CPUs the daemon may run on, at least one; the config key does
/// the same, the flag wins over it, and a count out of range is refused at start (exit 64).
/// Counted right after start, before any request could have needed a blocking thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_threads_follow_the_flag_the_config_and_the_cpus() {
    let d = Daemon::builder("two-socket")
        .arg("--rpc-threads")
        .arg("3")
        .start();
    assert_eq!(rpc_threads(&d), 3, "--rpc-threads 3");
    drop(d);

    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let d = Daemon::start("two-socket");
    assert_eq!(rpc_threads(&d), (cpus / 4).max(1), "default, {cpus} CPUs");
    drop(d);

    let d = Daemon::builder("two-socket")
        .config("[listen]\nrpc_threads = 2\n")
        .start();
    assert_eq!(rpc_threads(&d), 2, "[listen] rpc_threads = 2");
    drop(d);
    let d = Daemon::builder("two-socket")
        .config("[listen]\nrpc_threads = 2\n")
        .arg("--rpc-threads")
        .arg("1")
        .start();
    assert_eq!(rpc_threads(&d), 1, "the flag wins over the file");
    let c = d.client().await;
    c.submit(Batch::new().item(Item::new("cpu:0", "noop")).wait(true))
        .await
        .expect("one RPC thread serves");
    drop(d);

    for bad in ["0", "257", "many"] {
        let e = match Daemon::builder("two-socket")
            .arg("--rpc-threads")
            .arg(bad)
            .try_start()
        {
            Ok(_) => panic!("--rpc-threads {bad} started"),
            Err(e) => e,
        };
        assert_eq!(
            e.status.code(),
            Some(64),
            "--rpc-threads {bad}: {}",
            e.stderr
        );
        assert!(e.stderr.contains("--rpc-threads"), "{}", e.stderr);
    }
}
