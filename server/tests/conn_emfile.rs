//! `conn::Incoming` at a real EMFILE: with every descriptor of the process taken and a client
//! waiting in the backlog, the stream must back off (a handful of accept attempts a second, not
//! thousands), count the failures, never hand an error to tonic, and serve the client once
//! descriptors are free again.
//!
//! This file holds one test on purpose: it lowers RLIMIT_NOFILE of its own test process.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use tokio_stream::StreamExt;
use wqd::conn::{ConnSettings, Incoming, Listener, ListenerStats};

#[test]
fn accept_backs_off_at_emfile_and_recovers() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let stats = Arc::new(ListenerStats::new(Listener::Unix, 100));
        let settings = ConnSettings {
            max_connections: 100,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: None,
            tls: false,
            rewrite_authority: true,
        };
        let mut incoming = Incoming::new(listener, settings, stats.clone());
        // A client waits in the backlog.
        let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();

        // Take every descriptor: a low soft limit, then fill up to it.
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let in_use = wqd::conn::fds_in_use().unwrap();
        setrlimit(Resource::RLIMIT_NOFILE, in_use + 16, hard).unwrap();
        let mut filler = Vec::new();
        loop {
            match std::fs::File::open("/dev/null") {
                Ok(f) => filler.push(f),
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::EMFILE), "{e}");
                    break;
                }
            }
            assert!(filler.len() < 10_000, "the limit did not take");
        }

        // One second at EMFILE: nothing yielded (no error either), few attempts.
        let r = tokio::time::timeout(Duration::from_secs(1), incoming.next()).await;
        assert!(
            r.is_err(),
            "the stream yielded at EMFILE: {:?}",
            r.map(|o| o.map(|x| x.is_ok()))
        );
        let attempts = stats.accept_errors_fds.load(Ordering::Relaxed);
        assert!(
            (3..=12).contains(&attempts),
            "{attempts} failed accepts in 1 s: expected a backoff (5 ms doubling)"
        );

        // Descriptors free again: the waiting client is served within the backoff's bound.
        drop(filler);
        let conn = tokio::time::timeout(Duration::from_secs(3), incoming.next())
            .await
            .expect("served within 3 s of descriptors coming back")
            .expect("the stream does not end");
        assert!(conn.is_ok());
        assert_eq!(stats.open(), 1);
        assert_eq!(stats.accepted.load(Ordering::Relaxed), 1);
        drop(conn);
        assert_eq!(
            stats.open(),
            0,
            "the slot is given back with the connection"
        );
        setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    });
}
