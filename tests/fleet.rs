//! Issue 15: wqd daemons as members of a fleet over NATS JetStream, with real components
//! only — a `nats-server -js` started here (file storage in a temporary folder, loopback, a free
//! port) and real `wqd` daemons on sysfs fixture trees, driven through `wqd-client`'s fleet API.
//!
//! Each test starts its own server and members, so tests run in parallel without sharing a
//! stream. Every check counts: items, results, redeliveries, duplicates suppressed (by members
//! and by the flush), lost; the numbers are printed (`--nocapture` shows them).
//!
//! `nats-server` comes from Debian's package (`.ci/run` installs it); `WQD_E2E_NATS_SERVER`
//! points at another binary. Without one the tests fail, saying how to install it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use wqd_client::fleet::{Fleet, FleetOptions, FleetReport, Selector};
use wqd_client::Item;
use wqd_e2e::{metric, parse_cpulist, Daemon};

/// Members' settings: short enough that a dead member's items come back within seconds.
const ACK_WAIT: &str = "2s";

/// `nats-server -js` on loopback; stopped (SIGKILL) on drop.
struct Nats {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

fn nats_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("WQD_E2E_NATS_SERVER") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "nats-server not found (apt-get install nats-server, or set WQD_E2E_NATS_SERVER)"
            )
        })
}

impl Nats {
    fn start() -> Nats {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = tempfile::Builder::new()
            .prefix("wqd-e2e-nats")
            .tempdir()
            .expect("tempdir");
        let mut n = Nats {
            child: None,
            port,
            dir,
        };
        n.spawn();
        n
    }

    /// (Re)starts the server on the same port and store.
    fn spawn(&mut self) {
        let store = self.dir.path().join("store");
        let log = self.dir.path().join("nats.log");
        let child = Command::new(nats_bin())
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&store)
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "nats-server not listening; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait (the store stays).
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(pid) = libc::pid_t::try_from(c.id()) {
                // SAFETY: plain syscall on our own, not yet reaped child.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The config of member `host` of the fleet at `url`, with metrics on and workqueue `one`
/// (ordered: one item at a time, so a batch of `sleep` items takes a while).
fn member_config(url: &str, host: &str) -> String {
    format!(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n[[workqueue]]\nname = \"one\"\nordered = true\n[fleet]\nservers = [\"{url}\"]\nhost = \"{host}\"\n\
         ack_wait = \"{ACK_WAIT}\"\nmax_deliver = 5\nnak_delay = \"50ms\"\nhost_ttl = \"3s\"\n"
    )
}

fn member(fixture: &str, url: &str, host: &str) -> Daemon {
    Daemon::builder(fixture)
        .config(&member_config(url, host))
        .start()
}

async fn fleet(url: &str) -> Fleet {
    Fleet::connect(FleetOptions::new(url))
        .await
        .expect("connect to the fleet")
}

/// Waits until exactly the members `names` have host records.
async fn wait_members(f: &Fleet, names: &[&str]) {
    let want: BTreeSet<String> = names.iter().map(|s| s.to_string()).collect();
    let t0 = Instant::now();
    loop {
        if let Ok(h) = f.hosts().await {
            let got: BTreeSet<String> = h.into_iter().map(|h| h.name).collect();
            if got == want {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "members {got:?}, expected {want:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Group target → member CPUs, of a daemon's topology.
async fn groups_of(d: &Daemon) -> HashMap<String, BTreeSet<u32>> {
    let t = d.client().await.topology().await.expect("GetTopology");
    t.groups
        .iter()
        .map(|g| (g.target.clone(), parse_cpulist(&g.members)))
        .collect()
}

/// Where one item must end.
#[derive(Debug, Clone)]
struct Expect {
    /// The host, when the selector names one (host=, each-host) or only one can place it.
    host: Option<String>,
    target: String,
}

/// What [`check`] counted.
#[derive(Debug, Default)]
struct Counts {
    results: usize,
    per_host: BTreeMap<String, usize>,
    redeliveries: u64,
}

/// Asserts every expected id has exactly one `ok` result, on the right host, started on a CPU
/// of its group there; nothing lost, nothing extra.
fn check(
    rep: &FleetReport,
    expect: &HashMap<String, Expect>,
    groups: &HashMap<String, HashMap<String, BTreeSet<u32>>>,
) -> Counts {
    assert!(
        rep.missing.is_empty(),
        "lost: {} items without a result, e.g. {:?}",
        rep.missing.len(),
        rep.missing.iter().take(5).collect::<Vec<_>>()
    );
    assert_eq!(rep.results.len(), expect.len(), "one result per item");
    let mut c = Counts::default();
    for (id, e) in expect {
        let r = rep
            .results
            .get(id)
            .unwrap_or_else(|| panic!("no result for {id}"));
        let x = r.result.as_ref().expect("an item result");
        assert_eq!(
            wqd_client::fleet::state_name(r),
            "ok",
            "{id} on {}: {} {}",
            r.host,
            x.error,
            x.target
        );
        if let Some(h) = &e.host {
            assert_eq!(&r.host, h, "{id} ran on the wrong host");
        }
        let cpu = x
            .cpu_started
            .unwrap_or_else(|| panic!("{id}: no start CPU"));
        let members = groups
            .get(&r.host)
            .and_then(|g| g.get(&e.target))
            .unwrap_or_else(|| panic!("{id}: {} has no group {}", r.host, e.target));
        assert!(
            members.contains(&cpu),
            "{id}: CPU {cpu} is not in {} on {}",
            e.target,
            r.host
        );
        c.results += 1;
        *c.per_host.entry(r.host.clone()).or_default() += 1;
        c.redeliveries += r.deliveries.saturating_sub(1);
    }
    c
}

/// Member-side duplicates suppressed, from a live daemon's metrics.
fn member_dups(d: &Daemon) -> u64 {
    let page = d.scrape_metrics();
    metric(
        &page,
        "wqd_fleet_duplicates_suppressed_total{at=\"member\"}",
    )
    .unwrap_or(0.0) as u64
        + metric(
            &page,
            "wqd_fleet_duplicates_suppressed_total{at=\"publish\"}",
        )
        .unwrap_or(0.0) as u64
}

/// Per item of a batch: its selector, the host it must end on (if one), its target.
type Meta = Vec<(Selector, Option<String>, String)>;

/// Builds a batch: `(selector, target, handler args)` runs, and the expectation of each id.
fn plan(
    runs: &[(Selector, &str, usize, Option<&str>)],
    handler: (&str, &[(&str, &str)]),
) -> (Vec<(Selector, Item)>, Meta) {
    let mut items = Vec::new();
    let mut meta = Vec::new();
    for (sel, target, n, only) in runs {
        for _ in 0..*n {
            let mut it = Item::new(*target, handler.0);
            for (k, v) in handler.1 {
                it = it.arg(*k, *v);
            }
            items.push((sel.clone(), it));
            let host = match sel {
                Selector::Host(h) => Some(h.clone()),
                _ => only.map(str::to_string),
            };
            meta.push((sel.clone(), host, target.to_string()));
        }
    }
    (items, meta)
}

/// The expectation of every id of a submitted batch, from [`plan`]'s metadata.
fn expectations(batch: &wqd_client::fleet::FleetBatch, meta: &Meta) -> HashMap<String, Expect> {
    let mut out = HashMap::new();
    for (i, (sel, host, target)) in meta.iter().enumerate() {
        let i = u32::try_from(i).expect("index");
        if *sel == Selector::EachHost {
            for h in &batch.each_hosts {
                out.insert(
                    wqd_proto_id(&batch.batch, i, Some(h)),
                    Expect {
                        host: Some(h.clone()),
                        target: target.clone(),
                    },
                );
            }
        } else {
            out.insert(
                wqd_proto_id(&batch.batch, i, None),
                Expect {
                    host: host.clone(),
                    target: target.clone(),
                },
            );
        }
    }
    assert_eq!(out.len(), batch.ids.len(), "the ids the client published");
    out
}

fn wqd_proto_id(batch: &str, i: u32, h: Option<&str>) -> String {
    match h {
        Some(h) => format!("{batch}.{i}-{h}"),
        None => format!("{batch}.{i}"),
    }
}

fn print_numbers(what: &str, items: usize, rep: &FleetReport, c: &Counts, member_dups: u64) {
    println!(
        "fleet {what}: items {items}, results {}, per host {:?}, redeliveries {}, duplicates suppressed {} (members {member_dups}, flush {}), lost {}, waited {:.2}s",
        c.results,
        c.per_host,
        c.redeliveries,
        member_dups + rep.duplicates,
        rep.duplicates,
        rep.missing.len(),
        rep.waited.as_secs_f64()
    );
}

/// Three members on three topologies; 10 000 items across host=, any and each-host; every
/// one ends ok exactly once, on the right host, on a CPU of its group there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_items_across_selectors_end_once_on_the_right_cpus() {
    let nats = Nats::start();
    let url = nats.url();
    let ds = [
        ("ts", member("two-socket", &url, "ts")),
        ("vm", member("vm8-offline", &url, "vm")),
        ("en", member("empty-node", &url, "en")),
    ];
    let f = fleet(&url).await;
    wait_members(&f, &["ts", "vm", "en"]).await;
    let mut groups = HashMap::new();
    for (h, d) in &ds {
        groups.insert(h.to_string(), groups_of(d).await);
    }
    let host = |h: &str| Selector::Host(h.into());
    let runs = [
        (host("ts"), "node:1", 1500, None),
        (host("vm"), "cache:0", 1500, None),
        (host("en"), "node:0", 1000, None),
        // Only two-socket has a node 1.
        (Selector::Any, "node:1", 2000, Some("ts")),
        (Selector::Any, "node:0", 2000, None),
        (Selector::EachHost, "node:0", 2000, None),
    ];
    let (items, meta) = plan(&runs, ("noop", &[]));
    let n = items.len();
    assert_eq!(n, 10_000);
    let t0 = Instant::now();
    let b = f.submit("default", items).await.expect("fleet submit");
    let rep = f
        .flush_ids(&b.batch, &b.ids, Duration::from_secs(120))
        .await
        .expect("fleet flush");
    let took = t0.elapsed();
    let expect = expectations(&b, &meta);
    let c = check(&rep, &expect, &groups);
    assert_eq!(
        c.results, 14_000,
        "10 000 items, 2 000 of them copied to 3 hosts"
    );
    assert_eq!(rep.duplicates, 0, "no member died: no result twice");
    // Every member took a share of the `any` node:0 items or at least its own.
    for h in ["ts", "vm", "en"] {
        assert!(
            c.per_host.get(h).copied().unwrap_or(0) >= 2_000,
            "{h}: {:?}",
            c.per_host
        );
    }
    let dups: u64 = ds.iter().map(|(_, d)| member_dups(d)).sum();
    print_numbers("10k selectors", n, &rep, &c, dups);
    println!(
        "fleet 10k selectors: submit→all results {:.2}s",
        took.as_secs_f64()
    );
}

/// `kill -9` of a member mid-batch: its host items come back to it once restarted, its
/// `any` items go to the others after the ack wait; nothing is lost and the flush returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_killed_mid_batch_loses_nothing() {
    let nats = Nats::start();
    let url = nats.url();
    let mut ka = member("two-socket", &url, "ka");
    let kb = member("vm8-offline", &url, "kb");
    let kc = member("empty-node", &url, "kc");
    let f = fleet(&url).await;
    wait_members(&f, &["ka", "kb", "kc"]).await;
    let mut groups = HashMap::new();
    groups.insert("ka".to_string(), groups_of(&ka).await);
    groups.insert("kb".to_string(), groups_of(&kb).await);
    groups.insert("kc".to_string(), groups_of(&kc).await);
    let runs = [
        (Selector::Host("ka".into()), "node:0", 600, None),
        (Selector::Any, "node:0", 900, None),
        (Selector::EachHost, "node:0", 150, None),
    ];
    let (items, meta) = plan(&runs, ("sleep", &[("ms", "3")]));
    let n = items.len();
    let b = f.submit("one", items).await.expect("fleet submit");
    let expect = expectations(&b, &meta);
    // Mid-batch: ka holds hundreds of items (20 ms each, 8 CPUs in its node 0).
    tokio::time::sleep(Duration::from_millis(700)).await;
    let before = f
        .flush_ids(&b.batch, &b.ids, Duration::from_millis(100))
        .await
        .expect("partial flush");
    assert!(!before.missing.is_empty(), "the kill happens mid-batch");
    let pid = libc::pid_t::try_from(ka.pid()).expect("pid");
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(ka.wait_exit(Duration::from_secs(10)).is_some(), "ka died");
    drop(ka);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ka2 = member("two-socket", &url, "ka");
    let rep = f
        .flush_ids(&b.batch, &b.ids, Duration::from_secs(120))
        .await
        .expect("fleet flush");
    let c = check(&rep, &expect, &groups);
    assert!(
        c.redeliveries > 0,
        "the killed member's unacked items were delivered again"
    );
    let dups = member_dups(&ka2) + member_dups(&kb) + member_dups(&kc);
    print_numbers("kill -9", n, &rep, &c, dups);
}

/// `nats-server` restarted mid-batch (same port, same store): members and the client
/// reconnect; nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_restarted_mid_batch_loses_nothing() {
    let mut nats = Nats::start();
    let url = nats.url();
    let ds = [
        ("ra", member("two-socket", &url, "ra")),
        ("rb", member("vm8-offline", &url, "rb")),
        ("rc", member("empty-node", &url, "rc")),
    ];
    let f = fleet(&url).await;
    wait_members(&f, &["ra", "rb", "rc"]).await;
    let mut groups = HashMap::new();
    for (h, d) in &ds {
        groups.insert(h.to_string(), groups_of(d).await);
    }
    let runs = [
        (Selector::Host("rb".into()), "node:0", 500, None),
        (Selector::Any, "node:0", 1500, None),
        (Selector::EachHost, "node:0", 100, None),
    ];
    let (items, meta) = plan(&runs, ("sleep", &[("ms", "2")]));
    let n = items.len();
    let b = f.submit("one", items).await.expect("fleet submit");
    let expect = expectations(&b, &meta);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = f
        .flush_ids(&b.batch, &b.ids, Duration::from_millis(100))
        .await
        .expect("partial flush");
    assert!(!before.missing.is_empty(), "the restart happens mid-batch");
    println!(
        "fleet nats-server restart: {} of {} results before the restart",
        before.results.len(),
        before.expected
    );
    nats.stop();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    nats.spawn();
    let rep = f
        .flush_ids(&b.batch, &b.ids, Duration::from_secs(120))
        .await
        .expect("fleet flush");
    let c = check(&rep, &expect, &groups);
    let dups: u64 = ds.iter().map(|(_, d)| member_dups(d)).sum();
    print_numbers("nats-server restart", n, &rep, &c, dups);
}

/// A member whose group goes empty (its CPUs go offline in the fixture) hands `any` items for
/// that group to a member that has it live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_group_hands_any_items_to_another_member() {
    let nats = Nats::start();
    let url = nats.url();
    let ga = member("two-socket", &url, "ga");
    let gb = member("two-socket", &url, "gb");
    let gc = member("vm8-offline", &url, "gc");
    let f = fleet(&url).await;
    wait_members(&f, &["ga", "gb", "gc"]).await;
    let node1 = groups_of(&ga).await["node:1"].clone();
    for cpu in &node1 {
        ga.fixture().set_offline(*cpu);
    }
    let client = ga.client().await;
    let t0 = Instant::now();
    loop {
        let t = client.topology().await.expect("GetTopology");
        let g = t.groups.iter().find(|g| g.target == "node:1");
        if g.is_some_and(|g| g.live_members.is_empty()) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "node:1 still live on ga"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut groups = HashMap::new();
    for (h, d) in [("ga", &ga), ("gb", &gb), ("gc", &gc)] {
        groups.insert(h.to_string(), groups_of(d).await);
    }
    let runs = [(Selector::Any, "node:1", 600, Some("gb"))];
    let (items, meta) = plan(&runs, ("noop", &[]));
    let b = f.submit("default", items).await.expect("fleet submit");
    let expect = expectations(&b, &meta);
    let rep = f
        .flush_ids(&b.batch, &b.ids, Duration::from_secs(120))
        .await
        .expect("fleet flush");
    let c = check(&rep, &expect, &groups);
    assert_eq!(c.per_host.get("gb"), Some(&600), "{:?}", c.per_host);
    let page = ga.scrape_metrics();
    let naks = metric(&page, "wqd_fleet_naks_total{reason=\"no_live_cpu\"}").unwrap_or(0.0)
        + metric(
            &gc.scrape_metrics(),
            "wqd_fleet_naks_total{reason=\"no_live_cpu\"}",
        )
        .unwrap_or(0.0);
    assert!(naks > 0.0, "members without node:1 handed items back");
    println!(
        "fleet empty group: items 600, all on gb, naks by ga and gc {naks}, redeliveries {}, lost {}",
        c.redeliveries,
        rep.missing.len()
    );
}

/// Asserts the fan-out item `id` (run on `host`, whose groups are `groups`) ended with
/// exactly one `ok` result per group of `level` there, each on a CPU of its group (or, for a
/// group without a live CPU, fallen back with the reason); returns the number of groups.
fn check_each(
    rep: &FleetReport,
    id: &str,
    host: &str,
    level: &str,
    groups: &HashMap<String, BTreeSet<u32>>,
) -> usize {
    let mine: BTreeSet<&String> = groups
        .keys()
        .filter(|g| g.strip_prefix(level).is_some_and(|n| n.starts_with(':')))
        .collect();
    assert!(!mine.is_empty(), "{host} has no {level} group");
    assert_eq!(
        rep.expanded.get(id).copied(),
        u32::try_from(mine.len()).ok(),
        "{id}: expansion count on {host}"
    );
    assert!(
        !rep.results.contains_key(id),
        "{id}: no result under the item's own id"
    );
    let got: Vec<&wqd_client::fleet::FleetResult> =
        rep.results.values().filter(|r| r.item == id).collect();
    assert_eq!(
        got.len(),
        mine.len(),
        "{id}: one result per group of {host}"
    );
    for g in &mine {
        let gid = format!("{id}/{g}");
        let r = rep
            .results
            .get(&gid)
            .unwrap_or_else(|| panic!("no result for {gid}"));
        let x = r.result.as_ref().expect("an item result");
        assert_eq!(r.host, host, "{gid} ran on the wrong host");
        assert_eq!(
            wqd_client::fleet::state_name(r),
            "ok",
            "{gid}: {} {}",
            x.error,
            x.fallback_reason
        );
        assert_eq!(&x.target, *g, "{gid}: the result names its group");
        let cpu = x
            .cpu_started
            .unwrap_or_else(|| panic!("{gid}: no start CPU"));
        if x.fallback_level() == wqd_client::proto::FallbackLevel::Unspecified {
            assert!(
                groups[*g].contains(&cpu),
                "{gid}: CPU {cpu} is not in {g} on {host}"
            );
        } else {
            // A group without a live CPU (the fixture's offline CPUs): the workqueue's
            // fallback widened it, as for a local each: item, and says so.
            assert!(
                x.fallback_reason.contains(g.as_str()),
                "{gid}: fell back without saying why: {x:?}"
            );
        }
    }
    mine.len()
}

/// `each-host` × `each:cache`: one item per LLC on every host. Every member expands the item
/// against its own groups; the flush waits for every group's result; a host where the level
/// names nothing ends the item rejected, saying so; `any` × `each:` is refused at submit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_host_each_cache_is_one_item_per_llc_of_every_host() {
    let nats = Nats::start();
    let url = nats.url();
    let ds = [
        ("xa", member("two-socket", &url, "xa")),
        ("xb", member("vm8-offline", &url, "xb")),
        ("xc", member("empty-node", &url, "xc")),
    ];
    let f = fleet(&url).await;
    wait_members(&f, &["xa", "xb", "xc"]).await;
    let mut groups = HashMap::new();
    for (h, d) in &ds {
        groups.insert(h.to_string(), groups_of(d).await);
    }
    let caches = |h: &str| groups[h].keys().filter(|g| g.starts_with("cache:")).count();
    assert_eq!(caches("xa"), 4, "two-socket has four LLCs");
    // any × each: is ambiguous: refused before anything is published.
    let e = f
        .submit(
            "default",
            [(Selector::Any, Item::new("each:cache", "noop"))],
        )
        .await
        .expect_err("any with each:cache");
    assert!(e.to_string().contains("each-host"), "{e}");
    let items = vec![
        (Selector::EachHost, Item::new("each:cache", "noop")),
        (
            Selector::EachHost,
            Item::new("each:cache", "sleep").arg("ms", "20").key("k"),
        ),
        (Selector::Host("xa".into()), Item::new("each:node", "noop")),
        (Selector::EachHost, Item::new("node:0", "noop")),
        // A partition no member has: every host says so, with a rejected result.
        (
            Selector::Host("xb".into()),
            Item::new("each:nosuch", "noop"),
        ),
    ];
    let t0 = Instant::now();
    let b = f.submit("default", items).await.expect("fleet submit");
    let rep = f
        .flush_ids(&b.batch, &b.ids, Duration::from_secs(60))
        .await
        .expect("fleet flush");
    assert!(rep.missing.is_empty(), "lost: {:?}", rep.missing);
    assert!(rep.complete(), "{} of {} ended", rep.ended, rep.expected);
    assert_eq!(rep.expected, 3 + 3 + 1 + 3 + 1);
    let mut per_host: BTreeMap<String, usize> = BTreeMap::new();
    let mut results = 0;
    for h in ["xa", "xb", "xc"] {
        for i in [0, 1] {
            let n = check_each(
                &rep,
                &wqd_proto_id(&b.batch, i, Some(h)),
                h,
                "cache",
                &groups[h],
            );
            assert_eq!(n, caches(h));
            *per_host.entry(h.into()).or_default() += n;
            results += n;
        }
        let r = &rep.results[&wqd_proto_id(&b.batch, 3, Some(h))];
        assert_eq!(wqd_client::fleet::state_name(r), "ok");
        results += 1;
    }
    let nodes = check_each(
        &rep,
        &wqd_proto_id(&b.batch, 2, None),
        "xa",
        "node",
        &groups["xa"],
    );
    assert_eq!(nodes, 2, "two-socket has two nodes");
    results += nodes;
    let rej = &rep.results[&wqd_proto_id(&b.batch, 4, None)];
    assert_eq!(wqd_client::fleet::state_name(rej), "rejected");
    let why = &rej.result.as_ref().expect("a result").error;
    assert!(why.contains("each:nosuch") && why.contains("xb"), "{why}");
    results += 1;
    assert_eq!(rep.results.len(), results, "nothing beyond the groups");
    assert_eq!(rep.duplicates, 0);
    for (h, t) in &rep.per_host {
        let own = per_host.get(h).copied().unwrap_or(0)
            + 1
            + if h == "xa" { nodes } else { 0 }
            + if h == "xb" { 1 } else { 0 };
        assert_eq!(t.items as usize, own, "{h}: {:?}", rep.per_host);
    }
    // The same through wqctl: one line per host, every LLC counted.
    let out = Command::new(wqd_e2e::wqctl_bin())
        .args([
            "--fleet",
            &url,
            "submit",
            "--on",
            "each-host",
            "-t",
            "each:cache",
        ])
        .args(["--handler", "noop", "--flush", "--timeout", "60s"])
        .output()
        .expect("run wqctl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "wqctl: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let llcs: usize = ["xa", "xb", "xc"].map(caches).iter().sum();
    assert!(
        text.contains(&format!(
            "3 of 3 items terminal, {llcs} results (3 each: items expanded per group)"
        )),
        "{text}"
    );
    for h in ["xa", "xb", "xc"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(h))
            .unwrap_or_else(|| panic!("no line for {h}: {text}"));
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols.get(1), Some(&caches(h).to_string().as_str()), "{line}");
    }
    println!("{text}");
    println!(
        "fleet each-host x each:cache: items {}, results {results} (LLCs per host {:?}), duplicates {}, lost {}, took {:.2}s",
        rep.expected,
        ["xa", "xb", "xc"].map(caches),
        rep.duplicates,
        rep.missing.len(),
        t0.elapsed().as_secs_f64()
    );
}

/// `kill -9` of a member in the middle of an `each:` item: after the restart the item is
/// delivered again; groups whose result was published are not run again (the member finds
/// their results), the others run; every group ends with exactly one result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_each_item_redelivered_after_kill_reruns_only_unpublished_groups() {
    let nats = Nats::start();
    let url = nats.url();
    let mut ra = member("two-socket", &url, "ra");
    let f = fleet(&url).await;
    wait_members(&f, &["ra"]).await;
    let groups = groups_of(&ra).await;
    let cpus = groups.keys().filter(|g| g.starts_with("cpu:")).count();
    assert_eq!(cpus, 16);
    // Workqueue `one` is ordered: the 16 groups run one after another, 250 ms each.
    let b = f
        .submit(
            "one",
            [(
                Selector::Host("ra".into()),
                Item::new("each:cpu", "sleep").arg("ms", "250"),
            )],
        )
        .await
        .expect("fleet submit");
    let id = wqd_proto_id(&b.batch, 0, None);
    let t0 = Instant::now();
    let before = loop {
        let r = f
            .flush_ids(&b.batch, &b.ids, Duration::from_millis(100))
            .await
            .expect("partial flush");
        if r.results.len() >= 4 {
            break r;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "no progress");
    };
    assert!(!before.complete(), "the kill happens mid-item");
    let pid = libc::pid_t::try_from(ra.pid()).expect("pid");
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(ra.wait_exit(Duration::from_secs(10)).is_some(), "ra died");
    drop(ra);
    // Results published before the kill (the last ones may have landed during it).
    let published = f
        .flush_ids(&b.batch, &b.ids, Duration::from_millis(300))
        .await
        .expect("partial flush");
    let ra2 = member("two-socket", &url, "ra");
    let rep = f
        .flush_ids(&b.batch, &b.ids, Duration::from_secs(60))
        .await
        .expect("fleet flush");
    assert!(rep.complete(), "lost: {:?}", rep.missing);
    let n = check_each(&rep, &id, "ra", "cpu", &groups);
    assert_eq!(n, 16);
    assert_eq!(rep.duplicates, 0, "no group has two results");
    let page = ra2.scrape_metrics();
    let skipped = metric(
        &page,
        "wqd_fleet_duplicates_suppressed_total{at=\"member\"}",
    )
    .unwrap_or(0.0) as usize;
    let rerun_dups = metric(
        &page,
        "wqd_fleet_duplicates_suppressed_total{at=\"publish\"}",
    )
    .unwrap_or(0.0) as usize;
    assert_eq!(
        skipped,
        published.results.len(),
        "the redelivery skipped exactly the groups already published"
    );
    assert_eq!(rerun_dups, 0, "no published group ran again");
    for gid in published.results.keys() {
        assert_eq!(
            rep.results[gid].deliveries, 1,
            "{gid} kept its first result"
        );
    }
    let again = rep.results.values().filter(|r| r.deliveries > 1).count();
    assert_eq!(again + published.results.len(), 16);
    println!(
        "fleet each: kill -9: groups 16, published before the kill {}, skipped on redelivery {skipped}, run after the restart {again}, duplicates {}, lost {}",
        published.results.len(),
        rep.duplicates,
        rep.missing.len()
    );
}

/// The sockets (inodes) of TCP connections the process `pid` holds.
fn tcp_sockets(pid: u32) -> usize {
    let fds = Path::new("/proc").join(pid.to_string()).join("fd");
    let inodes: BTreeSet<String> = std::fs::read_dir(&fds)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    l.to_str()
                        .and_then(|s| s.strip_prefix("socket:["))
                        .and_then(|s| s.strip_suffix(']'))
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    let mut n = 0;
    for f in ["tcp", "tcp6"] {
        let text =
            std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("net").join(f))
                .unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // Column 9 is the inode; state 01 is ESTABLISHED.
            if cols.len() > 9 && cols[3] == "01" && inodes.contains(cols[9]) {
                n += 1;
            }
        }
    }
    n
}

/// Standalone stays the default: without `[fleet]` the daemon opens no TCP connection; with it
/// (and a server up) it does; a bad `[fleet]` exits 64 naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_fleet_the_daemon_never_touches_the_network() {
    let nats = Nats::start();
    let alone = Daemon::start("vm8-offline");
    let joined = member("vm8-offline", &nats.url(), "joined");
    let f = fleet(&nats.url()).await;
    wait_members(&f, &["joined"]).await;
    assert_eq!(
        tcp_sockets(alone.pid()),
        0,
        "standalone daemon holds a TCP connection"
    );
    assert!(
        tcp_sockets(joined.pid()) >= 1,
        "a member holds its NATS connection"
    );
    let Err(bad) = Daemon::builder("vm8-offline")
        .config("[fleet]\nservers = [\"http://127.0.0.1:1\"]\n")
        .try_start()
    else {
        panic!("a bad [fleet] must refuse to start");
    };
    assert_eq!(bad.status.code(), Some(64), "{}", bad.stderr);
    assert!(bad.stderr.contains("fleet.servers[0]"), "{}", bad.stderr);
}
