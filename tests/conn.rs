//! Connections that owe the daemon nothing (issue #10 item 4): more than
//! `listen.max_connections` of them, ones that never finish the HTTP/2 handshake, ones that sit
//! idle, and a descriptor limit too small for what clients open. The daemon must refuse or
//! close them promptly, count and log it, keep serving new clients, keep its topology rescan and
//! metrics working, and never spin. Every wait here is bounded.

#[path = "../server/tests/support/pki.rs"]
mod pki;

use pki::Pki;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use tokio_stream::StreamExt;
use wqd_client::{Batch, Client, Item};
use wqd_e2e::{wait_for, Daemon};

/// The daemon's metrics address, from its `wqd: metrics on http://ADDR/metrics` line.
async fn metrics_addr(d: &Daemon) -> SocketAddr {
    wait_for("the metrics line", Duration::from_secs(10), || async {
        d.stderr().lines().find_map(|l| {
            l.strip_prefix("wqd: metrics on http://")
                .and_then(|r| r.strip_suffix("/metrics"))
                .and_then(|a| a.parse().ok())
        })
    })
    .await
}

/// One scrape of `/metrics`, bounded by 5 s.
async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let run = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    match tokio::time::timeout(Duration::from_secs(5), run).await {
        Ok(Ok(text)) => text,
        Ok(Err(e)) => panic!("scrape {addr}: {e}"),
        Err(_) => panic!("scrape {addr}: no answer within 5 s"),
    }
}

/// The value of the series of `name` carrying every label of `labels` (`k="v"` strings).
fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|kv| l.contains(kv)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A blocking socket whose reads can be bounded.
trait Sock: Read {
    fn read_timeout(&self, d: Duration);
}

impl Sock for UnixStream {
    fn read_timeout(&self, d: Duration) {
        self.set_read_timeout(Some(d)).unwrap();
    }
}

impl Sock for std::net::TcpStream {
    fn read_timeout(&self, d: Duration) {
        self.set_read_timeout(Some(d)).unwrap();
    }
}

/// Reads once with a bound: `Some(0)` is EOF (closed by the daemon), `Some(n)` bytes arrived,
/// `None` nothing within `limit`.
fn read_once(s: &mut impl Sock, limit: Duration) -> Option<usize> {
    s.read_timeout(limit);
    let mut buf = [0u8; 4096];
    match s.read(&mut buf) {
        Ok(n) => Some(n),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        // A reset is a close too.
        Err(_) => Some(0),
    }
}

/// Reads until EOF or `limit`; returns when EOF came, measured from `since`.
fn closed_after(s: &mut impl Sock, since: Instant, limit: Duration) -> Option<Duration> {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        match read_once(
            s,
            end.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ) {
            Some(0) => return Some(since.elapsed()),
            Some(_) => continue,
            None => return None,
        }
    }
    None
}

/// A client that completes one GetStats call, or its error (bounded by 10 s).
async fn try_call(d: &Daemon) -> Result<(), String> {
    let run = async {
        let c = Client::connect(d.endpoint())
            .await
            .map_err(|e| e.to_string())?;
        c.stats().await.map_err(|e| e.to_string())?;
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .unwrap_or_else(|_| Err("no answer within 10 s (a hang)".into()))
}

/// CPU time (user + system) of process `pid` so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

const CAP: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_closed_at_once_and_counted() {
    let d = Daemon::builder("two-socket")
        .config(&format!(
            "[listen]\nmax_connections = {CAP}\nhandshake_timeout = \"60s\"\n"
        ))
        .args_metrics()
        .start();
    let maddr = metrics_addr(&d).await;

    // 20 sockets that send nothing. The daemon's HTTP/2 server speaks first (its SETTINGS),
    // so a served connection reads bytes and a refused one reads EOF.
    let t0 = Instant::now();
    let mut socks: Vec<UnixStream> = (0..20)
        .map(|_| UnixStream::connect(d.socket()).expect("connect"))
        .collect();
    let mut served = Vec::new();
    let mut refused = 0;
    for (i, s) in socks.iter_mut().enumerate() {
        match read_once(s, Duration::from_secs(3)) {
            Some(0) => refused += 1,
            Some(_) => served.push(i),
            None => panic!("socket {i}: neither served nor closed within 3 s"),
        }
    }
    assert_eq!(served.len(), CAP, "served {served:?}");
    assert_eq!(refused, 20 - CAP);
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );

    // At the cap a real client is refused, not left hanging.
    let r = try_call(&d).await;
    assert!(r.is_err(), "a client was served beyond the cap");
    assert!(
        !r.unwrap_err().contains("a hang"),
        "the refusal must not be a hang"
    );

    // Once the idle sockets go, clients are served again.
    drop(socks);
    wait_for(
        "a client served after the idle sockets closed",
        Duration::from_secs(10),
        || async { try_call(&d).await.ok() },
    )
    .await;

    let m = scrape(maddr).await;
    let refused_total = metric(
        &m,
        "wqd_connections_refused_total",
        &["listener=\"unix\"", "reason=\"limit\""],
    );
    assert!(
        refused_total.is_some_and(|v| v >= (20 - CAP) as f64),
        "refused: {refused_total:?}\n{m}"
    );
    assert_eq!(
        metric(&m, "wqd_connections_max", &["listener=\"unix\""]),
        Some(CAP as f64)
    );
    assert!(
        metric(&m, "wqd_connections_accepted_total", &["listener=\"unix\""])
            .is_some_and(|v| v >= CAP as f64)
    );
    assert!(
        d.stderr()
            .contains("connection refused: listen.max_connections open already"),
        "the refusal is logged:\n{}",
        d.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_connections_are_closed_busy_ones_are_not() {
    let d = Daemon::builder("two-socket")
        .config("[listen]\nhandshake_timeout = \"300ms\"\nidle_timeout = \"2s\"\n")
        .args_metrics()
        .start();
    let maddr = metrics_addr(&d).await;

    // A connection that sends nothing: closed by the handshake timeout, well before idle's.
    let t0 = Instant::now();
    let mut silent = UnixStream::connect(d.socket()).unwrap();
    let took = closed_after(&mut silent, t0, Duration::from_secs(5))
        .expect("a silent connection is closed within 5 s");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(1800),
        "closed after {took:?}; handshake_timeout is 300ms (idle_timeout 2s)"
    );

    // A connection that completes the HTTP/2 handshake (preface, SETTINGS, and the ACK of the
    // server's) and opens no stream: closed by the idle timeout, not the handshake one.
    let t0 = Instant::now();
    let mut idle = UnixStream::connect(d.socket()).unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS, empty
    hello.extend_from_slice(&[0, 0, 0, 4, 1, 0, 0, 0, 0]); // SETTINGS ACK
    idle.write_all(&hello).unwrap();
    let took = closed_after(&mut idle, t0, Duration::from_secs(8))
        .expect("an idle HTTP/2 connection is closed within 6 s");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "closed after {took:?}; idle_timeout is 2s"
    );

    // A call open for twice the idle timeout keeps its connection.
    let c = Client::connect(d.endpoint()).await.expect("connect");
    let t0 = Instant::now();
    c.submit(
        Batch::new()
            .item(Item::new("cpu:0", "sleep").arg("ms", "4000"))
            .wait(true),
    )
    .await
    .expect("a 4 s Submit(wait) outlives idle_timeout = 2 s");
    assert!(t0.elapsed() >= Duration::from_millis(3900));
    // So does a stream: WatchTopology open for 3 s, then a change arrives on it.
    let mut watch = c.watch_topology().await.expect("watch");
    let first = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("first snapshot in time")
        .expect("stream open")
        .expect("first snapshot");
    tokio::time::sleep(Duration::from_secs(3)).await;
    d.fixture().set_offline(3);
    let next = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("the change in time")
        .expect("the stream outlived idle_timeout")
        .expect("a snapshot");
    assert!(next.epoch > first.epoch);
    drop(watch);
    // After the idle close the same client reconnects on its next call.
    tokio::time::sleep(Duration::from_secs(3)).await;
    wait_for(
        "the client's next call after an idle close",
        Duration::from_secs(5),
        || async { c.stats().await.ok() },
    )
    .await;

    let m = scrape(maddr).await;
    let closed = |reason: &str| {
        metric(
            &m,
            "wqd_connections_closed_total",
            &["listener=\"unix\"", &format!("reason=\"{reason}\"")],
        )
    };
    assert!(closed("handshake").is_some_and(|v| v >= 1.0), "{m}");
    assert!(closed("idle").is_some_and(|v| v >= 2.0), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_descriptor_limit_the_daemon_neither_spins_nor_loses_its_topology() {
    const NOFILE: u64 = 128;
    let d = Daemon::builder("two-socket")
        .config("[listen]\nhandshake_timeout = \"60s\"\n")
        .args_metrics()
        .rlimit_nofile(NOFILE)
        .start();
    let maddr = metrics_addr(&d).await;
    assert!(
        d.stderr().contains("listen.max_connections lowered"),
        "the clamp to RLIMIT_NOFILE is logged:\n{}",
        d.stderr()
    );

    // More idle connections than the daemon has descriptors. Each connect is bounded: a
    // daemon that stopped accepting leaves the backlog full and connect would block.
    let mut socks = Vec::new();
    let mut failed = 0;
    for _ in 0..2 * NOFILE {
        match tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::UnixStream::connect(d.socket()),
        )
        .await
        {
            Ok(Ok(s)) => socks.push(s.into_std().unwrap()),
            _ => failed += 1,
        }
    }
    assert!(
        failed < 8,
        "{failed} connects failed or hung: the daemon stopped accepting"
    );

    // Two seconds at the limit: the daemon must not spin.
    let pid = d.pid();
    let before = cpu_time(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = cpu_time(pid) - before;
    eprintln!("daemon CPU time over 2 s at the descriptor limit: {spent:?}");
    assert!(
        spent < Duration::from_millis(300),
        "the daemon used {spent:?} of CPU in 2 s"
    );

    // The topology rescan and the metrics listener still have descriptors.
    d.fixture().set_offline(3);
    wait_for(
        "the rescan to see CPU 3 go, through /metrics",
        Duration::from_secs(10),
        || async {
            let m = scrape(maddr).await;
            (metric(&m, "wqd_cpu_live", &["cpu=\"3\""]) == Some(0.0)).then_some(())
        },
    )
    .await;
    let m = scrape(maddr).await;
    assert!(
        metric(
            &m,
            "wqd_connections_refused_total",
            &["listener=\"unix\"", "reason=\"limit\""]
        )
        .is_some_and(|v| v > 0.0),
        "{m}"
    );
    assert!(
        d.stderr().contains("connection refused"),
        "logged:\n{}",
        d.stderr()
    );
    assert!(
        !d.stderr().contains("Too many open files"),
        "something ran out of descriptors:\n{}",
        d.stderr()
    );

    // Once the sockets close, clients are served and see the new topology.
    drop(socks);
    let topo = wait_for(
        "a GetTopology answer after the sockets closed",
        Duration::from_secs(10),
        || async {
            let c = Client::connect(d.endpoint()).await.ok()?;
            c.topology().await.ok()
        },
    )
    .await;
    let cpu3 = topo.cpus.iter().find(|c| c.cpu == 3).expect("cpu 3 listed");
    assert!(!cpu3.live, "CPU 3 is offline in the topology");
}

/// The daemon's TCP address, from its `wqd: listening on tcp:ADDR` line.
async fn tcp_addr(d: &Daemon) -> SocketAddr {
    wait_for("the tcp line", Duration::from_secs(10), || async {
        d.stderr().lines().find_map(|l| {
            l.strip_prefix("wqd: listening on tcp:")
                .and_then(|a| a.parse().ok())
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tcp_listener_has_its_own_cap_and_handshake_timeout() {
    let d = Daemon::builder("two-socket")
        .config(
            "[listen]\nmax_connections = 2\nhandshake_timeout = \"300ms\"\n\
             [security]\ntcp_plaintext_loopback = true\n",
        )
        .arg("--tcp-listen")
        .arg("127.0.0.1:0")
        .args_metrics()
        .start();
    let addr = tcp_addr(&d).await;
    let maddr = metrics_addr(&d).await;
    let t0 = Instant::now();
    let mut socks: Vec<_> = (0..4)
        .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
        .collect();
    let (mut served, mut refused) = (Vec::new(), 0);
    for (i, s) in socks.iter_mut().enumerate() {
        match read_once(s, Duration::from_secs(3)) {
            Some(0) => refused += 1,
            Some(_) => served.push(i),
            None => panic!("tcp socket {i}: neither served nor closed within 3 s"),
        }
    }
    assert_eq!((served.len(), refused), (2, 2), "served {served:?}");
    // The served ones send nothing: closed at the handshake timeout.
    for i in served {
        let took = closed_after(&mut socks[i], t0, Duration::from_secs(5))
            .expect("a silent tcp connection is closed within 5 s");
        assert!(took >= Duration::from_millis(250), "closed after {took:?}");
    }
    // The Unix listener's cap is its own: still served.
    try_call(&d)
        .await
        .expect("the unix socket serves while tcp is full");
    let m = scrape(maddr).await;
    let tcp = |name: &str, extra: &[&str]| {
        let mut l = vec!["listener=\"tcp\""];
        l.extend_from_slice(extra);
        metric(&m, name, &l)
    };
    assert_eq!(tcp("wqd_connections_max", &[]), Some(2.0), "{m}");
    assert_eq!(
        tcp("wqd_connections_refused_total", &["reason=\"limit\""]),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        tcp("wqd_connections_closed_total", &["reason=\"handshake\""]),
        Some(2.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_connection_that_never_handshakes_is_closed() {
    let pki = Pki::new();
    let (cert_path, key_path) = (pki.path("server.pem"), pki.path("server.key"));
    let d = Daemon::builder("two-socket")
        .config(&format!(
            "[listen]\nhandshake_timeout = \"300ms\"\n[security]\ntls_cert = {cert_path:?}\ntls_key = {key_path:?}\n"
        ))
        .arg("--tcp-listen")
        .arg("127.0.0.1:0")
        .start();
    let addr = tcp_addr(&d).await;
    let t0 = Instant::now();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let took = closed_after(&mut s, t0, Duration::from_secs(5))
        .expect("a connection that never starts TLS is closed within 5 s");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "closed after {took:?}; handshake_timeout is 300ms"
    );
}

/// `--metrics-listen 127.0.0.1:0` on the builder.
trait MetricsArg {
    fn args_metrics(self) -> Self;
}

impl MetricsArg for wqd_e2e::DaemonBuilder {
    fn args_metrics(self) -> Self {
        self.arg("--metrics-listen").arg("127.0.0.1:0")
    }
}

/// The Rust client over plain TCP (`http://`), by address and by name: a small batch (its
/// request kept and written with its headers in one call) and a large one (written through
/// in many frames) both run whole, each item once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_client_submits_over_plain_tcp() {
    use wqd_client::proto::ItemState;
    let d = Daemon::builder("two-socket")
        .config("[security]\ntcp_plaintext_loopback = true\n")
        .arg("--tcp-listen")
        .arg("127.0.0.1:0")
        .start();
    let addr = tcp_addr(&d).await;
    for url in [
        format!("http://{addr}"),
        format!("http://localhost:{}", addr.port()),
    ] {
        let c = Client::connect(url.parse().expect("endpoint"))
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        for n in [3usize, 5000] {
            let r = c
                .submit(
                    Batch::new()
                        .items((0..n).map(|_| Item::new("cpu:0", "noop")))
                        .wait(true),
                )
                .await
                .unwrap_or_else(|e| panic!("{url}: submit of {n}: {e}"));
            assert_eq!(r.results.len(), n, "{url}: one result per item");
            let ids: Vec<u64> = r.results.iter().map(|x| x.item_id).collect();
            let mut sorted = ids.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), n, "{url}: each item once");
            assert!(
                r.results.iter().all(|x| x.state() == ItemState::Ok),
                "{url}: every item ran"
            );
        }
    }
}

/// The sockets process `pid`'s epoll instances hold, by socket inode, with the events each is
/// registered for (as `/proc/PID/fdinfo` reports them).
fn registered_sockets(pid: u32) -> std::collections::HashMap<String, u32> {
    let mut out = std::collections::HashMap::new();
    let link = |fd: &str| std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("/proc/PID/fd") {
        let fd = e
            .expect("fd entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        if !link(&fd).is_some_and(|t| t.to_string_lossy().contains("eventpoll")) {
            continue;
        }
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
        for line in info.lines() {
            let w: Vec<&str> = line.split_whitespace().collect();
            if let ["tfd:", tfd, "events:", ev, ..] = w[..] {
                let target = link(tfd).map(|t| t.to_string_lossy().into_owned());
                if let Some(inode) = target.as_deref().and_then(|t| t.strip_prefix("socket:")) {
                    out.insert(inode.to_string(), u32::from_str_radix(ev, 16).expect("hex"));
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_connection_wakes_the_daemon_for_requests_not_when_the_client_reads() {
    const EPOLLIN: u32 = 0x1;
    const EPOLLOUT: u32 = 0x4;
    let d = Daemon::start("two-socket");
    let before = registered_sockets(d.pid());
    let c = d.client().await;
    for _ in 0..3 {
        let r = c
            .submit(
                Batch::new()
                    .items((0..3).map(|_| Item::new("cpu:0", "noop")))
                    .wait(true),
            )
            .await
            .expect("submit");
        assert_eq!(r.results.len(), 3);
    }
    let after = registered_sockets(d.pid());
    let new: Vec<(&String, &u32)> = after
        .iter()
        .filter(|(inode, _)| !before.contains_key(*inode))
        .collect();
    // The client's connection, registered for reads only: a response the client reads frees
    // the daemon's send buffer, which would otherwise wake the daemon for nothing.
    assert!(!new.is_empty(), "the connection is registered: {after:?}");
    for (inode, ev) in new {
        assert_eq!(
            ev & (EPOLLIN | EPOLLOUT),
            EPOLLIN,
            "socket {inode}: events {ev:x}"
        );
    }
}
