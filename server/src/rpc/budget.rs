//! Refusing requests that are too big *before* they are decoded.
//!
//! A protobuf request decodes into much more memory than its bytes: a 13-byte `WorkItem` on
//! the wire is a struct of a few hundred bytes once decoded and checked, and tonic decodes a
//! whole message before any handler can count its items — so a count check in the handler
//! comes after the memory is spent (a 52 MiB Submit of 4 194 305 items once cost 1 GB).
//!
//! [`BudgetLayer`] wraps the request body of the methods that carry a repeated field (Submit,
//! SubmitStream, GetResults, Flush, Cancel). As the gRPC messages go by it keeps cheap
//! references to their bytes (no copy), and when a message is complete — before tonic sees
//! its last bytes — it walks its tags and lengths (no decoding) and counts the entries of the
//! method's repeated field. Over `limits.max_batch_items`, or over `limits.max_request_memory`
//! by the estimate [`held_bytes`], the body ends with the limit's status instead of the last
//! bytes, so the message is never decoded.
//!
//! Invariants: the scan never changes or holds back a byte of a message within the limits;
//! bodies of other methods pass untouched; the count it enforces is the count prost decodes
//! (tests compare the two on random messages, split at random points); a message the scan
//! cannot follow (malformed, compressed) passes unscanned, for the decoder to refuse.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::Status;

use super::limits::SharedLimits;

/// Memory held per decoded item besides its wire bytes: the decoded `WorkItem`, the checked
/// `ItemSpec` it becomes, and the engine's entry for it while the batch is submitted.
pub const ITEM_OVERHEAD: usize = std::mem::size_of::<wqd_proto::v1::WorkItem>()
    + std::mem::size_of::<wqd_core::engine::ItemSpec>()
    + 64;

/// Memory held per looked-up id: the id and the result handle the look-up returns.
pub const ID_OVERHEAD: usize = 16;

/// The estimate checked against `limits.max_request_memory`: what decoding and checking
/// `entries` entries carried in `bytes` wire bytes holds at once.
pub fn held_bytes(entries: u64, per_entry: usize, bytes: u64) -> u64 {
    entries
        .saturating_mul(per_entry as u64)
        .saturating_add(bytes)
}

/// What to count in a method's messages: the repeated field at `path` (field numbers from the
/// top-level message down), holding messages or varints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rule {
    path: &'static [u32],
    varints: bool,
    /// Counts add up over the messages of a stream (a SubmitStream batch is all of them).
    cumulative: bool,
    per_entry: usize,
    what: &'static str,
}

fn rule_for(path: &str) -> Option<Rule> {
    let items = |cumulative, what| Rule {
        path: &[2],
        varints: false,
        cumulative,
        per_entry: ITEM_OVERHEAD,
        what,
    };
    let ids = |path, varints| Rule {
        path,
        varints,
        cumulative: false,
        per_entry: ID_OVERHEAD,
        what: "the number of item ids",
    };
    Some(match path {
        "/wqd.v1.DispatchService/Submit" => items(false, "the batch's item count"),
        "/wqd.v1.DispatchService/SubmitStream" => items(true, "the streamed batch's item count"),
        // Each session request is a batch of its own (`SessionRequest.submit.items`).
        "/wqd.v1.DispatchService/Session" => Rule {
            path: &[2, 2],
            ..items(false, "a session request's item count")
        },
        "/wqd.v1.DispatchService/GetResults" => ids(&[1], true),
        "/wqd.v1.DispatchService/Flush" | "/wqd.v1.DispatchService/Cancel" => ids(&[1, 1], true),
        _ => return None,
    })
}

/// Wraps every route; see the module docs.
#[derive(Debug, Clone)]
pub struct BudgetLayer {
    limits: SharedLimits,
    /// A refused Submit or SubmitStream counts as a refused batch, like any other.
    counters: Arc<super::Counters>,
}

impl BudgetLayer {
    pub fn new(limits: SharedLimits, counters: Arc<super::Counters>) -> Self {
        Self { limits, counters }
    }
}

impl<S> tower::Layer<S> for BudgetLayer {
    type Service = Budget<S>;
    fn layer(&self, inner: S) -> Budget<S> {
        Budget {
            inner,
            limits: self.limits.clone(),
            counters: self.counters.clone(),
        }
    }
}

/// The service of [`BudgetLayer`].
#[derive(Debug, Clone)]
pub struct Budget<S> {
    inner: S,
    limits: SharedLimits,
    counters: Arc<super::Counters>,
}

impl<S> tower::Service<http::Request<Body>> for Budget<S>
where
    S: tower::Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> S::Future {
        let Some(rule) = rule_for(req.uri().path()) else {
            return self.inner.call(req);
        };
        let limits = self.limits.load();
        let mut scan = Scan::new(
            rule,
            limits.max_batch_items as u64,
            limits.max_request_memory as u64,
        );
        // A unary Submit refused here never reaches its handler, so the refusal is counted
        // here; a SubmitStream handler sees the refusal in its stream and counts it itself.
        if rule.per_entry == ITEM_OVERHEAD && !rule.cumulative {
            scan.batches = Some(self.counters.clone());
        }
        let req = req.map(|body| Body::new(Scanned { inner: body, scan }));
        self.inner.call(req)
    }
}

/// A request body whose gRPC messages are scanned as they pass (see the module docs).
struct Scanned {
    inner: Body,
    scan: Scan,
}

impl http_body::Body for Scanned {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if let Some(st) = this.scan.refused.take() {
            return Poll::Ready(Some(Err(st)));
        }
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if let Err(st) = this.scan.feed(data) {
                        // The whole messages before the refused one, in this frame, go
                        // through first (a session's requests read before the refusal are
                        // answered); the refusal comes at the next poll (`refused`).
                        let keep = std::mem::take(&mut this.scan.keep);
                        if keep > 0 {
                            return Poll::Ready(Some(Ok(Frame::data(data.slice(..keep)))));
                        }
                        return Poll::Ready(Some(Err(st)));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(st)) => Poll::Ready(Some(Err(st))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The scanner's state across the frames of one request.
struct Scan {
    rule: Rule,
    max_entries: u64,
    max_memory: u64,
    /// The 5-byte gRPC message header being read.
    header: [u8; 5],
    header_got: usize,
    /// Bytes of the current message still to come; `None` while reading a header.
    left: Option<usize>,
    /// The current message's bytes so far (cheap `Bytes` handles, no copy); empty when the
    /// message is not scanned (compressed).
    parts: Vec<Bytes>,
    skip: bool,
    /// Entries and wire bytes counted (over the stream for a cumulative rule).
    entries: u64,
    bytes: u64,
    /// A refusal decided but not yet delivered.
    refused: Option<Status>,
    /// Where a refused batch is counted (batch methods only).
    batches: Option<Arc<super::Counters>>,
    /// After a refusal: the bytes of the frame fed last that came before the refused message
    /// (whole messages, passed on before the refusal).
    keep: usize,
}

impl Scan {
    fn new(rule: Rule, max_entries: u64, max_memory: u64) -> Scan {
        Scan {
            rule,
            max_entries,
            max_memory,
            header: [0; 5],
            header_got: 0,
            left: None,
            parts: Vec::new(),
            skip: false,
            entries: 0,
            bytes: 0,
            refused: None,
            batches: None,
            keep: 0,
        }
    }

    /// Follows `data` through the message framing; scans each message as it completes.
    ///
    /// # Errors
    /// The limit's status when a completed message (or the stream so far) is over a limit.
    fn feed(&mut self, data: &Bytes) -> Result<(), Status> {
        let mut at = 0;
        // Where the message being read began in `data` (0: in an earlier frame).
        let mut start = 0;
        while at < data.len() {
            match self.left {
                None => {
                    if self.header_got == 0 {
                        start = at;
                    }
                    let take = (5 - self.header_got).min(data.len() - at);
                    self.header[self.header_got..self.header_got + take]
                        .copy_from_slice(&data[at..at + take]);
                    self.header_got += take;
                    at += take;
                    if self.header_got == 5 {
                        self.header_got = 0;
                        let len = u32::from_be_bytes([
                            self.header[1],
                            self.header[2],
                            self.header[3],
                            self.header[4],
                        ]) as usize;
                        self.skip = self.header[0] != 0;
                        self.left = Some(len);
                        if len == 0 {
                            self.complete(start)?;
                        }
                    }
                }
                Some(left) => {
                    let take = left.min(data.len() - at);
                    if !self.skip {
                        self.parts.push(data.slice(at..at + take));
                    }
                    at += take;
                    self.left = Some(left - take);
                    if left == take {
                        self.complete(start)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A whole message, which began at `start` of the frame fed last, is in `parts`: count
    /// and check it; a refusal is counted once, and keeps the frame's bytes before `start`.
    fn complete(&mut self, start: usize) -> Result<(), Status> {
        let r = self.check();
        if r.is_err() {
            self.keep = start;
            if let Some(c) = self.batches.take() {
                c.batches_refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        r
    }

    fn check(&mut self) -> Result<(), Status> {
        self.left = None;
        let parts = std::mem::take(&mut self.parts);
        if std::mem::take(&mut self.skip) {
            return Ok(());
        }
        let len: usize = parts.iter().map(Bytes::len).sum();
        let mut cur = Cursor::new(&parts);
        let n = count(&mut cur, len, self.rule.path, self.rule.varints);
        if !self.rule.cumulative {
            self.entries = 0;
            self.bytes = 0;
        }
        self.entries = self.entries.saturating_add(n);
        self.bytes = self.bytes.saturating_add(len as u64);
        if self.entries > self.max_entries {
            let st = Status::invalid_argument(format!(
                "{} is {}{}, over the limit limits.max_batch_items = {} (refused before \
                 decoding; nothing was queued)",
                self.rule.what,
                if self.rule.cumulative {
                    "at least "
                } else {
                    ""
                },
                self.entries,
                self.max_entries
            ));
            self.refused = Some(st.clone());
            return Err(st);
        }
        let held = held_bytes(self.entries, self.rule.per_entry, self.bytes);
        if held > self.max_memory {
            let st = Status::resource_exhausted(format!(
                "the request would hold about {held} bytes once decoded ({} entries in {} \
                 bytes), over limits.max_request_memory = {} (refused before decoding; \
                 nothing was queued); send fewer items per request",
                self.entries, self.bytes, self.max_memory
            ));
            self.refused = Some(st.clone());
            return Err(st);
        }
        Ok(())
    }
}

/// A read cursor over the parts of one message.
struct Cursor<'a> {
    parts: &'a [Bytes],
    part: usize,
    off: usize,
}

impl<'a> Cursor<'a> {
    fn new(parts: &'a [Bytes]) -> Self {
        Cursor {
            parts,
            part: 0,
            off: 0,
        }
    }

    fn byte(&mut self) -> Option<u8> {
        while let Some(p) = self.parts.get(self.part) {
            if let Some(&b) = p.get(self.off) {
                self.off += 1;
                return Some(b);
            }
            self.part += 1;
            self.off = 0;
        }
        None
    }

    /// A varint and the bytes it took.
    #[inline]
    fn varint(&mut self) -> Option<(u64, usize)> {
        // Fast path: the varint lies within the current part (nearly always: parts are
        // frames of kilobytes, varints a byte or two), read straight from its slice; a
        // one-byte varint (every tag, and the length of a small item) at once.
        if let Some(rest) = self.parts.get(self.part).and_then(|p| p.get(self.off..)) {
            if let Some(&b) = rest.first() {
                if b & 0x80 == 0 {
                    self.off += 1;
                    return Some((u64::from(b), 1));
                }
            }
            let mut v = 0u64;
            for (i, &b) in rest.iter().take(10).enumerate() {
                v |= u64::from(b & 0x7f) << (7 * i);
                if b & 0x80 == 0 {
                    self.off += i + 1;
                    return Some((v, i + 1));
                }
            }
            if rest.len() >= 10 {
                return None;
            }
        }
        // Slow path: it may run over into the next part(s).
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Some((v, i + 1));
            }
        }
        None
    }

    /// Steps over the entries of a run of one length-delimited field with a one-byte `key`,
    /// each with a one-byte length (under 128 bytes: a small item), that lie whole within the
    /// current part and within `max` bytes; returns how many and the bytes they took. Stops
    /// at anything else, for [`count`]'s general path. A batch of a thousand small items is
    /// such a run: a few instructions per item instead of two varint reads and a skip.
    fn small_entries(&mut self, key: u8, max: usize) -> (u64, usize) {
        let Some(p) = self.parts.get(self.part) else {
            return (0, 0);
        };
        let start = self.off;
        let end = p.len().min(start.saturating_add(max));
        let (mut at, mut n) = (start, 0u64);
        while at + 2 <= end && p[at] == key && p[at + 1] < 0x80 {
            let next = at + 2 + usize::from(p[at + 1]);
            if next > end {
                break;
            }
            at = next;
            n += 1;
        }
        self.off = at;
        (n, at - start)
    }

    /// Skips `n` bytes; `false` if the message ends first.
    fn skip(&mut self, mut n: usize) -> bool {
        while n > 0 {
            let Some(p) = self.parts.get(self.part) else {
                return false;
            };
            let here = p.len().saturating_sub(self.off).min(n);
            if here == 0 {
                self.part += 1;
                self.off = 0;
                continue;
            }
            self.off += here;
            n -= here;
        }
        true
    }
}

/// Counts the entries of the repeated field at `path` within the next `len` bytes of `cur`
/// (a message, or a nested one). Stops at anything malformed, with the count so far: the
/// decoder refuses such a message anyway.
fn count(cur: &mut Cursor<'_>, len: usize, path: &[u32], varints: bool) -> u64 {
    let mut n = 0u64;
    let mut used = 0usize;
    // The key of a run of small entries to step over at once, when the field to count is a
    // repeated message of this message with a one-byte key.
    let run_key = match path {
        [f] if !varints && *f < 16 => Some((*f << 3 | 2) as u8),
        _ => None,
    };
    while used < len {
        if let Some(key) = run_key {
            let (k, b) = cur.small_entries(key, len - used);
            n += k;
            used += b;
            if used >= len {
                break;
            }
        }
        let Some((key, k)) = cur.varint() else {
            return n;
        };
        used += k;
        let (field, wire) = (key >> 3, key & 7);
        let here = path.first().is_some_and(|&f| u64::from(f) == field);
        let last = path.len() == 1;
        match wire {
            0 => {
                let Some((_, k)) = cur.varint() else {
                    return n;
                };
                used += k;
                if here && last && varints {
                    n += 1;
                }
            }
            1 | 5 => {
                let w = if wire == 1 { 8 } else { 4 };
                if !cur.skip(w) {
                    return n;
                }
                used += w;
            }
            2 => {
                let Some((l, k)) = cur.varint() else {
                    return n;
                };
                used += k;
                let Ok(l) = usize::try_from(l) else {
                    return n;
                };
                if l > len.saturating_sub(used) {
                    return n;
                }
                used += l;
                if here && !last {
                    n += count(cur, l, &path[1..], varints);
                } else if here && varints {
                    // A packed run: one entry per varint, i.e. per byte without the
                    // continuation bit.
                    for _ in 0..l {
                        match cur.byte() {
                            Some(b) if b & 0x80 == 0 => n += 1,
                            Some(_) => {}
                            None => return n,
                        }
                    }
                } else {
                    if here {
                        n += 1;
                    }
                    if !cur.skip(l) {
                        return n;
                    }
                }
            }
            _ => return n,
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use prost::Message;
    use wqd_proto::v1;

    fn framed(msgs: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in msgs {
            out.push(0);
            out.extend_from_slice(&(m.len() as u32).to_be_bytes());
            out.extend_from_slice(m);
        }
        out
    }

    /// Feeds `wire` split at `cuts`; the counts of each message, or the refusal.
    fn run(rule: Rule, max: u64, mem: u64, wire: &[u8], cuts: &[usize]) -> Result<u64, Status> {
        let mut scan = Scan::new(rule, max, mem);
        let mut at = 0;
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
        cuts.sort_unstable();
        cuts.push(wire.len());
        for c in cuts {
            if c > at {
                scan.feed(&Bytes::copy_from_slice(&wire[at..c]))?;
                at = c;
            }
        }
        Ok(scan.entries)
    }

    fn submit(n: usize, target: &str) -> v1::SubmitRequest {
        v1::SubmitRequest {
            workqueue: "w".into(),
            items: (0..n)
                .map(|i| v1::WorkItem {
                    target: target.into(),
                    handler: "noop".into(),
                    key: if i % 3 == 0 {
                        format!("k{i}")
                    } else {
                        String::new()
                    },
                    // Mostly small items (a one-byte length: `small_entries`' run), and now
                    // and then one of 128 bytes or more, which breaks the run.
                    payload: vec![7; if i % 7 == 6 { 150 + i } else { i % 5 }],
                    ..Default::default()
                })
                .collect(),
            wait: n.is_multiple_of(2),
            receipts: 0,
        }
    }

    proptest! {
        #[test]
        fn item_counts_match_prost(n in 0usize..200, cuts in proptest::collection::vec(0usize..100_000, 0..12)) {
            let req = submit(n, "cache:1");
            let bytes = req.encode_to_vec();
            let back = v1::SubmitRequest::decode(bytes.as_slice()).map(|r| r.items.len());
            prop_assert_eq!(back.ok(), Some(n));
            let got = run(rule_for("/wqd.v1.DispatchService/Submit").unwrap(), u64::MAX, u64::MAX, &framed(&[bytes]), &cuts);
            prop_assert_eq!(got.ok(), Some(n as u64));
        }

        #[test]
        fn id_counts_match_prost(ids in proptest::collection::vec(any::<u64>(), 0..300), cuts in proptest::collection::vec(0usize..100_000, 0..12)) {
            let req = v1::GetResultsRequest { item_ids: ids.clone() };
            let wire = framed(&[req.encode_to_vec()]);
            let got = run(rule_for("/wqd.v1.DispatchService/GetResults").unwrap(), u64::MAX, u64::MAX, &wire, &cuts);
            prop_assert_eq!(got.ok(), Some(ids.len() as u64));
            let flush = v1::FlushRequest {
                scope: Some(v1::flush_request::Scope::Items(v1::ItemIds { ids: ids.clone() })),
                summary_only: true,
                include_delayed: false,
            };
            let wire = framed(&[flush.encode_to_vec()]);
            let got = run(rule_for("/wqd.v1.DispatchService/Flush").unwrap(), u64::MAX, u64::MAX, &wire, &cuts);
            prop_assert_eq!(got.ok(), Some(ids.len() as u64));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400), cuts in proptest::collection::vec(0usize..1000, 0..8)) {
            for path in ["/wqd.v1.DispatchService/Submit", "/wqd.v1.DispatchService/Flush", "/wqd.v1.DispatchService/GetResults"] {
                let _ = run(rule_for(path).unwrap(), 3, u64::MAX, &bytes, &cuts);
            }
        }
    }

    #[test]
    fn over_the_count_is_refused_before_the_last_byte() {
        let bytes = submit(11, "all").encode_to_vec();
        let wire = framed(&[bytes]);
        let rule = rule_for("/wqd.v1.DispatchService/Submit").unwrap();
        let e = run(rule, 10, u64::MAX, &wire, &[7, 30]).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message().contains("limits.max_batch_items = 10"),
            "{}",
            e.message()
        );
        assert_eq!(run(rule, 11, u64::MAX, &wire, &[]).ok(), Some(11));
    }

    #[test]
    fn streams_add_up_and_memory_is_estimated() {
        let rule = rule_for("/wqd.v1.DispatchService/SubmitStream").unwrap();
        let chunk = |n| {
            v1::SubmitStreamRequest {
                options: None,
                items: submit(n, "all").items,
                commit: false,
            }
            .encode_to_vec()
        };
        let wire = framed(&[chunk(6), chunk(6)]);
        let e = run(rule, 10, u64::MAX, &wire, &[3]).unwrap_err();
        assert!(e.message().contains("at least 12"), "{}", e.message());
        let e = run(rule, 100, 5 * ITEM_OVERHEAD as u64, &wire, &[]).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(
            e.message().contains("limits.max_request_memory"),
            "{}",
            e.message()
        );
        assert_eq!(run(rule, 100, u64::MAX, &wire, &[]).ok(), Some(12));
    }

    /// A session's requests are counted one by one (`SessionRequest.submit.items`), and a
    /// refused request leaves the whole requests before it, in the same frame, to be passed on
    /// (they are read and answered); a refusal whose message began in an earlier frame keeps
    /// nothing of this one.
    #[test]
    fn session_requests_count_one_by_one_and_earlier_ones_pass() {
        let rule = rule_for("/wqd.v1.DispatchService/Session").unwrap();
        let req = |tag, n| {
            v1::SessionRequest {
                tag,
                submit: Some(submit(n, "all")),
                wait_timeout: None,
            }
            .encode_to_vec()
        };
        let wire = framed(&[req(1, 6), req(2, 6), req(3, 6)]);
        assert_eq!(run(rule, 6, u64::MAX, &wire, &[]).ok(), Some(6));
        let wire = framed(&[req(1, 6), req(2, 7)]);
        let first = framed(&[req(1, 6)]).len();
        let mut scan = Scan::new(rule, 6, u64::MAX);
        let e = scan.feed(&Bytes::from(wire.clone())).unwrap_err();
        assert!(
            e.message().contains("a session request's item count is 7"),
            "{}",
            e.message()
        );
        assert_eq!(scan.keep, first, "the first request passes whole");
        let mut scan = Scan::new(rule, 6, u64::MAX);
        scan.feed(&Bytes::copy_from_slice(&wire[..first + 3]))
            .expect("nothing complete is over");
        scan.feed(&Bytes::copy_from_slice(&wire[first + 3..]))
            .unwrap_err();
        assert_eq!(
            scan.keep, 0,
            "the refused message began in the earlier frame"
        );
    }

    #[test]
    fn compressed_and_empty_messages_pass() {
        let rule = rule_for("/wqd.v1.DispatchService/Submit").unwrap();
        let mut wire = framed(&[submit(20, "all").encode_to_vec()]);
        wire[0] = 1;
        assert_eq!(run(rule, 3, u64::MAX, &wire, &[]).ok(), Some(0));
        assert_eq!(
            run(rule, 3, u64::MAX, &framed(&[vec![]]), &[]).ok(),
            Some(0)
        );
    }
}
