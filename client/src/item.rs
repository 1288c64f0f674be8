//! Typed builders for targets, items and batches, and their conversion to `wqd.v1`
//! messages.
//!
//! Invariant: the builders never validate against the daemon's rules (handler names,
//! argument meaning, limits) — the daemon is the one authority and rejects a bad batch as a
//! whole; the builders only make well-formed messages easy to write.

use std::fmt;
use std::time::Duration;

use wqd_proto::v1;

/// A target in the daemon's grammar (see `docs/targets.md`). Turns into the string that
/// goes on the wire; any string is also accepted wherever a target is expected.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target(String);

impl Target {
    /// `cpu:N`
    pub fn cpu(n: u32) -> Self {
        Target(format!("cpu:{n}"))
    }
    /// `core:N` — the SMT siblings of CPU N.
    pub fn core(n: u32) -> Self {
        Target(format!("core:{n}"))
    }
    /// `cache:N` — last-level cache N.
    pub fn cache(n: u32) -> Self {
        Target(format!("cache:{n}"))
    }
    /// `shard:N` — slice N of a last-level cache.
    pub fn shard(n: u32) -> Self {
        Target(format!("shard:{n}"))
    }
    /// `node:N` — NUMA node N.
    pub fn node(n: u32) -> Self {
        Target(format!("node:{n}"))
    }
    /// `package:N`
    pub fn package(n: u32) -> Self {
        Target(format!("package:{n}"))
    }
    /// `cpus:LIST` with a kernel cpulist such as `0-3,8`.
    pub fn cpus(list: impl AsRef<str>) -> Self {
        Target(format!("cpus:{}", list.as_ref()))
    }
    /// `all`
    pub fn all() -> Self {
        Target("all".into())
    }
    /// `NAME` — a named group from the daemon's config.
    pub fn named(name: impl Into<String>) -> Self {
        Target(name.into())
    }
    /// `NAME:N` — range N of a named partition.
    pub fn partition(name: impl AsRef<str>, index: u32) -> Self {
        Target(format!("{}:{index}", name.as_ref()))
    }
    /// `each:OVER` — a fan-out, for a submitted item only: the daemon replaces the item by one
    /// item per group of the level OVER (`cpu`, `core`, `shard`, `cache`, `node`, `package`)
    /// or per range of the partition OVER, in ascending group number.
    pub fn each(over: impl AsRef<str>) -> Self {
        Target(format!("each:{}", over.as_ref()))
    }
    /// The wire form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<Target> for String {
    fn from(t: Target) -> String {
        t.0
    }
}

/// Converts a std duration to the protobuf one (saturating at `i64::MAX` seconds).
pub fn to_proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Converts a protobuf duration to std; negative values become zero.
pub fn from_proto_duration(d: &prost_types::Duration) -> Duration {
    if d.seconds < 0 || d.nanos < 0 {
        return Duration::ZERO;
    }
    Duration::new(d.seconds.unsigned_abs(), d.nanos.unsigned_abs())
}

/// One work item. `Item::new(target, handler)` then optional settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Item(v1::WorkItem);

impl Item {
    /// An item running `handler` on `target` (a [`Target`] or any target string).
    pub fn new(target: impl Into<String>, handler: impl Into<String>) -> Self {
        Item(v1::WorkItem {
            target: target.into(),
            handler: handler.into(),
            ..Default::default()
        })
    }
    /// Adds (or replaces) one handler argument.
    pub fn arg(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.0.args.insert(key.into(), value.into());
        self
    }
    /// Sets the payload bytes.
    pub fn payload(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.0.payload = bytes.into();
        self
    }
    /// Sets the de-duplication key.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.0.key = key.into();
        self
    }
    /// Delays the item before it becomes runnable.
    pub fn delay(mut self, d: Duration) -> Self {
        self.0.delay = Some(to_proto_duration(d));
        self
    }
    /// Expires the item if not started within `d` of submission.
    pub fn deadline(mut self, d: Duration) -> Self {
        self.0.deadline = Some(to_proto_duration(d));
        self
    }
    /// The wire message.
    pub fn into_proto(self) -> v1::WorkItem {
        self.0
    }
    /// The wire message, borrowed.
    pub fn as_proto(&self) -> &v1::WorkItem {
        &self.0
    }
}

impl From<Item> for v1::WorkItem {
    fn from(i: Item) -> Self {
        i.0
    }
}

impl From<v1::WorkItem> for Item {
    fn from(w: v1::WorkItem) -> Self {
        Item(w)
    }
}

/// A batch for [`crate::Client::submit`].
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    workqueue: String,
    items: Vec<v1::WorkItem>,
    wait: bool,
    receipts: bool,
}

impl Default for Batch {
    fn default() -> Self {
        Batch {
            workqueue: String::new(),
            items: Vec::new(),
            wait: false,
            receipts: true,
        }
    }
}

impl Batch {
    /// An empty batch for the `default` workqueue, with a receipt per item.
    pub fn new() -> Self {
        Self::default()
    }
    /// The workqueue to queue on (empty = `default`).
    pub fn workqueue(mut self, name: impl Into<String>) -> Self {
        self.workqueue = name.into();
        self
    }
    /// Appends one item.
    pub fn item(mut self, item: impl Into<Item>) -> Self {
        self.items.push(item.into().0);
        self
    }
    /// Appends items.
    pub fn items<I: Into<Item>>(mut self, items: impl IntoIterator<Item = I>) -> Self {
        self.items.extend(items.into_iter().map(|i| i.into().0));
        self
    }
    /// Whether [`crate::Client::submit`] returns only when every item is terminal.
    pub fn wait(mut self, wait: bool) -> Self {
        self.wait = wait;
        self
    }
    /// Whether the response carries one receipt per item (the default, `true`). Without them
    /// (`RECEIPTS_MODE_NONE`) its `items` is empty and `first_item_id`, `item_count` and
    /// `queued_count` describe the batch: for a caller that follows the batch by its id or
    /// its counts, and would only decode and drop a receipt per item.
    pub fn receipts(mut self, each: bool) -> Self {
        self.receipts = each;
        self
    }
    /// Number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }
    /// True when there are no items.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
    /// Whether the batch waits (see [`Batch::wait`]).
    pub fn waits(&self) -> bool {
        self.wait
    }
    /// The wire message.
    pub fn into_proto(self) -> v1::SubmitRequest {
        v1::SubmitRequest {
            workqueue: self.workqueue,
            items: self.items,
            wait: self.wait,
            receipts: if self.receipts {
                v1::ReceiptsMode::Unspecified
            } else {
                v1::ReceiptsMode::None
            } as i32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_make_the_wire_message() {
        let req = Batch::new()
            .workqueue("wq1")
            .item(
                Item::new(Target::cache(1), "spin")
                    .arg("ms", "5")
                    .payload(b"abc".to_vec())
                    .key("k")
                    .delay(Duration::from_millis(10))
                    .deadline(Duration::from_secs(2)),
            )
            .item(Item::new("cpus:0-3", "noop"))
            .wait(true)
            .into_proto();
        assert_eq!(req.workqueue, "wq1");
        assert!(req.wait);
        assert_eq!(req.receipts(), v1::ReceiptsMode::Unspecified);
        let bare = Batch::new().receipts(false).into_proto();
        assert_eq!(bare.receipts(), v1::ReceiptsMode::None);
        let a = &req.items[0];
        assert_eq!(a.target, "cache:1");
        assert_eq!(a.args.get("ms").map(String::as_str), Some("5"));
        assert_eq!(a.payload, b"abc");
        assert_eq!(a.key, "k");
        assert_eq!(
            a.delay,
            Some(prost_types::Duration {
                seconds: 0,
                nanos: 10_000_000
            })
        );
        assert_eq!(
            a.deadline.as_ref().map(from_proto_duration),
            Some(Duration::from_secs(2))
        );
        assert_eq!(req.items[1].target, "cpus:0-3");
        assert_eq!(req.items[1].delay, None);
    }

    #[test]
    fn targets_spell_the_grammar() {
        assert_eq!(Target::cpu(3).as_str(), "cpu:3");
        assert_eq!(Target::cpus("0-3,8").as_str(), "cpus:0-3,8");
        assert_eq!(Target::partition("db", 2).as_str(), "db:2");
        assert_eq!(Target::all().to_string(), "all");
        assert_eq!(
            from_proto_duration(&prost_types::Duration {
                seconds: -1,
                nanos: 0
            }),
            Duration::ZERO
        );
    }
}
