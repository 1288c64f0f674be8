//! The `wqctl` binary against the real daemon (`two-socket` fixture): every command's JSON
//! document (`--output json`: exactly one document on stdout), the text forms people read, and
//! the exit codes scripts rely on — 0 success, 1 a failed request with one line
//! `wqctl: CODE: message` on stderr, 2 usage, 3 some items did not end OK.

#[path = "../server/tests/support/pki.rs"]
mod pki;

use pki::Pki;
use serde_json::Value;
use wqd_e2e::{run_wqctl, Daemon};

fn ids(v: &Value) -> Vec<u64> {
    v["item_ids"]
        .as_array()
        .expect("item_ids")
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

fn per_cpu(v: &Value) -> Vec<(u32, u64)> {
    v["summary"]["per_cpu"]
        .as_object()
        .expect("per_cpu")
        .iter()
        .map(|(k, n)| (k.parse().expect("cpu number key"), n.as_u64().unwrap()))
        .collect()
}

fn check_percentiles(p: &Value, count: u64) {
    assert_eq!(p["count"], count, "{p}");
    let v: Vec<u64> = ["p50", "p90", "p99", "max"]
        .iter()
        .map(|k| p[k].as_u64().unwrap_or_else(|| panic!("{k} in {p}")))
        .collect();
    assert!(
        v.windows(2).all(|w| w[0] <= w[1]),
        "ordered percentiles {p}"
    );
}

/// Asserts a failed command: exit 1, nothing on stdout, one line `wqctl: CODE: ...`.
fn check_failed(r: &wqd_e2e::Ran, code: &str) {
    r.expect_code(1);
    assert!(r.stdout.is_empty(), "stdout: {}", r.stdout);
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stderr: {:?}", r.stderr);
    let want = format!("wqctl: {code}: ");
    assert!(
        lines[0].starts_with(&want) && lines[0].len() > want.len(),
        "{:?} starts with {want:?} and says why",
        lines[0]
    );
}

#[test]
fn topology_as_json_and_text() {
    let d = Daemon::start("two-socket");
    let r = d.wqctl(&["topology", "-o", "json"]);
    let v = r.expect_code(0).json();
    assert!(v["epoch"].as_u64().unwrap() >= 1);
    assert_eq!(v["live"], "0-13");
    assert_eq!(v["isolated"], "14-15");
    let cpus = v["cpus"].as_array().unwrap();
    assert_eq!(cpus.len(), 16);
    assert_eq!(cpus[14]["isolated"], true);
    assert_eq!(cpus[14]["live"], false);
    assert_eq!(cpus[11]["core"], 3);
    let groups = v["groups"].as_array().unwrap();
    let core3 = groups.iter().find(|g| g["target"] == "core:3").unwrap();
    assert_eq!(core3["level"], "core");
    assert_eq!(core3["members"], "3,11");
    assert_eq!(core3["live_members"], "3,11");
    let c3 = groups.iter().find(|g| g["target"] == "cache:3").unwrap();
    assert_eq!(c3["live_members"], "6-7");

    let r = d.wqctl(&["topology"]);
    r.expect_code(0);
    let t = &r.stdout;
    assert!(t.starts_with("epoch "), "{t}");
    assert!(t.contains("live 0-13"), "{t}");
    assert!(t.contains("LEVEL") && t.contains("cache:3"), "{t}");
    let row14 = t
        .lines()
        .find(|l| l.split_whitespace().next() == Some("14"))
        .unwrap_or_else(|| panic!("a row for CPU 14:\n{t}"));
    assert!(row14.contains("yes") && row14.contains("no"), "{row14}");
}

#[test]
fn submit_wait_prints_the_summary() {
    let d = Daemon::start("two-socket");
    let r = d.wqctl(&[
        "-o",
        "json",
        "submit",
        "-t",
        "cache:0",
        "--handler",
        "spin",
        "--arg",
        "ms=2",
        "-n",
        "20",
        "--wait",
    ]);
    let v = r.expect_code(0).json();
    assert!(v["batch_id"].as_u64().unwrap() > 0);
    assert_eq!(v["item_count"], 20);
    assert_eq!(v["queued_count"], 20);
    assert_eq!(v["deduplicated_count"], 0);
    let got = ids(&v);
    assert_eq!(got.len(), 20);
    assert!(
        got.windows(2).all(|w| w[1] == w[0] + 1),
        "contiguous {got:?}"
    );
    assert_eq!(v["all_ok"], true);
    let s = &v["summary"];
    assert_eq!(s["items"], 20);
    assert_eq!(s["states"]["ok"], 20);
    assert_eq!(s["states"]["failed"], 0);
    let cpus = per_cpu(&v);
    assert!(
        cpus.iter().all(|(c, _)| [0, 1, 8, 9].contains(c)),
        "cache:0 items ran on cache 0's CPUs: {cpus:?}"
    );
    assert_eq!(cpus.iter().map(|(_, n)| n).sum::<u64>(), 20);
    assert_eq!(s["fallback_items"], 0);
    assert_eq!(s["rebinds"], 0);
    check_percentiles(&s["queue_latency_us"], 20);
    check_percentiles(&s["run_time_us"], 20);
    assert!(
        s["run_time_us"]["p50"].as_u64().unwrap() >= 2000,
        "spin ms=2 runs at least 2 ms: {}",
        s["run_time_us"]
    );

    // Text: the same summary for people.
    let r = d.wqctl(&[
        "submit",
        "-t",
        "cpu:1",
        "--handler",
        "noop",
        "-n",
        "3",
        "--wait",
    ]);
    r.expect_code(0);
    assert!(
        r.stdout.starts_with("batch ") && r.stdout.contains("3 items, 3 queued"),
        "{}",
        r.stdout
    );
}

#[test]
fn submit_flush_streams_large_batches() {
    let d = Daemon::start("two-socket");
    // Over 10 000 items: sent through SubmitStream, then flushed.
    let r = d.wqctl(&[
        "-o",
        "json",
        "submit",
        "-t",
        "node:1",
        "--handler",
        "noop",
        "-n",
        "20000",
        "--flush",
    ]);
    let v = r.expect_code(0).json();
    assert_eq!(v["item_count"], 20000);
    assert_eq!(v["queued_count"], 20000);
    assert_eq!(v["summary"]["states"]["ok"], 20000);
    assert_eq!(v["all_ok"], true);
    let cpus = per_cpu(&v);
    assert!(
        cpus.iter().all(|(c, _)| [4, 5, 6, 7, 12, 13].contains(c)),
        "{cpus:?}"
    );
    assert_eq!(cpus.iter().map(|(_, n)| n).sum::<u64>(), 20000);

    // A small batch with a key: one queued, the rest deduplicated. Streamed, and in one Submit,
    // which wqctl asks without receipts (the answer's shape gives the same duplicates).
    for (key, stream) in [("k", true), ("k2", false)] {
        let mut args = vec![
            "-o",
            "json",
            "submit",
            "-t",
            "cpu:0",
            "--handler",
            "noop",
            "-n",
            "5",
            "--key",
            key,
            "--delay",
            "200ms",
            "--wait",
        ];
        if stream {
            args.push("--stream");
        }
        let v = d.wqctl(&args).expect_code(0).json();
        assert_eq!(
            (
                &v["item_count"],
                &v["queued_count"],
                &v["deduplicated_count"]
            ),
            (&5.into(), &1.into(), &4.into()),
            "stream {stream}"
        );
        let first = ids(&v)[0];
        for (i, dup) in v["duplicates"].as_array().unwrap().iter().enumerate() {
            assert_eq!(dup["index"], i + 1);
            assert_eq!(dup["duplicate_of"], first);
        }
        assert_eq!(v["summary"]["states"]["ok"], 1);
    }
}

#[test]
fn failed_items_exit_3() {
    let d = Daemon::start("two-socket");
    let r = d.wqctl(&[
        "-o",
        "json",
        "submit",
        "-t",
        "cpu:0",
        "--handler",
        "noop",
        "--arg",
        "fail=x",
        "-n",
        "3",
        "--wait",
    ]);
    let v = r.expect_code(3).json();
    assert_eq!(v["all_ok"], false);
    assert_eq!(v["summary"]["states"]["failed"], 3);
    let errors = v["summary"]["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["count"], 3);
    assert!(errors[0]["error"].as_str().unwrap().contains('x'));

    // flush of that batch says so too, in JSON and in text.
    let batch = v["batch_id"].to_string();
    let r = d.wqctl(&["-o", "json", "flush", "--batch", &batch]);
    let f = r.expect_code(3).json();
    assert_eq!(f["items_covered"], 3);
    assert_eq!(f["states"]["failed"], 3);
    assert_eq!(f["all_ok"], false);
    d.wqctl(&["flush", "--batch", &batch]).expect_code(3);
    // --flush as well.
    d.wqctl(&[
        "submit",
        "-t",
        "cpu:0",
        "--handler",
        "noop",
        "--arg",
        "fail=x",
        "--flush",
    ])
    .expect_code(3);
}

#[test]
fn flush_cancel_drain_results_and_stats() {
    let d = Daemon::start("two-socket");
    let r = d.wqctl(&[
        "-o",
        "json",
        "submit",
        "-t",
        "cpus:0-3",
        "--handler",
        "sleep",
        "--arg",
        "ms=100",
        "-n",
        "8",
    ]);
    let v = r.expect_code(0).json();
    assert!(v.get("summary").is_none(), "no summary without --wait");
    let batch = v["batch_id"].to_string();
    let item_ids = ids(&v);

    let f = d
        .wqctl(&["-o", "json", "flush", "--batch", &batch])
        .expect_code(0)
        .json();
    assert_eq!(f["items_covered"], 8);
    assert_eq!(f["states"]["ok"], 8);
    assert_eq!(f["all_ok"], true);
    assert_eq!(f["summary"]["items"], 8);
    let list = format!("{},{}", item_ids[0], item_ids[1]);
    let f = d
        .wqctl(&["-o", "json", "flush", "--items", &list, "--summary-only"])
        .expect_code(0)
        .json();
    assert_eq!(f["items_covered"], 2);
    let f = d
        .wqctl(&["-o", "json", "flush", "--workqueue", "default"])
        .expect_code(0)
        .json();
    assert_eq!(f["items_covered"], 0);

    // results: found, with the result's fields; unknown ids say so.
    let id = item_ids[0].to_string();
    let res = d
        .wqctl(&["-o", "json", "results", &id, "999999"])
        .expect_code(0)
        .json();
    let items = res["items"].as_array().unwrap();
    assert_eq!(items[0]["status"], "found");
    assert_eq!(items[0]["result"]["state"], "ok");
    assert_eq!(items[0]["result"]["handler"], "sleep");
    assert_eq!(items[0]["result"]["target"], "cpus:0-3");
    assert!(items[0]["result"]["cpu_started"].as_u64().unwrap() <= 3);
    assert_eq!(items[1]["status"], "unknown");
    let text = d.wqctl(&["results", &id]).expect_code(0).stdout.clone();
    assert!(text.contains(&id) && text.contains("ok"), "{text}");

    // cancel: delayed items are pending and get cancelled without running.
    let v = d
        .wqctl(&[
            "-o",
            "json",
            "submit",
            "-t",
            "cpu:2",
            "--handler",
            "noop",
            "-n",
            "2",
            "--delay",
            "60s",
        ])
        .expect_code(0)
        .json();
    let b = v["batch_id"].to_string();
    let c = d
        .wqctl(&["-o", "json", "cancel", "--batch", &b])
        .expect_code(0)
        .json();
    let outcomes: Vec<(&str, &str)> = c["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["outcome"].as_str().unwrap(), i["state"].as_str().unwrap()))
        .collect();
    assert_eq!(outcomes, vec![("cancelled-pending", "cancelled"); 2], "{c}");
    let again = d
        .wqctl(&["-o", "json", "cancel", "--items", &ids(&v)[0].to_string()])
        .expect_code(0)
        .json();
    assert_eq!(again["items"][0]["outcome"], "already-terminal");

    // drain
    d.wqctl(&[
        "submit",
        "-t",
        "cpu:5",
        "--handler",
        "sleep",
        "--arg",
        "ms=200",
        "-n",
        "3",
    ])
    .expect_code(0);
    let dr = d.wqctl(&["-o", "json", "drain"]).expect_code(0).json();
    assert_eq!(dr["workqueue"], "default");
    assert_eq!(dr["states"]["ok"], 3);
    assert!(dr["waited_us"].as_u64().is_some());

    // stats
    let s = d.wqctl(&["-o", "json", "stats"]).expect_code(0).json();
    assert_eq!(s["items"]["ok"], 11);
    assert_eq!(s["items"]["cancelled"], 2);
    assert_eq!(s["items"]["pending"], 0);
    assert_eq!(s["batches_accepted"], 3);
    assert_eq!(s["workqueues"], 1);
    assert!(s["handlers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h == "noop"));
    assert!(!s["version"].as_str().unwrap().is_empty());
    d.wqctl(&["stats"]).expect_code(0);
}

#[test]
fn payload_from_stdin() {
    let d = Daemon::start("two-socket");
    let r = d.wqctl_stdin(
        &[
            "-o",
            "json",
            "submit",
            "-t",
            "cpu:0",
            "--handler",
            "digest",
            "--payload-file",
            "-",
            "--wait",
        ],
        Some(b"abc"),
    );
    let v = r.expect_code(0).json();
    let id = ids(&v)[0].to_string();
    let res = d
        .wqctl(&["-o", "json", "results", &id])
        .expect_code(0)
        .json();
    // base64 of the hex sha256 of "abc".
    let out = res["items"][0]["result"]["output"].as_str().unwrap();
    assert!(out.starts_with("YmE3ODE2YmY4ZjAx"), "{out}");
}

#[test]
fn wq_create_list_update_delete() {
    let d = Daemon::start("two-socket");
    let a = d
        .wqctl(&[
            "-o",
            "json",
            "wq",
            "create",
            "fast",
            "--max-active",
            "4",
            "--ordered",
            "--nice",
            "-5",
            "--placement",
            "least-loaded",
            "--fallback",
            "reject",
            "--max-queued",
            "50",
            "--results",
            "summary",
        ])
        .expect_code(0)
        .json();
    assert_eq!(a["name"], "fast");
    assert_eq!(a["results"], "summary");
    assert_eq!(a["max_active"], 4);
    assert_eq!(a["ordered"], true);
    assert_eq!(a["nice"], -5);
    assert_eq!(a["placement"], "least-loaded");
    assert_eq!(a["fallback"], "reject");
    assert_eq!(a["max_queued"], 50);
    check_failed(&d.wqctl(&["wq", "create", "fast"]), "ALREADY_EXISTS");

    let l = d.wqctl(&["-o", "json", "wq", "list"]).expect_code(0).json();
    let names: Vec<&str> = l["workqueues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["default", "fast"]);
    let one = d
        .wqctl(&["-o", "json", "wq", "list", "fast"])
        .expect_code(0)
        .json();
    assert_eq!(one["workqueues"][0]["stats"]["pending"], 0);
    assert_eq!(one["workqueues"][0]["stats"]["draining"], false);
    assert_eq!(one["workqueues"][0]["results"], "summary");
    let text = d.wqctl(&["wq", "list"]).expect_code(0).stdout.clone();
    assert!(text.contains("fast") && text.contains("default"), "{text}");
    assert!(text.contains("RESULTS"), "{text}");
    let row = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some("fast"))
        .unwrap_or_else(|| panic!("a row for fast: {text}"));
    assert!(
        row.split_whitespace().any(|w| w == "summary"),
        "the row shows results: {row}"
    );

    let u = d
        .wqctl(&[
            "-o",
            "json",
            "wq",
            "update",
            "fast",
            "--ordered",
            "false",
            "--max-active",
            "2",
            "--results",
            "full",
        ])
        .expect_code(0)
        .json();
    assert_eq!(u["results"], "full");
    assert_eq!(
        (
            &u["ordered"],
            &u["max_active"],
            &u["placement"],
            &u["max_queued"]
        ),
        (
            &Value::Bool(false),
            &Value::from(2),
            &Value::from("least-loaded"),
            &Value::from(50)
        )
    );

    d.wqctl(&[
        "submit",
        "-w",
        "fast",
        "-t",
        "cpu:1",
        "--handler",
        "sleep",
        "--arg",
        "ms=100",
    ])
    .expect_code(0);
    let del = d
        .wqctl(&["-o", "json", "wq", "delete", "fast"])
        .expect_code(0)
        .json();
    assert_eq!(del["deleted"], "fast");
    assert_eq!(del["states"]["ok"], 1);
    check_failed(&d.wqctl(&["wq", "delete", "fast"]), "NOT_FOUND");
    check_failed(
        &d.wqctl(&["wq", "delete", "default"]),
        "FAILED_PRECONDITION",
    );
}

/// `--results` takes only the three words (a usage error otherwise).
#[test]
fn wq_results_flag_is_checked() {
    let d = Daemon::start("two-socket");
    let r = d.wqctl(&["wq", "create", "x", "--results", "some"]);
    r.expect_code(2);
    assert!(r.stderr.contains("--results"), "{}", r.stderr);
}

/// A waited submit to a workqueue that keeps no per-item results prints the daemon's counts
/// (needs the engine to honour `results = summary`).
#[test]
fn submit_wait_on_a_summary_workqueue_prints_counts() {
    let d = Daemon::start("two-socket");
    d.wqctl(&["wq", "create", "sum", "--results", "summary"])
        .expect_code(0);
    let args = [
        "submit",
        "-w",
        "sum",
        "-t",
        "all",
        "--handler",
        "noop",
        "-n",
        "7",
        "--wait",
    ];
    let v = d
        .wqctl(&[&["-o", "json"][..], &args[..]].concat())
        .expect_code(0)
        .json();
    assert_eq!(v["all_ok"], true);
    assert_eq!(v["summary"]["states"]["ok"], 7);
    assert_eq!(v["summary"]["items"], 0, "no per-item results came back");
    let r = d.wqctl(&args);
    r.expect_code(0);
    assert!(
        r.stdout.contains("states:   ok 7") && r.stdout.contains("none kept (counts only)"),
        "{}",
        r.stdout
    );
    // A failed item still exits 3, from the counts alone.
    d.wqctl(&[
        "submit",
        "-w",
        "sum",
        "-t",
        "cpu:0",
        "--handler",
        "noop",
        "--arg",
        "fail=x",
        "--wait",
    ])
    .expect_code(3);
}

#[test]
fn errors_exit_1_with_one_line() {
    let d = Daemon::start("two-socket");
    let r = d.wqctl(&["submit", "-t", "cpu: 3", "--handler", "noop"]);
    check_failed(&r, "INVALID_ARGUMENT");
    assert!(r.stderr.contains("items[0]"), "{}", r.stderr);
    // JSON output changes nothing on failure: stdout stays empty.
    check_failed(
        &d.wqctl(&["-o", "json", "submit", "-t", "all", "--handler", "nope"]),
        "INVALID_ARGUMENT",
    );
    check_failed(
        &d.wqctl(&["submit", "-t", "all", "--handler", "noop", "-w", "missing"]),
        "NOT_FOUND",
    );
    check_failed(&d.wqctl(&["flush", "--batch", "424242"]), "NOT_FOUND");
    check_failed(&d.wqctl(&["drain", "missing"]), "NOT_FOUND");
    check_failed(
        &d.wqctl(&["wq", "update", "missing", "--max-active", "2"]),
        "NOT_FOUND",
    );
    // No daemon there.
    let gone = d.dir().join("absent.sock");
    let r = run_wqctl(Some(&gone), &["stats"], None);
    check_failed(&r, "UNAVAILABLE");
    assert!(r.stderr.contains("absent.sock"), "{}", r.stderr);
    // Usage errors are 2 and need no daemon.
    let r = run_wqctl(Some(&gone), &["submit", "--handler", "noop"], None);
    r.expect_code(2);
    assert!(r.stdout.is_empty());
}

/// `wqctl --addr https://...` against the real daemon's TCP listener with TLS, a required
/// client certificate (mTLS) and a bearer token: the documented remote path works with all
/// three, and each missing piece is a one-line refusal (exit 1) that ran nothing.
#[test]
fn https_with_client_certificate_and_token() {
    let pki = Pki::new();
    std::fs::write(pki.path("token"), "s3cret-token\n").unwrap();
    let p = |name: &str| pki.path(name).display().to_string();
    let config = format!(
        "[security]\ntls_cert = {:?}\ntls_key = {:?}\nclient_ca = {:?}\ntoken_file = {:?}\n",
        p("server.pem"),
        p("server.key"),
        p("ca.pem"),
        p("token")
    );
    let d = Daemon::builder("two-socket")
        .config(&config)
        .arg("--tcp-listen")
        .arg("127.0.0.1:0")
        .start();
    let mut addr = None;
    for _ in 0..200 {
        addr = d
            .stderr()
            .lines()
            .find_map(|l| l.strip_prefix("wqd: listening on tcp:").map(str::to_string));
        if addr.is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let url = format!("https://{}", addr.expect("wqd printed its TCP address"));
    let (ca, cert, key, token) = (p("ca.pem"), p("client.pem"), p("client.key"), p("token"));
    let full = [
        "--addr",
        url.as_str(),
        "--tls-ca",
        ca.as_str(),
        "--tls-cert",
        cert.as_str(),
        "--tls-key",
        key.as_str(),
        "--token-file",
        token.as_str(),
    ];

    let with = |extra: &[&str]| {
        let mut a: Vec<&str> = full.to_vec();
        a.extend_from_slice(extra);
        run_wqctl(None, &a, None)
    };
    let r = with(&["--output", "json", "topology"]);
    r.expect_code(0);
    assert!(r.json()["epoch"].as_u64().is_some(), "{}", r.stdout);
    let r = with(&[
        "--output",
        "json",
        "submit",
        "-t",
        "cache:0",
        "--handler",
        "noop",
        "--count",
        "5",
        "--wait",
    ]);
    r.expect_code(0);
    assert_eq!(r.json()["summary"]["states"]["ok"], 5, "{}", r.stdout);

    // Without the token: UNAUTHENTICATED. Without the client certificate: the TLS handshake
    // fails. Plain http:// to a TLS listener fails too. None of them runs anything.
    let no_token: Vec<&str> = full[..8].to_vec();
    let mut a = no_token.clone();
    a.extend(["submit", "-t", "cache:0", "--handler", "noop", "--wait"]);
    let r = run_wqctl(None, &a, None);
    check_failed(&r, "UNAUTHENTICATED");
    let mut a: Vec<&str> = vec!["--addr", url.as_str(), "--tls-ca", ca.as_str()];
    a.extend([
        "--token-file",
        token.as_str(),
        "submit",
        "-t",
        "cache:0",
        "--handler",
        "noop",
    ]);
    let r = run_wqctl(None, &a, None);
    assert_eq!(r.code, 1, "no client certificate: {r:?}");
    let plain = url.replacen("https://", "http://", 1);
    let r = run_wqctl(None, &["--addr", plain.as_str(), "topology"], None);
    assert_eq!(r.code, 1, "plain http to a TLS listener: {r:?}");

    let r = with(&["--output", "json", "stats"]);
    r.expect_code(0);
    assert_eq!(
        r.json()["batches_accepted"],
        1,
        "only the full-credential batch ran: {}",
        r.stdout
    );
}
