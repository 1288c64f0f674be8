//! wqd-torture: CPU hotplug torture for wqd, in the spirit of the kernel's rcutorture with its
//! on/off interval.
//!
//! For `--duration` it offlines and onlines random CPUs (never cpu0) every 50-200 ms, sometimes
//! all of them at once, while submitter threads send `spin`, `sleep` and `noop` items to every
//! `cpu:N`, `node:N`, rcu_node-like leaf (`cpus:0-1`, `cpus:2-3`, ...) and `all`, on one
//! workqueue per fallback policy, with random flushes and cancels; every few seconds it replays
//! the seed's scenario (one item per leaf, flush them all while the leaves' CPUs go offline).
//! Then it brings every CPU back, flushes everything and checks the contract (see `check.rs`
//! and `docs/torture.md`). The last line is `WQD-TORTURE: PASS` or `WQD-TORTURE: FAIL <why>`.
//!
//! `--mode library` (the default) runs the engine in-process; `--mode daemon --socket PATH`
//! drives a running `wqd` through `wqd-client` (the VM harness starts the real daemon for it).
//!
//! Writing `cpuN/online` needs `--allow-hotplug`: it is meant for a VM (tests/vm) or a host you
//! mean to torture. Without it the workload and checks run with every CPU left alone.
//!
//! Exit status: 0 pass, 1 a check failed, 2 the run could not be set up.

mod attached;
mod backend;
mod check;
mod clock;
mod daemon;
mod hotplug;
mod load;
mod report;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use parking_lot::Mutex;
use wqd_core::cpuset::CpuSet;

use crate::backend::{Backend, Library};
use crate::clock::{secs, Clock};
use crate::hotplug::{Cause, CpuCtl, HotplugConfig, HotplugLog, Writer};
use crate::load::{Ctx, Ledger, Plan, Scenario, WQS};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// The engine in-process, on the real host topology.
    Library,
    /// A running wqd daemon, through wqd-client.
    Daemon,
}

/// CPU hotplug torture for wqd.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// What to drive.
    #[arg(long, value_enum, default_value = "library")]
    mode: Mode,
    /// The daemon's socket (daemon mode).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// How long to wait for the daemon to answer on its socket (daemon mode).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// How long to torture (e.g. 30s, 10m).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Seed of every random choice and of the scenario (decimal or 0x hex).
    #[arg(long, default_value = "1", value_parser = parse_seed)]
    seed: u64,
    /// Really write cpuN/online. Only in a VM or on a host you mean to torture.
    #[arg(long)]
    allow_hotplug: bool,
    /// Where sysfs is.
    #[arg(long, default_value = "/sys")]
    sys_root: PathBuf,
    /// Race window of the checks, in ms (see docs/torture.md).
    #[arg(long, default_value_t = 100)]
    race_window_ms: u64,
    /// wqd must reflect every CPU transition in its live set within this (see docs/torture.md).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    lag_bound: Duration,
    /// A flush that waits longer than this fails the run.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    flush_bound: Duration,
    /// CPUs per rcu_node leaf (`cpus:` targets of this many consecutive CPUs).
    #[arg(long, default_value_t = 2)]
    leaf_size: u32,
    /// Submitter threads.
    #[arg(long, default_value_t = 2)]
    submitters: u32,
    /// Shortest and longest pause between hotplug operations, in ms.
    #[arg(long, default_value_t = 50)]
    min_gap_ms: u64,
    #[arg(long, default_value_t = 200)]
    max_gap_ms: u64,
    /// Do not print each hotplug transition.
    #[arg(long)]
    quiet_hotplug: bool,
    /// Daemon mode: start attached worker processes of this binary (`wqd-worker-example`)
    /// serving the handler `tw`; a share of the items go to them, and one is killed with
    /// SIGKILL every few seconds and started again (see attached.rs).
    #[arg(long)]
    attached_worker: Option<PathBuf>,
    /// How many attached worker processes.
    #[arg(long, default_value_t = 2)]
    attached_workers: usize,
}

fn parse_seed(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("seed {s:?}: {e}"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(&args) {
        Ok(None) => {
            println!("WQD-TORTURE: PASS");
            ExitCode::SUCCESS
        }
        Ok(Some(reason)) => {
            println!("WQD-TORTURE: FAIL {reason}");
            ExitCode::from(1)
        }
        Err(e) => {
            println!("WQD-TORTURE: FAIL setup: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn read_list(p: &Path) -> Result<CpuSet> {
    let s = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    CpuSet::parse_list(s.trim()).with_context(|| format!("parsing {}", p.display()))
}

/// NUMA nodes and their CPUs, read while every CPU is online.
fn read_nodes(sys: &Path) -> Result<Vec<(u32, CpuSet)>> {
    let dir = sys.join("devices/system/node");
    let mut nodes = Vec::new();
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Ok(nodes);
    };
    for e in rd {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        let name = e.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix("node"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let set = read_list(&e.path().join("cpulist"))?;
        if !set.is_empty() {
            nodes.push((n, set));
        }
    }
    nodes.sort_by_key(|(n, _)| *n);
    Ok(nodes)
}

fn start_backend(args: &Args, clock: &Arc<Clock>) -> Result<Arc<dyn Backend>> {
    let keep = args.duration + Duration::from_secs(900);
    match args.mode {
        Mode::Library => Ok(Arc::new(Library::start(clock.clone(), keep)?)),
        Mode::Daemon => {
            let socket = args
                .socket
                .as_ref()
                .ok_or_else(|| anyhow!("--mode daemon needs --socket PATH"))?;
            Ok(Arc::new(daemon::Daemon::start(
                socket,
                clock.clone(),
                args.connect_timeout,
            )?))
        }
    }
}

/// Waits until the backend schedules on every CPU of `all`, at most `bound`.
fn wait_live(backend: &dyn Backend, all: &CpuSet, bound: Duration) -> Result<Duration> {
    let t = std::time::Instant::now();
    loop {
        let live = backend.live()?;
        if all.is_subset(&live) {
            return Ok(t.elapsed());
        }
        if t.elapsed() > bound {
            bail!("wqd still sees live {live} {bound:?} after every CPU of {all} came back");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn run(args: &Args) -> Result<Option<String>> {
    let clock = Arc::new(Clock::new());
    let cpu_dir = args.sys_root.join("devices/system/cpu");
    let present = read_list(&cpu_dir.join("present"))?;
    let n_cpus = present.last().map_or(1, |c| c + 1);
    let ctl = CpuCtl::new(&args.sys_root);
    let hotpluggable = if args.allow_hotplug {
        ctl.hotpluggable(present.iter().filter(|&c| c != 0))
    } else {
        Vec::new()
    };
    let log = Arc::new(Mutex::new(HotplugLog::default()));
    let writer = Arc::new(Writer::new(
        ctl.clone(),
        clock.clone(),
        log.clone(),
        !args.quiet_hotplug,
    ));
    let left = writer.all_online(&hotpluggable, Cause::Setup);
    if !left.is_empty() {
        bail!("cannot bring CPUs {left:?} online before the run");
    }
    {
        let mut l = log.lock();
        for &c in &hotpluggable {
            l.initial.insert(c, ctl.is_online(c)?);
        }
        // Setup writes happened before the run: start the log clean, every CPU online.
        l.transitions.clear();
    }
    let nodes = read_nodes(&args.sys_root)?;
    let plan = Arc::new(Plan::new(
        n_cpus,
        &nodes,
        args.leaf_size,
        hotpluggable.clone(),
    ));
    let scenario = Scenario::from_seed(args.seed, &plan);

    let backend = start_backend(args, &clock)?;
    for (name, fallback) in WQS {
        backend.create_workqueue(name, fallback, 2)?;
    }
    let node_desc: Vec<String> = nodes.iter().map(|(n, s)| format!("{n}:{s}")).collect();
    let hp_desc = if args.allow_hotplug {
        format!(
            "cpus {:?} every {}-{} ms",
            hotpluggable, args.min_gap_ms, args.max_gap_ms
        )
    } else {
        "off (no --allow-hotplug)".to_string()
    };
    let targets: Vec<String> = plan.targets.iter().map(|t| t.target.to_string()).collect();
    let header = vec![
        ("mode".to_string(), backend.describe()),
        (
            "run".to_string(),
            format!(
                "seed {:#x}, duration {} s, cpus {present}, nodes [{}], race window {} ms, lag bound {:?}, flush bound {:?}",
                args.seed,
                secs(args.duration),
                node_desc.join(" "),
                args.race_window_ms,
                args.lag_bound,
                args.flush_bound
            ),
        ),
        ("hotplug".to_string(), hp_desc),
        ("targets".to_string(), targets.join(" ")),
        ("scenario".to_string(), scenario.describe(&plan)),
    ];
    for (k, v) in &header {
        println!("torture: {k}: {v}");
    }

    let mut keeper = match (&args.attached_worker, args.mode, &args.socket) {
        (Some(bin), Mode::Daemon, Some(socket)) => {
            let k = attached::Keeper::start(
                bin.clone(),
                socket.clone(),
                args.attached_workers.max(1),
                args.seed,
            )?;
            // Their handler is known once one has attached: wait for that (bounded).
            let t = std::time::Instant::now();
            while !backend.handlers()?.iter().any(|h| h == attached::HANDLER) {
                if t.elapsed() > Duration::from_secs(30) {
                    bail!("no attached worker serves {} after 30 s", attached::HANDLER);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            println!(
                "torture: attached: {} worker processes of {} serve {}, one killed every 2-6 s",
                args.attached_workers.max(1),
                bin.display(),
                attached::HANDLER
            );
            Some(k)
        }
        (Some(_), _, _) => bail!("--attached-worker needs --mode daemon and --socket"),
        _ => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let ledger = Arc::new(Ledger::default());
    let (hp_tx, hp_rx) = crossbeam_channel::unbounded();
    let ctx = Ctx {
        backend: backend.clone(),
        clock: clock.clone(),
        plan: plan.clone(),
        ledger: ledger.clone(),
        stop: stop.clone(),
        seed: args.seed,
        flush_bound: args.flush_bound,
        hotplug: args.allow_hotplug.then_some(hp_tx),
        attached: keeper.is_some(),
    };
    let hp_thread = {
        let cfg = HotplugConfig {
            seed: args.seed,
            cpus: hotpluggable.clone(),
            min_gap: Duration::from_millis(args.min_gap_ms),
            max_gap: Duration::from_millis(args.max_gap_ms.max(args.min_gap_ms)),
        };
        let (w, stop) = (writer.clone(), stop.clone());
        spawn("torture-hotplug", move || {
            hotplug::run(&w, &cfg, &hp_rx, &stop).context("hotplug thread")
        })?
    };
    let mut workers = Vec::new();
    for t in 0..args.submitters {
        let ctx = ctx.clone();
        workers.push(spawn("torture-submit", move || {
            load::submitter(&ctx, u64::from(t))
        })?);
    }
    {
        let (ctx, sc) = (ctx.clone(), scenario.clone());
        workers.push(spawn("torture-scenario", move || {
            load::scenario(&ctx, &sc)
        })?);
    }

    let end = clock.now() + args.duration;
    let mut next_progress = clock.now() + Duration::from_secs(5);
    while clock.now() < end {
        std::thread::sleep(Duration::from_millis(200));
        clock.sample();
        if clock.now() >= next_progress {
            next_progress += Duration::from_secs(5);
            println!(
                "torture: t={} items {} flushes {} hotplug writes {} live {}",
                secs(clock.now()),
                ledger.items.lock().len(),
                ledger.flushes.lock().len(),
                log.lock().transitions.len(),
                backend.live().map(|l| l.to_string()).unwrap_or_default()
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    // The hotplug thread first, then every CPU back, and only then wait for the submitters:
    // a flush on `tw-wait` may be waiting for a CPU that only the final online returns.
    let mut thread_errors = Vec::new();
    let mut join = |h: std::thread::JoinHandle<Result<()>>| match h.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => thread_errors.push(format!("{e:#}")),
        Err(_) => thread_errors.push("a driver thread panicked".to_string()),
    };
    join(hp_thread);
    // Every attached worker alive again before the final flush needs them.
    if let Some(k) = keeper.as_mut() {
        k.finish();
        println!(
            "torture: attached: {} started, {} killed, {} running",
            k.stats.started.load(Ordering::Relaxed),
            k.stats.killed.load(Ordering::Relaxed),
            k.running()
        );
    }
    let ran = clock.now();
    let left = writer.all_online(&hotpluggable, Cause::Final);
    for h in workers {
        join(h);
    }
    if !left.is_empty() {
        thread_errors.push(format!("cannot bring CPUs {left:?} back online"));
    }
    let all = present.clone();
    match wait_live(backend.as_ref(), &all, Duration::from_secs(10)) {
        Ok(d) => println!("torture: wqd saw every CPU back after {}", clock::ms(d)),
        Err(e) => thread_errors.push(format!("{e:#}")),
    }
    load::final_flush(&ctx);

    let items = ledger.items.lock().clone();
    let mut submit_errors_late = Vec::new();
    let mut results = HashMap::with_capacity(items.len());
    for chunk in items.chunks(4096) {
        let ids: Vec<u64> = chunk.iter().map(|s| s.id).collect();
        for r in backend.results(&ids)?.into_iter().flatten() {
            results.insert(r.id, r);
        }
    }
    let runs = backend.runs();
    let history = backend.live_history();
    let epochs = backend.epochs();
    let counters = backend.counters();
    let daemon_counts = match backend.daemon_counts() {
        Ok(c) => c,
        Err(e) => {
            submit_errors_late.push(format!("reading the daemon's counters: {e:#}"));
            None
        }
    };
    backend.shutdown();

    let log = log.lock();
    let flushes = ledger.flushes.lock().clone();
    let mut submit_errors = ledger.errors.lock().clone();
    submit_errors.extend(thread_errors);
    submit_errors.extend(submit_errors_late);
    let reused = ledger.reused_ids.lock().clone();
    let window = Duration::from_millis(args.race_window_ms);
    let findings = check::check(&check::Input {
        plan: &plan,
        items: &items,
        results: &results,
        runs: runs.as_ref(),
        log: &log,
        view: (!history.is_empty()).then_some(history.as_slice()),
        epochs: &epochs,
        daemon: daemon_counts.as_ref(),
        flushes: &flushes,
        submit_errors: &submit_errors,
        reused_ids: &reused,
        window,
        lag_bound: args.lag_bound,
        // Results name the epoch that decided a fallback or rejection, and the view publishes
        // an epoch only after the engine applied it: judged exactly, no allowance.
        decision_lag: Duration::ZERO,
        flush_bound: args.flush_bound,
    });
    let lags = (!history.is_empty() && !log.transitions.is_empty())
        .then(|| check::lags(&log, &history, args.lag_bound));
    let mut header = header;
    header[1].1 = format!("{} (ran {} s)", header[1].1, secs(ran));
    let summary = report::Summary {
        header,
        findings: &findings,
        submitted: items.len(),
        scenario_items: items.iter().filter(|s| s.scenario).count(),
        scenario_runs: ledger.scenario_runs.load(Ordering::Relaxed),
        queue_full: ledger.queue_full.load(Ordering::Relaxed),
        log: &log,
        flushes: &flushes,
        lags,
        counters,
        window,
    };
    print!("{}", report::render(&summary));
    Ok(findings.verdict())
}

fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .with_context(|| format!("spawning {name}"))
}
