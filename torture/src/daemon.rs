//! Daemon mode: the driver talks to a running `wqd` (the real binary, started by the VM's
//! `/init`) through `wqd-client`, on a small tokio runtime of its own. The workload threads stay
//! plain threads and call [`Daemon`]'s [`Backend`] methods, which block on the runtime.
//!
//! What the library backend sees from inside, this one gets from the API:
//!
//! - wqd's published live sets come from `WatchTopology`, each stamped with the snapshot's own
//!   `taken_at` (the daemon's clock, the same guest clock the results use) and indexed by epoch.
//!   The stream keeps only the latest snapshot for a slow reader, so an epoch can be skipped: a
//!   gap in the epochs is recorded as an unknown stretch of the view (`None`), which the checks
//!   never count as "live".
//! - Handler runs cannot be seen, so duplicates are caught from what the daemon reports: every
//!   flush streams each covered item exactly once, terminal, and as many as its summary says;
//!   every cancel answers once per id, terminal; and at the end each workqueue's terminal totals
//!   (a counter bumped once per item end) and the daemon's re-bind counter must equal what the
//!   results add up to.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use parking_lot::Mutex;
use tokio_stream::StreamExt;
use wqd_client::proto::{self, CancelOutcome, FallbackLevel, FallbackPolicy, ItemState};
use wqd_client::{Batch, CancelScope, Client, Endpoint, FlushScope, Item};
use wqd_core::cpuset::CpuSet;
use wqd_core::engine::State;
use wqd_core::groups::Fallback;

use crate::backend::{Backend, DaemonCounts, Rec, Run, Scope, Spec, View, Waited};
use crate::clock::Clock;

/// What the watch task has seen.
#[derive(Debug, Default)]
struct Watched {
    view: View,
    epochs: HashMap<u64, CpuSet>,
    last_epoch: u64,
    latest: CpuSet,
    /// Snapshots received, and epochs the stream skipped (a slow reader sees only the latest).
    received: u64,
    skipped: u64,
    /// Why the stream ended early, if it did.
    error: Option<String>,
}

impl Watched {
    /// Folds one snapshot in; a gap in the epochs becomes an unknown stretch of the view that
    /// starts right after the last known snapshot.
    fn push(&mut self, s: &proto::TopologySnapshot, clock: &Clock) -> Result<()> {
        let live = CpuSet::parse_list(&s.live)
            .map_err(|e| anyhow!("epoch {}: live {:?}: {e}", s.epoch, s.live))?;
        let at = s
            .taken_at
            .as_ref()
            .map_or_else(|| clock.now(), |t| clock.on_timeline(to_system(t)));
        if s.epoch <= self.last_epoch {
            return Ok(());
        }
        if self.last_epoch != 0 && s.epoch > self.last_epoch + 1 {
            self.skipped += s.epoch - self.last_epoch - 1;
            let after = self
                .view
                .last()
                .map_or(at, |(t, _)| *t + Duration::from_nanos(1));
            self.view.push((after.min(at), None));
        }
        self.received += 1;
        self.last_epoch = s.epoch;
        self.epochs.insert(s.epoch, live.clone());
        self.view.push((at, Some(live.clone())));
        self.latest = live;
        Ok(())
    }
}

fn to_system(t: &prost_types::Timestamp) -> SystemTime {
    let secs = u64::try_from(t.seconds).unwrap_or(0);
    let nanos = u32::try_from(t.nanos).unwrap_or(0);
    SystemTime::UNIX_EPOCH + Duration::new(secs, nanos)
}

fn state_of(s: ItemState) -> State {
    match s {
        ItemState::Ok => State::Ok,
        ItemState::Failed => State::Failed,
        ItemState::Cancelled => State::Cancelled,
        ItemState::Expired => State::Expired,
        ItemState::Rejected => State::Rejected,
        ItemState::Running => State::Running,
        // Unspecified is never reported for a real item: count it as not terminal.
        ItemState::Delayed => State::Delayed,
        ItemState::Pending | ItemState::Unspecified => State::Pending,
    }
}

fn is_terminal(s: ItemState) -> bool {
    state_of(s).is_terminal()
}

fn policy_of(f: Fallback) -> FallbackPolicy {
    match f {
        Fallback::Widen => FallbackPolicy::Widen,
        Fallback::Wait => FallbackPolicy::Wait,
        Fallback::Reject => FallbackPolicy::Reject,
    }
}

/// The level's name as the library reports it (`node`, `all`, ...).
fn level_of(l: FallbackLevel) -> Option<String> {
    (l != FallbackLevel::Unspecified).then(|| {
        l.as_str_name()
            .trim_start_matches("FALLBACK_LEVEL_")
            .to_ascii_lowercase()
    })
}

/// A running wqd, driven over its socket.
pub struct Daemon {
    rt: tokio::runtime::Runtime,
    client: Client,
    clock: Arc<Clock>,
    socket: PathBuf,
    version: String,
    watched: Arc<Mutex<Watched>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Daemon {
    /// Connects to the daemon at `socket` (retrying for up to `connect_bound` while it starts)
    /// and starts watching its topology.
    ///
    /// # Errors
    /// No daemon answered in time, or the watch could not start.
    pub fn start(socket: &Path, clock: Arc<Clock>, connect_bound: Duration) -> Result<Daemon> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("torture-rpc")
            .enable_all()
            .build()
            .context("starting the tokio runtime")?;
        let t0 = Instant::now();
        let client = rt.block_on(async {
            loop {
                match Client::connect(Endpoint::unix(socket)).await {
                    Ok(c) => match c.stats().await {
                        Ok(_) => return Ok(c),
                        Err(e) if t0.elapsed() > connect_bound => return Err(anyhow!(e)),
                        Err(_) => {}
                    },
                    Err(e) if t0.elapsed() > connect_bound => return Err(anyhow!(e)),
                    Err(_) => {}
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let client =
            client.with_context(|| format!("no wqd answered on {} in time", socket.display()))?;
        let version = rt.block_on(client.stats())?.version;
        let watched = Arc::new(Mutex::new(Watched::default()));
        let mut stream = rt
            .block_on(client.watch_topology())
            .context("starting WatchTopology")?;
        let first = rt
            .block_on(stream.next())
            .ok_or_else(|| anyhow!("WatchTopology ended before its first snapshot"))??;
        watched.lock().push(&first, &clock)?;
        let (w, c) = (watched.clone(), clock.clone());
        let task = rt.spawn(async move {
            while let Some(m) = stream.next().await {
                let r = m
                    .map_err(|e| anyhow!(e))
                    .and_then(|s| w.lock().push(&s, &c));
                if let Err(e) = r {
                    w.lock().error = Some(format!("{e:#}"));
                    return;
                }
            }
            w.lock().error = Some("WatchTopology ended".into());
        });
        Ok(Daemon {
            rt,
            client,
            clock,
            socket: socket.to_path_buf(),
            version,
            watched,
            task: Mutex::new(Some(task)),
        })
    }

    /// Runs `fut` with `bound` as its deadline.
    fn bounded<T, F>(&self, bound: Duration, fut: F) -> Result<T>
    where
        F: std::future::Future<Output = Result<T, wqd_client::ClientError>>,
    {
        // The timer must be made inside the runtime: block_on's future is polled there.
        match self
            .rt
            .block_on(async { tokio::time::timeout(bound, fut).await })
        {
            Ok(r) => Ok(r?),
            Err(_) => bail!("did not return within {bound:?}"),
        }
    }
}

/// What is wrong with a flush stream: each covered item once, terminal, as many as the summary
/// says, and (for an id scope) exactly the ids asked for that the daemon knows.
fn check_flush(
    want: Option<&[u64]>,
    results: &[proto::ItemResult],
    summary: &proto::FlushSummary,
) -> Vec<String> {
    let mut bad = Vec::new();
    let mut seen: HashMap<u64, u32> = HashMap::with_capacity(results.len());
    for r in results {
        *seen.entry(r.item_id).or_default() += 1;
        if !is_terminal(r.state()) {
            bad.push(format!("item {} streamed as {:?}", r.item_id, r.state()));
        }
    }
    for (id, n) in &seen {
        if *n > 1 {
            bad.push(format!("item {id} streamed {n} times"));
        }
    }
    if results.len() as u64 != summary.items_covered {
        bad.push(format!(
            "{} results streamed for {} items covered",
            results.len(),
            summary.items_covered
        ));
    }
    if !summary.unknown_item_ids.is_empty() {
        bad.push(format!(
            "the daemon does not know ids {:?}",
            &summary.unknown_item_ids[..summary.unknown_item_ids.len().min(5)]
        ));
    }
    if let Some(c) = &summary.counts {
        if c.pending + c.running > 0 {
            bad.push(format!(
                "summary counts {} pending and {} running",
                c.pending, c.running
            ));
        }
    }
    if let Some(want) = want {
        let want: HashSet<u64> = want.iter().copied().collect();
        let missing: Vec<u64> = want
            .iter()
            .filter(|id| !seen.contains_key(id))
            .copied()
            .take(5)
            .collect();
        if !missing.is_empty() {
            bad.push(format!("no result streamed for items {missing:?}"));
        }
        if let Some(extra) = seen.keys().find(|id| !want.contains(id)) {
            bad.push(format!("item {extra} streamed but not asked for"));
        }
    }
    bad
}

impl Backend for Daemon {
    fn handlers(&self) -> Result<Vec<String>> {
        Ok(self
            .rt
            .block_on(self.client.stats())
            .context("GetStats")?
            .handlers)
    }

    fn describe(&self) -> String {
        let w = self.watched.lock();
        format!(
            "daemon (wqd {} on {}, driven through wqd-client), live {} at epoch {}",
            self.version,
            self.socket.display(),
            w.latest,
            w.last_epoch
        )
    }

    fn create_workqueue(&self, name: &str, fallback: Fallback, max_active: u32) -> Result<()> {
        let attrs = proto::WorkqueueAttrs {
            name: name.to_string(),
            max_active,
            fallback: policy_of(fallback) as i32,
            // Attached workers are killed mid-run (`attached.rs`): their items are re-delivered.
            on_worker_lost: proto::WorkerLostPolicy::Requeue as i32,
            ..Default::default()
        };
        self.rt
            .block_on(self.client.create_workqueue(attrs))
            .with_context(|| format!("creating workqueue {name}"))?;
        Ok(())
    }

    fn submit(&self, wq: &str, items: &[Spec]) -> Result<Option<(u64, Vec<u64>)>> {
        let batch = Batch::new().workqueue(wq).items(items.iter().map(|s| {
            s.args
                .iter()
                .fold(Item::new(s.target.to_string(), s.handler), |it, (k, v)| {
                    it.arg(*k, v.clone())
                })
        }));
        let r = match self.rt.block_on(self.client.submit(batch)) {
            Ok(r) => r,
            Err(e) if e.code() == tonic::Code::ResourceExhausted => return Ok(None),
            Err(e) => return Err(anyhow!(e).context(format!("submitting to {wq}"))),
        };
        if r.items.len() != items.len() {
            bail!(
                "submitting {} items to {wq}: {} receipts",
                items.len(),
                r.items.len()
            );
        }
        if let Some(x) = r.items.iter().find(|x| !x.queued || x.item_id == 0) {
            bail!("submitting to {wq}: an item without a key was not queued: {x:?}");
        }
        Ok(Some((
            r.batch_id,
            r.items.iter().map(|x| x.item_id).collect(),
        )))
    }

    fn flush(&self, scope: Scope, bound: Duration) -> Result<Waited> {
        let want = match &scope {
            Scope::Items(v) => Some(v.clone()),
            _ => None,
        };
        let scope = match scope {
            Scope::Items(v) => FlushScope::Items(v),
            Scope::Batch(b) => FlushScope::Batch(b),
            Scope::Workqueue(w) => FlushScope::Workqueue(w),
        };
        let t = Instant::now();
        let (results, summary) = self.bounded(bound, self.client.flush_all(scope))?;
        Ok(Waited {
            covered: summary.items_covered as usize,
            waited: t.elapsed(),
            bad: check_flush(want.as_deref(), &results, &summary),
        })
    }

    fn cancel(&self, ids: &[u64], bound: Duration) -> Result<Waited> {
        let t = Instant::now();
        let r = self.bounded(bound, self.client.cancel(CancelScope::Items(ids.to_vec())))?;
        let mut bad = Vec::new();
        let want: HashSet<u64> = ids.iter().copied().collect();
        let mut seen = HashSet::new();
        for x in &r.items {
            if !seen.insert(x.item_id) {
                bad.push(format!("cancel answered item {} twice", x.item_id));
            }
            if x.outcome() == CancelOutcome::Unknown {
                bad.push(format!(
                    "cancel: the daemon does not know item {}",
                    x.item_id
                ));
            } else if !is_terminal(x.state()) {
                bad.push(format!(
                    "cancel returned with item {} still {:?} ({:?})",
                    x.item_id,
                    x.state(),
                    x.outcome()
                ));
            }
        }
        if seen != want {
            bad.push(format!(
                "cancel of {} ids answered {} ids",
                want.len(),
                seen.len()
            ));
        }
        Ok(Waited {
            covered: r.items.len(),
            waited: t.elapsed(),
            bad,
        })
    }

    fn results(&self, ids: &[u64]) -> Result<Vec<Option<Rec>>> {
        let r = self
            .rt
            .block_on(self.client.results(ids.iter().copied()))
            .context("GetResults")?;
        if r.items.len() != ids.len() {
            bail!("GetResults of {} ids answered {}", ids.len(), r.items.len());
        }
        Ok(r.items
            .iter()
            .map(|l| {
                let r = l.result.as_ref()?;
                (l.status() == proto::LookupStatus::Found).then(|| Rec {
                    id: r.item_id,
                    state: state_of(r.state()),
                    cpu_started: r.cpu_started,
                    queued: r
                        .queued_at
                        .as_ref()
                        .map_or(Duration::ZERO, |t| self.clock.on_timeline(to_system(t))),
                    started: r
                        .started_at
                        .as_ref()
                        .map(|t| self.clock.on_timeline(to_system(t))),
                    finished: r
                        .finished_at
                        .as_ref()
                        .map(|t| self.clock.on_timeline(to_system(t))),
                    fallback: level_of(r.fallback_level()),
                    rebinds: r.rebinds,
                    epoch: (r.topology_epoch != 0).then_some(r.topology_epoch),
                    decided: (r.decision_epoch != 0).then_some(r.decision_epoch),
                    error: r.error.clone(),
                    reason: r.fallback_reason.clone(),
                    handler: r.handler.clone(),
                    worker: r.worker_id,
                    worker_lost: r.worker_lost,
                })
            })
            .collect())
    }

    fn live(&self) -> Result<CpuSet> {
        let w = self.watched.lock();
        match &w.error {
            Some(e) => bail!("topology watch: {e}"),
            None => Ok(w.latest.clone()),
        }
    }

    fn runs(&self) -> Option<HashMap<u64, Run>> {
        None
    }

    fn live_history(&self) -> View {
        self.watched.lock().view.clone()
    }

    fn epochs(&self) -> HashMap<u64, CpuSet> {
        self.watched.lock().epochs.clone()
    }

    fn daemon_counts(&self) -> Result<Option<DaemonCounts>> {
        let stats = self.rt.block_on(self.client.stats()).context("GetStats")?;
        let wqs = self
            .rt
            .block_on(self.client.list_workqueues(None))
            .context("ListWorkqueues")?;
        let mut totals = BTreeMap::new();
        for w in wqs {
            let (Some(a), Some(s)) = (w.attrs, w.stats) else {
                continue;
            };
            let t = s.totals.unwrap_or_default();
            let by: BTreeMap<State, u64> = [
                (State::Ok, t.ok),
                (State::Failed, t.failed),
                (State::Cancelled, t.cancelled),
                (State::Expired, t.expired),
                (State::Rejected, t.rejected),
            ]
            .into_iter()
            .collect();
            totals.insert(a.name, by);
        }
        Ok(Some(DaemonCounts {
            totals,
            rebinds: stats.rebinds,
        }))
    }

    fn counters(&self) -> Vec<(String, u64)> {
        let mut v = Vec::new();
        if let Ok(s) = self.rt.block_on(self.client.stats()) {
            v.extend([
                ("epoch".to_string(), s.topology_epoch),
                ("batches".to_string(), s.batches_accepted),
                ("rebinds".to_string(), s.rebinds),
                ("fallback_binds".to_string(), s.fallbacks),
                ("results_retained".to_string(), s.results_retained),
            ]);
        }
        let w = self.watched.lock();
        v.push(("watch.snapshots".to_string(), w.received));
        v.push(("watch.skipped_epochs".to_string(), w.skipped));
        v
    }

    fn shutdown(&self) {
        if let Some(t) = self.task.lock().take() {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(epoch: u64, live: &str) -> proto::TopologySnapshot {
        proto::TopologySnapshot {
            epoch,
            live: live.into(),
            ..Default::default()
        }
    }

    #[test]
    fn skipped_epochs_become_unknown_stretches() {
        let clock = Clock::new();
        let mut w = Watched::default();
        for s in [
            snap(1, "0-3"),
            snap(2, "0,2-3"),
            snap(5, "0"),
            snap(4, "0-3"),
        ] {
            w.push(&s, &clock).expect("push");
        }
        assert_eq!(w.last_epoch, 5);
        assert_eq!(w.skipped, 2);
        assert_eq!(w.received, 3);
        let known: Vec<Option<String>> = w
            .view
            .iter()
            .map(|(_, l)| l.as_ref().map(|l| l.to_string()))
            .collect();
        assert_eq!(
            known,
            vec![
                Some("0-3".into()),
                Some("0,2-3".into()),
                None,
                Some("0".into())
            ]
        );
        assert_eq!(w.latest, CpuSet::single(0));
    }

    #[test]
    fn flush_streams_are_checked() {
        let r = |id, st: ItemState| proto::ItemResult {
            item_id: id,
            state: st as i32,
            ..Default::default()
        };
        let summary = |n| proto::FlushSummary {
            items_covered: n,
            ..Default::default()
        };
        let good = [r(1, ItemState::Ok), r(2, ItemState::Rejected)];
        assert!(check_flush(Some(&[1, 2]), &good, &summary(2)).is_empty());
        let dup = [r(1, ItemState::Ok), r(1, ItemState::Ok)];
        let bad = check_flush(Some(&[1, 2]), &dup, &summary(2));
        assert!(
            bad.iter().any(|b| b.contains("streamed 2 times")),
            "{bad:?}"
        );
        assert!(bad.iter().any(|b| b.contains("[2]")), "{bad:?}");
        let running = [r(3, ItemState::Running)];
        assert_eq!(check_flush(None, &running, &summary(1)).len(), 1);
        assert_eq!(check_flush(None, &good, &summary(3)).len(), 1);
    }
}
