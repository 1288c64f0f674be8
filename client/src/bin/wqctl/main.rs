//! `wqctl`: the command-line client of wqd. `cli` defines the command line, `summary`
//! computes batch summaries, `render` formats responses, `fleet` serves `--fleet`; this file connects, calls the
//! daemon, prints, and maps outcomes to exit codes.
//!
//! Invariant: stdout gets only the chosen output (text, or exactly one JSON document);
//! diagnostics and the progress bar go to stderr. Exit codes are documented in
//! `cli::EXIT_CODES` (0 ok, 1 request failed, 2 usage, 3 some items not OK).

mod cli;
mod fleet;
mod render;
mod summary;

use std::io::{IsTerminal, Read};
use std::process::ExitCode;

use clap::Parser;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use tokio_stream::StreamExt;
use wqd_client::chunk::{shape_receipts, stream_receipts};
use wqd_client::error::code_name;
use wqd_client::proto::{
    self, FallbackPolicy, ItemReceipt, ItemResult, Placement, ResultsMode, StateCounts,
    UnservedPolicy, UpdateWorkqueueRequest, WorkerLostPolicy, WorkqueueAttrs,
};
use wqd_client::{
    Batch, CancelScope, Client, ClientError, Endpoint, FlushEvent, FlushScope, Item, TlsOptions,
};

use cli::{
    Cli, Command, FallbackArg, Output, PlacementArg, ResultsArg, SubmitArgs, UnservedArg,
    WorkerLostArg, WqAttrArgs, WqCommand,
};
use summary::{States, Summary};

/// Batches with more items than this go through `SubmitStream`.
const STREAM_THRESHOLD: u64 = 10_000;
/// ... as do batches whose encoded size would exceed this.
const STREAM_BYTES: u64 = 2 << 20;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Client(#[from] ClientError),
    #[error("{0}")]
    Local(String),
    #[error("fleet: {0}")]
    Fleet(#[from] wqd_client::fleet::FleetError),
}

/// What a successful command reports to the exit code.
enum Done {
    Ok,
    NotAllOk,
}

fn main() -> ExitCode {
    let cli = Cli::parse(); // exits 2 on usage errors
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wqctl: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(Done::Ok) => ExitCode::SUCCESS,
        Ok(Done::NotAllOk) => ExitCode::from(3),
        Err(e) => {
            eprintln!("wqctl: {e}");
            ExitCode::from(1)
        }
    }
}

fn endpoint(cli: &Cli) -> Result<Endpoint, CliError> {
    if let Some(a) = &cli.addr {
        return Ok(a.parse()?);
    }
    Ok(match &cli.socket {
        Some(p) => Endpoint::unix(p),
        None => Endpoint::default(),
    })
}

/// Prints one JSON document or the text, on stdout.
fn emit(output: Output, v: impl FnOnce() -> Value, text: impl FnOnce() -> String) {
    match output {
        Output::Json => println!("{}", v()),
        Output::Text => print!("{}", text()),
    }
}

/// The TLS settings from --tls-ca/--tls-cert/--tls-key, read from their files.
fn tls_options(cli: &Cli) -> Result<Option<TlsOptions>, CliError> {
    let read = |flag: &str, p: &std::path::Path| {
        std::fs::read(p).map_err(|e| CliError::Local(format!("{flag} {}: {e}", p.display())))
    };
    if cli.tls_ca.is_none() && cli.tls_cert.is_none() {
        return Ok(None);
    }
    let mut o = TlsOptions::default();
    if let Some(p) = &cli.tls_ca {
        o.ca_pem = Some(read("--tls-ca", p)?);
    }
    if let (Some(c), Some(k)) = (&cli.tls_cert, &cli.tls_key) {
        o.identity = Some((read("--tls-cert", c)?, read("--tls-key", k)?));
    }
    Ok(Some(o))
}

/// The bearer token from --token-file or WQD_TOKEN.
fn token(cli: &Cli) -> Result<Option<String>, CliError> {
    match (&cli.token_file, &cli.token) {
        (Some(p), _) => std::fs::read_to_string(p)
            .map(Some)
            .map_err(|e| CliError::Local(format!("--token-file {}: {e}", p.display()))),
        (None, Some(t)) => Ok(Some(t.clone())),
        (None, None) => Ok(None),
    }
}

async fn run(cli: Cli) -> Result<Done, CliError> {
    if let Some(url) = cli.fleet.clone() {
        return fleet::run(cli, &url).await;
    }
    if matches!(cli.command, Command::Fleet(_)) {
        return Err(CliError::Local(
            "fleet commands need --fleet nats://HOST:PORT (or WQD_FLEET)".into(),
        ));
    }
    if let Command::Flush(f) = &cli.command {
        if f.scope.fleet_batch.is_some() {
            return Err(CliError::Local(
                "--fleet-batch needs --fleet nats://HOST:PORT (or WQD_FLEET)".into(),
            ));
        }
    }
    let mut client = Client::connect_with(endpoint(&cli)?, tls_options(&cli)?)
        .await?
        .with_timeout(cli.timeout);
    if let Some(t) = token(&cli)? {
        client = client.with_token(&t)?;
    }
    let out = cli.output;
    match cli.command {
        Command::Topology { watch: false } => {
            let t = client.topology().await?;
            emit(
                out,
                || render::topology_json(&t),
                || render::topology_text(&t),
            );
        }
        Command::Topology { watch: true } => {
            let mut s = client.watch_topology().await?;
            let mut first = true;
            while let Some(t) = s.next().await {
                let t = t?;
                match out {
                    Output::Json => println!("{}", render::topology_json(&t)),
                    Output::Text => {
                        if !first {
                            println!();
                        }
                        print!("{}", render::topology_text(&t));
                    }
                }
                first = false;
            }
        }
        Command::Submit(args) => return submit(&client, out, args).await,
        Command::Flush(f) => {
            let scope = if let Some(b) = f.scope.batch {
                FlushScope::Batch(b)
            } else if let Some(w) = f.scope.workqueue {
                if f.include_delayed {
                    FlushScope::WorkqueueAll(w)
                } else {
                    FlushScope::Workqueue(w)
                }
            } else {
                FlushScope::Items(f.scope.items)
            };
            let (results, fs) = flush(&client, out, scope, f.summary_only, None).await?;
            let states = fs.counts.as_ref().map(States::from).unwrap_or_default();
            let summary = Summary::of(&results);
            let ok = states.all_ok();
            emit(
                out,
                || {
                    json!({
                        "items_covered": fs.items_covered,
                        "waited_us": render::dur_us(fs.waited.as_ref()),
                        "unknown_item_ids": fs.unknown_item_ids,
                        "delayed_not_covered": fs.delayed_not_covered,
                        "states": states,
                        "all_ok": ok,
                        "summary": (!f.summary_only).then_some(&summary),
                    })
                },
                || {
                    let mut t = format!(
                        "flushed {} items in {}\n",
                        fs.items_covered,
                        render::human_us(render::dur_us(fs.waited.as_ref()))
                    );
                    if fs.delayed_not_covered > 0 {
                        t.push_str(&format!(
                            "not covered: {} delayed items (--include-delayed queues and flushes them)\n",
                            fs.delayed_not_covered
                        ));
                    }
                    if f.summary_only {
                        let s = Summary {
                            states: states.clone(),
                            ..Default::default()
                        };
                        t.push_str(render::summary_text(&s).lines().next().unwrap_or_default());
                        t.push('\n');
                    } else {
                        t.push_str(&render::summary_text(&summary));
                    }
                    if !fs.unknown_item_ids.is_empty() {
                        t.push_str(&format!("unknown ids: {:?}\n", fs.unknown_item_ids));
                    }
                    t
                },
            );
            return Ok(if ok { Done::Ok } else { Done::NotAllOk });
        }
        Command::Cancel(c) => {
            let scope = match c.batch {
                Some(b) => CancelScope::Batch(b),
                None => CancelScope::Items(c.items),
            };
            let r = client.cancel(scope).await?;
            emit(out, || render::cancel_json(&r), || render::cancel_text(&r));
        }
        Command::Drain { workqueue } => {
            let r = client.drain(workqueue.clone()).await?;
            let c = r.counts.unwrap_or_default();
            let waited = render::dur_us(r.waited.as_ref());
            emit(
                out,
                || json!({"workqueue": workqueue, "states": render::counts_json(&c), "waited_us": waited}),
                || {
                    format!(
                        "drained {workqueue} in {}: ok {}  failed {}  cancelled {}  expired {}  rejected {}\n",
                        render::human_us(waited),
                        c.ok,
                        c.failed,
                        c.cancelled,
                        c.expired,
                        c.rejected
                    )
                },
            );
        }
        Command::Wq(cmd) => wq(&client, out, cmd).await?,
        Command::Results { ids } => {
            let r = client.results(ids).await?;
            emit(
                out,
                || render::results_json(&r),
                || render::results_text(&r),
            );
        }
        Command::Stats => {
            let s = client.stats().await?;
            emit(out, || render::stats_json(&s), || render::stats_text(&s));
        }
        Command::Fleet(_) => {
            return Err(CliError::Local(
                "fleet commands need --fleet nats://HOST:PORT (or WQD_FLEET)".into(),
            ))
        }
        Command::Workers => {
            let r = client.list_workers_response().await?;
            let w = &r.workers;
            emit(
                out,
                || {
                    json!({
                        "workers": render::workers_json(w),
                        "workers_lost": r.workers_lost,
                        "items_lost": r.items_lost,
                    })
                },
                || {
                    format!(
                        "{}lost since start: {} workers holding {} items\n",
                        render::workers_text(w),
                        r.workers_lost,
                        r.items_lost
                    )
                },
            );
        }
    }
    Ok(Done::Ok)
}

fn read_payload(path: &std::path::Path) -> Result<Vec<u8>, CliError> {
    let mut buf = Vec::new();
    let res = if path.as_os_str() == "-" {
        std::io::stdin().read_to_end(&mut buf).map(|_| ())
    } else {
        std::fs::File::open(path).and_then(|mut f| f.read_to_end(&mut buf).map(|_| ()))
    };
    res.map_err(|e| CliError::Local(format!("cannot read payload {}: {e}", path.display())))?;
    Ok(buf)
}

async fn submit(client: &Client, out: Output, a: SubmitArgs) -> Result<Done, CliError> {
    let target = a.target.clone();
    let mut item = Item::new(a.target, a.handler);
    for (k, v) in a.args {
        item = item.arg(k, v);
    }
    if let Some(p) = &a.payload_file {
        item = item.payload(read_payload(p)?);
    }
    if let Some(k) = a.key {
        item = item.key(k);
    }
    if let Some(d) = a.delay {
        item = item.delay(d);
    }
    if let Some(d) = a.deadline {
        item = item.deadline(d);
    }
    let item_bytes = prost::Message::encoded_len(item.as_proto()) as u64 + 8;
    let streamed =
        a.stream || a.count > STREAM_THRESHOLD || a.count.saturating_mul(item_bytes) > STREAM_BYTES;
    let count = a.count;

    // Submit.
    let (batch_id, receipts, waited_results) = if streamed {
        let tmpl = item;
        let items = (0..count).map(move |_| tmpl.clone());
        let r = client.submit_stream(a.workqueue.clone(), items).await?;
        (r.batch_id, stream_receipts(&r), None)
    } else {
        let wait = a.wait;
        // Receipts only for a fan-out, whose receipts name the groups; otherwise the answer's
        // shape says the same for a few bytes instead of a receipt per item.
        let each = fans_out(&target);
        let batch = Batch::new()
            .workqueue(a.workqueue.clone())
            .items(std::iter::repeat_n(
                item,
                usize::try_from(count).unwrap_or(usize::MAX),
            ))
            .wait(wait)
            .receipts(each);
        let r = client.submit(batch).await?;
        // A daemon that predates the receipts mode sends them all the same.
        let receipts = match r.items.is_empty() {
            false => r.items,
            true => shape_receipts(r.first_item_id, r.item_count, &r.duplicates),
        };
        (r.batch_id, receipts, wait.then_some((r.results, r.counts)))
    };
    let queued = receipts.iter().filter(|r| r.queued).count() as u64;

    // Wait, if asked. The counts are the daemon's: the answer for a workqueue that keeps no
    // per-item results (results = summary or none), whose waits return counts only.
    let waited: Option<(Vec<ItemResult>, Option<StateCounts>)> = match waited_results {
        Some(r) => Some(r),
        None if a.wait || a.flush => {
            let bar =
                (out == Output::Text && std::io::stdout().is_terminal()).then(|| progress(queued));
            let (r, s) = flush(client, out, FlushScope::Batch(batch_id), false, bar).await?;
            Some((r, s.counts))
        }
        None => None,
    };
    let summary = waited
        .as_ref()
        .map(|(r, c)| Summary::of_wait(r, c.as_ref()));
    let results = waited.map(|(r, _)| r);
    let all_ok = summary.as_ref().map(|s| s.states.all_ok()).unwrap_or(true);
    // A fan-out reports per group: the daemon expanded it, each result names its group.
    let groups = results
        .as_ref()
        .filter(|_| fans_out(&target))
        .map(summary::per_group);

    emit(
        out,
        || {
            let mut v = receipt_json(batch_id, &receipts, summary.as_ref());
            if let (Some(g), Some(obj)) = (&groups, v.as_object_mut()) {
                obj.insert(
                    "groups".into(),
                    serde_json::to_value(g).unwrap_or(Value::Null),
                );
            }
            v
        },
        || {
            let mut t = format!(
                "batch {batch_id}: {} items, {queued} queued, {} deduplicated{}\n",
                receipts.len(),
                receipts.len() as u64 - queued,
                id_range(&receipts)
            );
            if let Some(g) = &groups {
                t.push_str(&render::groups_text(g));
            }
            if let Some(s) = &summary {
                t.push_str(&render::summary_text(s));
            }
            t
        },
    );
    Ok(if all_ok { Done::Ok } else { Done::NotAllOk })
}

/// True when `target` is an `each:` fan-out, which the daemon expands to one item per group.
fn fans_out(target: &str) -> bool {
    target.trim_start().starts_with("each:")
}

/// ` (ids A-B)` when the queued ids are contiguous, ` (id A)` for one, else empty.
fn id_range(r: &[ItemReceipt]) -> String {
    let ids: Vec<u64> = r.iter().filter(|x| x.queued).map(|x| x.item_id).collect();
    match (ids.first(), ids.last()) {
        (Some(a), Some(b)) if a == b => format!(" (id {a})"),
        (Some(a), Some(b)) if b - a + 1 == ids.len() as u64 => format!(" (ids {a}-{b})"),
        _ => String::new(),
    }
}

fn receipt_json(batch_id: u64, receipts: &[ItemReceipt], summary: Option<&Summary>) -> Value {
    let item_ids: Vec<u64> = receipts
        .iter()
        .filter(|r| r.queued)
        .map(|r| r.item_id)
        .collect();
    let duplicates: Vec<Value> = receipts
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.queued)
        .map(|(i, r)| json!({"index": i, "duplicate_of": r.duplicate_of}))
        .collect();
    let mut v = json!({
        "batch_id": batch_id,
        "item_count": receipts.len(),
        "queued_count": item_ids.len(),
        "deduplicated_count": duplicates.len(),
        "item_ids": item_ids,
        "duplicates": duplicates,
    });
    if let (Some(s), Some(obj)) = (summary, v.as_object_mut()) {
        obj.insert("all_ok".into(), Value::Bool(s.states.all_ok()));
        obj.insert(
            "summary".into(),
            serde_json::to_value(s).unwrap_or(Value::Null),
        );
    }
    v
}

fn progress(total: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {pos}/{len} items  {per_sec}  eta {eta}")
    {
        bar.set_style(style);
    }
    bar
}

/// Runs a flush to its summary, collecting results (and advancing `bar`).
async fn flush(
    client: &Client,
    _out: Output,
    scope: FlushScope,
    summary_only: bool,
    bar: Option<ProgressBar>,
) -> Result<(Vec<ItemResult>, proto::FlushSummary), CliError> {
    let mut stream = client.flush(scope, summary_only).await?;
    let mut results = Vec::new();
    while let Some(ev) = stream.next().await {
        match ev? {
            FlushEvent::Results(r) => {
                if let Some(b) = &bar {
                    b.inc(r.len() as u64);
                }
                results.extend(r);
            }
            FlushEvent::Summary(s) => {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                return Ok((results, s));
            }
        }
    }
    Err(ClientError::Protocol("flush stream ended without summary".into()).into())
}

fn placement(p: PlacementArg) -> Placement {
    match p {
        PlacementArg::First => Placement::First,
        PlacementArg::Spread => Placement::Spread,
        PlacementArg::LeastLoaded => Placement::LeastLoaded,
        PlacementArg::Idle => Placement::Idle,
    }
}

fn fallback(f: FallbackArg) -> FallbackPolicy {
    match f {
        FallbackArg::Widen => FallbackPolicy::Widen,
        FallbackArg::Wait => FallbackPolicy::Wait,
        FallbackArg::Reject => FallbackPolicy::Reject,
    }
}

fn worker_lost(w: WorkerLostArg) -> WorkerLostPolicy {
    match w {
        WorkerLostArg::Fail => WorkerLostPolicy::Fail,
        WorkerLostArg::Requeue => WorkerLostPolicy::Requeue,
    }
}

fn unserved(u: UnservedArg) -> UnservedPolicy {
    match u {
        UnservedArg::Wait => UnservedPolicy::Wait,
        UnservedArg::Reject => UnservedPolicy::Reject,
    }
}

fn results_mode(r: ResultsArg) -> ResultsMode {
    match r {
        ResultsArg::Full => ResultsMode::Full,
        ResultsArg::Summary => ResultsMode::Summary,
        ResultsArg::None => ResultsMode::None,
    }
}

/// `wq create` attributes; unset ones are zero, which the daemon reads as "default".
fn create_attrs(name: String, ordered: bool, a: &WqAttrArgs) -> WorkqueueAttrs {
    WorkqueueAttrs {
        name,
        max_active: a.max_active.unwrap_or(0),
        group_max_active: a.group_max_active.unwrap_or(0),
        ordered,
        nice: a.nice.unwrap_or(0),
        placement: a.placement.map(placement).unwrap_or(Placement::Unspecified) as i32,
        fallback: a
            .fallback
            .map(fallback)
            .unwrap_or(FallbackPolicy::Unspecified) as i32,
        max_queued: a.max_queued.unwrap_or(0),
        on_worker_lost: a
            .on_worker_lost
            .map(worker_lost)
            .unwrap_or(WorkerLostPolicy::Unspecified) as i32,
        unserved: a
            .unserved
            .map(unserved)
            .unwrap_or(UnservedPolicy::Unspecified) as i32,
        results: a
            .results
            .map(results_mode)
            .unwrap_or(ResultsMode::Unspecified) as i32,
    }
}

fn update_request(name: String, ordered: Option<bool>, a: &WqAttrArgs) -> UpdateWorkqueueRequest {
    UpdateWorkqueueRequest {
        name,
        max_active: a.max_active,
        group_max_active: a.group_max_active,
        ordered,
        nice: a.nice,
        placement: a.placement.map(|p| placement(p) as i32),
        fallback: a.fallback.map(|f| fallback(f) as i32),
        max_queued: a.max_queued,
        on_worker_lost: a.on_worker_lost.map(|w| worker_lost(w) as i32),
        unserved: a.unserved.map(|u| unserved(u) as i32),
        results: a.results.map(|r| results_mode(r) as i32),
    }
}

async fn wq(client: &Client, out: Output, cmd: WqCommand) -> Result<(), CliError> {
    match cmd {
        WqCommand::Create {
            name,
            ordered,
            attrs,
        } => {
            let a = client
                .create_workqueue(create_attrs(name, ordered, &attrs))
                .await?;
            emit(
                out,
                || render::attrs_json(&a),
                || format!("created workqueue {}\n", a.name),
            );
        }
        WqCommand::List { name } => {
            let l = client.list_workqueues(name).await?;
            emit(
                out,
                || json!({"workqueues": render::workqueues_json(&l)}),
                || render::workqueues_text(&l),
            );
        }
        WqCommand::Update {
            name,
            ordered,
            attrs,
        } => {
            let a = client
                .update_workqueue(update_request(name, ordered, &attrs))
                .await?;
            emit(
                out,
                || render::attrs_json(&a),
                || format!("updated workqueue {}\n", a.name),
            );
        }
        WqCommand::Delete {
            name,
            cancel_pending,
        } => {
            let r = client
                .delete_workqueue(name.clone(), cancel_pending)
                .await?;
            let c = r.counts.unwrap_or_default();
            emit(
                out,
                || json!({"deleted": name, "states": render::counts_json(&c)}),
                || format!("deleted workqueue {name}\n"),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipt_json_lists_queued_ids_and_duplicates() {
        let r = vec![
            ItemReceipt {
                item_id: 10,
                queued: true,
                duplicate_of: 0,
                ..Default::default()
            },
            ItemReceipt {
                item_id: 0,
                queued: false,
                duplicate_of: 10,
                ..Default::default()
            },
            ItemReceipt {
                item_id: 12,
                queued: true,
                duplicate_of: 0,
                ..Default::default()
            },
        ];
        let v = receipt_json(4, &r, None);
        assert_eq!(v["batch_id"], 4);
        assert_eq!(v["item_count"], 3);
        assert_eq!(v["queued_count"], 2);
        assert_eq!(v["item_ids"], json!([10, 12]));
        assert_eq!(v["duplicates"], json!([{"index": 1, "duplicate_of": 10}]));
        assert!(v.get("summary").is_none());
        let v = receipt_json(4, &r, Some(&Summary::default()));
        assert_eq!(v["all_ok"], true);
        assert_eq!(id_range(&r), "");
        assert_eq!(id_range(&r[..1]), " (id 10)");
    }

    #[test]
    fn wq_flags_map_to_messages() {
        let a = WqAttrArgs {
            max_active: Some(2),
            group_max_active: None,
            nice: Some(-3),
            placement: Some(PlacementArg::Spread),
            fallback: None,
            max_queued: None,
            on_worker_lost: Some(WorkerLostArg::Requeue),
            unserved: None,
            results: Some(ResultsArg::Summary),
        };
        let c = create_attrs("w".into(), true, &a);
        assert_eq!((c.max_active, c.group_max_active, c.nice), (2, 0, -3));
        assert_eq!(c.placement(), Placement::Spread);
        assert_eq!(c.fallback(), FallbackPolicy::Unspecified);
        assert_eq!(c.on_worker_lost(), WorkerLostPolicy::Requeue);
        assert_eq!(c.unserved(), UnservedPolicy::Unspecified);
        assert_eq!(c.results(), ResultsMode::Summary);
        let u = update_request("w".into(), None, &a);
        assert_eq!(u.results, Some(ResultsMode::Summary as i32));
        assert_eq!(u.max_active, Some(2));
        assert_eq!(u.group_max_active, None);
        assert_eq!(u.placement, Some(Placement::Spread as i32));
        assert_eq!(u.ordered, None);
    }
}
