//! `wqctl --fleet URL ...`: `submit` and `flush` against a fleet of daemons over NATS
//! JetStream, and `fleet hosts`. Owns only the mapping of the command line onto
//! [`wqd_client::fleet`] and the printing of its reports; the same output rules as the rest of
//! wqctl hold (stdout gets the chosen output only; exit 3 when not every item ended OK, 1 when
//! the flush deadline passed with items missing).

use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use wqd_client::fleet::{Fleet, FleetOptions, FleetReport, Selector};
use wqd_client::Item;

use crate::cli::{Cli, Command, FleetCommand, Output, SubmitArgs};
use crate::{emit, CliError, Done};

/// The flush deadline when --timeout is not given.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(600);

pub async fn run(cli: Cli, url: &str) -> Result<Done, CliError> {
    let mut o = FleetOptions::new(url);
    o.credentials_file = cli.fleet_creds.clone();
    let deadline = cli.timeout.unwrap_or(DEFAULT_DEADLINE);
    let out = cli.output;
    let fleet = Fleet::connect(o).await?;
    match cli.command {
        Command::Submit(a) => submit(&fleet, out, a, deadline).await,
        Command::Flush(f) => {
            let Some(b) = f.scope.fleet_batch else {
                return Err(CliError::Local(
                    "with --fleet, flush takes --fleet-batch ID".into(),
                ));
            };
            let rep = fleet.flush(&b, deadline).await?;
            report(out, &rep, None)
        }
        Command::Fleet(FleetCommand::Hosts) => {
            let hosts = fleet.hosts().await?;
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            let age = |h: &wqd_client::fleet::HostRecord| {
                h.updated_at
                    .as_ref()
                    .map(|t| (now - t.seconds as f64 - f64::from(t.nanos) / 1e9).max(0.0))
                    .unwrap_or(0.0)
            };
            emit(
                out,
                || {
                    Value::Array(
                        hosts
                            .iter()
                            .map(|h| {
                                json!({
                                    "name": h.name, "version": h.version, "cpus": h.cpus,
                                    "live_cpus": h.live_cpus, "live": h.live, "groups": h.groups,
                                    "load": h.load, "pending": h.pending, "running": h.running,
                                    "epoch": h.epoch, "age_s": age(h),
                                })
                            })
                            .collect(),
                    )
                },
                || {
                    let mut t = format!(
                        "{:<20} {:>5} {:>5} {:>6} {:>8} {:>8} {:>8} {:>6}  GROUPS\n",
                        "HOST", "LIVE", "CPUS", "LOAD", "PENDING", "RUNNING", "VERSION", "AGE"
                    );
                    for h in &hosts {
                        t.push_str(&format!(
                            "{:<20} {:>5} {:>5} {:>5.0}% {:>8} {:>8} {:>8} {:>5.1}s  {}\n",
                            h.name,
                            h.live_cpus,
                            h.cpus,
                            h.load * 100.0,
                            h.pending,
                            h.running,
                            h.version,
                            age(h),
                            h.groups.join(" ")
                        ));
                    }
                    t
                },
            );
            Ok(Done::Ok)
        }
        _ => Err(CliError::Local(
            "--fleet works with submit, flush --fleet-batch and fleet hosts".into(),
        )),
    }
}

async fn submit(
    fleet: &Fleet,
    out: Output,
    a: SubmitArgs,
    deadline: Duration,
) -> Result<Done, CliError> {
    let sel: Selector = a.on.parse()?;
    let mut item = Item::new(a.target.clone(), a.handler.clone());
    for (k, v) in &a.args {
        item = item.arg(k.clone(), v.clone());
    }
    if let Some(p) = &a.payload_file {
        let bytes = crate::read_payload(p)?;
        item = item.payload(bytes);
    }
    if let Some(k) = &a.key {
        item = item.key(k.clone());
    }
    if let Some(d) = a.delay {
        item = item.delay(d);
    }
    if let Some(d) = a.deadline {
        item = item.deadline(d);
    }
    let n = usize::try_from(a.count).unwrap_or(usize::MAX);
    let b = fleet
        .submit(&a.workqueue, (0..n).map(|_| (sel.clone(), item.clone())))
        .await?;
    if !(a.wait || a.flush) {
        emit(
            out,
            || json!({"batch": b.batch, "items": b.ids.len(), "each_hosts": b.each_hosts}),
            || format!("fleet batch {}: {} items published\n", b.batch, b.ids.len()),
        );
        return Ok(Done::Ok);
    }
    let rep = fleet.flush_ids(&b.batch, &b.ids, deadline).await?;
    report(out, &rep, Some(&b.batch))
}

fn report(out: Output, rep: &FleetReport, _batch: Option<&str>) -> Result<Done, CliError> {
    let mut lat: Vec<Duration> = rep.latencies.clone();
    lat.sort();
    let pct = |p: f64| -> u128 {
        if lat.is_empty() {
            return 0;
        }
        let i = ((lat.len() - 1) as f64 * p).round() as usize;
        lat[i].as_micros()
    };
    emit(
        out,
        || {
            json!({
                "batch": rep.batch,
                "expected": rep.expected,
                "ended": rep.ended,
                "results": rep.results.len(),
                "expanded": rep.expanded.len(),
                "missing": rep.missing.len(),
                "duplicates_suppressed": rep.duplicates,
                "complete": rep.complete(),
                "all_ok": rep.all_ok(),
                "waited_us": rep.waited.as_micros() as u64,
                "latency_us": {"p50": pct(0.5) as u64, "p99": pct(0.99) as u64},
                "hosts": rep.per_host.iter().map(|(h, t)| (h.clone(), json!({
                    "items": t.items, "states": t.states, "fallbacks": t.fallbacks,
                    "redeliveries": t.redeliveries,
                }))).collect::<serde_json::Map<String, Value>>(),
            })
        },
        || {
            let mut t = format!(
                "fleet batch {}: {} of {} items terminal{} in {:.3}s (duplicates suppressed: {}; submit→result p50 {}us p99 {}us)\n",
                rep.batch,
                rep.ended,
                rep.expected,
                if rep.expanded.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", {} results ({} each: items expanded per group)",
                        rep.results.len(),
                        rep.expanded.len()
                    )
                },
                rep.waited.as_secs_f64(),
                rep.duplicates,
                pct(0.5),
                pct(0.99)
            );
            t.push_str(&format!(
                "{:<20} {:>8} {:>10} {:>13}  STATES\n",
                "HOST", "ITEMS", "FALLBACKS", "REDELIVERIES"
            ));
            for (h, x) in &rep.per_host {
                let states: Vec<String> =
                    x.states.iter().map(|(s, n)| format!("{s} {n}")).collect();
                t.push_str(&format!(
                    "{:<20} {:>8} {:>10} {:>13}  {}\n",
                    h,
                    x.items,
                    x.fallbacks,
                    x.redeliveries,
                    states.join("  ")
                ));
            }
            t
        },
    );
    if !rep.complete() {
        return Err(CliError::Local(format!(
            "DEADLINE_EXCEEDED: {} of {} items of fleet batch {} have no result yet (the work goes on)",
            rep.missing.len(),
            rep.expected,
            rep.batch
        )));
    }
    Ok(if rep.all_ok() {
        Done::Ok
    } else {
        Done::NotAllOk
    })
}
