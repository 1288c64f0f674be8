//! `wqd-bench`: runs every measurement of `docs/benchmarks.md` in one process and writes the
//! markdown table (stdout, and `--out FILE`).
//!
//! Usage: `wqd-bench [--quick] [--only dispatch|contention|hotplug|scale|grpc|workers|service|fleet|busy]...
//! [--out FILE]`, or `wqd-bench --profile-engine ROUNDS [summary] [batch=N] [store=N]` to run only the engine's batch loop (batches of 10k unless said; for a profiler),
//! or `wqd-bench --profile-grpc SOCKET ROUNDS [BATCH] [nowait] [summary] [flush] [empty] [session] [pause=MS] [target=T,..] [runs] [noreceipts]` to drive a daemon already
//! running on SOCKET (e.g. under callgrind) with `Submit(wait)` batches.
//! `--quick` shrinks every section (a smoke run of a few seconds); the figures are then not
//! worth comparing. The counting allocator is installed here, for memory per pending item.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use wqd_bench::{
    alloc, contention, dispatch, fleet, grpc, hotplug, report, scale, service, workers,
};

#[global_allocator]
static A: alloc::Counting = alloc::Counting;

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into());
    let n = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "- CPUs available: {n} ({cpu})\n- kernel: {kernel}\n- load average at start: {load}\n- \
         build: release, rustc as in the workspace\n"
    )
}

const USAGE: &str =
    "usage: wqd-bench [--quick] [--only dispatch|contention|hotplug|scale|grpc|workers|service|fleet|busy]... \
[--out FILE]
       wqd-bench --profile-engine ROUNDS [summary] [batch=N] [store=N] [busy]
       wqd-bench --profile-grpc SOCKET ROUNDS [BATCH] [nowait] [summary] [flush] [empty] [session] [pause=MS] [target=T,..] [runs] [noreceipts] [busy]
       wqd-bench --profile-contention one|split ROUNDS [full] [busy]
Runs every measurement of docs/benchmarks.md (several minutes) and prints the markdown tables;
--quick is a smoke run whose figures are not worth comparing. The busy section, and `busy` on a
profile loop, run beside a thread that never sleeps on each CPU, 10 nice levels below the bench.";

const SECTIONS: [&str; 9] = [
    "dispatch",
    "contention",
    "hotplug",
    "scale",
    "grpc",
    "workers",
    "service",
    "fleet",
    "busy",
];

/// Refuses what a full run would otherwise ignore (a mistyped flag, or `--help`, must not start
/// minutes of benchmarks): `Err` is the message, `Ok(false)` asks for the usage.
fn check_args(args: &[String]) -> Result<bool, String> {
    if args.iter().any(|a| a.starts_with("--profile-")) {
        return Ok(true);
    }
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => return Ok(false),
            "--quick" => {}
            "--out" => {
                it.next().ok_or("--out needs a FILE")?;
            }
            "--only" => match it.next() {
                Some(s) if SECTIONS.contains(&s.as_str()) => {}
                other => {
                    let got = other.map_or("nothing", String::as_str);
                    return Err(format!(
                        "--only takes one of {}, not {got:?}",
                        SECTIONS.join("|")
                    ));
                }
            },
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(true)
}

fn main() {
    // As the daemon does (`wqd_core::malloc`): every system of a run measured with freed
    // heap kept, so that no figure depends on where glibc happened to trim.
    wqd_core::malloc::keep_freed(32 << 20);
    let args: Vec<String> = std::env::args().skip(1).collect();
    match check_args(&args) {
        Ok(true) => {}
        Ok(false) => {
            println!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("wqd-bench: {e}\n{USAGE}");
            std::process::exit(2);
        }
    }
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let only: Vec<&str> = args
        .windows(2)
        .filter(|w| w[0] == "--only")
        .map(|w| w[1].as_str())
        .collect();
    let want = |s: &str| only.is_empty() || only.contains(&s);

    if let Some(n) = args
        .iter()
        .position(|a| a == "--profile-engine")
        .and_then(|i| args.get(i + 1))
    {
        // Only the engine's batch loop, for a profiler (see docs/benchmarks.md).
        let n: usize = n.parse().expect("--profile-engine ROUNDS");
        let (s, w) = dispatch::cpus();
        wqd_bench::topo::pin(s);
        // `summary` (anywhere after ROUNDS): on a workqueue with results = summary.
        let results = match args.iter().any(|a| a == "summary") {
            true => wqd_core::engine::ResultsMode::Summary,
            false => wqd_core::engine::ResultsMode::Full,
        };
        // `batch=N`: batches of N instead of 10 000.
        let batch: usize = args
            .iter()
            .find_map(|a| a.strip_prefix("batch="))
            .map_or(10_000, |b| b.parse().expect("batch=N"));
        // `store=N`: the result store holds N results (2^16 unless said, as the table's).
        let store: usize = args
            .iter()
            .find_map(|a| a.strip_prefix("store="))
            .map_or(1 << 16, |b| b.parse().expect("store=N"));
        let mut e = dispatch::Wqd::with_store(w, results, store);
        let _busy = wqd_bench::busy::Neighbours::if_asked(&args);
        let t0 = Instant::now();
        for _ in 0..n {
            dispatch::System::batch(&mut e, batch);
        }
        let el = t0.elapsed();
        println!(
            "{n} x {batch} items in {el:.1?}: {:.0} ns/item",
            el.as_secs_f64() * 1e9 / (n * batch) as f64
        );
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--profile-contention") {
        // Only two submitters through one engine or one engine each (see contention.rs).
        let one = match args.get(i + 1).map(String::as_str) {
            Some("one") => true,
            Some("split") => false,
            _ => {
                eprintln!("usage: wqd-bench --profile-contention one|split ROUNDS [full] [busy]");
                std::process::exit(2);
            }
        };
        let rounds: usize = args.get(i + 2).and_then(|s| s.parse().ok()).unwrap_or(300);
        let full = args.iter().skip(i + 3).any(|a| a == "full");
        let _busy = wqd_bench::busy::Neighbours::if_asked(&args);
        let el = contention::profile(one, rounds, full);
        println!(
            "{} engine(s), 2 x {rounds} x 1000 items in {el:.2}s: {:.0} items/s",
            if one { 1 } else { 2 },
            (2 * rounds * 1000) as f64 / el
        );
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--profile-grpc") {
        // Only a client loop against a daemon already running (under a profiler).
        let socket = args
            .get(i + 1)
            .expect("--profile-grpc SOCKET ROUNDS [BATCH] [nowait] [summary]");
        let rounds: usize = args.get(i + 2).and_then(|s| s.parse().ok()).unwrap_or(20);
        let batch: usize = args.get(i + 3).and_then(|s| s.parse().ok()).unwrap_or(1000);
        let wait = !args.iter().any(|a| a == "nowait");
        let summary = args.iter().any(|a| a == "summary");
        let flush = args.iter().any(|a| a == "flush");
        let _busy = wqd_bench::busy::Neighbours::if_asked(&args);
        let pause = args
            .iter()
            .find_map(|a| a.strip_prefix("pause="))
            .and_then(|ms| ms.parse::<u64>().ok())
            .map_or(Duration::ZERO, Duration::from_millis);
        grpc::profile_client(
            std::path::Path::new(socket),
            rounds,
            grpc::ProfileCall {
                batch,
                wait: wait && !flush,
                summary,
                flush,
                empty: args.iter().any(|a| a == "empty"),
                session: args.iter().any(|a| a == "session"),
                pause,
                targets: args
                    .iter()
                    .find_map(|a| a.strip_prefix("target="))
                    .unwrap_or("all")
                    .to_string(),
                runs: args.iter().any(|a| a == "runs"),
                receipts: !args.iter().any(|a| a == "noreceipts"),
            },
        );
        return;
    }
    let started = Instant::now();
    let mut md = String::new();
    let _ = writeln!(md, "## Results\n\n{}", machine());
    let mut verdicts = Vec::new();
    let mut section =
        |name: &str, f: &mut dyn FnMut() -> (Vec<report::Table>, Vec<report::Verdict>)| {
            if !want(name) {
                return;
            }
            eprintln!("wqd-bench: {name}...");
            let t0 = Instant::now();
            let (tables, v) = f();
            eprintln!("wqd-bench: {name} took {:.1?}", t0.elapsed());
            for t in tables {
                let _ = writeln!(md, "{}", t.markdown());
            }
            verdicts.extend(v);
        };
    section("dispatch", &mut || {
        let mut cfg = dispatch::Cfg::default();
        if quick {
            cfg = dispatch::Cfg {
                runs: 2,
                batches: vec![(1, 200), (100, 10), (dispatch::COMPARATOR, 2), (10_000, 1)],
                latency_samples: 100,
                busy: false,
            };
        }
        dispatch::run(cfg)
    });
    section("contention", &mut || {
        let mut cfg = contention::Cfg::default();
        if quick {
            cfg = contention::Cfg {
                runs: 1,
                batches: [(100, 20), (1000, 4)],
                busy: false,
            };
        }
        contention::run(cfg)
    });
    section("hotplug", &mut || {
        let mut cfg = hotplug::Cfg::default();
        if quick {
            cfg = hotplug::Cfg {
                trials: 2,
                monitor_trials: 1,
                pending: 100,
                period: Duration::from_millis(200),
            };
        }
        hotplug::run(cfg)
    });
    section("scale", &mut || {
        let mut cfg = scale::Cfg::default();
        if quick {
            cfg = scale::Cfg {
                runs: 2,
                resolve_iters: 10_000,
                groups: 1000,
                pending: 20_000,
                trees: [256, 512],
            };
        }
        scale::run(cfg)
    });
    section("grpc", &mut || {
        let mut cfg = grpc::Cfg::default();
        if quick {
            cfg = grpc::Cfg {
                runs: 2,
                window: Duration::from_millis(30),
                latency_samples: 50,
                topology_reps: 2,
                topology_cpus: vec![256],
                topology_groups: 1000,
                ..cfg
            };
        }
        grpc::run(cfg)
    });
    section("workers", &mut || {
        let mut cfg = workers::Cfg::default();
        if quick {
            cfg = workers::Cfg {
                runs: 1,
                window: Duration::from_millis(200),
                ..cfg
            };
        }
        workers::run(cfg)
    });
    section("service", &mut || {
        let mut cfg = service::Cfg::default();
        if quick {
            cfg = service::Cfg {
                runs: 2,
                window: Duration::from_millis(50),
                latency_samples: 100,
                ..cfg
            };
        }
        service::run(cfg)
    });
    // The busy host: the in-process, two-groups and service comparisons again, shorter,
    // beside a thread that never sleeps on each CPU (no target is judged there).
    section("busy", &mut || {
        let mut d = dispatch::Cfg {
            runs: 5,
            batches: vec![
                (1, 1000),
                (100, 100),
                (dispatch::COMPARATOR, 20),
                (10_000, 2),
            ],
            latency_samples: 300,
            busy: true,
        };
        let mut c = contention::Cfg {
            runs: 3,
            busy: true,
            ..contention::Cfg::default()
        };
        let mut s = service::Cfg {
            runs: 3,
            window: Duration::from_millis(300),
            latency_samples: 300,
            busy: true,
            ..service::Cfg::default()
        };
        if quick {
            d.runs = 1;
            d.batches = vec![(1, 100), (100, 10), (dispatch::COMPARATOR, 1), (10_000, 1)];
            d.latency_samples = 50;
            c.runs = 1;
            c.batches = [(100, 20), (1000, 4)];
            s.runs = 1;
            s.window = Duration::from_millis(50);
            s.latency_samples = 50;
        }
        let (mut tables, mut verdicts) = dispatch::run(d);
        for (t, v) in [contention::run(c), service::run(s)] {
            tables.extend(t);
            verdicts.extend(v);
        }
        (tables, verdicts)
    });
    section("fleet", &mut || {
        let mut cfg = fleet::Cfg::default();
        if quick {
            cfg.window = Duration::from_millis(300);
        }
        fleet::run(cfg)
    });
    let _ = writeln!(md, "{}", report::verdicts(&verdicts));
    let _ = writeln!(
        md,
        "Whole run: {:.0?}{}.",
        started.elapsed(),
        if quick {
            " (--quick: figures not comparable)"
        } else {
            ""
        }
    );
    print!("{md}");
    if let Some(path) = out {
        std::fs::write(&path, &md).unwrap_or_else(|e| panic!("writing {path}: {e}"));
        eprintln!("wqd-bench: wrote {path}");
    }
}
