//! Conversions between `wqd.v1` messages and engine types. Pure functions.
//!
//! Invariant: every conversion from the wire checks what the engine's types cannot express
//! (negative durations, unset enums, sizes) and names the field it refused; conversions to the
//! wire never fail and lose nothing the proto can carry.
//!
//! A submitted item's `each:LEVEL` / `each:NAME` target is expanded here, by [`BatchSpecs`],
//! before the batch is checked against its limits and submitted: the engine only ever sees
//! items naming one group. [`Origins`] maps every entry of the expanded batch back to the wire
//! item it came from, for receipts and error messages (`items[2] (each:cache → cache:3)`).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use wqd_proto::out::SubmitResponseOut;
use wqd_proto::v1;

use super::limits::Limits;
use super::RpcError;
use crate::rpc::budget::{held_bytes, ITEM_OVERHEAD};
use wqd_core::cpuset::CpuSet;
use wqd_core::engine::{
    Batch, ItemResult, ItemSpec, ResultsMode, State, Unserved, WorkerLost, WorkqueueAttrs,
    WorkqueueChanges, WorkqueueStats,
};
use wqd_core::groups::{Fallback, GroupMap, Level, Placement};
use wqd_core::live::Snapshot;
use wqd_core::quote::quote;
use wqd_core::target::{Each, ItemTarget, Target, TargetError};
use wqd_core::topology::AllowedSource;

/// Longest de-duplication key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Longest target text accepted, in bytes (a cpulist of every one of 8 192 CPUs, spelled
/// out one by one, fits).
pub const MAX_TARGET_BYTES: usize = 48 << 10;
/// Longest handler name accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// One wire item naming one group to an engine item; `index` is its index in the whole batch
/// (or stream). A fan-out (`each:...`) is refused here: expanding one needs the groups, see
/// [`BatchSpecs`].
///
/// # Errors
/// [`RpcError::Item`] naming the field, or [`RpcError::OverLimit`] for the payload size.
pub fn item_spec(index: usize, it: v1::WorkItem, limits: &Limits) -> Result<ItemSpec, RpcError> {
    let target = parse_target(index, &it.target)?;
    let ItemTarget::One(target) = target else {
        return Err(RpcError::Item {
            index,
            field: "target",
            problem: TargetError::FanOut {
                found: it.target.trim().to_string(),
            }
            .to_string(),
        });
    };
    checked(index, it, target, limits)
}

/// Parses a wire target text, refusing empty and over-long ones.
fn parse_target(index: usize, text: &str) -> Result<ItemTarget, RpcError> {
    let bad = |problem: String| RpcError::Item {
        index,
        field: "target",
        problem,
    };
    if text.trim().is_empty() {
        return Err(bad("required (e.g. \"cache:0\", \"all\")".into()));
    }
    if text.len() > MAX_TARGET_BYTES {
        return Err(bad(format!(
            "{} is {} bytes, longer than {MAX_TARGET_BYTES}",
            quote(text),
            text.len()
        )));
    }
    ItemTarget::from_str(text).map_err(|e| bad(e.to_string()))
}

/// What a target text names, ready to use: one group, or the groups a fan-out expanded to.
#[derive(Debug, Clone)]
enum Named {
    One(Target),
    Each(Each, Arc<[Target]>),
}

/// The last target text parsed and what it names. A batch nearly always names one target for
/// all its items, so [`BatchSpecs::push`] parses (and expands) each run of equal texts once.
/// Only a text that parsed and expanded is kept, so a hit is exactly what a fresh parse would
/// return.
#[derive(Debug, Default)]
pub struct TargetCache {
    last: Option<(String, Named)>,
}

/// One fan-out of a batch: entries `first .. first + targets.len()` came from wire item `wire`.
#[derive(Debug, Clone)]
struct Fan {
    first: usize,
    wire: usize,
    each: Each,
    targets: Arc<[Target]>,
}

/// Where an entry of a built batch came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin<'a> {
    /// The index of the wire item (in the request, or across the stream).
    pub wire: usize,
    /// For an entry expanded from a fan-out: the fan-out and the group of this entry.
    pub fan: Option<(&'a Each, &'a Target)>,
}

/// Where the entries of a batch came from, once its [`ItemSpec`]s went to the engine: entry
/// `i` of the batch is wire item `i` unless a fan-out came before it.
#[derive(Debug, Default, Clone)]
pub struct Origins {
    fans: Vec<Fan>,
}

impl Origins {
    /// True when some item of the batch was a fan-out.
    pub fn any(&self) -> bool {
        !self.fans.is_empty()
    }

    /// Where entry `entry` of the batch came from. O(log fan-outs).
    pub fn of(&self, entry: usize) -> Origin<'_> {
        // The last fan-out starting at or before `entry`.
        let k = self.fans.partition_point(|f| f.first <= entry);
        let Some(f) = k.checked_sub(1).and_then(|k| self.fans.get(k)) else {
            return Origin {
                wire: entry,
                fan: None,
            };
        };
        match f.targets.get(entry - f.first) {
            Some(t) => Origin {
                wire: f.wire,
                fan: Some((&f.each, t)),
            },
            // After the fan-out: shift by the entries it added beyond its one wire item.
            None => Origin {
                wire: f.wire + 1 + (entry - f.first - f.targets.len()),
                fan: None,
            },
        }
    }
}

impl fmt::Display for Origin<'_> {
    /// `items[2]`, or `items[2] (each:cache → cache:3)` for an expanded entry.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "items[{}]", self.wire)?;
        if let Some((each, t)) = self.fan {
            write!(f, " ({each} → {t})")?;
        }
        Ok(())
    }
}

/// A batch being converted from wire items: its engine items, with every fan-out expanded
/// (against the groups of one snapshot, taken at the first fan-out), and where each came from.
///
/// Invariants: `specs` holds the batch in order, an `each:` item replaced by one item per
/// group in ascending group number; `limits.max_batch_items` holds for `specs.len()`; when the
/// batch has a fan-out, the memory it holds by the [`held_bytes`] estimate (every entry's
/// overhead, payload, args and key) is within `limits.max_request_memory`.
#[derive(Debug, Default)]
pub struct BatchSpecs {
    pub specs: Batch,
    targets: TargetCache,
    origins: Origins,
    wire: usize,
    /// Payload, args and key bytes of every entry so far.
    bytes: u64,
    groups: Option<Arc<GroupMap>>,
}

impl BatchSpecs {
    /// Wire items taken so far.
    pub fn wire_items(&self) -> usize {
        self.wire
    }

    /// The entries and where they came from.
    pub fn into_parts(self) -> (Batch, Origins) {
        (self.specs, self.origins)
    }

    /// Converts the next wire item (index [`BatchSpecs::wire_items`]) and appends it, or the
    /// items its fan-out expands to. `groups` is called once, at the first fan-out of the
    /// batch, for the groups to expand against.
    ///
    /// # Errors
    /// As [`item_spec`], plus [`RpcError::Item`] for a fan-out that names no group here (or
    /// whose key, suffixed, is too long) and [`RpcError::OverLimit`] when the expanded batch
    /// is over `limits.max_batch_items` or `limits.max_request_memory`. Errors name the wire
    /// item (`items[2]`).
    pub fn push(
        &mut self,
        it: v1::WorkItem,
        limits: &Limits,
        groups: impl FnOnce() -> Arc<GroupMap>,
    ) -> Result<(), RpcError> {
        self.push_copies(it, 1, limits, groups)
    }

    /// As [`BatchSpecs::push`] for `copies` consecutive identical wire items: an item that
    /// names one group is checked and converted once and goes to the engine as a run of
    /// copies; a fan-out is expanded per copy, as the items written out would be. An error
    /// names the first copy (every copy would fail the same way).
    pub fn push_copies(
        &mut self,
        mut it: v1::WorkItem,
        copies: usize,
        limits: &Limits,
        groups: impl FnOnce() -> Arc<GroupMap>,
    ) -> Result<(), RpcError> {
        if copies == 0 {
            return Ok(());
        }
        let index = self.wire;
        let named = match &self.targets.last {
            Some((text, n)) if *text == it.target => n.clone(),
            _ => {
                let n = match parse_target(index, &it.target)? {
                    ItemTarget::One(t) => Named::One(t),
                    ItemTarget::Each(e) => {
                        let g = self.groups.get_or_insert_with(groups);
                        let ts = g.each(&e).map_err(|err| {
                            let msg = err.to_string();
                            let each = e.to_string();
                            RpcError::Item {
                                index,
                                field: "target",
                                problem: if msg.starts_with(&each) {
                                    msg
                                } else {
                                    format!("{each}: {msg}")
                                },
                            }
                        })?;
                        Named::Each(e, ts.into())
                    }
                };
                self.targets.last = Some((std::mem::take(&mut it.target), n.clone()));
                n
            }
        };
        match named {
            Named::One(t) => {
                let spec = checked(index, it, t, limits)?;
                check_count(self.specs.len().saturating_add(copies), limits, || {
                    "the batch's item count".to_string()
                })?;
                self.bytes = self
                    .bytes
                    .saturating_add(spec_bytes(&spec).saturating_mul(copies as u64));
                self.specs.copies(spec, copies);
                self.wire += copies;
                if self.origins.any() {
                    self.check_memory(0, 0, limits, || format!("items[{index}]"))?;
                }
                Ok(())
            }
            Named::Each(each, targets) => {
                // Checked once for all the copies (they differ only in their index, which
                // the first copy's refusal names).
                let first_target = targets.first().cloned().unwrap_or(Target::All);
                let spec = checked(index, it, first_target, limits)?;
                for _ in 1..copies {
                    self.push_fan(spec.clone(), &each, &targets, limits)?;
                }
                self.push_fan(spec, &each, &targets, limits)
            }
        }
    }

    /// Appends one fan-out: wire item `self.wire`, already `checked` into `spec`, expanded
    /// to one entry per group of `targets`.
    fn push_fan(
        &mut self,
        spec: ItemSpec,
        each: &Each,
        targets: &Arc<[Target]>,
        limits: &Limits,
    ) -> Result<(), RpcError> {
        let index = self.wire;
        let n = targets.len();
        check_count(self.specs.len() + n, limits, || {
            format!(
                "the batch's item count with each: expanded (items[{index}] {each} \
                 names {n} groups)"
            )
        })?;
        // Only a key grows per group (by "/" and the group's name): the names are written
        // out for that alone.
        let suffix = spec.key.as_ref().map_or(0, |_| {
            1 + targets
                .iter()
                .map(|t| t.to_string().len())
                .max()
                .unwrap_or(0)
        });
        if let Some(key) = &spec.key {
            let len = key.len() + suffix;
            if len > MAX_KEY_BYTES {
                return Err(RpcError::Item {
                    index,
                    field: "key",
                    problem: format!(
                        "{} bytes with its per-group suffix (\"/{}\" and alike) is \
                         longer than {MAX_KEY_BYTES}",
                        len,
                        targets.last().map(ToString::to_string).unwrap_or_default()
                    ),
                });
            }
        }
        let per = spec_bytes(&spec) + suffix as u64;
        self.check_memory(n, per.saturating_mul(n as u64), limits, || {
            format!("items[{index}] {each} copies its payload and args to {n} items")
        })?;
        self.origins.fans.push(Fan {
            first: self.specs.len(),
            wire: self.wire,
            each: each.clone(),
            targets: targets.clone(),
        });
        for t in targets.iter() {
            let mut s = spec.clone();
            s.key = spec.key.as_ref().map(|k| format!("{k}/{t}"));
            s.target = t.clone();
            self.bytes += spec_bytes(&s);
            self.specs.push(s);
        }
        self.wire += 1;
        Ok(())
    }
}

impl BatchSpecs {
    /// With `entries` more entries holding `bytes` more bytes, checks the batch's
    /// [`held_bytes`] estimate against `limits.max_request_memory`.
    fn check_memory(
        &self,
        entries: usize,
        bytes: u64,
        limits: &Limits,
        why: impl FnOnce() -> String,
    ) -> Result<(), RpcError> {
        let entries = (self.specs.len() + entries) as u64;
        let held = held_bytes(entries, ITEM_OVERHEAD, self.bytes.saturating_add(bytes));
        if held > limits.max_request_memory as u64 {
            return Err(RpcError::OverLimit {
                what: format!(
                    "the memory the batch holds with each: expanded ({}), estimated in bytes,",
                    why()
                ),
                found: usize::try_from(held).unwrap_or(usize::MAX),
                limit: "limits.max_request_memory",
                max: limits.max_request_memory,
            });
        }
        Ok(())
    }
}

/// Payload, args and key bytes of an entry.
fn spec_bytes(s: &ItemSpec) -> u64 {
    let args: usize = s.args.iter().map(|(k, v)| k.len() + v.len()).sum();
    (s.payload.len() + args + s.key.as_ref().map_or(0, String::len)) as u64
}

/// `n` entries against `limits.max_batch_items`; `what` names the count.
fn check_count(n: usize, limits: &Limits, what: impl FnOnce() -> String) -> Result<(), RpcError> {
    if n > limits.max_batch_items {
        return Err(RpcError::OverLimit {
            what: what(),
            found: n,
            limit: "limits.max_batch_items",
            max: limits.max_batch_items,
        });
    }
    Ok(())
}

/// Checks every field of `it` but its target (already parsed to `target`).
fn checked(
    index: usize,
    it: v1::WorkItem,
    target: Target,
    limits: &Limits,
) -> Result<ItemSpec, RpcError> {
    let bad = |field, problem: String| RpcError::Item {
        index,
        field,
        problem,
    };
    if it.handler.is_empty() {
        return Err(bad("handler", "required (e.g. \"noop\")".into()));
    }
    if it.handler.len() > MAX_NAME_BYTES {
        return Err(bad(
            "handler",
            format!(
                "{} is longer than {MAX_NAME_BYTES} bytes",
                quote(&it.handler)
            ),
        ));
    }
    if it.payload.len() > limits.max_payload_bytes {
        return Err(RpcError::OverLimit {
            what: format!("items[{index}].payload size in bytes"),
            found: it.payload.len(),
            limit: "limits.max_payload_bytes",
            max: limits.max_payload_bytes,
        });
    }
    // Arguments count against the same budget as the payload: they are input bytes the
    // engine keeps with the item.
    let args_bytes: usize = it.args.iter().map(|(k, v)| k.len() + v.len()).sum();
    if args_bytes > limits.max_payload_bytes {
        return Err(RpcError::OverLimit {
            what: format!("items[{index}].args size in bytes"),
            found: args_bytes,
            limit: "limits.max_payload_bytes",
            max: limits.max_payload_bytes,
        });
    }
    if it.key.len() > MAX_KEY_BYTES {
        return Err(bad(
            "key",
            format!("{} bytes is longer than {MAX_KEY_BYTES}", it.key.len()),
        ));
    }
    let delay = duration_in(it.delay).map_err(|p| bad("delay", p))?;
    let deadline = duration_in(it.deadline).map_err(|p| bad("deadline", p))?;
    for (field, d, max, limit) in [
        ("delay", delay, limits.max_delay, "limits.max_delay"),
        (
            "deadline",
            deadline,
            limits.max_deadline,
            "limits.max_deadline",
        ),
    ] {
        if let Some(d) = d.filter(|d| *d > max) {
            return Err(bad(
                field,
                format!(
                    "{} is longer than {limit} = {}",
                    humantime::format_duration(Duration::from_secs(d.as_secs())),
                    humantime::format_duration(max)
                ),
            ));
        }
    }
    Ok(ItemSpec {
        target,
        handler: it.handler,
        args: it.args.into_iter().collect(),
        payload: it.payload,
        key: (!it.key.is_empty()).then_some(it.key),
        delay: delay.filter(|d| !d.is_zero()),
        deadline: deadline.filter(|d| !d.is_zero()),
    })
}

/// The range of `google.protobuf.Duration` seconds (about 10 000 years either way).
pub const PROTO_DURATION_MAX_SECS: i64 = 315_576_000_000;

/// A wire duration to a std one; unset is `None`.
///
/// # Errors
/// A text saying why: out of the proto's documented range, negative, or nanos out of range.
pub fn duration_in(d: Option<prost_types::Duration>) -> Result<Option<Duration>, String> {
    let Some(d) = d else { return Ok(None) };
    if !(-PROTO_DURATION_MAX_SECS..=PROTO_DURATION_MAX_SECS).contains(&d.seconds) {
        return Err(format!(
            "{}s is outside google.protobuf.Duration's range (±{PROTO_DURATION_MAX_SECS}s)",
            d.seconds
        ));
    }
    if d.seconds < 0 || d.nanos < 0 {
        return Err(format!(
            "must not be negative (got {}s {}ns)",
            d.seconds, d.nanos
        ));
    }
    if d.nanos >= 1_000_000_000 {
        return Err(format!("nanos {} must be below 1e9", d.nanos));
    }
    Ok(Some(Duration::new(d.seconds as u64, d.nanos as u32)))
}

/// A std duration to the wire (saturating).
pub fn duration_out(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

/// A wall-clock time to the wire.
pub fn timestamp_out(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

/// An engine state to the wire.
pub fn state_out(s: State) -> v1::ItemState {
    match s {
        State::Delayed => v1::ItemState::Delayed,
        State::Pending => v1::ItemState::Pending,
        State::Running => v1::ItemState::Running,
        State::Ok => v1::ItemState::Ok,
        State::Failed => v1::ItemState::Failed,
        State::Cancelled => v1::ItemState::Cancelled,
        State::Expired => v1::ItemState::Expired,
        State::Rejected => v1::ItemState::Rejected,
    }
}

/// A fallback level to the wire; `None` (no fallback) is UNSPECIFIED.
pub fn fallback_level_out(l: Option<Level>) -> v1::FallbackLevel {
    match l {
        None | Some(Level::Cpu) | Some(Level::List) => v1::FallbackLevel::Unspecified,
        Some(Level::Core) => v1::FallbackLevel::Core,
        Some(Level::Shard) => v1::FallbackLevel::Shard,
        Some(Level::Cache) => v1::FallbackLevel::Cache,
        Some(Level::Node) => v1::FallbackLevel::Node,
        Some(Level::Package) => v1::FallbackLevel::Package,
        Some(Level::All) => v1::FallbackLevel::All,
    }
}

/// A group level to the wire.
pub fn group_level_out(l: Level) -> v1::GroupLevel {
    match l {
        Level::Cpu => v1::GroupLevel::Cpu,
        Level::Core => v1::GroupLevel::Core,
        Level::Shard => v1::GroupLevel::Shard,
        Level::Cache => v1::GroupLevel::Cache,
        Level::Node => v1::GroupLevel::Node,
        Level::Package => v1::GroupLevel::Package,
        Level::All => v1::GroupLevel::All,
        Level::List => v1::GroupLevel::List,
    }
}

/// An item's result (or current state) to the wire.
pub fn result_out(r: &ItemResult) -> v1::ItemResult {
    ResultsOut::default().result(r)
}

/// Converts results to the wire, keeping the text of the last target: the items of a batch
/// usually share one target, so its canonical text is formatted once per run, then copied.
#[derive(Debug, Default)]
pub struct ResultsOut {
    last_target: Option<(Target, String)>,
}

impl ResultsOut {
    /// The canonical text of `t`, formatted once per run of equal targets.
    fn target_text(&mut self, t: &Target) -> &str {
        if !matches!(&self.last_target, Some((last, _)) if last == t) {
            self.last_target = Some((t.clone(), t.to_string()));
        }
        self.last_target
            .as_ref()
            .map_or("", |(_, text)| text.as_str())
    }

    /// An upper bound of the encoded size of [`ResultsOut::result`] of `r` (as
    /// [`result_len_bound`]), without converting it.
    pub fn len_bound(&mut self, r: &ItemResult) -> usize {
        RESULT_FIXED_MAX
            + self.target_text(&r.target).len()
            + r.workqueue.len()
            + r.output.len()
            + r.error.len()
            + r.reason.len()
            + r.handler.len()
    }

    /// [`result_out`] of `r`.
    pub fn result(&mut self, r: &ItemResult) -> v1::ItemResult {
        let target = self.target_text(&r.target).to_string();
        v1::ItemResult {
            item_id: r.id,
            batch_id: r.batch,
            workqueue: String::from(&*r.workqueue),
            state: state_out(r.state) as i32,
            output: r.output.clone(),
            error: r.error.clone(),
            target,
            cpu_started: r.cpu_started,
            cpu_finished: r.cpu_finished,
            fallback_level: fallback_level_out(r.fallback) as i32,
            fallback_reason: if r.fallback.is_some() {
                r.reason.clone()
            } else {
                String::new()
            },
            rebinds: r.rebinds,
            queued_at: Some(timestamp_out(r.queued_at)),
            started_at: r.started_at.map(timestamp_out),
            finished_at: r.finished_at.map(timestamp_out),
            topology_epoch: r.epoch_started.unwrap_or(0),
            handler: String::from(&*r.handler),
            decision_epoch: r.epoch_decided.unwrap_or(0),
            worker_id: r.worker.map_or(0, |w| w.worker),
            worker_pid: r.worker.map_or(0, |w| w.pid),
            worker_slot: r.worker.map_or(0, |w| w.slot),
            worker_lost: r.worker_lost,
        }
    }
}

/// Encoded bytes of an [`v1::ItemResult`] without its variable-length fields, at most (every
/// key, varint and length prefix at its widest, as a `repeated` entry: key + length prefix).
/// Fields 1–15 take a 1-byte key, 16–17 two; a varint takes at most 10 bytes (5 for uint32);
/// a Timestamp at most 1 + 1 + 11 + 11. Rounded up.
const RESULT_FIXED_MAX: usize = 256;
/// Encoded bytes of one `ItemLookup` in a `GetResultsResponse` beyond its result, at most (key,
/// length, id, status, the result's key and length).
pub const LOOKUP_FIXED_MAX: usize = 32;
/// An upper bound of `r.encoded_len()` as an entry of a `repeated` field, cheap to compute
/// (no varint sizing): [`RESULT_FIXED_MAX`] plus the lengths of its strings and bytes.
pub fn result_len_bound(r: &v1::ItemResult) -> usize {
    RESULT_FIXED_MAX
        + r.workqueue.len()
        + r.output.len()
        + r.error.len()
        + r.target.len()
        + r.fallback_reason.len()
        + r.handler.len()
}

/// Encoded `StateCounts` at most, with its tag and length: 8 fields of a 1-byte tag and a
/// varint of at most 10 bytes, plus 2.
const COUNTS_MAX: usize = 8 * 11 + 2;

/// An upper bound of `resp.encoded_len()`: the exact size is needed only when this exceeds
/// the message limit. The results are already encoded: their size is known.
pub fn submit_response_len_bound(resp: &SubmitResponseOut) -> usize {
    // The batch id, then the first item's id and the two counts: a key and a varint each.
    16 + 3 * 11
        + COUNTS_MAX
        + resp.items.bytes_len()
        + resp.results.bytes_len()
        + prost::encoding::message::encoded_len_repeated(8, &resp.duplicates)
}

/// Adds `n` items in state `s` to wire counts.
pub fn count_state(c: &mut v1::StateCounts, s: State, n: u64) {
    match s {
        State::Delayed => c.delayed += n,
        State::Pending => c.pending += n,
        State::Running => c.running += n,
        State::Ok => c.ok += n,
        State::Failed => c.failed += n,
        State::Cancelled => c.cancelled += n,
        State::Expired => c.expired += n,
        State::Rejected => c.rejected += n,
    }
}

/// Counts by state to the wire.
pub fn counts_out<N: Copy + Into<u64>>(m: &BTreeMap<State, N>) -> v1::StateCounts {
    let mut c = v1::StateCounts::default();
    for (s, n) in m {
        count_state(&mut c, *s, (*n).into());
    }
    c
}

/// A wire placement to the engine's; UNSPECIFIED is `None`.
///
/// # Errors
/// A text for values outside the enum.
pub fn placement_in(p: i32) -> Result<Option<Placement>, String> {
    match v1::Placement::try_from(p) {
        Ok(v1::Placement::Unspecified) => Ok(None),
        Ok(v1::Placement::First) => Ok(Some(Placement::First)),
        Ok(v1::Placement::Spread) => Ok(Some(Placement::Spread)),
        Ok(v1::Placement::LeastLoaded) => Ok(Some(Placement::LeastLoaded)),
        Ok(v1::Placement::Idle) => Ok(Some(Placement::Idle)),
        Err(_) => Err(format!("unknown placement value {p}")),
    }
}

/// A wire fallback policy to the engine's; UNSPECIFIED is `None`.
///
/// # Errors
/// A text for values outside the enum.
pub fn fallback_in(f: i32) -> Result<Option<Fallback>, String> {
    match v1::FallbackPolicy::try_from(f) {
        Ok(v1::FallbackPolicy::Unspecified) => Ok(None),
        Ok(v1::FallbackPolicy::Widen) => Ok(Some(Fallback::Widen)),
        Ok(v1::FallbackPolicy::Wait) => Ok(Some(Fallback::Wait)),
        Ok(v1::FallbackPolicy::Reject) => Ok(Some(Fallback::Reject)),
        Err(_) => Err(format!("unknown fallback policy value {f}")),
    }
}

/// A wire `on_worker_lost` to the engine's; UNSPECIFIED is `None`.
///
/// # Errors
/// A text for values outside the enum.
pub fn worker_lost_in(v: i32) -> Result<Option<WorkerLost>, String> {
    match v1::WorkerLostPolicy::try_from(v) {
        Ok(v1::WorkerLostPolicy::Unspecified) => Ok(None),
        Ok(v1::WorkerLostPolicy::Fail) => Ok(Some(WorkerLost::Fail)),
        Ok(v1::WorkerLostPolicy::Requeue) => Ok(Some(WorkerLost::Requeue)),
        Err(_) => Err(format!("unknown worker-lost policy value {v}")),
    }
}

/// A wire `unserved` policy to the engine's; UNSPECIFIED is `None`.
///
/// # Errors
/// A text for values outside the enum.
pub fn unserved_in(v: i32) -> Result<Option<Unserved>, String> {
    match v1::UnservedPolicy::try_from(v) {
        Ok(v1::UnservedPolicy::Unspecified) => Ok(None),
        Ok(v1::UnservedPolicy::Wait) => Ok(Some(Unserved::Wait)),
        Ok(v1::UnservedPolicy::Reject) => Ok(Some(Unserved::Reject)),
        Err(_) => Err(format!("unknown unserved policy value {v}")),
    }
}

/// A wire results mode to the engine's; UNSPECIFIED is `None`.
///
/// # Errors
/// A text for values outside the enum.
pub fn results_in(v: i32) -> Result<Option<ResultsMode>, String> {
    match v1::ResultsMode::try_from(v) {
        Ok(v1::ResultsMode::Unspecified) => Ok(None),
        Ok(v1::ResultsMode::Full) => Ok(Some(ResultsMode::Full)),
        Ok(v1::ResultsMode::Summary) => Ok(Some(ResultsMode::Summary)),
        Ok(v1::ResultsMode::None) => Ok(Some(ResultsMode::None)),
        Err(_) => Err(format!("unknown results mode value {v}")),
    }
}

fn results_out(r: ResultsMode) -> v1::ResultsMode {
    match r {
        ResultsMode::Full => v1::ResultsMode::Full,
        ResultsMode::Summary => v1::ResultsMode::Summary,
        ResultsMode::None => v1::ResultsMode::None,
    }
}

fn placement_out(p: Placement) -> v1::Placement {
    match p {
        Placement::First => v1::Placement::First,
        Placement::Spread => v1::Placement::Spread,
        Placement::LeastLoaded => v1::Placement::LeastLoaded,
        Placement::Idle => v1::Placement::Idle,
    }
}

fn fallback_out(f: Fallback) -> v1::FallbackPolicy {
    match f {
        Fallback::Widen => v1::FallbackPolicy::Widen,
        Fallback::Wait => v1::FallbackPolicy::Wait,
        Fallback::Reject => v1::FallbackPolicy::Reject,
    }
}

/// Create-time attributes: a zero value leaves the attribute unset, so it takes the default
/// documented in the proto (max_active 1, placement spread, fallback widen, max_queued the
/// daemon's `limits.max_queued`), which is [`WorkqueueAttrs::new`]'s.
///
/// # Errors
/// [`RpcError::Field`] for enum values outside the proto's.
pub fn attrs_in(
    a: v1::WorkqueueAttrs,
    default_max_queued: usize,
) -> Result<WorkqueueAttrs, RpcError> {
    let field = |f: &str, problem| RpcError::Field {
        field: format!("attrs.{f}"),
        problem,
    };
    let set = |v: u32| (v != 0).then_some(v);
    let changes = WorkqueueChanges {
        max_active: set(a.max_active),
        max_waiting: None,
        group_max_active: set(a.group_max_active),
        ordered: a.ordered.then_some(true),
        nice: (a.nice != 0).then_some(a.nice),
        placement: placement_in(a.placement).map_err(|p| field("placement", p))?,
        fallback: fallback_in(a.fallback).map_err(|p| field("fallback", p))?,
        max_queued: (a.max_queued != 0)
            .then(|| usize::try_from(a.max_queued).unwrap_or(usize::MAX)),
        on_worker_lost: worker_lost_in(a.on_worker_lost).map_err(|p| field("on_worker_lost", p))?,
        unserved: unserved_in(a.unserved).map_err(|p| field("unserved", p))?,
        results: results_in(a.results).map_err(|p| field("results", p))?,
    };
    Ok(WorkqueueAttrs::new(&a.name, default_max_queued).with(&changes))
}

/// `UpdateWorkqueue`'s fields: an absent one is unset; a present UNSPECIFIED enum is an error.
///
/// # Errors
/// [`RpcError::Field`] for an UNSPECIFIED enum or one outside the proto's.
pub fn changes_in(r: &v1::UpdateWorkqueueRequest) -> Result<WorkqueueChanges, RpcError> {
    fn required<T>(
        v: Option<i32>,
        f: &str,
        what: &str,
        conv: fn(i32) -> Result<Option<T>, String>,
    ) -> Result<Option<T>, RpcError> {
        let field = |problem| RpcError::Field {
            field: f.to_string(),
            problem,
        };
        v.map(|v| conv(v)?.ok_or_else(|| format!("UNSPECIFIED is not {what}")))
            .transpose()
            .map_err(field)
    }
    Ok(WorkqueueChanges {
        max_active: r.max_active,
        max_waiting: None,
        group_max_active: r.group_max_active,
        ordered: r.ordered,
        nice: r.nice,
        placement: required(r.placement, "placement", "a placement", placement_in)?,
        fallback: required(r.fallback, "fallback", "a policy", fallback_in)?,
        max_queued: r
            .max_queued
            .map(|v| usize::try_from(v).unwrap_or(usize::MAX)),
        on_worker_lost: required(
            r.on_worker_lost,
            "on_worker_lost",
            "a policy",
            worker_lost_in,
        )?,
        unserved: required(r.unserved, "unserved", "a policy", unserved_in)?,
        results: required(r.results, "results", "a results mode", results_in)?,
    })
}

/// Engine attributes to the wire.
pub fn attrs_out(a: &WorkqueueAttrs) -> v1::WorkqueueAttrs {
    v1::WorkqueueAttrs {
        name: a.name.clone(),
        max_active: a.max_active,
        group_max_active: a.group_max_active,
        ordered: a.ordered,
        nice: a.nice,
        placement: placement_out(a.placement) as i32,
        fallback: fallback_out(a.fallback) as i32,
        max_queued: a.max_queued as u64,
        on_worker_lost: match a.on_worker_lost {
            WorkerLost::Fail => v1::WorkerLostPolicy::Fail,
            WorkerLost::Requeue => v1::WorkerLostPolicy::Requeue,
        } as i32,
        unserved: match a.unserved {
            Unserved::Wait => v1::UnservedPolicy::Wait,
            Unserved::Reject => v1::UnservedPolicy::Reject,
        } as i32,
        results: results_out(a.results) as i32,
    }
}

/// A workqueue with its counters to the wire.
pub fn wq_info_out(s: &WorkqueueStats) -> v1::WorkqueueInfo {
    v1::WorkqueueInfo {
        attrs: Some(attrs_out(&s.attrs)),
        stats: Some(v1::WorkqueueStats {
            pending: s.pending as u64,
            running: s.running as u64,
            delayed: s.delayed as u64,
            totals: Some(counts_out(&s.totals)),
            draining: s.draining,
        }),
    }
}

/// Where the allowed set came from, as the wire names it.
pub fn allowed_source_out(s: AllowedSource) -> &'static str {
    match s {
        AllowedSource::CgroupV1 => "cgroup-v1:cpuset.effective_cpus",
        AllowedSource::CgroupV2 => "cgroup-v2:cpuset.cpus.effective",
        AllowedSource::Affinity => "sched_getaffinity",
        AllowedSource::AllOnline => "sysfs-root",
    }
}

/// A snapshot to the wire; `busy(cpu)` gives the host load column.
pub fn snapshot_out(s: &Snapshot, busy: &dyn Fn(u32) -> f64) -> v1::TopologySnapshot {
    let topo = &s.topology;
    let listing = s.groups.listing();
    // Per-CPU group indexes, read back from the listing (each CPU is in at most one group
    // per level).
    let mut idx: BTreeMap<u32, [u32; 5]> = BTreeMap::new();
    let mut groups = Vec::with_capacity(listing.len());
    for g in &listing {
        let slot = match g.target {
            Target::Core(n) => Some((0, n)),
            Target::Shard(n) => Some((1, n)),
            Target::Cache(n) => Some((2, n)),
            Target::Node(n) => Some((3, n)),
            Target::Package(n) => Some((4, n)),
            _ => None,
        };
        if let Some((k, n)) = slot {
            for c in g.members.iter() {
                idx.entry(c).or_insert([u32::MAX; 5])[k] = n;
            }
        }
        groups.push(v1::GroupInfo {
            level: group_level_out(g.level) as i32,
            target: g.target.to_string(),
            members: g.members.to_string(),
            live_members: g.members.intersection(&s.live).to_string(),
        });
    }
    let mut cpus_all: CpuSet = topo.possible.clone();
    for c in topo.cpus.keys() {
        cpus_all.insert(*c);
    }
    let cpus = cpus_all
        .iter()
        .map(|c| {
            let i = idx.get(&c).copied().unwrap_or([u32::MAX; 5]);
            // A CPU never seen online is its own core; other levels have no group for it.
            let or = |v: u32, d: u32| if v == u32::MAX { d } else { v };
            v1::CpuState {
                cpu: c,
                online: topo.online.contains(c),
                allowed: topo.allowed.contains(c),
                isolated: topo.isolated.contains(c),
                live: s.live.contains(c),
                core: or(i[0], c),
                shard: or(i[1], 0),
                cache: or(i[2], 0),
                node: or(i[3], 0),
                package: or(i[4], 0),
                busy: busy(c),
            }
        })
        .collect();
    v1::TopologySnapshot {
        epoch: s.epoch,
        cpus,
        groups,
        possible: topo.possible.to_string(),
        online: topo.online.to_string(),
        allowed: topo.allowed.to_string(),
        isolated: topo.isolated.to_string(),
        live: s.live.to_string(),
        allowed_source: allowed_source_out(topo.allowed_source).to_string(),
        taken_at: Some(timestamp_out(s.at)),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use prost::Message;

    use super::*;

    fn item(target: &str, handler: &str) -> v1::WorkItem {
        v1::WorkItem {
            target: target.into(),
            handler: handler.into(),
            ..Default::default()
        }
    }

    #[test]
    fn items_are_checked_field_by_field() {
        let lim = Limits {
            max_payload_bytes: 4,
            ..Limits::default()
        };
        let ok = item_spec(0, item(" cpus:3,1-2 ", "noop"), &lim).unwrap();
        assert_eq!(ok.target.to_string(), "cpus:1-3");
        assert!(ok.key.is_none() && ok.delay.is_none());
        let e = item_spec(5, item("CPU:1", "noop"), &lim).unwrap_err();
        assert!(e.to_string().starts_with("items[5].target: "), "{e}");
        let e = item_spec(1, item("all", ""), &lim).unwrap_err();
        assert!(
            e.to_string().starts_with("items[1].handler: required"),
            "{e}"
        );
        let mut big = item("all", "noop");
        big.payload = vec![0; 5];
        let e = item_spec(2, big, &lim).unwrap_err();
        assert!(
            e.to_string().contains("limits.max_payload_bytes = 4"),
            "{e}"
        );
        let mut neg = item("all", "noop");
        neg.delay = Some(prost_types::Duration {
            seconds: -1,
            nanos: 0,
        });
        let e = item_spec(3, neg, &lim).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("items[3].delay: must not be negative"),
            "{e}"
        );
    }

    /// Groups of a machine with possible CPUs 0-7 never seen online (so `each:cpu` and
    /// `each:core` name 8 groups, other levels none), a partition `rcu` of 0-7 in ranges of 4
    /// and a named group `db`.
    fn groups() -> Arc<GroupMap> {
        use wqd_core::groups::GroupsConfig;
        use wqd_core::topology::{AllowedSource, Topology};
        let all = CpuSet::range(0, 7);
        let topo = Topology {
            possible: all.clone(),
            present: all.clone(),
            online: all.clone(),
            isolated: CpuSet::new(),
            allowed: all.clone(),
            allowed_source: AllowedSource::AllOnline,
            cpus: BTreeMap::new(),
            nodes: BTreeMap::new(),
        };
        let mut cfg = GroupsConfig::default();
        cfg.partition_ranges("rcu", &all, 4).unwrap();
        cfg.named.insert("db".into(), CpuSet::range(0, 3));
        Arc::new(GroupMap::build(&topo, &cfg))
    }

    fn build(items: Vec<v1::WorkItem>, lim: &Limits) -> Result<BatchSpecs, RpcError> {
        let mut b = BatchSpecs::default();
        for it in items {
            b.push(it, lim, groups)?;
        }
        Ok(b)
    }

    /// Runs of copies build the batch the items written out build: the same entries in order,
    /// the same origins, and the same error (naming the same wire item) when one is refused.
    #[test]
    fn copies_build_the_batch_the_items_written_out_build() {
        let mut keyed = item("each:rcu", "noop");
        keyed.key = "k".into();
        let mut bad = item("cpu:0", "noop");
        bad.key = "x".repeat(MAX_KEY_BYTES + 1);
        let runs: Vec<Vec<(v1::WorkItem, usize)>> = vec![
            vec![
                (item("cpu:1", "noop"), 3),
                (keyed.clone(), 2),
                (item("all", "noop"), 1),
            ],
            vec![(item("each:cpu", "noop"), 2), (item("cpu:2", "noop"), 4)],
            vec![(item("cpu:1", "noop"), 2), (bad, 3)],
            vec![(item("cpu:1", "noop"), 5), (item("cpu:9", "noop"), 2)],
        ];
        for (k, run) in runs.into_iter().enumerate() {
            for lim in [
                Limits::default(),
                Limits {
                    max_batch_items: 7,
                    ..Limits::default()
                },
            ] {
                let mut a = BatchSpecs::default();
                let ra: Result<(), RpcError> = run
                    .iter()
                    .try_for_each(|(it, n)| a.push_copies(it.clone(), *n, &lim, groups));
                let flat: Vec<v1::WorkItem> = run
                    .iter()
                    .flat_map(|(it, n)| std::iter::repeat_n(it.clone(), *n))
                    .collect();
                let rb = build(flat, &lim);
                match (ra, rb) {
                    (Ok(()), Ok(b)) => {
                        let fa: Vec<String> = a.specs.iter().map(|s| format!("{s:?}")).collect();
                        let fb: Vec<String> = b.specs.iter().map(|s| format!("{s:?}")).collect();
                        assert_eq!(fa, fb, "run {k}");
                        let (_, oa) = a.into_parts();
                        let (_, ob) = b.into_parts();
                        for i in 0..fa.len() {
                            assert_eq!(oa.of(i), ob.of(i), "run {k} entry {i}");
                        }
                    }
                    (Err(ea), Err(eb)) => assert_eq!(ea.to_string(), eb.to_string(), "run {k}"),
                    (ra, rb) => panic!("run {k}: {ra:?} vs {:?}", rb.map(|b| b.specs.len())),
                }
            }
        }
    }

    #[test]
    fn a_cached_target_is_what_a_fresh_parse_gives() {
        let lim = Limits::default();
        let texts = [
            "cpus:3,1-2",
            "cpus:3,1-2",
            "all",
            "node:0",
            "node:0",
            "cpus:1-3",
        ];
        let b = build(texts.iter().map(|t| item(t, "noop")).collect(), &lim).unwrap();
        for (i, t) in texts.iter().enumerate() {
            let fresh = item_spec(i, item(t, "noop"), &lim).unwrap();
            assert_eq!(b.specs.iter().nth(i).unwrap().target, fresh.target, "{t}");
        }
        // A refused text is never cached: it is refused again, with its own index.
        let mut b = BatchSpecs::default();
        for i in 0..2 {
            let e = b.push(item("CPU:1", "noop"), &lim, groups).unwrap_err();
            assert!(e.to_string().starts_with("items[0].target: "), "{i}: {e}");
            let e = b.push(item("  ", "noop"), &lim, groups).unwrap_err();
            assert!(e.to_string().contains("target: required"), "{e}");
        }
        // The other checks still run on a cache hit.
        b.push(item("all", "noop"), &lim, groups).unwrap();
        let e = b.push(item("all", ""), &lim, groups).unwrap_err();
        assert!(e.to_string().starts_with("items[1].handler"), "{e}");
    }

    #[test]
    fn each_expands_in_place_in_group_order() {
        let lim = Limits::default();
        let mut fan = item("each:rcu", "spin");
        fan.key = "k".into();
        fan.payload = b"p".to_vec();
        fan.args.insert("ms".into(), "1".into());
        fan.delay = Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        });
        let b = build(
            vec![
                item("all", "noop"),
                fan.clone(),
                item("cpu:1", "noop"),
                item(" each:cpu ", "noop"),
                item("node:0", "noop"),
            ],
            &lim,
        )
        .unwrap();
        assert_eq!(b.wire_items(), 5);
        let (specs, origins) = b.into_parts();
        let specs: Vec<&ItemSpec> = specs.iter().collect();
        let targets: Vec<String> = specs.iter().map(|s| s.target.to_string()).collect();
        let mut want = vec!["all", "rcu:0", "rcu:1", "cpu:1"];
        let cpus: Vec<String> = (0..8).map(|c| format!("cpu:{c}")).collect();
        want.extend(cpus.iter().map(String::as_str));
        want.push("node:0");
        assert_eq!(targets, want);
        // Copies keep everything but the target and the key, which gets the group.
        for (s, group) in specs[1..3].iter().zip(["rcu:0", "rcu:1"]) {
            assert_eq!(s.key.as_deref(), Some(format!("k/{group}").as_str()));
            assert_eq!(
                (s.handler.as_str(), s.payload.as_slice()),
                ("spin", &b"p"[..])
            );
            assert_eq!(s.args.get("ms").map(String::as_str), Some("1"));
            assert_eq!(s.delay, Some(Duration::from_secs(1)));
        }
        assert!(specs[4].key.is_none(), "no key, no suffix");
        // Every entry maps back to the item the client sent.
        let at: Vec<String> = (0..specs.len())
            .map(|i| origins.of(i).to_string())
            .collect();
        assert_eq!(at[0], "items[0]");
        assert_eq!(at[1], "items[1] (each:rcu → rcu:0)");
        assert_eq!(at[2], "items[1] (each:rcu → rcu:1)");
        assert_eq!(at[3], "items[2]");
        assert_eq!(at[4], "items[3] (each:cpu → cpu:0)");
        assert_eq!(at[11], "items[3] (each:cpu → cpu:7)");
        assert_eq!(at[12], "items[4]");
        assert!(origins.any());
        assert!(!BatchSpecs::default().into_parts().1.any());
    }

    #[test]
    fn each_refusals_name_the_item_sent() {
        let lim = Limits::default();
        let err =
            |items: Vec<v1::WorkItem>, lim: &Limits| build(items, lim).unwrap_err().to_string();
        assert_eq!(
            err(vec![item("all", "noop"), item("each:db", "noop")], &lim),
            "items[1].target: each:db: \"db\" is a named group, not a partition; each: fans \
             out over a level (cpu, core, shard, cache, node, package) or a partition's \
             ranges; submit to db for the one group"
        );
        assert_eq!(
            err(vec![item("each:cache", "noop")], &lim),
            "items[0].target: each:cache names no group on this machine (no CPU has \
             last-level cache data)"
        );
        let e = err(vec![item("each:nope", "noop")], &lim);
        assert!(
            e.starts_with("items[0].target: each:nope: unknown group name \"nope\""),
            "{e}"
        );
        assert!(err(vec![item("each:all", "noop")], &lim)
            .starts_with("items[0].target: at byte 5: each: takes a level"));
        // One group is required where there is no batch to expand into.
        let e = item_spec(0, item("each:cpu", "noop"), &lim).unwrap_err();
        assert!(
            e.to_string().contains("fans out to one item per group"),
            "{e}"
        );
        // The count limit applies to the expanded batch.
        let small = Limits {
            max_batch_items: 9,
            ..Limits::default()
        };
        assert_eq!(
            err(
                vec![
                    item("all", "noop"),
                    item("each:cpu", "noop"),
                    item("all", "noop")
                ],
                &small
            ),
            "the batch's item count is 10, over the limit limits.max_batch_items = 9"
        );
        assert_eq!(
            err(
                vec![
                    item("all", "noop"),
                    item("all", "noop"),
                    item("each:cpu", "noop")
                ],
                &small
            ),
            "the batch's item count with each: expanded (items[2] each:cpu names 8 groups) is \
             10, over the limit limits.max_batch_items = 9"
        );
        // So does the memory estimate: every copy holds the payload.
        let tight = Limits {
            max_request_memory: 8 * ITEM_OVERHEAD + 7 * 1000,
            ..Limits::default()
        };
        let mut big = item("each:cpu", "noop");
        big.payload = vec![0; 1000];
        let e = err(vec![big], &tight);
        assert!(
            e.starts_with(
                "the memory the batch holds with each: expanded (items[0] each:cpu copies its \
                 payload and args to 8 items), estimated in bytes, is "
            ) && e.contains("over the limit limits.max_request_memory"),
            "{e}"
        );
        // A key that is too long once suffixed.
        let mut keyed = item("each:rcu", "noop");
        keyed.key = "k".repeat(MAX_KEY_BYTES - 3);
        assert_eq!(
            err(vec![keyed], &lim),
            "items[0].key: 1027 bytes with its per-group suffix (\"/rcu:1\" and alike) is \
             longer than 1024"
        );
    }

    fn result(target: Target) -> ItemResult {
        ItemResult {
            id: 7,
            batch: 3,
            workqueue: Arc::from("default"),
            state: State::Ok,
            output: b"out".to_vec(),
            error: String::new(),
            target,
            handler: Arc::from("noop"),
            cpu_started: Some(1),
            cpu_finished: Some(1),
            fallback: None,
            reason: "ignored without a fallback".into(),
            rebinds: 0,
            queued_at: SystemTime::UNIX_EPOCH + Duration::from_secs(5),
            started_at: Some(SystemTime::now()),
            finished_at: None,
            epoch_started: Some(2),
            epoch_decided: None,
            worker: None,
            worker_lost: 0,
        }
    }

    #[test]
    fn results_out_copies_the_texts_of_each_result() {
        let mut out = ResultsOut::default();
        for t in [
            Target::All,
            Target::All,
            Target::Node(0),
            Target::Cpus("1-3".parse().unwrap()),
            Target::All,
        ] {
            let r = result(t.clone());
            let m = out.result(&r);
            assert_eq!(m.target, t.to_string());
            assert_eq!(m, result_out(&r));
            assert_eq!(
                (m.workqueue.as_str(), m.handler.as_str()),
                ("default", "noop")
            );
            assert!(m.fallback_reason.is_empty());
        }
    }

    #[test]
    fn the_response_bound_is_never_below_the_exact_size() {
        let wide = prost_types::Timestamp {
            seconds: i64::MIN,
            nanos: i32::MIN,
        };
        let worst = v1::ItemResult {
            item_id: u64::MAX,
            batch_id: u64::MAX,
            workqueue: "w".repeat(300),
            state: i32::MIN,
            output: vec![0xff; 20_000],
            error: "e".repeat(130),
            target: "cpus:0-4095".into(),
            cpu_started: Some(u32::MAX),
            cpu_finished: Some(u32::MAX),
            fallback_level: i32::MIN,
            fallback_reason: "r".repeat(17_000),
            rebinds: u32::MAX,
            queued_at: Some(wide),
            started_at: Some(wide),
            finished_at: Some(wide),
            topology_epoch: u64::MAX,
            handler: "h".repeat(200),
            decision_epoch: u64::MAX,
            worker_id: u64::MAX,
            worker_pid: u32::MAX,
            worker_slot: u32::MAX,
            worker_lost: u32::MAX,
        };
        let empty = v1::ItemResult::default();
        for results in [
            vec![],
            vec![empty.clone()],
            vec![worst.clone(); 3],
            vec![worst, empty],
        ] {
            let stock = v1::SubmitResponse {
                batch_id: u64::MAX,
                items: vec![
                    v1::ItemReceipt {
                        item_id: u64::MAX,
                        queued: true,
                        duplicate_of: u64::MAX,
                        target: "partition-name:4294967295".into(),
                        source_index: Some(u64::MAX),
                    };
                    results.len() + 2
                ],
                results,
                counts: Some(v1::StateCounts {
                    pending: u64::MAX,
                    running: u64::MAX,
                    ok: u64::MAX,
                    failed: u64::MAX,
                    cancelled: u64::MAX,
                    expired: u64::MAX,
                    rejected: u64::MAX,
                    delayed: u64::MAX,
                }),
                first_item_id: u64::MAX,
                item_count: u64::MAX,
                queued_count: u64::MAX,
                duplicates: vec![
                    v1::DuplicateItem {
                        index: u64::MAX,
                        duplicate_of: u64::MAX,
                    };
                    3
                ],
            };
            let mut items = wqd_proto::out::EncodedReceipts::default();
            for r in &stock.items {
                items.push(r);
            }
            let mut resp = SubmitResponseOut {
                batch_id: stock.batch_id,
                items,
                counts: stock.counts,
                first_item_id: u64::MAX,
                item_count: u64::MAX,
                queued_count: u64::MAX,
                duplicates: stock.duplicates.clone(),
                ..Default::default()
            };
            for r in &stock.results {
                resp.results.push(&r.encode_to_vec());
            }
            let bound = submit_response_len_bound(&resp);
            let exact = resp.encoded_len();
            assert_eq!(exact, stock.encoded_len());
            assert!(bound >= exact, "bound {bound} < exact {exact}");
        }
    }

    #[test]
    fn attrs_defaults_on_create() {
        let a = attrs_in(
            v1::WorkqueueAttrs {
                name: "w".into(),
                ..Default::default()
            },
            77,
        )
        .unwrap();
        assert_eq!(a.max_active, 1);
        assert_eq!(a.placement, Placement::Spread);
        assert_eq!(a.fallback, Fallback::Widen);
        assert_eq!(a.max_queued, 77);
        let back = attrs_out(&a);
        assert_eq!(back.placement, v1::Placement::Spread as i32);
        assert!(attrs_in(
            v1::WorkqueueAttrs {
                name: "w".into(),
                placement: 99,
                ..Default::default()
            },
            1
        )
        .is_err());
        // The same defaults as a config entry with no keys (WorkqueueAttrs::new).
        assert_eq!(a, WorkqueueAttrs::new("w", 77));
        assert_eq!(a.results, ResultsMode::Full);
        assert_eq!(back.results, v1::ResultsMode::Full as i32);
    }

    #[test]
    fn results_mode_in_and_out() {
        for (wire, mode) in [
            (v1::ResultsMode::Full, ResultsMode::Full),
            (v1::ResultsMode::Summary, ResultsMode::Summary),
            (v1::ResultsMode::None, ResultsMode::None),
        ] {
            let a = attrs_in(
                v1::WorkqueueAttrs {
                    name: "w".into(),
                    results: wire as i32,
                    ..Default::default()
                },
                1,
            )
            .unwrap();
            assert_eq!(a.results, mode);
            assert_eq!(attrs_out(&a).results, wire as i32);
            let r = v1::UpdateWorkqueueRequest {
                name: "w".into(),
                results: Some(wire as i32),
                ..Default::default()
            };
            assert_eq!(changes_in(&r).unwrap().results, Some(mode));
        }
        match attrs_in(
            v1::WorkqueueAttrs {
                name: "w".into(),
                results: 4,
                ..Default::default()
            },
            1,
        ) {
            Err(RpcError::Field { field, problem }) => {
                assert_eq!(field, "attrs.results");
                assert_eq!(problem, "unknown results mode value 4");
            }
            other => panic!("{other:?}"),
        }
        for (v, problem) in [
            (0, "UNSPECIFIED is not a results mode"),
            (-1, "unknown results mode value -1"),
        ] {
            let r = v1::UpdateWorkqueueRequest {
                name: "w".into(),
                results: Some(v),
                ..Default::default()
            };
            match changes_in(&r) {
                Err(RpcError::Field { field, problem: p }) => {
                    assert_eq!(field, "results");
                    assert_eq!(p, problem);
                }
                other => panic!("{other:?}"),
            }
        }
        // Absent: unchanged.
        let r = v1::UpdateWorkqueueRequest {
            name: "w".into(),
            ..Default::default()
        };
        assert_eq!(changes_in(&r).unwrap().results, None);
    }

    #[test]
    fn update_sets_only_the_fields_given() {
        let r = v1::UpdateWorkqueueRequest {
            name: "w".into(),
            max_active: Some(4),
            fallback: Some(v1::FallbackPolicy::Reject as i32),
            ..Default::default()
        };
        let a = WorkqueueAttrs::new("w", 9).with(&changes_in(&r).unwrap());
        let mut want = WorkqueueAttrs::new("w", 9);
        want.max_active = 4;
        want.fallback = Fallback::Reject;
        assert_eq!(a, want);
        let unspecified = v1::UpdateWorkqueueRequest {
            name: "w".into(),
            placement: Some(0),
            ..Default::default()
        };
        match changes_in(&unspecified) {
            Err(RpcError::Field { field, problem }) => {
                assert_eq!(field, "placement");
                assert_eq!(problem, "UNSPECIFIED is not a placement");
            }
            other => panic!("{other:?}"),
        }
    }
}
