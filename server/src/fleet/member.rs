//! The fleet member: one NATS connection and the tasks on it — the host record refresher,
//! one consumer loop per durable consumer (`host-NAME` and the shared `any`), the
//! max-deliveries advisory listener, and one task per item in the local engine.
//!
//! Owns the NATS client of the daemon and the set of fleet item ids running here
//! (`Shared::inflight`). Invariants (argued in `README.md` beside this file):
//! * an item is acked only after its terminal result was published and JetStream acked the
//!   publication; every other path naks it, leaves it for redelivery, or publishes a terminal
//!   `failed`/`rejected` result first — never an ack without a published result;
//! * within this member an item id runs at most once at a time: a redelivery of an id in
//!   `inflight` is dropped (the running copy acks), a redelivery whose result is already in
//!   the results stream is acked without running;
//! * items cancelled because the daemon is stopping are nak'd, not published as cancelled;
//! * a fan-out item (`each:`) is expanded here against this host's groups, one result per
//!   group (id `<item id>/<group>`), acked when all are published; a redelivery skips the
//!   groups whose result is published.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, consumer, kv, stream, AckKind};
use bytes::Bytes;
use futures_util::StreamExt as _;
use parking_lot::Mutex;
use prost::Message as _;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{default_host_name, FleetConfig, FleetError};
use crate::metrics::{FleetMetrics, Metrics};
use crate::rpc::convert;
use crate::rpc::limits::SharedLimits;
use crate::shared::stopped;
use wqd_core::engine::{Engine, EngineError, FlushEvent};
use wqd_core::groups::Level;
use wqd_core::live::LiveView;
use wqd_core::load::LoadSampler;
use wqd_core::target::{Each, ItemTarget};
use wqd_proto::fleet::{FleetItem, FleetResult, HostRecord, Names, ANY_CONSUMER};
use wqd_proto::v1;

/// How long stopping waits for running item tasks to publish their results.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Longest pause between retries of a failed JetStream call.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// JetStream's `max_deliver` on the shared `any` consumer is `fleet.max_deliver` times this:
/// deliveries to members that cannot place an item (and hand it back) count there too.
const ANY_DELIVER_FACTOR: i64 = 10;
/// JetStream's de-duplication window on the results stream.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// What the member needs of the daemon.
pub struct MemberContext {
    pub engine: Arc<Engine>,
    pub view: Arc<LiveView>,
    pub load: Option<Arc<LoadSampler>>,
    pub limits: SharedLimits,
    pub metrics: Option<Arc<Metrics>>,
}

/// Counts since start (logged when the member stops; the metrics carry the same).
#[derive(Debug, Default)]
pub struct Stats {
    pub delivered: AtomicU64,
    pub redelivered: AtomicU64,
    pub acked: AtomicU64,
    pub naked: AtomicU64,
    /// Redelivered items whose result was already published: acked, not run again.
    pub dup_member: AtomicU64,
    /// Redeliveries of an item running here: dropped, the running copy acks.
    pub dup_inflight: AtomicU64,
    /// Results JetStream reported as duplicates of one already stored.
    pub dup_publish: AtomicU64,
    pub published: AtomicU64,
    /// Items ended `failed` because they were delivered `max_deliver` times.
    pub gave_up: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// `[fleet]` with its I/O done ([`Member::prepare`]): what [`Member::start`] needs.
pub struct Prepared {
    host: String,
    opts: async_nats::ConnectOptions,
    cfg: FleetConfig,
}

impl Prepared {
    /// The member's name.
    pub fn host(&self) -> &str {
        &self.host
    }
}

/// A running member. [`Member::stop`] ends it.
pub struct Member {
    host: String,
    stop: watch::Sender<bool>,
    main: JoinHandle<()>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// State every task of the member shares.
struct Shared {
    host: String,
    names: Names,
    cfg: FleetConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    ctx: MemberContext,
    /// L: ids of the items running here (submitted, result not yet published).
    inflight: Mutex<HashSet<String>>,
    stats: Stats,
    metrics: Option<FleetMetrics>,
    stopping: watch::Receiver<bool>,
    /// Item tasks still running (stop waits for them, bounded).
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// L: every member's host record as last read.
    others: Mutex<Vec<HostRecord>>,
    /// The hosts bucket, once set up.
    kv: std::sync::OnceLock<kv::Store>,
}

/// Which durable consumer a loop serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Host,
    Any,
}

impl Member {
    /// Resolves what `[fleet]` needs I/O for — the host name, the credentials, token and TLS
    /// files — once, at start-up, before anything is bound.
    ///
    /// # Errors
    /// [`FleetError::HostName`], [`FleetError::File`] (a file that cannot be read).
    pub async fn prepare(cfg: &FleetConfig) -> Result<Prepared, FleetError> {
        let host = match &cfg.host {
            Some(h) => h.clone(),
            None => {
                let h = nix::unistd::gethostname()
                    .map_err(|e| FleetError::HostName(e.to_string()))?
                    .to_string_lossy()
                    .into_owned();
                let n = default_host_name(&h);
                if !wqd_proto::fleet::is_token(&n) {
                    return Err(FleetError::HostName(format!("{h:?} gives no usable name")));
                }
                n
            }
        };
        let opts = connect_options(cfg, &host).await?;
        Ok(Prepared {
            host,
            opts,
            cfg: cfg.clone(),
        })
    }

    /// Starts connecting to NATS in the background and starts the member's tasks. Never waits
    /// for NATS: a fleet that is down at start is joined when it comes up.
    ///
    /// # Errors
    /// [`FleetError::Connect`] for options the NATS client refuses (a bad server address).
    pub async fn start(p: Prepared, ctx: MemberContext) -> Result<Member, FleetError> {
        let Prepared { host, opts, cfg } = p;
        let metrics = ctx.metrics.as_ref().map(|m| m.fleet());
        let client = opts
            .connect(cfg.servers.as_slice())
            .await
            .map_err(|e| FleetError::Connect(e.to_string()))?;
        let js = jetstream::new(client.clone());
        let (stop, stopping) = watch::channel(false);
        let shared = Arc::new(Shared {
            host: host.clone(),
            names: cfg.names(),
            cfg: cfg.clone(),
            client,
            js,
            ctx,
            inflight: Mutex::new(HashSet::new()),
            stats: Stats::default(),
            metrics,
            stopping,
            tasks: Mutex::new(Vec::new()),
            others: Mutex::new(Vec::new()),
            kv: std::sync::OnceLock::new(),
        });
        let main = tokio::spawn(shared.clone().run());
        tracing::info!(host = %host, servers = ?cfg.servers, "fleet member starting");
        Ok(Member {
            host,
            stop,
            main,
            shared,
        })
    }

    /// This member's name.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The counts so far.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Stops pulling items; items the engine cancels from now on are handed back to the fleet
    /// (nak), not published as cancelled. [`Member::stop`] finishes the job.
    pub fn begin_stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Stops taking items and refreshing the host record (the record is deleted), waits up to
    /// [`STOP_GRACE`] for running items to publish their results, then closes the connection.
    /// Call it after the engine stopped (its cancelled items are nak'd, not published).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(STOP_GRACE, self.main).await;
        let tasks = std::mem::take(&mut *self.shared.tasks.lock());
        let end = tokio::time::Instant::now() + STOP_GRACE;
        for t in tasks {
            if tokio::time::timeout_at(end, t).await.is_err() {
                break;
            }
        }
        if let Ok(kv) = self
            .shared
            .js
            .get_key_value(&self.shared.names.hosts_bucket)
            .await
        {
            let _ = tokio::time::timeout(Duration::from_secs(1), kv.delete(&self.host)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.shared.client.flush()).await;
        let s = &self.shared.stats;
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        tracing::info!(
            host = %self.host,
            delivered = n(&s.delivered),
            redelivered = n(&s.redelivered),
            acked = n(&s.acked),
            naked = n(&s.naked),
            published = n(&s.published),
            duplicates_suppressed_member = n(&s.dup_member),
            duplicates_inflight = n(&s.dup_inflight),
            duplicates_suppressed_publish = n(&s.dup_publish),
            gave_up = n(&s.gave_up),
            "fleet member stopped"
        );
    }
}

/// The connect options of `cfg`, reading the files it names.
async fn connect_options(
    cfg: &FleetConfig,
    host: &str,
) -> Result<async_nats::ConnectOptions, FleetError> {
    let file = |what, path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| FleetError::File { what, path, source }
    };
    let mut o = async_nats::ConnectOptions::new()
        .name(format!("wqd:{host}"))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(5)));
    if let Some(p) = &cfg.credentials_file {
        o = o
            .credentials_file(p)
            .await
            .map_err(file("credentials file", p))?;
    }
    if let (Some(u), Some(pw)) = (&cfg.user, &cfg.password) {
        o = o.user_and_password(u.clone(), pw.clone());
    }
    if let Some(p) = &cfg.token_file {
        let t = std::fs::read_to_string(p).map_err(file("token file", p))?;
        o = o.token(t.trim().to_string());
    }
    for (what, p) in [
        ("tls_ca", &cfg.tls_ca),
        ("tls_cert", &cfg.tls_cert),
        ("tls_key", &cfg.tls_key),
    ] {
        if let Some(p) = p {
            std::fs::metadata(p).map_err(file(what, p))?;
        }
    }
    if let Some(ca) = &cfg.tls_ca {
        o = o.add_root_certificates(ca.clone());
    }
    if let (Some(c), Some(k)) = (&cfg.tls_cert, &cfg.tls_key) {
        o = o.add_client_certificate(c.clone(), k.clone());
    }
    if cfg.tls_required || cfg.tls_ca.is_some() {
        o = o.require_tls(true);
    }
    Ok(o)
}

/// Retries `f` with a growing pause until it succeeds or the member stops (`None`).
async fn retry<T, E: std::fmt::Display, F, Fut>(
    what: &str,
    stopping: &watch::Receiver<bool>,
    mut f: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut pause = Duration::from_millis(50);
    let mut warned = false;
    loop {
        if *stopping.borrow() {
            return None;
        }
        match f().await {
            Ok(v) => return Some(v),
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "fleet: {what} failed; retrying");
                    warned = true;
                } else {
                    tracing::debug!(error = %e, "fleet: {what} failed again");
                }
            }
        }
        tokio::select! {
            _ = stopped(stopping.clone()) => return None,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(MAX_BACKOFF);
    }
}

impl Shared {
    /// Keeps `t` among the member's item tasks (dropping those that finished), so a stop can
    /// wait for them.
    fn track(&self, t: JoinHandle<()>) {
        let mut tasks = self.tasks.lock();
        tasks.retain(|t| !t.is_finished());
        tasks.push(t);
    }

    /// Creates (or finds) the streams and the bucket, then runs the refresher, both consumer
    /// loops and the advisory listener until stopping.
    async fn run(self: Arc<Self>) {
        let stopping = self.stopping.clone();
        let Some(kv) = retry(
            "setting up the streams and the hosts bucket",
            &stopping,
            || self.setup(),
        )
        .await
        else {
            return;
        };
        let _ = self.kv.set(kv.clone());
        tracing::info!(host = %self.host, "fleet member joined");
        let tasks = vec![
            tokio::spawn(self.clone().refresh(kv)),
            tokio::spawn(self.clone().consume(Which::Host)),
            tokio::spawn(self.clone().consume(Which::Any)),
            tokio::spawn(self.clone().advisories()),
        ];
        stopped(stopping).await;
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
    }

    async fn setup(&self) -> Result<kv::Store, FleetError> {
        let n = &self.names;
        let js_err =
            |what: &str, e: &dyn std::fmt::Display| FleetError::JetStream(format!("{what}: {e}"));
        self.js
            .get_or_create_stream(stream::Config {
                name: n.work_stream.clone(),
                subjects: vec![n.work_subjects()],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| js_err(&format!("stream {}", n.work_stream), &e))?;
        self.js
            .get_or_create_stream(stream::Config {
                name: n.results_stream.clone(),
                subjects: n.results_subjects(),
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                max_age: self.cfg.results_max_age,
                duplicate_window: DUPLICATE_WINDOW,
                ..Default::default()
            })
            .await
            .map_err(|e| js_err(&format!("stream {}", n.results_stream), &e))?;
        // The bucket's stream, created as `create_key_value` would: that call first asks for
        // the account's info, which async-nats 0.51 cannot parse from a 2.9 server (Debian's).
        self.js
            .get_or_create_stream(stream::Config {
                name: format!("KV_{}", n.hosts_bucket),
                subjects: vec![format!("$KV.{}.>", n.hosts_bucket)],
                max_messages_per_subject: 1,
                max_age: self.cfg.host_ttl,
                storage: stream::StorageType::File,
                allow_rollup: true,
                deny_delete: true,
                allow_direct: true,
                discard: stream::DiscardPolicy::New,
                ..Default::default()
            })
            .await
            .map_err(|e| js_err(&format!("bucket {}", n.hosts_bucket), &e))?;
        let kv = self
            .js
            .get_key_value(&n.hosts_bucket)
            .await
            .map_err(|e| js_err(&format!("bucket {}", n.hosts_bucket), &e))?;
        Ok(kv)
    }

    fn consumer_config(&self, which: Which) -> consumer::pull::Config {
        let (name, filter) = match which {
            Which::Host => (
                self.names.host_consumer(&self.host),
                self.names.host_subject(&self.host),
            ),
            Which::Any => (ANY_CONSUMER.to_string(), self.names.any_subject()),
        };
        // `any` items are also delivered to members that cannot place them and hand them back:
        // JetStream's bound there is ANY_DELIVER_FACTOR times larger (see README.md).
        let max_deliver = match which {
            Which::Host => self.cfg.max_deliver,
            Which::Any => self.cfg.max_deliver.saturating_mul(ANY_DELIVER_FACTOR),
        };
        consumer::pull::Config {
            durable_name: Some(name),
            filter_subject: filter,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.cfg.ack_wait,
            max_deliver,
            max_ack_pending: self.cfg.max_in_flight,
            ..Default::default()
        }
    }

    async fn consumer(&self, which: Which) -> Result<consumer::PullConsumer, FleetError> {
        let cfg = self.consumer_config(which);
        let name = cfg.durable_name.clone().unwrap_or_default();
        let s = self
            .js
            .get_stream(&self.names.work_stream)
            .await
            .map_err(|e| FleetError::JetStream(e.to_string()))?;
        s.get_or_create_consumer(&name, cfg)
            .await
            .map_err(|e| FleetError::JetStream(e.to_string()))
    }

    /// One consumer's loop: (re)creates the consumer and its message stream, handles every
    /// message; on a stream error that is not a missed heartbeat, starts over.
    async fn consume(self: Arc<Self>, which: Which) {
        let stopping = self.stopping.clone();
        let what = format!("creating the {which:?} consumer");
        while !*stopping.borrow() {
            let Some(c) = retry(&what, &stopping, || self.consumer(which)).await else {
                return;
            };
            let Some(mut msgs) = retry("starting to pull", &stopping, || async {
                c.stream()
                    .max_messages_per_batch(256)
                    .heartbeat(Duration::from_secs(5))
                    .expires(Duration::from_secs(30))
                    .messages()
                    .await
            })
            .await
            else {
                return;
            };
            loop {
                let next = tokio::select! {
                    _ = stopped(stopping.clone()) => return,
                    m = msgs.next() => m,
                };
                match next {
                    Some(Ok(m)) => self.handle(m, which).await,
                    Some(Err(e)) => {
                        use consumer::pull::MessagesErrorKind as K;
                        if e.kind() == K::MissingHeartbeat {
                            tracing::debug!(?which, "fleet: missed a heartbeat");
                            continue;
                        }
                        tracing::warn!(?which, error = %e, "fleet: pulling failed; starting over");
                        break;
                    }
                    None => break,
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// One delivery: de-duplicate, check placement (`any`), submit, and hand the rest to the
    /// item's task.
    async fn handle(self: &Arc<Self>, m: jetstream::Message, which: Which) {
        let delivered = m.info().map(|i| i.delivered).unwrap_or(1);
        bump(&self.stats.delivered);
        if let Some(x) = &self.metrics {
            x.deliveries.increment(1);
        }
        let item = match FleetItem::decode(m.payload.clone()) {
            Ok(i) if i.id.starts_with(&format!("{}.", i.batch)) && !i.batch.is_empty() => i,
            Ok(i) => {
                tracing::warn!(id = %i.id, batch = %i.batch, "fleet: an item whose id does not carry its batch; terminated");
                let _ = m.ack_with(AckKind::Term).await;
                return;
            }
            Err(e) => {
                tracing::warn!(subject = %m.subject, error = %e, "fleet: an undecodable item; terminated");
                let _ = m.ack_with(AckKind::Term).await;
                return;
            }
        };
        if delivered > 1 {
            bump(&self.stats.redelivered);
            if let Some(x) = &self.metrics {
                x.redeliveries.increment(1);
            }
            if self.inflight.lock().contains(&item.id) {
                // Running here: its task acks when it ends (and keeps the delivery alive).
                bump(&self.stats.dup_inflight);
                return;
            }
            if self.result_exists(&item.id).await {
                bump(&self.stats.dup_member);
                if let Some(x) = &self.metrics {
                    x.dup_member.increment(1);
                }
                self.ack(&m).await;
                return;
            }
        }
        let last_try = match which {
            Which::Host => delivered >= self.cfg.max_deliver,
            Which::Any => delivered >= self.cfg.max_deliver.saturating_mul(ANY_DELIVER_FACTOR),
        };
        let text = item.item.as_ref().map(|w| w.target.as_str()).unwrap_or("");
        if let Ok(ItemTarget::Each(each)) = text.parse::<ItemTarget>() {
            if which == Which::Any {
                let reason = format!(
                    "{each} with the any selector is ambiguous (which host's groups?); submit it \
                     with each-host or host=NAME"
                );
                self.end_unrun(&m, &item, delivered, v1::ItemState::Rejected, reason)
                    .await;
            } else {
                self.handle_each(m, item, each, delivered, last_try).await;
            }
            return;
        }
        if which == Which::Any {
            if let Some(why) = self.unplaceable(&item) {
                // Give up only when no other member's record shows a live CPU in the group
                // (after max_deliver tries), or at JetStream's bound; else hand it back.
                let nobody =
                    delivered >= self.cfg.max_deliver && !self.another_can_place(&item).await;
                if last_try || nobody {
                    bump(&self.stats.gave_up);
                    let reason = format!(
                        "no fleet member could place it after {delivered} deliveries (fleet.max_deliver = {}); last refusal by {}: {why}",
                        self.cfg.max_deliver, self.host
                    );
                    self.end_unrun(&m, &item, delivered, v1::ItemState::Failed, reason)
                        .await;
                } else {
                    self.nak(&m, false).await;
                }
                return;
            }
        }
        let limits = self.ctx.limits.load();
        let spec = item
            .item
            .clone()
            .ok_or_else(|| "the fleet item has no work item".to_string())
            .and_then(|wi| convert::item_spec(0, wi, &limits).map_err(|e| e.to_string()));
        let spec = match spec {
            Ok(s) => s,
            Err(e) => {
                self.end_unrun(&m, &item, delivered, v1::ItemState::Rejected, e)
                    .await;
                return;
            }
        };
        let wq = if item.workqueue.is_empty() {
            "default"
        } else {
            item.workqueue.as_str()
        };
        match self.ctx.engine.submit_and_flush(wq, vec![spec], false) {
            Ok((_, flush)) => {
                self.inflight.lock().insert(item.id.clone());
                self.track(tokio::spawn(self.clone().finish(m, item, flush, delivered)));
            }
            Err(e) if passing(&e) && !last_try => self.nak(&m, true).await,
            Err(e) => {
                let e = e.to_string();
                let e = e.strip_prefix("item 0: ").unwrap_or(&e).to_string();
                self.end_unrun(&m, &item, delivered, v1::ItemState::Rejected, e)
                    .await;
            }
        }
    }

    /// A fan-out item (`each:LEVEL`, `each:NAME`): expanded against this host's groups now,
    /// as `Submit` expands one (same groups, same order, keys suffixed `/GROUP`), minus the
    /// groups whose result a previous delivery already published; the rest go to the engine
    /// as one batch, and [`Shared::finish_each`] publishes one result per group, then acks.
    async fn handle_each(
        self: &Arc<Self>,
        m: jetstream::Message,
        item: FleetItem,
        each: Each,
        delivered: i64,
        last_try: bool,
    ) {
        let snap = self.ctx.view.current();
        let targets = match snap.groups.each(&each) {
            Ok(t) if !t.is_empty() => t,
            Ok(_) => {
                let reason = format!("{each} names no group on {}", self.host);
                self.end_unrun(&m, &item, delivered, v1::ItemState::Rejected, reason)
                    .await;
                return;
            }
            Err(e) => {
                let msg = e.to_string();
                let text = each.to_string();
                let msg = if msg.starts_with(&text) {
                    msg
                } else {
                    format!("{text}: {msg}")
                };
                let reason = format!("{msg} (on {})", self.host);
                self.end_unrun(&m, &item, delivered, v1::ItemState::Rejected, reason)
                    .await;
                return;
            }
        };
        let limits = self.ctx.limits.load();
        let Some(wi) = item.item.clone() else {
            let reason = "the fleet item has no work item".to_string();
            self.end_unrun(&m, &item, delivered, v1::ItemState::Rejected, reason)
                .await;
            return;
        };
        if targets.len() > limits.max_batch_items {
            let reason = format!(
                "{each} names {} groups on {}, over the limit limits.max_batch_items = {}",
                targets.len(),
                self.host,
                limits.max_batch_items
            );
            self.end_unrun(&m, &item, delivered, v1::ItemState::Rejected, reason)
                .await;
            return;
        }
        let expanded = u32::try_from(targets.len()).unwrap_or(u32::MAX);
        let mut todo: Vec<(String, String)> = Vec::with_capacity(targets.len());
        let mut specs = Vec::with_capacity(targets.len());
        for t in &targets {
            let group = t.to_string();
            let id = wqd_proto::fleet::group_id(&item.id, &group);
            if delivered > 1 && self.result_exists(&id).await {
                // Published by an earlier delivery: not run again.
                bump(&self.stats.dup_member);
                if let Some(x) = &self.metrics {
                    x.dup_member.increment(1);
                }
                continue;
            }
            let mut w = wi.clone();
            w.target.clone_from(&group);
            if !w.key.is_empty() {
                w.key = format!("{}/{group}", w.key);
            }
            match convert::item_spec(0, w, &limits) {
                Ok(s) => specs.push(s),
                Err(e) => {
                    let reason = format!("{each} → {group}: {e}");
                    self.end_unrun(&m, &item, delivered, v1::ItemState::Rejected, reason)
                        .await;
                    return;
                }
            }
            todo.push((group, id));
        }
        if todo.is_empty() {
            self.ack(&m).await;
            return;
        }
        let wq = if item.workqueue.is_empty() {
            "default"
        } else {
            item.workqueue.as_str()
        };
        match self.ctx.engine.submit_and_flush(wq, specs, false) {
            Ok((receipt, flush)) => {
                let mut groups: HashMap<u64, Vec<(String, String)>> = HashMap::new();
                for (s, g) in receipt.items.iter().zip(todo) {
                    groups.entry(s.id).or_default().push(g);
                }
                self.inflight.lock().insert(item.id.clone());
                self.track(tokio::spawn(
                    self.clone()
                        .finish_each(m, item, flush, groups, expanded, delivered),
                ));
            }
            Err(e) if passing(&e) && !last_try => self.nak(&m, true).await,
            Err(e) => {
                let reason = format!("{each} on {}: {e}", self.host);
                self.end_unrun(&m, &item, delivered, v1::ItemState::Rejected, reason)
                    .await;
            }
        }
    }

    /// Waits for every group of a fan-out item (sending progress acks meanwhile), publishing
    /// each group's result as it ends; acks once all are published. If the engine stops or
    /// cancels a group for the daemon's shutdown, the item is handed back (nak): the groups
    /// already published are skipped on its next delivery.
    async fn finish_each(
        self: Arc<Self>,
        m: jetstream::Message,
        item: FleetItem,
        mut flush: wqd_core::engine::Flush,
        mut groups: HashMap<u64, Vec<(String, String)>>,
        expanded: u32,
        delivered: i64,
    ) {
        let mut progress =
            tokio::time::interval((self.cfg.ack_wait / 3).max(Duration::from_millis(300)));
        progress.tick().await;
        let mut hand_back = false;
        let mut unpublished = false;
        while !groups.is_empty() {
            let ev = tokio::select! {
                ev = flush.next() => ev,
                _ = progress.tick() => {
                    let _ = m.ack_with(AckKind::Progress).await;
                    continue;
                }
            };
            let (eid, result) = match ev {
                Some(FlushEvent::Done(r)) => (r.id, convert::result_out(&r)),
                Some(FlushEvent::Ended(id, state)) => (
                    id,
                    v1::ItemResult {
                        item_id: id,
                        state: convert::state_out(state).into(),
                        ..Default::default()
                    },
                ),
                Some(FlushEvent::Gone(id)) => (
                    id,
                    v1::ItemResult {
                        item_id: id,
                        state: v1::ItemState::Failed.into(),
                        error: "the item's result expired from the engine before it was \
                                published"
                            .into(),
                        ..Default::default()
                    },
                ),
                None => {
                    hand_back = true;
                    break;
                }
            };
            let Some(these) = groups.remove(&eid) else {
                continue;
            };
            if *self.stopping.borrow() && result.state() == v1::ItemState::Cancelled {
                hand_back = true;
                continue;
            }
            for (group, id) in these {
                let mut r = result.clone();
                if r.target.is_empty() {
                    r.target.clone_from(&group);
                }
                let fan = Some((id.as_str(), expanded));
                if !self.publish_as(&item, fan, r, delivered).await {
                    unpublished = true;
                }
            }
        }
        if hand_back {
            self.nak(&m, false).await;
        } else if !unpublished {
            self.ack(&m).await;
        }
        self.inflight.lock().remove(&item.id);
    }

    /// Why an `any` item cannot be placed here (its group has no live CPU, or names nothing
    /// here); `None` when it can, or when its target does not parse (the engine says why).
    fn unplaceable(&self, item: &FleetItem) -> Option<String> {
        let text = item.item.as_ref().map(|w| w.target.as_str()).unwrap_or("");
        let Ok(ItemTarget::One(t)) = text.parse::<ItemTarget>() else {
            return None;
        };
        let snap = self.ctx.view.current();
        match snap.groups.members(&t) {
            Ok(m) if m.intersects(&snap.live) => None,
            Ok(_) => Some(format!("{t} has no live CPU on {}", self.host)),
            Err(e) => Some(format!("{t} names nothing on {}: {e}", self.host)),
        }
    }

    /// Whether another member's host record (read now; the last read if the bucket cannot be
    /// read) says it has a live CPU in the item's group. Groups a record cannot show (named
    /// groups, partitions, `core:N`) count as yes: only the member itself can tell.
    async fn another_can_place(&self, item: &FleetItem) -> bool {
        use wqd_core::target::Target;
        let text = item.item.as_ref().map(|w| w.target.as_str()).unwrap_or("");
        let Ok(ItemTarget::One(t)) = text.parse::<ItemTarget>() else {
            return false;
        };
        let canonical = t.to_string();
        let fresh = match self.kv.get() {
            Some(kv) => read_records(kv).await,
            None => None,
        };
        let records = self.merge_records(fresh);
        records.iter().filter(|r| r.name != self.host).any(|r| {
            let live = || wqd_core::cpuset::CpuSet::parse_list(&r.live).unwrap_or_default();
            match &t {
                Target::Cpu(n) => live().contains(*n),
                Target::Cpus(set) => live().intersects(set),
                Target::Core(_) | Target::Named(_) | Target::Partition { .. } => true,
                _ => r.groups.contains(&canonical),
            }
        })
    }

    /// Folds a fresh read of the host records into the copy kept, and returns it. A read can
    /// miss a key (listing races with puts), so a member absent from it is kept until its
    /// record is older than `host_ttl`, as the bucket itself would keep it.
    fn merge_records(&self, fresh: Option<Vec<HostRecord>>) -> Vec<HostRecord> {
        let mut kept = self.others.lock();
        for r in fresh.unwrap_or_default() {
            match kept.iter_mut().find(|k| k.name == r.name) {
                Some(k) => *k = r,
                None => kept.push(r),
            }
        }
        let now = SystemTime::now();
        let ttl = self.cfg.host_ttl;
        kept.retain(|r| {
            r.updated_at.as_ref().is_some_and(|t| {
                let at = SystemTime::UNIX_EPOCH
                    + Duration::new(
                        u64::try_from(t.seconds).unwrap_or(0),
                        u32::try_from(t.nanos).unwrap_or(0),
                    );
                now.duration_since(at).map_or(true, |age| age <= ttl)
            })
        });
        kept.clone()
    }

    /// Waits for the item's end (sending progress acks meanwhile), publishes its result, then
    /// acks it.
    async fn finish(
        self: Arc<Self>,
        m: jetstream::Message,
        item: FleetItem,
        mut flush: wqd_core::engine::Flush,
        delivered: i64,
    ) {
        let mut progress =
            tokio::time::interval((self.cfg.ack_wait / 3).max(Duration::from_millis(300)));
        progress.tick().await;
        let ev = loop {
            tokio::select! {
                ev = flush.next() => break ev,
                _ = progress.tick() => { let _ = m.ack_with(AckKind::Progress).await; }
            }
        };
        let result = match ev {
            Some(FlushEvent::Done(r)) => convert::result_out(&r),
            Some(FlushEvent::Ended(id, state)) => v1::ItemResult {
                item_id: id,
                state: convert::state_out(state).into(),
                ..Default::default()
            },
            Some(FlushEvent::Gone(id)) => v1::ItemResult {
                item_id: id,
                state: v1::ItemState::Failed.into(),
                error: "the item's result expired from the engine before it was published".into(),
                ..Default::default()
            },
            None => {
                // The engine stopped before the item ended: someone else runs it.
                self.nak(&m, false).await;
                self.inflight.lock().remove(&item.id);
                return;
            }
        };
        if *self.stopping.borrow() && result.state() == v1::ItemState::Cancelled {
            // Cancelled by this daemon's shutdown, not by the submitter: hand it back.
            self.nak(&m, false).await;
            self.inflight.lock().remove(&item.id);
            return;
        }
        if self.publish(&item, result, delivered).await {
            self.ack(&m).await;
        }
        self.inflight.lock().remove(&item.id);
    }

    /// Publishes a result for an item no engine ran (refused, or past `max_deliver`), then
    /// acks it.
    async fn end_unrun(
        &self,
        m: &jetstream::Message,
        item: &FleetItem,
        delivered: i64,
        state: v1::ItemState,
        reason: String,
    ) {
        let r = unrun_result(item, state, reason);
        if self.publish(item, r, delivered).await {
            self.ack(m).await;
        }
    }

    /// Publishes the result of `item` with its id as `Nats-Msg-Id`, retrying until JetStream
    /// acks it; false if the member stopped first (the item is then left unacked).
    async fn publish(&self, item: &FleetItem, result: v1::ItemResult, delivered: i64) -> bool {
        self.publish_as(item, None, result, delivered).await
    }

    /// As [`Shared::publish`]; `fan`: for one group of a fan-out item, the group's result id
    /// and the item's expansion count (the result is published under that id).
    async fn publish_as(
        &self,
        item: &FleetItem,
        fan: Option<(&str, u32)>,
        result: v1::ItemResult,
        delivered: i64,
    ) -> bool {
        let id = fan.map_or(item.id.as_str(), |f| f.0);
        let fr = FleetResult {
            batch: item.batch.clone(),
            id: id.to_string(),
            item: fan.map(|_| item.id.clone()).unwrap_or_default(),
            expanded: fan.map_or(0, |f| f.1),
            selector: item.selector.clone(),
            host: self.host.clone(),
            result: Some(result),
            deliveries: u64::try_from(delivered).unwrap_or(1),
            published_at: Some(convert::timestamp_out(SystemTime::now())),
            submitted_at: item.submitted_at,
        };
        let payload = Bytes::from(fr.encode_to_vec());
        let subject = self.names.result_subject(id);
        let t0 = Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", id);
            let r = async {
                self.js
                    .publish_with_headers(subject.clone(), h, payload.clone())
                    .await?
                    .await
            }
            .await;
            match r {
                Ok(ack) => {
                    bump(&self.stats.published);
                    if ack.duplicate {
                        bump(&self.stats.dup_publish);
                    }
                    if let Some(x) = &self.metrics {
                        x.results.increment(1);
                        x.publish.record(t0.elapsed().as_secs_f64());
                        if ack.duplicate {
                            x.dup_publish.increment(1);
                        }
                    }
                    return true;
                }
                Err(e) => {
                    // While stopping, give up after the grace: the item stays unacked and is
                    // redelivered.
                    if *self.stopping.borrow() && t0.elapsed() > STOP_GRACE {
                        return false;
                    }
                    tracing::debug!(id = %id, error = %e, "fleet: publishing a result failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Whether the results stream already holds a result for `id` (any error: no, so the
    /// item runs: at-least-once).
    async fn result_exists(&self, id: &str) -> bool {
        let Ok(s) = self.js.get_stream_no_info(&self.names.results_stream).await else {
            return false;
        };
        s.get_last_raw_message_by_subject(&self.names.result_subject(id))
            .await
            .is_ok()
    }

    async fn ack(&self, m: &jetstream::Message) {
        match m.ack().await {
            Ok(()) => {
                bump(&self.stats.acked);
                if let Some(x) = &self.metrics {
                    x.acks.increment(1);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "fleet: ack failed; the item will be redelivered and de-duplicated")
            }
        }
    }

    /// Hands an item back after `fleet.nak_delay`; `busy`: because the engine refused it.
    async fn nak(&self, m: &jetstream::Message, busy: bool) {
        bump(&self.stats.naked);
        if let Some(x) = &self.metrics {
            if busy {
                x.naks_busy.increment(1);
            } else {
                x.naks.increment(1);
            }
        }
        let _ = m.ack_with(AckKind::Nak(Some(self.cfg.nak_delay))).await;
    }

    /// Puts the host record every `host_ttl / 3`, and reads the consumers' lag.
    async fn refresh(self: Arc<Self>, kv: kv::Store) {
        let mut every = tokio::time::interval(self.cfg.host_ttl / 3);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stopping = self.stopping.clone();
        loop {
            tokio::select! {
                _ = stopped(stopping.clone()) => return,
                _ = every.tick() => {}
            }
            let rec = self.record();
            if let Err(e) = kv.put(&self.host, Bytes::from(rec.encode_to_vec())).await {
                tracing::debug!(error = %e, "fleet: refreshing the host record failed");
            }
            let _ = self.merge_records(read_records(&kv).await);
            if let Some(x) = &self.metrics {
                let up = self.client.connection_state() == async_nats::connection::State::Connected;
                x.connected.set(if up { 1.0 } else { 0.0 });
                if let Ok(mut s) = self.js.get_stream_no_info(&self.names.work_stream).await {
                    for (which, p, a) in [
                        (Which::Host, &x.pending_host, &x.ack_pending_host),
                        (Which::Any, &x.pending_any, &x.ack_pending_any),
                    ] {
                        let name = self.consumer_config(which).durable_name.unwrap_or_default();
                        if let Ok(info) = s.consumer_info(&name).await {
                            p.set(info.num_pending as f64);
                            a.set(info.num_ack_pending as f64);
                        }
                    }
                    let _ = &mut s;
                }
            }
        }
    }

    /// This host's record now.
    fn record(&self) -> HostRecord {
        let snap = self.ctx.view.current();
        let groups = snap
            .groups
            .listing()
            .into_iter()
            .filter(|g| !matches!(g.level, Level::Cpu | Level::Core))
            .filter(|g| g.members.intersects(&snap.live))
            .map(|g| g.target.to_string())
            .collect();
        let load = match &self.ctx.load {
            Some(l) if !snap.live.is_empty() => {
                snap.live.iter().map(|c| l.busy(c)).sum::<f64>() / snap.live.len() as f64
            }
            _ => 0.0,
        };
        let (mut pending, mut running) = (0u64, 0u64);
        for w in self.ctx.engine.workqueues() {
            pending += (w.pending + w.delayed) as u64;
            running += w.running as u64;
        }
        HostRecord {
            name: self.host.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            cpus: u32::try_from(snap.topology.cpus.len()).unwrap_or(u32::MAX),
            live_cpus: u32::try_from(snap.live.len()).unwrap_or(u32::MAX),
            live: snap.live.to_string(),
            groups,
            load,
            pending,
            running,
            epoch: snap.epoch,
            updated_at: Some(convert::timestamp_out(SystemTime::now())),
        }
    }

    /// Listens for JetStream's max-deliveries advisories of this member's consumers: an item
    /// delivered `max_deliver` times and never acked (its last member died, or never took it)
    /// ends `failed` with the reason, and leaves the work stream.
    async fn advisories(self: Arc<Self>) {
        let stopping = self.stopping.clone();
        let subject = self.names.max_deliveries_advisory("*").to_string();
        let Some(mut sub) = retry("subscribing to advisories", &stopping, || {
            self.client.subscribe(subject.clone())
        })
        .await
        else {
            return;
        };
        let mine = [
            self.names.host_consumer(&self.host),
            ANY_CONSUMER.to_string(),
        ];
        loop {
            let msg = tokio::select! {
                _ = stopped(stopping.clone()) => return,
                m = sub.next() => match m { Some(m) => m, None => return },
            };
            let Ok(adv) = serde_json::from_slice::<serde_json::Value>(&msg.payload) else {
                continue;
            };
            let consumer = adv["consumer"].as_str().unwrap_or("");
            if !mine.iter().any(|c| c == consumer) {
                continue;
            }
            let (Some(seq), deliveries) = (adv["stream_seq"].as_u64(), adv["deliveries"].as_u64())
            else {
                continue;
            };
            self.give_up(seq, deliveries.unwrap_or(0)).await;
        }
    }

    /// Ends the work stream's message `seq` `failed` (unless a result exists) and deletes it.
    async fn give_up(&self, seq: u64, deliveries: u64) {
        let Ok(s) = self.js.get_stream_no_info(&self.names.work_stream).await else {
            return;
        };
        let Ok(raw) = s.get_raw_message(seq).await else {
            return; // Another member handled it.
        };
        let Ok(item) = FleetItem::decode(raw.payload.clone()) else {
            let _ = s.delete_message(seq).await;
            return;
        };
        if !self.result_exists(&item.id).await {
            bump(&self.stats.gave_up);
            let reason = format!(
                "delivered {deliveries} times (fleet.max_deliver = {}) and never acked: every member that took it died or timed out (ack_wait {:?})",
                self.cfg.max_deliver, self.cfg.ack_wait
            );
            let r = unrun_result(&item, v1::ItemState::Failed, reason);
            if !self
                .publish(&item, r, i64::try_from(deliveries).unwrap_or(i64::MAX))
                .await
            {
                return;
            }
        }
        let _ = s.delete_message(seq).await;
    }
}

/// Every host record in the bucket; `None` if they cannot be read now.
/// Engine refusals that pass (stopping, full, draining): the item is handed back for another
/// try rather than ended.
fn passing(e: &EngineError) -> bool {
    matches!(
        e,
        EngineError::ShuttingDown | EngineError::QueueFull { .. } | EngineError::Draining(_)
    )
}

async fn read_records(kv: &kv::Store) -> Option<Vec<HostRecord>> {
    let mut keys = kv.keys().await.ok()?;
    let mut names = Vec::new();
    while let Some(k) = keys.next().await {
        names.push(k.ok()?);
    }
    let mut out = Vec::with_capacity(names.len());
    for k in names {
        if let Ok(Some(v)) = kv.get(&k).await {
            if let Ok(r) = HostRecord::decode(v) {
                out.push(r);
            }
        }
    }
    Some(out)
}

/// The result of an item no engine ran.
fn unrun_result(item: &FleetItem, state: v1::ItemState, reason: String) -> v1::ItemResult {
    let target = item
        .item
        .as_ref()
        .map(|w| w.target.clone())
        .unwrap_or_default();
    tracing::info!(id = %item.id, state = state.as_str_name(), reason = %reason, "fleet: item ended without running");
    v1::ItemResult {
        state: state.into(),
        error: reason,
        target,
        workqueue: item.workqueue.clone(),
        finished_at: Some(convert::timestamp_out(SystemTime::now())),
        ..Default::default()
    }
}
