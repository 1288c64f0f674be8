//! The fleet client: submit work to a fleet of wqd daemons over NATS JetStream and wait for
//! it, without talking to any daemon directly (feature `fleet`).
//!
//! Owns [`Fleet`] (one NATS connection), the host selector ([`Selector`]), the batch receipt
//! ([`FleetBatch`]) and the flush report ([`FleetReport`]), and [`FleetError`], this module's
//! one error enum. Invariants: a batch's manifest is stored before any of its items is
//! published, so a flush by batch id alone knows every id to wait for; every item is published
//! with its id as `Nats-Msg-Id`, so a retried publish is stored once; a flush counts each id
//! once, whatever number of results JetStream holds for it (at-least-once delivery
//! de-duplicated by id), and reports the ones seen again as duplicates; a fan-out item
//! (`each:` target, expanded by its member) ends when it has as many distinct group results
//! as its member says it expanded to, or one result under its own id.
//!
//! ```no_run
//! # async fn demo() -> Result<(), wqd_client::fleet::FleetError> {
//! use std::time::Duration;
//! use wqd_client::fleet::{Fleet, FleetOptions, Selector};
//! use wqd_client::Item;
//! let fleet = Fleet::connect(FleetOptions::new("nats://127.0.0.1:4222")).await?;
//! let batch = fleet
//!     .submit("default", (0..8).map(|_| (Selector::Any, Item::new("node:1", "noop"))))
//!     .await?;
//! let report = fleet.flush(&batch.batch, Duration::from_secs(60)).await?;
//! assert!(report.complete());
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt as _;
use prost::Message as _;

use crate::item::Item;
use wqd_proto::fleet::{self as wire, FleetItem, ANY, EACH_HOST, HOST_PREFIX};
pub use wqd_proto::fleet::{BatchManifest, FleetResult, HostRecord, Names};
use wqd_proto::v1;

/// Items whose publish acks are awaited together.
const PUBLISH_WINDOW: usize = 4096;

/// Errors of the fleet client.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("connecting to NATS: {0}")]
    Connect(String),
    #[error("reading {what} {}: {source}", .path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad host selector {0:?}: expected host=NAME, any or each-host")]
    Selector(String),
    #[error("each-host item, but no member has a host record (is any wqd with [fleet] running?)")]
    NoHosts,
    #[error(
        "items[{index}]: target {target:?} fans out to one item per group of a host, and any host \
         is ambiguous; submit it with each-host (every member's groups) or host=NAME"
    )]
    EachAny { index: usize, target: String },
    #[error(
        "no manifest for fleet batch {0:?} (unknown batch, or older than the results stream keeps)"
    )]
    UnknownBatch(String),
    #[error("JetStream: {0}")]
    JetStream(String),
    #[error("undecodable {what}: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: prost::DecodeError,
    },
}

fn js_err(e: impl fmt::Display) -> FleetError {
    FleetError::JetStream(e.to_string())
}

/// Where a fleet item goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// One named member (`host=web-12`).
    Host(String),
    /// The first member with a live CPU in the item's group (`any`).
    Any,
    /// One copy to every member with a host record at submit time (`each-host`).
    EachHost,
}

impl FromStr for Selector {
    type Err = FleetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            ANY => Ok(Selector::Any),
            EACH_HOST => Ok(Selector::EachHost),
            _ => match s.strip_prefix(HOST_PREFIX) {
                Some(h) if wire::is_token(h) => Ok(Selector::Host(h.to_string())),
                _ => Err(FleetError::Selector(s.to_string())),
            },
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Host(h) => write!(f, "{HOST_PREFIX}{h}"),
            Selector::Any => f.write_str(ANY),
            Selector::EachHost => f.write_str(EACH_HOST),
        }
    }
}

/// How to reach the fleet: the same servers, names and credentials the members use.
#[derive(Debug, Clone, Default)]
pub struct FleetOptions {
    pub servers: Vec<String>,
    pub names: Names,
    pub credentials_file: Option<PathBuf>,
    pub user_password: Option<(String, String)>,
    pub token: Option<String>,
    pub tls_ca: Option<PathBuf>,
    pub tls_identity: Option<(PathBuf, PathBuf)>,
    /// Bound on each JetStream request (default 10 s).
    pub request_timeout: Option<Duration>,
}

impl FleetOptions {
    /// One server (comma-separated URLs name several), default names, no credentials.
    pub fn new(servers: &str) -> Self {
        FleetOptions {
            servers: servers.split(',').map(|s| s.trim().to_string()).collect(),
            ..Default::default()
        }
    }
}

/// A connection to a fleet.
#[derive(Debug, Clone)]
pub struct Fleet {
    client: async_nats::Client,
    js: jetstream::Context,
    names: Names,
}

/// A submitted fleet batch.
#[derive(Debug, Clone)]
pub struct FleetBatch {
    pub batch: String,
    /// Every item id, in submission order (each-host items once per host).
    pub ids: Vec<String>,
    /// The members each-host items were copied to.
    pub each_hosts: Vec<String>,
}

/// One member's share of a flushed batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostTally {
    pub items: u64,
    /// Items by terminal state name (`ok`, `failed`, ...).
    pub states: BTreeMap<String, u64>,
    /// Items that ran in an enclosing group (their own had no live CPU).
    pub fallbacks: u64,
    /// Deliveries beyond the first, summed over the host's items.
    pub redeliveries: u64,
}

/// What a fleet flush saw.
#[derive(Debug, Clone, Default)]
pub struct FleetReport {
    pub batch: String,
    /// Fleet items waited for (each-host copies counted once per host).
    pub expected: usize,
    /// Fleet items with all their results.
    pub ended: usize,
    /// One result per result id (the first one read). An item with an `each:` target has
    /// one result per group its member expanded it to (id `<item id>/<group>`, with
    /// [`FleetResult::item`] and [`FleetResult::expanded`] set), others one under their id.
    pub results: BTreeMap<String, FleetResult>,
    /// Fan-out items: item id → the number of groups (results) it expanded to.
    pub expanded: BTreeMap<String, u32>,
    /// Results read for an id already seen (de-duplicated away).
    pub duplicates: u64,
    /// Ids without a result when the flush ended.
    pub missing: Vec<String>,
    pub per_host: BTreeMap<String, HostTally>,
    /// Submit→result latency of each result, from the item's and the result's timestamps.
    pub latencies: Vec<Duration>,
    pub waited: Duration,
}

impl FleetReport {
    /// Whether every expected item has all its results.
    pub fn complete(&self) -> bool {
        self.missing.is_empty() && self.ended == self.expected
    }
    /// Whether every result is `ok`.
    pub fn all_ok(&self) -> bool {
        self.results.values().all(|r| {
            r.result
                .as_ref()
                .is_some_and(|x| x.state() == v1::ItemState::Ok)
        })
    }
}

/// The state name of a result (`ok`, `failed`, ...).
pub fn state_name(r: &FleetResult) -> String {
    let s = r.result.as_ref().map(|x| x.state()).unwrap_or_default();
    s.as_str_name()
        .strip_prefix("ITEM_STATE_")
        .unwrap_or("UNSPECIFIED")
        .to_ascii_lowercase()
}

fn ts(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn ts_nanos(t: &prost_types::Timestamp) -> i128 {
    i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos)
}

/// Whether a target text is a fan-out (`each:LEVEL`, `each:NAME`), which a member expands.
fn is_fan_out(target: &str) -> bool {
    target.trim_start().starts_with("each:")
}

/// A fresh batch id: time, process and a counter, as one subject token.
fn new_batch_id() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!(
        "b{:x}-{:x}-{}",
        t,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

impl Fleet {
    /// Connects (fails if no server answers).
    ///
    /// # Errors
    /// [`FleetError::File`] for credentials that cannot be read, [`FleetError::Connect`].
    pub async fn connect(o: FleetOptions) -> Result<Fleet, FleetError> {
        let mut opts = async_nats::ConnectOptions::new()
            .name("wqd-client fleet")
            .request_timeout(Some(o.request_timeout.unwrap_or(Duration::from_secs(10))));
        if let Some(p) = &o.credentials_file {
            opts = opts
                .credentials_file(p)
                .await
                .map_err(|source| FleetError::File {
                    what: "credentials file",
                    path: p.clone(),
                    source,
                })?;
        }
        if let Some((u, p)) = &o.user_password {
            opts = opts.user_and_password(u.clone(), p.clone());
        }
        if let Some(t) = &o.token {
            opts = opts.token(t.clone());
        }
        if let Some(ca) = &o.tls_ca {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some((c, k)) = &o.tls_identity {
            opts = opts.add_client_certificate(c.clone(), k.clone());
        }
        let client = opts
            .connect(o.servers.as_slice())
            .await
            .map_err(|e| FleetError::Connect(e.to_string()))?;
        Ok(Fleet {
            js: jetstream::new(client.clone()),
            client,
            names: o.names,
        })
    }

    /// The NATS client (for tests and tools that need more).
    pub fn nats(&self) -> &async_nats::Client {
        &self.client
    }

    /// The members' host records, by name (members whose record expired are absent).
    ///
    /// # Errors
    /// [`FleetError::JetStream`] (no bucket: no member ever joined), [`FleetError::Decode`].
    pub async fn hosts(&self) -> Result<Vec<HostRecord>, FleetError> {
        let kv = self
            .js
            .get_key_value(&self.names.hosts_bucket)
            .await
            .map_err(js_err)?;
        let mut keys: Vec<String> = Vec::new();
        let mut ks = kv.keys().await.map_err(js_err)?;
        while let Some(k) = ks.next().await {
            keys.push(k.map_err(js_err)?);
        }
        keys.sort();
        let mut out = Vec::new();
        for k in keys {
            if let Some(v) = kv.get(&k).await.map_err(js_err)? {
                out.push(HostRecord::decode(v).map_err(|source| FleetError::Decode {
                    what: "host record",
                    source,
                })?);
            }
        }
        Ok(out)
    }

    /// Publishes a batch: its manifest, then every item (each-host items once per member with
    /// a host record now), each publish acked by JetStream before this returns. Items go to
    /// `workqueue` on the member that takes them.
    ///
    /// # Errors
    /// [`FleetError::NoHosts`] for each-host items when no member is known;
    /// [`FleetError::JetStream`] when a publish is not acked (items published before it stay).
    pub async fn submit(
        &self,
        workqueue: &str,
        items: impl IntoIterator<Item = (Selector, Item)>,
    ) -> Result<FleetBatch, FleetError> {
        let items: Vec<(Selector, Item)> = items.into_iter().collect();
        if let Some((index, (_, it))) = items
            .iter()
            .enumerate()
            .find(|(_, (s, it))| *s == Selector::Any && is_fan_out(&it.as_proto().target))
        {
            return Err(FleetError::EachAny {
                index,
                target: it.as_proto().target.clone(),
            });
        }
        let batch = new_batch_id();
        let each: Vec<u32> = items
            .iter()
            .enumerate()
            .filter(|(_, (s, _))| *s == Selector::EachHost)
            .map(|(i, _)| u32::try_from(i).unwrap_or(u32::MAX))
            .collect();
        let each_hosts: Vec<String> = if each.is_empty() {
            Vec::new()
        } else {
            let h: Vec<String> = self.hosts().await?.into_iter().map(|h| h.name).collect();
            if h.is_empty() {
                return Err(FleetError::NoHosts);
            }
            h
        };
        let now = ts(SystemTime::now());
        let manifest = BatchManifest {
            batch: batch.clone(),
            count: u32::try_from(items.len()).unwrap_or(u32::MAX),
            each_index: each,
            each_hosts: each_hosts.clone(),
            submitted_at: Some(now),
        };
        self.js
            .publish(
                self.names.manifest_subject(&batch),
                Bytes::from(manifest.encode_to_vec()),
            )
            .await
            .map_err(js_err)?
            .await
            .map_err(js_err)?;
        let mut ids = Vec::with_capacity(items.len());
        let mut acks = Vec::with_capacity(PUBLISH_WINDOW.min(items.len()));
        for (index, (sel, item)) in items.into_iter().enumerate() {
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            let copies: Vec<(Option<&str>, String)> = match &sel {
                Selector::Host(h) => vec![(None, h.clone())],
                Selector::Any => vec![(None, String::new())],
                Selector::EachHost => each_hosts
                    .iter()
                    .map(|h| (Some(h.as_str()), h.clone()))
                    .collect(),
            };
            let wi = item.into_proto();
            for (each_host, host) in copies {
                let id = wire::item_id(&batch, index, each_host);
                let subject = if host.is_empty() {
                    self.names.any_subject()
                } else {
                    self.names.host_subject(&host)
                };
                let fi = FleetItem {
                    batch: batch.clone(),
                    id: id.clone(),
                    selector: sel.to_string(),
                    host,
                    workqueue: workqueue.to_string(),
                    item: Some(wi.clone()),
                    submitted_at: Some(now),
                };
                let mut h = async_nats::HeaderMap::new();
                h.insert("Nats-Msg-Id", id.as_str());
                acks.push(
                    self.js
                        .publish_with_headers(subject, h, Bytes::from(fi.encode_to_vec()))
                        .await
                        .map_err(js_err)?,
                );
                ids.push(id);
                if acks.len() >= PUBLISH_WINDOW {
                    for a in acks.drain(..) {
                        a.await.map_err(js_err)?;
                    }
                }
            }
        }
        for a in acks {
            a.await.map_err(js_err)?;
        }
        Ok(FleetBatch {
            batch,
            ids,
            each_hosts,
        })
    }

    /// The ids batch `batch` promised, from its manifest.
    ///
    /// # Errors
    /// [`FleetError::UnknownBatch`], [`FleetError::JetStream`].
    pub async fn batch_ids(&self, batch: &str) -> Result<Vec<String>, FleetError> {
        let s = self
            .js
            .get_stream_no_info(&self.names.results_stream)
            .await
            .map_err(js_err)?;
        let m = s
            .get_last_raw_message_by_subject(&self.names.manifest_subject(batch))
            .await
            .map_err(|_| FleetError::UnknownBatch(batch.to_string()))?;
        let m = BatchManifest::decode(m.payload).map_err(|source| FleetError::Decode {
            what: "batch manifest",
            source,
        })?;
        Ok(wire::manifest_ids(&m))
    }

    /// Waits until every item of `batch` has a terminal result from some member (an `each:`
    /// item: one per group it expanded to), or until `deadline` passes. Postcondition: unless
    /// [`FleetReport::missing`] is non-empty, every id of the batch has exactly one result in
    /// [`FleetReport::results`], or, for a fan-out item, exactly [`FleetReport::expanded`]
    /// results under `<id>/<group>`. The work goes on after a deadline.
    ///
    /// # Errors
    /// As [`Fleet::batch_ids`]; [`FleetError::JetStream`] when the results cannot be read.
    pub async fn flush(&self, batch: &str, deadline: Duration) -> Result<FleetReport, FleetError> {
        let ids = self.batch_ids(batch).await?;
        self.flush_ids(batch, &ids, deadline).await
    }

    /// As [`Fleet::flush`], for ids the caller knows (e.g. [`FleetBatch::ids`]).
    ///
    /// # Errors
    /// [`FleetError::JetStream`] when the results cannot be read.
    pub async fn flush_ids(
        &self,
        batch: &str,
        ids: &[String],
        deadline: Duration,
    ) -> Result<FleetReport, FleetError> {
        let t0 = Instant::now();
        let end = tokio::time::Instant::now() + deadline;
        let mut want: HashSet<&str> = ids.iter().map(String::as_str).collect();
        // Fan-out items: distinct group results read so far.
        let mut parts: HashMap<String, u32> = HashMap::new();
        let mut rep = FleetReport {
            batch: batch.to_string(),
            expected: want.len(),
            ..Default::default()
        };
        let s = self
            .js
            .get_stream_no_info(&self.names.results_stream)
            .await
            .map_err(js_err)?;
        // An ordered consumer: it re-creates itself after a reconnect or a gap.
        let c = s
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.names.batch_results(batch),
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(js_err)?;
        let mut msgs = c.messages().await.map_err(js_err)?;
        while !want.is_empty() {
            let m = match tokio::time::timeout_at(end, msgs.next()).await {
                Err(_) => break,
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    tracing::debug!(error = %e, "fleet flush: reading results; continuing");
                    continue;
                }
                Ok(Some(Ok(m))) => m,
            };
            let r =
                FleetResult::decode(m.payload.clone()).map_err(|source| FleetError::Decode {
                    what: "result",
                    source,
                })?;
            if rep.results.contains_key(&r.id) {
                rep.duplicates += 1;
                continue;
            }
            if r.expanded > 0 && !r.item.is_empty() {
                // One group of a fan-out item: the item ends with its last group.
                if !want.contains(r.item.as_str()) {
                    continue; // Not of this flush, or the item already ended.
                }
                let n = parts.entry(r.item.clone()).or_default();
                *n += 1;
                let expanded = rep.expanded.entry(r.item.clone()).or_insert(r.expanded);
                if *n >= *expanded {
                    want.remove(r.item.as_str());
                    rep.ended += 1;
                }
            } else if want.remove(r.id.as_str()) {
                rep.ended += 1;
            } else {
                continue; // Not of this flush (another batch's id cannot match the filter).
            }
            let t = rep.per_host.entry(r.host.clone()).or_default();
            t.items += 1;
            *t.states.entry(state_name(&r)).or_default() += 1;
            if let Some(x) = &r.result {
                if x.fallback_level() != v1::FallbackLevel::Unspecified {
                    t.fallbacks += 1;
                }
            }
            t.redeliveries += r.deliveries.saturating_sub(1);
            if let (Some(a), Some(b)) = (&r.submitted_at, &r.published_at) {
                let ns = (ts_nanos(b) - ts_nanos(a)).max(0);
                rep.latencies
                    .push(Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)));
            }
            rep.results.insert(r.id.clone(), r);
        }
        // Duplicates already stored when the flush ended are counted; later ones are not.
        rep.missing = ids
            .iter()
            .filter(|i| want.contains(i.as_str()))
            .cloned()
            .collect();
        rep.waited = t0.elapsed();
        Ok(rep)
    }

    /// Deletes the fleet's streams and bucket (tests and benchmarks start from nothing).
    ///
    /// # Errors
    /// [`FleetError::JetStream`] for a failure other than "not found".
    pub async fn delete_everything(&self) -> Result<(), FleetError> {
        for s in [&self.names.work_stream, &self.names.results_stream] {
            let _ = self.js.delete_stream(s).await;
        }
        let _ = self.js.delete_key_value(&self.names.hosts_bucket).await;
        Ok(())
    }

    /// The work stream's state: messages stored (unacked items) (tests).
    ///
    /// # Errors
    /// [`FleetError::JetStream`].
    pub async fn work_stream_messages(&self) -> Result<u64, FleetError> {
        let mut s = self
            .js
            .get_stream(&self.names.work_stream)
            .await
            .map_err(js_err)?;
        let info: &stream::Info = s.info().await.map_err(js_err)?;
        Ok(info.state.messages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_round_trip_and_refuse_bad_names() {
        for s in ["any", "each-host", "host=web-12"] {
            assert_eq!(s.parse::<Selector>().unwrap().to_string(), s);
        }
        for bad in ["", "host=", "host=a.b", "all", "host=*"] {
            assert!(bad.parse::<Selector>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn batch_ids_are_distinct_tokens() {
        let a = new_batch_id();
        let b = new_batch_id();
        assert_ne!(a, b);
        assert!(wire::is_token(&a), "{a}");
    }
}
