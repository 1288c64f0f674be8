//! A large batch's submit runs as a blocking call (`Rpc::blocking`): in place on the daemon's
//! multi-thread runtime, in the blocking pool on a current-thread one. Either way it must not
//! stall the daemon's other connections, and it must work on both flavours. Its own test
//! binary: it arms an engine failpoint, which is process-wide.

mod support;

use std::time::Duration;

use support::fixture;
use wqd::daemon::Daemon;
use wqd_client::{Batch, Client, Endpoint, Item};

/// More items than the daemon submits on the request's own task (`INLINE_SUBMIT_ITEMS`,
/// 1 024).
const BIG: usize = 2_000;

const SEAM: &str = "engine::submit-between-items";

/// A daemon in-process on the `two-socket` fixture (its directory kept alive with it), and a
/// client connected to it.
async fn start() -> (tempfile::TempDir, Daemon, Client) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = support::config(dir.path(), &fixture("two-socket"));
    let d = Daemon::start(cfg).await.expect("start");
    let c = Client::connect(Endpoint::unix(d.socket_path()))
        .await
        .expect("connect");
    (dir, d, c)
}

/// A batch of [`BIG`] `noop` items on `all`, waited for.
fn big_batch() -> Batch {
    Batch::new()
        .items((0..BIG).map(|_| Item::new("all", "noop")))
        .wait(true)
}

/// On a multi-thread runtime with a single async worker, a large submit held inside the
/// engine (a failpoint pauses it between two items) leaves that worker's other tasks free: a
/// health check on another connection is answered while the submit is still held, and the
/// submit completes once released. The check runs on a thread and runtime of its own, which
/// releases the submit after it, answered or not; so the test fails (rather than hangs) if
/// the submit ran on the async worker itself: the daemon could not answer until the release.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_held_large_submit_does_not_stall_other_connections() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let (_dir, d, submitter) = start().await;

    wqd_core::failpoint::cfg(SEAM, "pause").expect("failpoint");
    let done = Arc::new(AtomicBool::new(false));
    let sock = d.socket_path().to_path_buf();
    let seen_done = done.clone();
    let checker = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let checked = rt.block_on(async {
            // Give the submit time to reach the seam (it cannot pass it while paused).
            tokio::time::sleep(Duration::from_millis(300)).await;
            tokio::time::timeout(Duration::from_secs(20), async {
                let ch = wqd_client::unix_channel(&sock)
                    .await
                    .map_err(|e| e.to_string())?;
                tonic_health::pb::health_client::HealthClient::new(ch)
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .map_err(|e| e.to_string())
            })
            .await
        });
        let held = !seen_done.load(Ordering::SeqCst);
        wqd_core::failpoint::remove(SEAM);
        (checked, held)
    });
    let r = tokio::time::timeout(Duration::from_secs(60), submitter.submit(big_batch()))
        .await
        .expect("the submit completes once released")
        .expect("submit");
    done.store(true, Ordering::SeqCst);
    let (checked, held) = checker.join().expect("checker");
    checked
        .expect("health check stalled behind a held submit")
        .expect("health check");
    assert!(held, "the check was answered while the submit was held");
    assert_eq!(r.items.len(), BIG);
    assert_eq!(r.results.len(), BIG);
    d.shutdown().await;
}

/// On a current-thread runtime (a library user's, or a test's), where running in place is not
/// allowed, a large submit goes to the blocking pool and completes: every item ran.
#[tokio::test(flavor = "current_thread")]
async fn a_large_submit_works_on_a_current_thread_runtime() {
    let (_dir, d, c) = start().await;
    let r = c.submit(big_batch()).await.expect("submit");
    assert_eq!(r.items.len(), BIG);
    assert_eq!(r.results.len(), BIG);
    assert!(r
        .results
        .iter()
        .all(|x| x.state() == wqd_client::proto::ItemState::Ok));
    d.shutdown().await;
}
