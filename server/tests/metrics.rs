//! The Prometheus endpoint: the daemon in-process on a copy of the `two-socket` fixture with
//! `metrics.listen = 127.0.0.1:0`, scraped while work runs and CPUs go away and come back;
//! then the real binary's `wqd: metrics on` line, the loopback rule, and the alert rules
//! under `promtool` (skipped, saying why, when promtool is not installed).

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{copy_fixture, fixture, set_offline, set_online};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;
use tonic::Code;
use wqd::config::{Config, WorkqueueEntry};
use wqd::daemon::Daemon;
use wqd_client::{Batch, Client, Endpoint, FlushScope, Item};

/// One scrape, parsed: (name, labels) → value.
#[derive(Debug)]
struct Scrape {
    text: String,
    series: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    fn parse(text: String) -> Scrape {
        let mut series = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (head, value) = line.rsplit_once(' ').expect("name and value");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let (name, labels) = match head.split_once('{') {
                None => (head.to_string(), BTreeMap::new()),
                Some((n, rest)) => {
                    let body = rest.strip_suffix('}').expect("closing brace");
                    let mut labels = BTreeMap::new();
                    // Values here never hold `",`; good enough for wqd's label values.
                    for pair in body.split("\",") {
                        let (k, v) = pair.split_once("=\"").expect("label pair");
                        labels.insert(k.to_string(), v.trim_end_matches('"').to_string());
                    }
                    (n.to_string(), labels)
                }
            };
            series.push((name, labels, value));
        }
        Scrape { text, series }
    }

    /// The value of the one series `name` whose labels include `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let hits: Vec<f64> = self
            .series
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
            .collect();
        assert!(
            hits.len() <= 1,
            "{name}{labels:?} matches {} series",
            hits.len()
        );
        hits.first().copied()
    }

    fn val(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no series {name}{labels:?} in\n{}", self.text))
    }
}

async fn scrape_raw(addr: SocketAddr, request: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8(buf).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head");
    (head.to_string(), body.to_string())
}

async fn scrape(addr: SocketAddr) -> Scrape {
    let (head, body) = scrape_raw(addr, "GET /metrics HTTP/1.1\r\nHost: wqd\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    Scrape::parse(body)
}

/// Scrapes until `ok` holds (the topology monitor rescans every 50ms).
async fn scrape_until(addr: SocketAddr, what: &str, ok: impl Fn(&Scrape) -> bool) -> Scrape {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let s = scrape(addr).await;
        if ok(&s) {
            return s;
        }
        assert!(
            Instant::now() < until,
            "timed out waiting for {what}:\n{}",
            s.text
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn workqueue(name: &str, fallback: &str) -> WorkqueueEntry {
    WorkqueueEntry {
        fallback: Some(fallback.into()),
        max_queued: Some(100),
        ..support::workqueue(name)
    }
}

fn config(dir: &Path, sys: &Path) -> Config {
    let mut c = support::config(dir, sys);
    c.topology.rescan = Duration::from_millis(50);
    c.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    c.workqueues.push(workqueue("hold", "wait"));
    c
}

/// Epochs published by the sources that notice hotplug (rescan, worker reports, uevents).
fn hotplug_epochs(s: &Scrape) -> f64 {
    ["rescan", "worker", "uevent"]
        .iter()
        .map(|src| s.val("wqd_topology_epochs_total", &[("source", src)]))
        .sum()
}

const SUBMIT: &str = "wqd.v1.DispatchService/Submit";
const FLUSH: &str = "wqd.v1.DispatchService/Flush";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_the_work_and_the_topology() {
    let dir = tempfile::tempdir().unwrap();
    let sys = copy_fixture("two-socket");
    let d = Daemon::start(config(dir.path(), sys.path()))
        .await
        .expect("start");
    let addr = d.metrics_addr().expect("metrics served");
    assert!(addr.ip().is_loopback() && addr.port() != 0);
    let c = Client::connect(Endpoint::unix(d.socket_path()))
        .await
        .unwrap();

    // At start: the machine, and zero series that alerts and increase() rely on.
    // The fixture has 16 CPUs online, 14 and 15 isolated: 14 live.
    let s = scrape(addr).await;
    assert_eq!(s.val("wqd_live_cpus", &[]), 14.0);
    assert_eq!(s.val("wqd_online_cpus", &[]), 16.0);
    assert_eq!(s.val("wqd_cpu_live", &[("cpu", "15")]), 0.0);
    assert_eq!(s.val("wqd_topology_epoch", &[]), 1.0);
    assert_eq!(s.val("wqd_engine_topology_epoch", &[]), 1.0);
    assert_eq!(s.val("wqd_cpu_live", &[("cpu", "3")]), 1.0);
    assert_eq!(
        s.val(
            "wqd_group_live_cpus",
            &[("group", "cpu:3"), ("level", "cpu")]
        ),
        1.0
    );
    assert_eq!(
        s.val("wqd_items_submitted_total", &[("workqueue", "default")]),
        0.0
    );
    assert_eq!(s.val("wqd_rebinds_total", &[("reason", "offline")]), 0.0);
    assert_eq!(s.val("wqd_fallbacks_total", &[("level", "node")]), 0.0);
    assert_eq!(s.val("wqd_watchdog_lockups_total", &[("cpu", "15")]), 0.0);
    assert_eq!(s.val("wqd_cpu_hogs_total", &[("cpu", "0")]), 0.0);
    assert_eq!(
        s.val("wqd_workqueue_max_queued", &[("workqueue", "hold")]),
        100.0
    );
    assert_eq!(
        s.val("wqd_topology_epochs_total", &[("source", "initial")]),
        1.0
    );
    assert!(s.get("wqd_build_info", &[]).is_some());
    assert!(s
        .text
        .contains("# TYPE wqd_item_queue_wait_seconds histogram"));

    // Submit-and-wait 20 items: counts and histogram counts equal what was sent.
    let r = c
        .submit(
            Batch::new()
                .items((0..20).map(|_| Item::new("all", "noop")))
                .wait(true),
        )
        .await
        .unwrap();
    assert_eq!(r.results.len(), 20);
    let wq = [("workqueue", "default")];
    let s = scrape(addr).await;
    assert_eq!(s.val("wqd_items_submitted_total", &wq), 20.0);
    assert_eq!(
        s.val(
            "wqd_items_finished_total",
            &[("workqueue", "default"), ("state", "ok")]
        ),
        20.0
    );
    assert_eq!(
        s.val(
            "wqd_items_finished_total",
            &[("workqueue", "default"), ("state", "failed")]
        ),
        0.0
    );
    assert_eq!(s.val("wqd_item_queue_wait_seconds_count", &wq), 20.0);
    assert_eq!(s.val("wqd_item_run_seconds_count", &wq), 20.0);
    assert_eq!(
        s.val(
            "wqd_item_run_seconds_bucket",
            &[("workqueue", "default"), ("le", "+Inf")]
        ),
        20.0
    );
    assert_eq!(
        s.val(
            "wqd_flush_duration_seconds_count",
            &[("method", "Submit"), ("outcome", "complete")]
        ),
        1.0
    );
    assert_eq!(
        s.val(
            "wqd_rpc_handled_total",
            &[("method", SUBMIT), ("code", "OK")]
        ),
        1.0
    );
    assert_eq!(
        s.val("wqd_rpc_duration_seconds_count", &[("method", SUBMIT)]),
        1.0
    );

    // Refused calls are counted by their code.
    let e = c
        .submit(
            Batch::new()
                .workqueue("nope")
                .item(Item::new("all", "noop")),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .submit(Batch::new().item(Item::new("cash:1", "noop")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c.flush_all(FlushScope::Batch(999_999)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // A session counts once as an RPC, when it ends; its requests each by their code.
    let mut sess = c.session().await.unwrap();
    sess.submit(Batch::new().item(Item::new("all", "noop")).wait(true))
        .await
        .unwrap();
    let e = sess
        .submit(Batch::new().item(Item::new("cash:1", "noop")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    sess.close();
    assert!(sess.next().await.unwrap().is_none());

    // A streamed flush counts once, when the stream ends with OK.
    let (results, summary) = c.flush_all(FlushScope::Batch(r.batch_id)).await.unwrap();
    assert_eq!(results.len(), 20);
    assert_eq!(summary.items_covered, 20);
    let s = scrape(addr).await;
    let code =
        |m: &str, code: &str| s.get("wqd_rpc_handled_total", &[("method", m), ("code", code)]);
    assert_eq!(code(SUBMIT, "NOT_FOUND"), Some(1.0));
    assert_eq!(code(SUBMIT, "INVALID_ARGUMENT"), Some(1.0));
    assert_eq!(code(SUBMIT, "OK"), Some(1.0));
    assert_eq!(code(FLUSH, "NOT_FOUND"), Some(1.0));
    assert_eq!(code(FLUSH, "OK"), Some(1.0));
    assert_eq!(code("wqd.v1.DispatchService/Session", "OK"), Some(1.0));
    for (c, n) in [("OK", 1.0), ("INVALID_ARGUMENT", 1.0)] {
        assert_eq!(
            s.get("wqd_session_requests_total", &[("code", c)]),
            Some(n),
            "{c}"
        );
    }
    assert_eq!(
        s.val(
            "wqd_flush_duration_seconds_count",
            &[("method", "Flush"), ("outcome", "complete")]
        ),
        1.0
    );

    // CPU 3 goes away: live gauges, epochs and events by source follow.
    set_offline(sys.path(), 3);
    let s = scrape_until(addr, "epoch 2", |s| {
        s.get("wqd_topology_epoch", &[]) == Some(2.0)
    })
    .await;
    assert_eq!(s.val("wqd_engine_topology_epoch", &[]), 2.0);
    assert_eq!(s.val("wqd_cpu_live", &[("cpu", "3")]), 0.0);
    assert_eq!(s.val("wqd_live_cpus", &[]), 13.0);
    assert_eq!(s.val("wqd_online_cpus", &[]), 15.0);
    assert_eq!(s.val("wqd_group_live_cpus", &[("group", "cpu:3")]), 0.0);
    // Netlink is off: the periodic rescan found it (a worker report could too).
    assert_eq!(hotplug_epochs(&s), 1.0);
    assert!(s.val("wqd_topology_events_total", &[("source", "rescan")]) >= 1.0);

    // A wait-fallback workqueue holds work for the dead CPU: pending rises...
    let held = c
        .submit(
            Batch::new()
                .workqueue("hold")
                .items((0..5).map(|_| Item::new("cpu:3", "noop"))),
        )
        .await
        .unwrap();
    let pend = [("workqueue", "hold"), ("level", "cpu")];
    let s = scrape(addr).await;
    assert_eq!(s.val("wqd_items_pending", &pend), 5.0);
    assert_eq!(
        s.val(
            "wqd_workqueue_items",
            &[("workqueue", "hold"), ("state", "pending")]
        ),
        5.0
    );
    assert_eq!(
        s.val("wqd_items_submitted_total", &[("workqueue", "hold")]),
        5.0
    );
    assert!(s.val("wqd_flushes_active", &[]) == 0.0);

    // While they wait: a Flush that outlives the client's deadline and one the client drops
    // unread are counted by how they ended, and neither leaves a flush registered.
    let flushes = |s: &Scrape, outcome: &str| {
        s.get(
            "wqd_flush_duration_seconds_count",
            &[("method", "Flush"), ("outcome", outcome)],
        )
    };
    let complete = flushes(&s, "complete");
    let short = c.clone().with_timeout(Some(Duration::from_millis(100)));
    let mut st = short
        .flush(FlushScope::Batch(held.batch_id), true)
        .await
        .unwrap();
    match st.next().await {
        Some(Err(e)) => assert_eq!(e.code(), Code::DeadlineExceeded, "{e}"),
        other => panic!("a flush past its deadline ended with {other:?}"),
    }
    assert!(
        st.next().await.is_none(),
        "nothing after the deadline status"
    );
    let dropped = c
        .flush(FlushScope::Batch(held.batch_id), true)
        .await
        .unwrap();
    drop(dropped);
    let s = scrape_until(addr, "the dropped flush counted and gone", |s| {
        flushes(s, "abandoned") == Some(1.0) && s.get("wqd_flushes_active", &[]) == Some(0.0)
    })
    .await;
    assert_eq!(flushes(&s, "deadline"), Some(1.0));
    assert_eq!(flushes(&s, "complete"), complete, "neither completed");
    assert_eq!(
        s.val("wqd_items_pending", &pend),
        5.0,
        "the work is still there"
    );

    // ... and falls once the CPU is back and the items ran.
    set_online(sys.path(), &fixture("two-socket"), 3);
    let (done, _) = c.flush_all(FlushScope::Batch(held.batch_id)).await.unwrap();
    assert_eq!(done.len(), 5);
    let s = scrape_until(addr, "epoch 3", |s| {
        s.get("wqd_topology_epoch", &[]) == Some(3.0)
    })
    .await;
    assert_eq!(s.val("wqd_items_pending", &pend), 0.0);
    assert_eq!(
        s.val(
            "wqd_items_finished_total",
            &[("workqueue", "hold"), ("state", "ok")]
        ),
        5.0
    );
    assert_eq!(s.val("wqd_cpu_live", &[("cpu", "3")]), 1.0);
    assert_eq!(s.val("wqd_live_cpus", &[]), 14.0);
    assert_eq!(hotplug_epochs(&s), 2.0);

    // Running per CPU while an item sleeps on CPU 5, and back to 0 after.
    let slow = c
        .submit(Batch::new().item(Item::new("cpu:5", "sleep").arg("ms", "600")))
        .await
        .unwrap();
    scrape_until(addr, "an item running on cpu 5", |s| {
        s.get("wqd_cpu_running_items", &[("cpu", "5")]) == Some(1.0)
    })
    .await;
    let st = c.stats().await.unwrap();
    assert!(st.workers >= 1);

    c.flush_all(FlushScope::Batch(slow.batch_id)).await.unwrap();
    let s = scrape(addr).await;
    assert_eq!(s.val("wqd_cpu_running_items", &[("cpu", "5")]), 0.0);
    let run = s.val("wqd_item_run_seconds_sum", &wq);
    assert!(run >= 0.6, "run time sum {run} includes the 600ms sleep");

    // Not /metrics: 404; not GET: 405.
    let (head, _) = scrape_raw(addr, "GET / HTTP/1.1\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let (head, _) = scrape_raw(addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");

    promtool_check_metrics(&s.text);
    d.shutdown().await;
}

#[test]
fn metrics_listen_is_loopback_unless_remote_is_allowed() {
    let mut c = Config::default();
    c.metrics.listen = Some("0.0.0.0:9464".parse().unwrap());
    let e = c.validate().unwrap_err().to_string();
    assert!(
        e.contains("metrics.listen") && e.contains("allow_remote"),
        "{e}"
    );
    c.listen.allow_remote = true;
    c.validate().unwrap();
    let toml = Config::from_toml("[metrics]\nlisten = \"127.0.0.1:9464\"\n", "test").unwrap();
    toml.validate().unwrap();
}

fn promtool() -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|p| p.join("promtool"))
        .find(|p| p.is_file())
}

/// `promtool check metrics` on a scrape: names, types, units and help lines by the book.
fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    let Some(p) = promtool() else {
        eprintln!(
            "SKIP promtool check metrics: promtool is not installed (apt-get install prometheus)"
        );
        return;
    };
    let mut child = Command::new(p)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool check metrics:\n{said}");
}

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/prometheus")
        .join(file)
}

#[test]
fn alert_rules_pass_promtool() {
    let rules = deploy("alerts.yml");
    assert!(rules.is_file(), "{} is missing", rules.display());
    assert!(deploy("scrape.yml").is_file());
    let Some(p) = promtool() else {
        eprintln!(
            "SKIP alert_rules_pass_promtool: promtool is not installed (apt-get install \
             prometheus); {} was not checked",
            rules.display()
        );
        return;
    };
    for args in [
        vec!["check", "rules", rules.to_str().unwrap()],
        vec!["test", "rules", deploy("alerts_test.yml").to_str().unwrap()],
    ] {
        let out = Command::new(&p).args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_binary_prints_its_metrics_address() {
    use std::io::{BufRead, BufReader, Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("wqd.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_wqd"))
        .arg("--socket")
        .arg(&sock)
        .arg("--sysfs-root")
        .arg(fixture("vm8-offline"))
        .args(["--no-netlink", "--log-level", "warn"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wqd");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr: SocketAddr = loop {
        match lines.next() {
            Some(Ok(l)) => {
                if let Some(rest) = l.strip_prefix("wqd: metrics on http://") {
                    break rest.strip_suffix("/metrics").unwrap().parse().unwrap();
                }
            }
            other => panic!("wqd exited before serving metrics: {other:?}"),
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (_, body) = text.split_once("\r\n\r\n").unwrap();
    let scrape = Scrape::parse(body.to_string());
    let live = scrape.val("wqd_live_cpus", &[]);
    assert!(live >= 1.0, "{live}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));

    // A non-loopback address without --allow-remote is a usage error.
    let out = Command::new(env!("CARGO_BIN_EXE_wqd"))
        .arg("--socket")
        .arg(&sock)
        .args(["--metrics-listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("metrics.listen"));
}
