//! Item results straight from the engine's [`ItemResult`] (or a [`ResultRecord`] read in
//! place: a [`ResultView`] either way) to wire bytes, for `Submit(wait)` and the `Flush`
//! stream.
//!
//! [`ResultsOut::result`](super::convert::ResultsOut::result) builds a [`wqd_proto::v1::ItemResult`] per
//! result — a `String` for the workqueue, the target and the handler, copies of the output,
//! the error and the reason — which prost then sizes twice, encodes and drops. The profile of
//! batches of 1 000 put that at about a quarter of the daemon's instructions. [`ResultEncoder`]
//! writes the same fields from the engine's borrowed values with `prost::encoding`, the
//! target's canonical text formatted once per run of equal targets and a timestamp split once
//! per run of equal times (a batch's queue time; a start that is the previous result's finish),
//! into one reused scratch buffer, then appends them to an [`EncodedResults`] that the response
//! copies whole. `bench/benches/encode.rs` times it against prost's generated code.
//!
//! Invariant: the bytes are exactly prost's encoding of `result_out(r)` (fields in number
//! order, proto3 defaults left out, `optional` fields and timestamps written when set); the
//! tests decode them with the stock `v1` types and compare field by field.

use std::time::SystemTime;

use prost::encoding::WireType;
use wqd_core::engine::ResultView;
#[cfg(doc)]
use wqd_core::engine::{ItemResult, ResultRecord};
use wqd_core::target::Target;
use wqd_proto::out::EncodedResults;

use super::convert::{fallback_level_out, state_out};

/// Encodes results one by one (see the module docs), keeping the text of the last target and
/// a scratch buffer between them.
#[derive(Debug, Default)]
pub struct ResultEncoder {
    last_target: Option<(Target, String)>,
    /// The last `queued_at`, encoded: every item of a batch has the same, and a timestamp
    /// costs about 200 instructions to split and write.
    last_queued: Option<TimeField>,
    /// The last `finished_at`, encoded: a worker running a batch's items back to back starts
    /// each at the clock reading that ended the one before (`engine/worker.rs`), and results
    /// are encoded in that order, so most `started_at`s are the previous result's
    /// `finished_at`.
    last_finished: Option<TimeField>,
    scratch: Vec<u8>,
}

impl ResultEncoder {
    /// Appends `r`, encoded as a `wqd.v1.ItemResult`, to `out`.
    pub fn push(&mut self, r: &ResultView<'_>, out: &mut EncodedResults) {
        if !matches!(&self.last_target, Some((last, _)) if last == r.target) {
            self.last_target = Some((r.target.clone(), r.target.to_string()));
        }
        let target = self.last_target.as_ref().map_or("", |(_, t)| t.as_str());
        self.scratch.clear();
        encode_body(
            r,
            target,
            &mut self.last_queued,
            &mut self.last_finished,
            &mut self.scratch,
        );
        out.push(&self.scratch);
    }
}

// prost's own `encode_varint` and `message::encode` go through the generic `BufMut` (a
// capacity check per byte, the timestamp sized twice): the profile put them at half of this
// module's cost. These write to the `Vec` directly; the tests hold them to prost's bytes.

/// A base-128 varint, as prost writes it.
fn varint(mut v: u64, buf: &mut Vec<u8>) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

/// A field key.
fn key(tag: u32, wire: WireType, buf: &mut Vec<u8>) {
    varint(u64::from(tag << 3 | wire as u32), buf);
}

/// A length-delimited field from borrowed bytes, left out when empty (proto3's default).
fn put_bytes(tag: u32, v: &[u8], buf: &mut Vec<u8>) {
    if !v.is_empty() {
        key(tag, WireType::LengthDelimited, buf);
        varint(v.len() as u64, buf);
        buf.extend_from_slice(v);
    }
}

/// A `uint64` (or `uint32`) field, left out when zero.
fn put_u64(tag: u32, v: u64, buf: &mut Vec<u8>) {
    if v != 0 {
        key(tag, WireType::Varint, buf);
        varint(v, buf);
    }
}

/// A `uint32` field, left out when zero.
fn put_u32(tag: u32, v: u32, buf: &mut Vec<u8>) {
    put_u64(tag, u64::from(v), buf);
}

/// An `int32` (or enum) field, left out when zero: sign-extended, so a negative value takes
/// ten bytes, as in prost.
fn put_i32(tag: u32, v: i32, buf: &mut Vec<u8>) {
    put_u64(tag, i64::from(v) as u64, buf);
}

/// A `google.protobuf.Timestamp` field as written: its key, its length and its body,
/// `seconds` (int64, 1) and `nanos` (int32, 2), each left out when zero (an empty message at
/// the epoch); at most 19 bytes (tags below 16 take a one-byte key).
///
/// The bytes are built in integers, `lo` holding bytes 0..16 and `hi` bytes 16..24
/// (little-endian), and appended whole, a copy of known size: no capacity check per byte
/// (about 200 instructions per timestamp once), no call to `memcpy` for a few bytes, and no
/// wide read of bytes just stored one at a time (the CPU cannot forward those stores to the
/// read and waits for them: 41% of `ResultEncoder::push`'s own samples in a first cut that
/// copied a byte array).
#[derive(Debug, Clone, Copy)]
struct TimeField {
    at: SystemTime,
    lo: u128,
    hi: u64,
    len: usize,
}

impl TimeField {
    fn new(tag: u32, at: SystemTime) -> TimeField {
        let (secs, nanos) = unix_parts(at);
        let mut f = TimeField {
            at,
            lo: 0,
            hi: 0,
            len: 2,
        };
        if secs != 0 {
            f.byte(1 << 3 | WireType::Varint as u8);
            f.varint(secs as u64);
        }
        if nanos != 0 {
            f.byte(2 << 3 | WireType::Varint as u8);
            f.varint(i64::from(nanos) as u64);
        }
        f.lo |= u128::from((f.len - 2) as u8) << 8;
        f.retag(tag)
    }

    /// Appends byte `b`.
    fn byte(&mut self, b: u8) {
        match self.len {
            at @ 0..16 => self.lo |= u128::from(b) << (8 * at),
            at => self.hi |= u64::from(b) << (8 * (at - 16)),
        }
        self.len += 1;
    }

    /// Appends a base-128 varint, as prost writes it.
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.byte((v as u8) | 0x80);
            v >>= 7;
        }
        self.byte(v as u8);
    }

    /// The same time as field `tag`.
    fn retag(mut self, tag: u32) -> TimeField {
        debug_assert!(tag < 16, "a timestamp field's one-byte key");
        let key = (tag << 3 | WireType::LengthDelimited as u32) as u8;
        self.lo = (self.lo & !0xff) | u128::from(key);
        self
    }

    /// Appends the field: all 24 bytes, then the tail cut.
    fn put(&self, buf: &mut Vec<u8>) {
        let end = buf.len() + self.len;
        let mut b = [0u8; 24];
        b[..16].copy_from_slice(&self.lo.to_le_bytes());
        b[16..].copy_from_slice(&self.hi.to_le_bytes());
        buf.extend_from_slice(&b);
        buf.truncate(end);
    }
}

/// Writes field `tag` for `t` from `cache` when it holds the same time (under any tag), or
/// fresh, left in `cache` for the next result.
fn put_time_cached(tag: u32, t: SystemTime, cache: &mut Option<TimeField>, buf: &mut Vec<u8>) {
    let field = match *cache {
        Some(f) if f.at == t => f.retag(tag),
        _ => TimeField::new(tag, t),
    };
    field.put(buf);
    *cache = Some(field);
}

/// `t` as a normalised `google.protobuf.Timestamp`'s (seconds, nanos): what
/// `prost_types::Timestamp::from(t)` gives, nanos in 0..1e9 also before the epoch, without its
/// generic normalisation (a quarter of the cost of encoding a result, when it ran three times
/// per result; now once per distinct time).
fn unix_parts(t: SystemTime) -> (i64, i32) {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i32),
        Err(e) => {
            let d = e.duration();
            let (s, n) = (d.as_secs() as i64, d.subsec_nanos() as i32);
            if n == 0 {
                (-s, 0)
            } else {
                (-s - 1, 1_000_000_000 - n)
            }
        }
    }
}

/// The body of `wqd.v1.ItemResult` for `r` (no key, no length), field by field as
/// `convert::ResultsOut::result` fills them.
fn encode_body(
    r: &ResultView<'_>,
    target: &str,
    queued: &mut Option<TimeField>,
    finished: &mut Option<TimeField>,
    buf: &mut Vec<u8>,
) {
    put_u64(1, r.id, buf);
    put_u64(2, r.batch, buf);
    put_bytes(3, r.workqueue.as_bytes(), buf);
    put_i32(4, state_out(r.state) as i32, buf);
    put_bytes(5, r.output, buf);
    put_bytes(6, r.error.as_bytes(), buf);
    put_bytes(7, target.as_bytes(), buf);
    // `optional`: written when set, zero included.
    if let Some(c) = r.cpu_started {
        key(8, WireType::Varint, buf);
        varint(u64::from(c), buf);
    }
    if let Some(c) = r.cpu_finished {
        key(9, WireType::Varint, buf);
        varint(u64::from(c), buf);
    }
    put_i32(10, fallback_level_out(r.fallback) as i32, buf);
    if r.fallback.is_some() {
        put_bytes(11, r.reason.as_bytes(), buf);
    }
    put_u32(12, r.rebinds, buf);
    put_time_cached(13, r.queued_at, queued, buf);
    // A start equal to the previous result's finish (see `last_finished`) is written from
    // that field; the cache then takes this result's finish.
    if let Some(t) = r.started_at {
        match *finished {
            Some(f) if f.at == t => f.retag(14).put(buf),
            _ => TimeField::new(14, t).put(buf),
        }
    }
    if let Some(t) = r.finished_at {
        put_time_cached(15, t, finished, buf);
    }
    put_u64(16, r.epoch_started.unwrap_or(0), buf);
    put_bytes(17, r.handler.as_bytes(), buf);
    put_u64(18, r.epoch_decided.unwrap_or(0), buf);
    put_u64(19, r.worker.map_or(0, |w| w.worker), buf);
    put_u32(20, r.worker.map_or(0, |w| w.pid), buf);
    put_u32(21, r.worker.map_or(0, |w| w.slot), buf);
    put_u32(22, r.worker_lost, buf);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use prost::Message;
    use wqd_core::engine::{ItemResult, State, WorkerRef};
    use wqd_core::groups::Level;
    use wqd_proto::out::{FlushEventOut, FlushResponseOut, SubmitResponseOut};
    use wqd_proto::v1;

    use super::*;
    use crate::rpc::convert::result_out;

    /// The fast timestamp split is prost-types' normalised `Timestamp`, before and after the
    /// epoch, whole seconds and not.
    #[test]
    fn unix_parts_are_prost_types_timestamps() {
        let epoch = std::time::UNIX_EPOCH;
        let mut times = vec![epoch, SystemTime::now()];
        for d in [
            Duration::from_nanos(1),
            Duration::from_secs(1),
            Duration::new(1, 999_999_999),
            Duration::new(1_700_000_000, 123_456_789),
        ] {
            times.push(epoch + d);
            times.push(epoch - d);
        }
        for t in times {
            let ts = prost_types::Timestamp::from(t);
            assert_eq!(unix_parts(t), (ts.seconds, ts.nanos), "{t:?}");
        }
    }

    /// Every field set, to values that need their widest encodings.
    fn full(id: u64, target: Target) -> ItemResult {
        ItemResult {
            id,
            batch: u64::MAX,
            workqueue: Arc::from("a-workqueue"),
            state: State::Failed,
            // An output the engine cut at its limit, with its marker.
            output: [vec![0xffu8; 70_000], b"...[cut]".to_vec()].concat(),
            error: "exit status 3: \u{e9}t\u{e9}".into(),
            target,
            handler: Arc::from("attached:py"),
            cpu_started: Some(0),
            cpu_finished: Some(u32::MAX),
            fallback: Some(Level::Package),
            reason: "cpu:1 offline; widened to package:0".into(),
            rebinds: u32::MAX,
            queued_at: SystemTime::UNIX_EPOCH - Duration::new(7, 5),
            started_at: Some(SystemTime::UNIX_EPOCH),
            finished_at: Some(SystemTime::UNIX_EPOCH + Duration::new(u32::MAX as u64, 999_999_999)),
            epoch_started: Some(u64::MAX),
            epoch_decided: Some(1),
            worker: Some(WorkerRef {
                worker: u64::MAX,
                pid: u32::MAX,
                slot: 1,
            }),
            worker_lost: 2,
        }
    }

    /// As few fields set as an engine result can have.
    fn bare(id: u64, target: Target) -> ItemResult {
        ItemResult {
            id,
            batch: 0,
            workqueue: Arc::from(""),
            state: State::Pending,
            output: Vec::new(),
            error: String::new(),
            target,
            handler: Arc::from(""),
            cpu_started: None,
            cpu_finished: None,
            fallback: None,
            // Left out without a fallback, as `result_out` does.
            reason: "not sent".into(),
            rebinds: 0,
            queued_at: SystemTime::UNIX_EPOCH,
            started_at: None,
            finished_at: None,
            epoch_started: None,
            epoch_decided: Some(0),
            worker: None,
            worker_lost: 0,
        }
    }

    fn samples() -> Vec<ItemResult> {
        let cpus: Target = "1-3".parse().map(Target::Cpus).expect("cpulist");
        let mut v = vec![
            full(1, Target::All),
            bare(2, Target::All),
            full(3, Target::Node(0)),
            bare(0, cpus.clone()),
            full(5, cpus),
            bare(6, Target::All),
        ];
        let mut fallback_no_reason = full(7, Target::Node(1));
        fallback_no_reason.reason.clear();
        fallback_no_reason.fallback = Some(Level::All);
        v.push(fallback_no_reason);
        let mut ok = bare(8, Target::All);
        ok.state = State::Ok;
        ok.output = b"out".to_vec();
        ok.started_at = Some(SystemTime::now());
        ok.finished_at = Some(SystemTime::now());
        v.push(ok);
        v
    }

    #[test]
    fn a_submit_response_decodes_to_the_old_conversion_field_by_field() {
        let rs = samples();
        let mut enc = ResultEncoder::default();
        let mut resp = SubmitResponseOut {
            batch_id: 4,
            counts: Some(v1::StateCounts {
                ok: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        for r in &rs {
            enc.push(&r.view(), &mut resp.results);
        }
        assert_eq!(resp.results.len(), rs.len());
        let bytes = resp.encode_to_vec();
        assert_eq!(resp.encoded_len(), bytes.len());
        let got = v1::SubmitResponse::decode(&bytes[..]).expect("stock decode");
        let old = v1::SubmitResponse {
            batch_id: 4,
            items: Vec::new(),
            results: rs.iter().map(result_out).collect(),
            counts: resp.counts,
            ..Default::default()
        };
        assert_eq!(got.results.len(), old.results.len());
        for (g, o) in got.results.iter().zip(&old.results) {
            // Field by field, so a difference names its field.
            assert_eq!(g.item_id, o.item_id);
            assert_eq!(g.batch_id, o.batch_id);
            assert_eq!(g.workqueue, o.workqueue);
            assert_eq!(g.state, o.state);
            assert_eq!(g.output, o.output);
            assert_eq!(g.error, o.error);
            assert_eq!(g.target, o.target);
            assert_eq!(g.cpu_started, o.cpu_started);
            assert_eq!(g.cpu_finished, o.cpu_finished);
            assert_eq!(g.fallback_level, o.fallback_level);
            assert_eq!(g.fallback_reason, o.fallback_reason);
            assert_eq!(g.rebinds, o.rebinds);
            assert_eq!(g.queued_at, o.queued_at);
            assert_eq!(g.started_at, o.started_at);
            assert_eq!(g.finished_at, o.finished_at);
            assert_eq!(g.topology_epoch, o.topology_epoch);
            assert_eq!(g.handler, o.handler);
            assert_eq!(g.decision_epoch, o.decision_epoch);
            assert_eq!(g.worker_id, o.worker_id);
            assert_eq!(g.worker_pid, o.worker_pid);
            assert_eq!(g.worker_slot, o.worker_slot);
            assert_eq!(g.worker_lost, o.worker_lost);
            assert_eq!(g, o);
        }
        assert_eq!(got, old);
        // Byte for byte what prost writes for the old conversion.
        assert_eq!(bytes, old.encode_to_vec());
    }

    /// `rs` as the encoder writes them, and as the stock conversion gives them.
    fn both_ways(rs: &[ItemResult]) -> (SubmitResponseOut, v1::SubmitResponse) {
        let mut enc = ResultEncoder::default();
        let mut resp = SubmitResponseOut::default();
        for r in rs {
            enc.push(&r.view(), &mut resp.results);
        }
        let old = v1::SubmitResponse {
            results: rs.iter().map(result_out).collect(),
            ..Default::default()
        };
        (resp, old)
    }

    /// A batch's results share `queued_at`: the encoder writes the cached field for a repeat
    /// and the fresh one after a change, and both decode as prost's conversion.
    #[test]
    fn repeated_and_changing_queue_times_encode_as_prost() {
        let mut rs = Vec::new();
        for r in samples() {
            let mut again = r.clone();
            again.id += 100;
            rs.push(r);
            rs.push(again);
        }
        let mut later = rs[0].clone();
        later.queued_at += Duration::new(3, 1);
        rs.push(later);
        rs.push(rs[0].clone());
        let (resp, old) = both_ways(&rs);
        assert_eq!(resp.encode_to_vec(), old.encode_to_vec());
    }

    /// A worker starts each item at the clock reading that ended the one before: a start
    /// equal to the previous result's finish is written from the cached field under its own
    /// tag, and any other start (or a finish after it) is written fresh; all decode as
    /// prost's conversion.
    #[test]
    fn starts_equal_to_the_previous_finish_encode_as_prost() {
        let t = |s: i64, n: u32| match s {
            0.. => SystemTime::UNIX_EPOCH + Duration::new(s as u64, n),
            _ => SystemTime::UNIX_EPOCH - Duration::new(s.unsigned_abs(), n),
        };
        let times = [
            // (started, finished): back to back, then a gap, a start before the epoch, an
            // item that never started, a start equal to an older finish, an equal pair.
            (Some(t(1_700_000_000, 1)), Some(t(1_700_000_000, 500))),
            (Some(t(1_700_000_000, 500)), Some(t(1_700_000_001, 0))),
            (
                Some(t(1_700_000_001, 0)),
                Some(t(1_700_000_002, 999_999_999)),
            ),
            (Some(t(1_700_000_005, 7)), Some(t(1_700_000_006, 8))),
            (Some(t(-3, 5)), Some(t(1_700_000_006, 8))),
            (None, None),
            (Some(t(1_700_000_006, 8)), Some(t(0, 0))),
            (Some(t(0, 0)), Some(t(0, 0))),
            (Some(t(0, 0)), None),
            (Some(t(0, 0)), Some(t(9, 9))),
        ];
        let rs: Vec<ItemResult> = times
            .iter()
            .enumerate()
            .map(|(i, &(started_at, finished_at))| {
                let mut r = bare(i as u64 + 1, Target::All);
                r.state = State::Ok;
                r.started_at = started_at;
                r.finished_at = finished_at;
                r
            })
            .collect();
        let (resp, old) = both_ways(&rs);
        let got = v1::SubmitResponse::decode(&resp.encode_to_vec()[..]).expect("stock decode");
        for (g, o) in got.results.iter().zip(&old.results) {
            assert_eq!((g.started_at, g.finished_at), (o.started_at, o.finished_at));
        }
        assert_eq!(resp.encode_to_vec(), old.encode_to_vec());
    }

    #[test]
    fn a_flush_group_decodes_to_the_old_conversion() {
        use v1::flush_response::Event;
        let rs = samples();
        let mut enc = ResultEncoder::default();
        let mut group = EncodedResults::new(1);
        for r in &rs {
            enc.push(&r.view(), &mut group);
        }
        let msg = FlushResponseOut {
            event: Some(FlushEventOut::Results(group)),
        };
        let bytes = msg.encode_to_vec();
        let old = v1::FlushResponse {
            event: Some(Event::Results(v1::ItemResults {
                results: rs.iter().map(result_out).collect(),
            })),
        };
        assert_eq!(
            v1::FlushResponse::decode(&bytes[..]).ok(),
            Some(old.clone())
        );
        assert_eq!(bytes, old.encode_to_vec());
    }
}
