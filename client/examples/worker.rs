//! `wqd-worker-example`: an attached worker serving one handler that digests each item's
//! payload (std `DefaultHasher`, 16 hex digits), one slot per CPU of a target. Scriptable, for
//! the e2e tests and the VM torture:
//!
//! ```text
//! wqd-worker-example --socket PATH --target T --handler NAME --name N
//!                    [--sleep-ms N] [--fail-every N] [--prefetch N] [--stop finish|handback]
//! ```
//!
//! stdout: `attached worker_id=ID pid=PID slots=CPU,CPU..` once, then one line per item
//! `item ID cpu CPU slot S attempt A -> DIGEST` (or `-> error ...` / `-> cancelled`), flushed
//! per line; stderr: diagnostics. `--sleep-ms` makes each item take that long (interrupted by a
//! cancel, which answers `cancelled`); `--fail-every N` fails every Nth item this process runs.
//! SIGTERM or SIGINT stops gracefully (`--stop`, default `handback`) and exits 0; a session the
//! daemon ends exits 1.
//!
//! Built as a binary of wqd-client (not a cargo example) so `cargo build --bins` keeps it fresh
//! and the e2e harness finds it next to `wqd` and `wqctl`.

use std::hash::Hasher;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use wqd_client::worker::{Graceful, WorkItem, Worker};
use wqd_client::Endpoint;

const USAGE: &str = "usage: wqd-worker-example --socket PATH --target T --handler NAME --name N \
[--sleep-ms N] [--fail-every N] [--prefetch N] [--stop finish|handback]";

struct Args {
    socket: String,
    target: String,
    handler: String,
    name: String,
    sleep_ms: u64,
    fail_every: u64,
    prefetch: u32,
    stop: Graceful,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        socket: String::new(),
        target: String::new(),
        handler: "checksum".into(),
        name: "wqd-worker-example".into(),
        sleep_ms: 0,
        fail_every: 0,
        prefetch: 1,
        stop: Graceful::HandBack,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let num = |v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: not a number: {v}"))
        };
        match flag.as_str() {
            "--socket" => a.socket = val()?,
            "--target" => a.target = val()?,
            "--handler" => a.handler = val()?,
            "--name" => a.name = val()?,
            "--sleep-ms" => a.sleep_ms = num(val()?)?,
            "--fail-every" => a.fail_every = num(val()?)?,
            "--prefetch" => {
                a.prefetch =
                    u32::try_from(num(val()?)?).map_err(|_| "--prefetch too large".to_string())?
            }
            "--stop" => {
                a.stop = match val()?.as_str() {
                    "finish" => Graceful::Finish,
                    "handback" => Graceful::HandBack,
                    other => return Err(format!("--stop: finish or handback, not {other}")),
                }
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.socket.is_empty() || a.target.is_empty() {
        return Err("--socket and --target are required".into());
    }
    Ok(a)
}

/// The digest the handler answers: `DefaultHasher` (fixed keys) over the payload bytes, as
/// 16 lower-case hex digits.
fn digest(payload: &[u8]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(payload);
    format!("{:016x}", h.finish())
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("wqd-worker-example: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runs = Arc::new(AtomicU64::new(0));
    let (sleep, fail_every) = (Duration::from_millis(args.sleep_ms), args.fail_every);
    let handler = move |item: &WorkItem| -> Result<Vec<u8>, String> {
        let n = runs.fetch_add(1, Ordering::Relaxed) + 1;
        let line = |what: &str| {
            println!(
                "item {} cpu {} slot {} attempt {} -> {what}",
                item.id, item.cpu, item.slot, item.attempt
            )
        };
        if !sleep.is_zero() && item.wait_cancelled(sleep) {
            line("cancelled");
            return Err("cancelled".into());
        }
        if fail_every > 0 && n.is_multiple_of(fail_every) {
            let e = format!("fail-every {fail_every}: run {n}");
            line(&format!("error {e}"));
            return Err(e);
        }
        let d = digest(&item.payload);
        line(&d);
        Ok(d.into_bytes())
    };
    // Signal handlers first: a SIGTERM that arrives right after the "attached" line must
    // stop the worker gracefully, not kill the process.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wqd-worker-example: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let signals = {
        use tokio::signal::unix::{signal, SignalKind};
        let _guard = rt.enter();
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(t), Ok(i)) => (t, i),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("wqd-worker-example: cannot install signal handlers: {e}");
                return ExitCode::from(1);
            }
        }
    };
    let worker = Worker::builder(Endpoint::unix(&args.socket))
        .target(args.target.clone())
        .handler(args.handler.clone(), handler)
        .prefetch(args.prefetch)
        .name(args.name.clone())
        .spawn();
    let worker = match worker {
        Ok(w) => w,
        Err(e) => {
            eprintln!("wqd-worker-example: cannot attach: {e}");
            return ExitCode::from(1);
        }
    };
    if let Some(a) = worker.info() {
        let cpus: Vec<String> = a.slots.iter().map(|(_, c)| c.to_string()).collect();
        println!(
            "attached worker_id={} pid={} slots={}",
            a.worker_id,
            std::process::id(),
            cpus.join(",")
        );
        eprintln!(
            "wqd-worker-example: worker {} serves {:?} on CPUs {} (pinning {})",
            a.worker_id,
            args.handler,
            cpus.join(","),
            a.pinning
        );
    }
    // Wait for SIGTERM/SIGINT, or for the session to end on its own (lost).
    let (mut term, mut int) = signals;
    let signalled = rt.block_on(async {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = term.recv() => return true,
                _ = int.recv() => return true,
                _ = tick.tick() => if worker.is_finished() { return false },
            }
        }
    });
    if signalled {
        eprintln!("wqd-worker-example: stopping ({:?})", args.stop);
        worker.stop(args.stop);
    }
    match worker.join() {
        Ok(r) if signalled => {
            eprintln!(
                "wqd-worker-example: stopped: ok {} failed {} cancelled {} handed back {}",
                r.ok, r.failed, r.cancelled, r.handed_back
            );
            ExitCode::SUCCESS
        }
        Ok(_) => {
            eprintln!("wqd-worker-example: the session ended without a stop");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("wqd-worker-example: {e}");
            ExitCode::from(1)
        }
    }
}
