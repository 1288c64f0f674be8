//! Turning daemon responses into what `wqctl` prints: JSON values with stable, documented
//! names (lower-case enum names, RFC 3339 timestamps, bytes as base64, durations in
//! microseconds) and plain-text tables.
//!
//! Invariant: pure functions from messages to values or strings; printing happens in
//! `main.rs` only, so stdout holds exactly what the chosen output format promises.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{json, Value};
use wqd_client::proto::{
    CancelOutcome, CancelResponse, FallbackPolicy, GetResultsResponse, GetStatsResponse,
    GroupLevel, ItemResult, LookupStatus, Placement, ResultsMode, StateCounts, TopologySnapshot,
    UnservedPolicy, WorkerInfo, WorkerLostPolicy, WorkqueueAttrs, WorkqueueInfo,
};

use crate::summary::{fallback_name, state_name, GroupRow, States, Summary};

/// Strips the enum-name prefix and lower-cases (`PLACEMENT_LEAST_LOADED` → `least-loaded`).
fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
        .replace('_', "-")
}

pub fn placement_name(p: Placement) -> String {
    short(p.as_str_name(), "PLACEMENT_")
}
pub fn fallback_policy_name(p: FallbackPolicy) -> String {
    short(p.as_str_name(), "FALLBACK_POLICY_")
}
pub fn results_mode_name(r: ResultsMode) -> String {
    short(r.as_str_name(), "RESULTS_MODE_")
}
pub fn worker_lost_name(w: WorkerLostPolicy) -> String {
    short(w.as_str_name(), "WORKER_LOST_POLICY_")
}
pub fn unserved_name(u: UnservedPolicy) -> String {
    short(u.as_str_name(), "UNSERVED_POLICY_")
}
pub fn level_name(l: GroupLevel) -> String {
    short(l.as_str_name(), "GROUP_LEVEL_")
}
pub fn outcome_name(o: CancelOutcome) -> String {
    short(o.as_str_name(), "CANCEL_OUTCOME_")
}
pub fn lookup_name(s: LookupStatus) -> String {
    short(s.as_str_name(), "LOOKUP_STATUS_")
}

fn ts_json(t: Option<&prost_types::Timestamp>) -> Value {
    match t.and_then(to_system_time) {
        Some(st) => Value::String(humantime::format_rfc3339_nanos(st).to_string()),
        None => Value::Null,
    }
}

fn to_system_time(t: &prost_types::Timestamp) -> Option<SystemTime> {
    let secs = u64::try_from(t.seconds).ok()?;
    let nanos = u32::try_from(t.nanos).ok()?;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

pub fn dur_us(d: Option<&prost_types::Duration>) -> u64 {
    d.map(wqd_client::item::from_proto_duration)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A duration for people: `850µs`, `12.3ms`, `4.56s`.
pub fn human_us(us: u64) -> String {
    if us < 1_000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{:.1}ms", us as f64 / 1e3)
    } else {
        format!("{:.2}s", us as f64 / 1e6)
    }
}

pub fn counts_json(c: &StateCounts) -> Value {
    serde_json::to_value(States::from(c)).unwrap_or(Value::Null)
}

pub fn result_json(r: &ItemResult) -> Value {
    json!({
        "item_id": r.item_id,
        "batch_id": r.batch_id,
        "workqueue": r.workqueue,
        "handler": r.handler,
        "target": r.target,
        "state": state_name(r.state()),
        "output": base64::engine::general_purpose::STANDARD.encode(&r.output),
        "error": r.error,
        "cpu_started": r.cpu_started,
        "cpu_finished": r.cpu_finished,
        "fallback_level": fallback_name(r.fallback_level()),
        "fallback_reason": r.fallback_reason,
        "rebinds": r.rebinds,
        "queued_at": ts_json(r.queued_at.as_ref()),
        "started_at": ts_json(r.started_at.as_ref()),
        "finished_at": ts_json(r.finished_at.as_ref()),
        "topology_epoch": r.topology_epoch,
        "decision_epoch": r.decision_epoch,
        "worker_id": r.worker_id,
        "worker_pid": r.worker_pid,
        "worker_slot": r.worker_slot,
        "worker_lost": r.worker_lost,
    })
}

pub fn summary_text(s: &Summary) -> String {
    let mut o = String::new();
    let st = &s.states;
    let _ = writeln!(
        o,
        "states:   ok {}  failed {}  cancelled {}  expired {}  rejected {}{}",
        st.ok,
        st.failed,
        st.cancelled,
        st.expired,
        st.rejected,
        if st.pending + st.running > 0 {
            format!("  pending {}  running {}", st.pending, st.running)
        } else {
            String::new()
        }
    );
    if s.items == 0 && st.total() > 0 {
        // Counts alone: the workqueue keeps no per-item results (results = summary or none).
        let _ = writeln!(o, "results:  none kept (counts only)");
        return o;
    }
    if !s.per_cpu.is_empty() {
        let cpus: Vec<_> = s
            .per_cpu
            .iter()
            .map(|(c, n)| format!("cpu{c} {n}"))
            .collect();
        let _ = writeln!(o, "per CPU:  {}", cpus.join("  "));
    }
    let levels: Vec<_> = s
        .fallbacks
        .iter()
        .map(|(l, n)| format!("{l} {n}"))
        .collect();
    let _ = writeln!(
        o,
        "fallback: {} items{}",
        s.fallback_items,
        if levels.is_empty() {
            String::new()
        } else {
            format!(" ({})", levels.join(", "))
        }
    );
    let _ = writeln!(o, "rebinds:  {} ({} items)", s.rebinds, s.rebound_items);
    for (name, p) in [
        ("queued→started", &s.queue_latency_us),
        ("run time", &s.run_time_us),
    ] {
        if p.count > 0 {
            let _ = writeln!(
                o,
                "{name:<15} p50 {}  p90 {}  p99 {}  max {}",
                human_us(p.p50),
                human_us(p.p90),
                human_us(p.p99),
                human_us(p.max)
            );
        }
    }
    for e in &s.errors {
        let _ = writeln!(o, "error ×{}: {}", e.count, e.error);
    }
    o
}

/// The per-group table of a fan-out: one line per item, in group order.
pub fn groups_text(rows: &[GroupRow]) -> String {
    let w = rows
        .iter()
        .map(|r| r.group.len())
        .max()
        .unwrap_or(0)
        .max("GROUP".len());
    let mut o = String::new();
    let _ = writeln!(o, "{:<w$}  {:<9}  {:>4}  FALLBACK", "GROUP", "STATE", "CPU");
    for r in rows {
        let cpu = r.cpu.map_or_else(|| "-".to_string(), |c| c.to_string());
        let fb = if r.fallback_reason.is_empty() {
            r.fallback.to_string()
        } else {
            format!("{} ({})", r.fallback, r.fallback_reason)
        };
        let _ = writeln!(o, "{:<w$}  {:<9}  {:>4}  {fb}", r.group, r.state, cpu);
    }
    o
}

fn yn(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

pub fn topology_json(t: &TopologySnapshot) -> Value {
    json!({
        "epoch": t.epoch,
        "taken_at": ts_json(t.taken_at.as_ref()),
        "possible": t.possible,
        "online": t.online,
        "allowed": t.allowed,
        "isolated": t.isolated,
        "live": t.live,
        "allowed_source": t.allowed_source,
        "cpus": t.cpus.iter().map(|c| json!({
            "cpu": c.cpu, "online": c.online, "allowed": c.allowed, "isolated": c.isolated,
            "live": c.live, "core": c.core, "shard": c.shard, "cache": c.cache, "node": c.node,
            "package": c.package, "busy": c.busy,
        })).collect::<Vec<_>>(),
        "groups": t.groups.iter().map(|g| json!({
            "level": level_name(g.level()), "target": g.target, "members": g.members,
            "live_members": g.live_members,
        })).collect::<Vec<_>>(),
    })
}

pub fn topology_text(t: &TopologySnapshot) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "epoch {}   live {}", t.epoch, or_dash(&t.live));
    let _ = writeln!(
        o,
        "online {}   allowed {} ({})   isolated {}   possible {}",
        or_dash(&t.online),
        or_dash(&t.allowed),
        or_dash(&t.allowed_source),
        or_dash(&t.isolated),
        or_dash(&t.possible)
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:>4}  {:<6}  {:<7}  {:<8}  {:<4}  {:>4}  {:>5}  {:>5}  {:>4}  {:>3}  {:>5}",
        "CPU",
        "ONLINE",
        "ALLOWED",
        "ISOLATED",
        "LIVE",
        "CORE",
        "SHARD",
        "CACHE",
        "NODE",
        "PKG",
        "BUSY"
    );
    for c in &t.cpus {
        let _ = writeln!(
            o,
            "{:>4}  {:<6}  {:<7}  {:<8}  {:<4}  {:>4}  {:>5}  {:>5}  {:>4}  {:>3}  {:>4.0}%",
            c.cpu,
            yn(c.online),
            yn(c.allowed),
            yn(c.isolated),
            yn(c.live),
            c.core,
            c.shard,
            c.cache,
            c.node,
            c.package,
            c.busy * 100.0
        );
    }
    let _ = writeln!(o);
    let tw = t
        .groups
        .iter()
        .map(|g| g.target.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let mw = t
        .groups
        .iter()
        .map(|g| g.members.len())
        .max()
        .unwrap_or(7)
        .max(7);
    let _ = writeln!(
        o,
        "{:<7}  {:<tw$}  {:<mw$}  LIVE",
        "LEVEL", "TARGET", "MEMBERS"
    );
    for g in &t.groups {
        let _ = writeln!(
            o,
            "{:<7}  {:<tw$}  {:<mw$}  {}",
            level_name(g.level()),
            g.target,
            or_dash(&g.members),
            or_dash(&g.live_members)
        );
    }
    o
}

pub fn attrs_json(a: &WorkqueueAttrs) -> Value {
    json!({
        "name": a.name,
        "max_active": a.max_active,
        "group_max_active": a.group_max_active,
        "ordered": a.ordered,
        "nice": a.nice,
        "placement": placement_name(a.placement()),
        "fallback": fallback_policy_name(a.fallback()),
        "max_queued": a.max_queued,
        "results": results_mode_name(a.results()),
        "on_worker_lost": worker_lost_name(a.on_worker_lost()),
        "unserved": unserved_name(a.unserved()),
    })
}

pub fn workqueues_json(list: &[WorkqueueInfo]) -> Value {
    Value::Array(
        list.iter()
            .map(|w| {
                let mut v = w
                    .attrs
                    .as_ref()
                    .map(attrs_json)
                    .unwrap_or_else(|| json!({}));
                if let (Some(obj), Some(s)) = (v.as_object_mut(), w.stats.as_ref()) {
                    obj.insert(
                        "stats".into(),
                        json!({
                            "delayed": s.delayed,
                            "pending": s.pending,
                            "running": s.running,
                            "draining": s.draining,
                            "totals": s.totals.as_ref().map(counts_json),
                        }),
                    );
                }
                v
            })
            .collect(),
    )
}

pub fn workqueues_text(list: &[WorkqueueInfo]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<16} {:>6} {:>9} {:>7} {:>4} {:<12} {:<7} {:>10} {:<7} {:>8} {:>8} {:>7} {:>9} {:>7} {:>5}",
        "NAME",
        "ACTIVE",
        "GRP_ACTV",
        "ORDERED",
        "NICE",
        "PLACEMENT",
        "FALLBK",
        "MAX_QUEUED",
        "RESULTS",
        "DELAYED",
        "PENDING",
        "RUNNING",
        "OK",
        "NOT_OK",
        "DRAIN"
    );
    for w in list {
        let a = w.attrs.clone().unwrap_or_default();
        let s = w.stats.unwrap_or_default();
        let t = s.totals.unwrap_or_default();
        let _ = writeln!(
            o,
            "{:<16} {:>6} {:>9} {:>7} {:>4} {:<12} {:<7} {:>10} {:<7} {:>8} {:>8} {:>7} {:>9} {:>7} {:>5}",
            a.name,
            a.max_active,
            a.group_max_active,
            yn(a.ordered),
            a.nice,
            placement_name(a.placement()),
            fallback_policy_name(a.fallback()),
            a.max_queued,
            results_mode_name(a.results()),
            s.delayed,
            s.pending,
            s.running,
            t.ok,
            t.failed + t.cancelled + t.expired + t.rejected,
            yn(s.draining)
        );
    }
    o
}

pub fn workers_json(list: &[WorkerInfo]) -> Value {
    Value::Array(
        list.iter()
            .map(|w| {
                json!({
                    "worker_id": w.worker_id,
                    "pid": w.pid,
                    "uid": w.uid,
                    "gid": w.gid,
                    "cert_names": w.cert_names,
                    "name": w.name,
                    "handlers": w.handlers,
                    "slots": w.slots.iter().map(|s| json!({
                        "slot": s.slot, "cpu": s.cpu, "credits": s.credits,
                        "in_flight": s.in_flight, "done": s.done, "closed": s.closed,
                        "live": s.live,
                    })).collect::<Vec<_>>(),
                    "attached_seconds": w.attached_seconds,
                    "done": w.done,
                    "handed_back": w.handed_back,
                })
            })
            .collect(),
    )
}

/// `cpu:inflight/done` per slot, comma-separated; a closed slot ends in `x`, one whose CPU
/// is not live in `!`.
fn slots_text(w: &WorkerInfo) -> String {
    let s: Vec<String> = w
        .slots
        .iter()
        .map(|s| {
            format!(
                "{}:{}/{}{}{}",
                s.cpu,
                s.in_flight,
                s.done,
                if s.closed { "x" } else { "" },
                if s.live { "" } else { "!" }
            )
        })
        .collect();
    if s.is_empty() {
        "-".into()
    } else {
        s.join(",")
    }
}

pub fn workers_text(list: &[WorkerInfo]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:>6} {:>8} {:>6} {:<16} {:<20} {:>8} {:>8} {:>9}  SLOTS (cpu:in_flight/done)",
        "ID", "PID", "UID", "NAME", "HANDLERS", "DONE", "HANDBACK", "ATTACHED"
    );
    for w in list {
        let _ = writeln!(
            o,
            "{:>6} {:>8} {:>6} {:<16} {:<20} {:>8} {:>8} {:>9}  {}",
            w.worker_id,
            w.pid,
            w.uid.map(|u| u.to_string()).unwrap_or_else(|| "-".into()),
            or_dash(&w.name),
            or_dash(&w.handlers.join(",")),
            w.done,
            w.handed_back,
            human_secs(w.attached_seconds),
            slots_text(w)
        );
    }
    if list.is_empty() {
        o.push_str("(no attached workers)\n");
    }
    o
}

/// Whole seconds for people: `42s`, `3m07s`, `2h05m`.
fn human_secs(s: f64) -> String {
    let s = if s.is_finite() && s > 0.0 {
        s as u64
    } else {
        0
    };
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

pub fn cancel_json(r: &CancelResponse) -> Value {
    json!({
        "items": r.items.iter().map(|i| json!({
            "item_id": i.item_id,
            "outcome": outcome_name(i.outcome()),
            "state": state_name(i.state()),
        })).collect::<Vec<_>>(),
    })
}

pub fn cancel_text(r: &CancelResponse) -> String {
    let mut o = format!("{:>10}  {:<18}  STATE\n", "ITEM", "OUTCOME");
    for i in &r.items {
        let _ = writeln!(
            o,
            "{:>10}  {:<18}  {}",
            i.item_id,
            outcome_name(i.outcome()),
            state_name(i.state())
        );
    }
    o
}

pub fn results_json(r: &GetResultsResponse) -> Value {
    json!({
        "items": r.items.iter().map(|l| json!({
            "item_id": l.item_id,
            "status": lookup_name(l.status()),
            "result": l.result.as_ref().map(result_json),
        })).collect::<Vec<_>>(),
    })
}

/// Output bytes for a terminal: UTF-8 text (shortened), else a byte count.
fn output_text(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => {
            let s = s.trim_end();
            if s.chars().count() > 60 {
                format!("{}…", s.chars().take(60).collect::<String>())
            } else {
                s.to_string()
            }
        }
        Err(_) => format!("<{} bytes>", b.len()),
    }
}

pub fn results_text(r: &GetResultsResponse) -> String {
    let mut o = format!(
        "{:>10}  {:<9}  {:<12}  {:<14}  {:>4}  {:<8}  {:>7}  {:>9}  {:>9}  OUTPUT/ERROR\n",
        "ITEM", "STATE", "WORKQUEUE", "TARGET", "CPU", "FALLBACK", "REBINDS", "QUEUED", "RUN"
    );
    for l in &r.items {
        let Some(res) = l
            .result
            .as_ref()
            .filter(|_| l.status() == LookupStatus::Found)
        else {
            let _ = writeln!(o, "{:>10}  {}", l.item_id, lookup_name(l.status()));
            continue;
        };
        let lat = |a: Option<&prost_types::Timestamp>, b: Option<&prost_types::Timestamp>| match (
            a.and_then(to_system_time),
            b.and_then(to_system_time),
        ) {
            (Some(a), Some(b)) => b
                .duration_since(a)
                .map(|d| human_us(u64::try_from(d.as_micros()).unwrap_or(u64::MAX)))
                .unwrap_or_else(|_| "-".into()),
            _ => "-".into(),
        };
        let detail = if res.error.is_empty() {
            output_text(&res.output)
        } else {
            res.error.clone()
        };
        let _ = writeln!(
            o,
            "{:>10}  {:<9}  {:<12}  {:<14}  {:>4}  {:<8}  {:>7}  {:>9}  {:>9}  {}",
            res.item_id,
            state_name(res.state()),
            res.workqueue,
            res.target,
            res.cpu_started
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            fallback_name(res.fallback_level()),
            res.rebinds,
            lat(res.queued_at.as_ref(), res.started_at.as_ref()),
            lat(res.started_at.as_ref(), res.finished_at.as_ref()),
            detail
        );
    }
    o
}

pub fn stats_json(s: &GetStatsResponse) -> Value {
    json!({
        "version": s.version,
        "started_at": ts_json(s.started_at.as_ref()),
        "uptime_us": dur_us(s.uptime.as_ref()),
        "topology_epoch": s.topology_epoch,
        "items": s.items.as_ref().map(counts_json),
        "batches_accepted": s.batches_accepted,
        "batches_refused": s.batches_refused,
        "deduplicated": s.deduplicated,
        "rebinds": s.rebinds,
        "fallbacks": s.fallbacks,
        "workqueues": s.workqueues,
        "handlers": s.handlers,
        "results_retained": s.results_retained,
    })
}

pub fn stats_text(s: &GetStatsResponse) -> String {
    let c = s.items.unwrap_or_default();
    let mut o = String::new();
    let _ = writeln!(o, "version           {}", s.version);
    let _ = writeln!(
        o,
        "uptime            {}",
        human_us(dur_us(s.uptime.as_ref()))
    );
    let _ = writeln!(o, "topology epoch    {}", s.topology_epoch);
    let _ = writeln!(o, "workqueues        {}", s.workqueues);
    let _ = writeln!(o, "handlers          {}", s.handlers.join(", "));
    let _ = writeln!(
        o,
        "items now         pending {}  running {}",
        c.pending, c.running
    );
    let _ = writeln!(
        o,
        "items ended       ok {}  failed {}  cancelled {}  expired {}  rejected {}",
        c.ok, c.failed, c.cancelled, c.expired, c.rejected
    );
    let _ = writeln!(
        o,
        "batches           accepted {}  refused {}",
        s.batches_accepted, s.batches_refused
    );
    let _ = writeln!(o, "deduplicated      {}", s.deduplicated);
    let _ = writeln!(o, "rebinds           {}", s.rebinds);
    let _ = writeln!(o, "fallbacks         {}", s.fallbacks);
    let _ = writeln!(o, "results retained  {}", s.results_retained);
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use wqd_client::proto::{CpuState, GroupInfo, ItemState};

    #[test]
    fn enum_names_are_short_and_lower() {
        assert_eq!(placement_name(Placement::LeastLoaded), "least-loaded");
        assert_eq!(fallback_policy_name(FallbackPolicy::Widen), "widen");
        assert_eq!(level_name(GroupLevel::Cache), "cache");
        assert_eq!(outcome_name(CancelOutcome::WaitedRunning), "waited-running");
        assert_eq!(lookup_name(LookupStatus::Forgotten), "forgotten");
        assert_eq!(results_mode_name(ResultsMode::Summary), "summary");
        assert_eq!(worker_lost_name(WorkerLostPolicy::Requeue), "requeue");
        assert_eq!(unserved_name(UnservedPolicy::Reject), "reject");
    }

    #[test]
    fn attrs_json_has_every_attribute() {
        let a = WorkqueueAttrs {
            name: "w".into(),
            on_worker_lost: WorkerLostPolicy::Requeue as i32,
            unserved: UnservedPolicy::Reject as i32,
            ..Default::default()
        };
        let v = attrs_json(&a);
        assert_eq!(v["on_worker_lost"], "requeue");
        assert_eq!(v["unserved"], "reject");
        // Every field of the message has a key (a new attribute must be added here too).
        let keys = v.as_object().map_or(0, |o| o.len());
        assert_eq!(keys, 11, "{v}");
    }

    #[test]
    fn a_summary_of_counts_alone_says_no_results_were_kept() {
        let c = StateCounts {
            ok: 3,
            ..Default::default()
        };
        let t = summary_text(&Summary::of_wait(&[], Some(&c)));
        assert_eq!(
            t,
            "states:   ok 3  failed 0  cancelled 0  expired 0  rejected 0\n\
             results:  none kept (counts only)\n"
        );
    }

    #[test]
    fn result_json_shape() {
        let r = ItemResult {
            item_id: 5,
            state: ItemState::Ok as i32,
            output: b"hi".to_vec(),
            cpu_started: Some(3),
            queued_at: Some(prost_types::Timestamp {
                seconds: 0,
                nanos: 0,
            }),
            ..Default::default()
        };
        let v = result_json(&r);
        assert_eq!(v["state"], "ok");
        assert_eq!(v["output"], "aGk=");
        assert_eq!(v["cpu_started"], 3);
        assert_eq!(v["cpu_finished"], Value::Null);
        assert_eq!(v["queued_at"], "1970-01-01T00:00:00.000000000Z");
        assert_eq!(v["started_at"], Value::Null);
        assert_eq!(v["fallback_level"], "none");
    }

    #[test]
    fn topology_renders_cpus_and_groups() {
        let t = TopologySnapshot {
            epoch: 3,
            live: "0-1".into(),
            cpus: vec![CpuState {
                cpu: 0,
                online: true,
                live: true,
                busy: 0.25,
                ..Default::default()
            }],
            groups: vec![GroupInfo {
                level: GroupLevel::Cache as i32,
                target: "cache:0".into(),
                members: "0-3".into(),
                live_members: "0-1".into(),
            }],
            ..Default::default()
        };
        let text = topology_text(&t);
        assert!(text.starts_with("epoch 3"));
        assert!(text.contains("25%"));
        assert!(text.contains("cache:0"));
        let v = topology_json(&t);
        assert_eq!(v["groups"][0]["level"], "cache");
        assert_eq!(v["cpus"][0]["busy"], 0.25);
    }

    #[test]
    fn human_durations() {
        assert_eq!(human_us(850), "850µs");
        assert_eq!(human_us(12_340), "12.3ms");
        assert_eq!(human_us(4_560_000), "4.56s");
    }

    #[test]
    fn workers_render_slots_and_names() {
        use wqd_client::proto::SlotInfo;
        let w = WorkerInfo {
            worker_id: 3,
            pid: 77,
            uid: Some(1000),
            name: "resizer".into(),
            handlers: vec!["resize".into(), "thumb".into()],
            slots: vec![
                SlotInfo {
                    slot: 0,
                    cpu: 2,
                    in_flight: 1,
                    done: 5,
                    live: true,
                    ..Default::default()
                },
                SlotInfo {
                    slot: 1,
                    cpu: 3,
                    closed: true,
                    ..Default::default()
                },
            ],
            attached_seconds: 187.4,
            done: 5,
            ..Default::default()
        };
        let t = workers_text(std::slice::from_ref(&w));
        assert!(t.contains("resize,thumb"), "{t}");
        assert!(t.contains("2:1/5,3:0/0x!"), "{t}");
        assert!(t.contains("3m07s"), "{t}");
        let v = workers_json(&[w]);
        assert_eq!(v[0]["pid"], 77);
        assert_eq!(v[0]["slots"][1]["closed"], true);
        assert_eq!(workers_text(&[]).lines().count(), 2);
    }
}
