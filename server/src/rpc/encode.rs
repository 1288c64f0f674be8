//! Item results straight from the engine's [`ItemResult`] (or a [`ResultRecord`] read in
//! place: a [`ResultView`] either way) to wire bytes, for `Submit(wait)` and the `Flush`
//! stream.
//!
//! [`ResultsOut::result`](super::convert::ResultsOut::result) builds a [`wqd_proto::v1::ItemResult`] per
//! result — a `String` for the workqueue, the target and the handler, copies of the output,
//! the error and the reason — which prost then sizes twice, encodes and drops. The profile of
//! batches of 1 000 put that at about a quarter of the daemon's instructions. [`ResultEncoder`]
//! writes the same fields from the engine's borrowed values with `prost::encoding`, the
//! target's canonical text formatted once per run of equal targets, into one reused scratch
//! buffer, then appends them to an [`EncodedResults`] that the response copies whole.
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
    /// The last `queued_at` and its encoded field (key included): every item of a batch has
    /// the same, and a timestamp costs about 200 instructions to split and write.
    last_queued: Option<(SystemTime, Vec<u8>)>,
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
        encode_body(r, target, &mut self.last_queued, &mut self.scratch);
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

/// [`varint`] into `tmp` at `at`; returns the index after it. `tmp` has room: callers
/// write at most two varints of ten bytes after two bytes.
fn stack_varint(mut v: u64, tmp: &mut [u8; 24], mut at: usize) -> usize {
    while v >= 0x80 {
        tmp[at] = (v as u8) | 0x80;
        v >>= 7;
        at += 1;
    }
    tmp[at] = v as u8;
    at + 1
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

/// A `google.protobuf.Timestamp` field, written when set (even at the epoch, as an empty
/// message): `seconds` (int64, 1) and `nanos` (int32, 2), each left out when zero.
fn put_time(tag: u32, t: Option<SystemTime>, buf: &mut Vec<u8>) {
    // The field's key and its length take one byte each (tags below 16; a timestamp's body
    // is at most 16 bytes): the whole field is written on the stack and appended at once,
    // instead of a capacity check per byte (about 200 instructions per timestamp before).
    debug_assert!(tag < 16, "put_time's one-byte key");
    if let Some(t) = t {
        let (secs, nanos) = unix_parts(t);
        let (secs, nanos) = (secs as u64, i64::from(nanos) as u64);
        let mut tmp = [0u8; 24];
        tmp[0] = (tag << 3 | WireType::LengthDelimited as u32) as u8;
        let mut n = 2;
        if secs != 0 {
            tmp[n] = 1 << 3 | WireType::Varint as u8;
            n = stack_varint(secs, &mut tmp, n + 1);
        }
        if nanos != 0 {
            tmp[n] = 2 << 3 | WireType::Varint as u8;
            n = stack_varint(nanos, &mut tmp, n + 1);
        }
        tmp[1] = (n - 2) as u8;
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// `t` as a normalised `google.protobuf.Timestamp`'s (seconds, nanos): what
/// `prost_types::Timestamp::from(t)` gives, nanos in 0..1e9 also before the epoch, without its
/// generic normalisation (a quarter of the cost of encoding a result, three times per result).
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
    queued: &mut Option<(SystemTime, Vec<u8>)>,
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
    match queued {
        Some((at, field)) if *at == r.queued_at => buf.extend_from_slice(field),
        _ => {
            let from = buf.len();
            put_time(13, Some(r.queued_at), buf);
            let field = &buf[from..];
            match queued {
                Some((at, f)) => {
                    *at = r.queued_at;
                    f.clear();
                    f.extend_from_slice(field);
                }
                None => *queued = Some((r.queued_at, field.to_vec())),
            }
        }
    }
    put_time(14, r.started_at, buf);
    put_time(15, r.finished_at, buf);
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
        let mut enc = ResultEncoder::default();
        let mut resp = SubmitResponseOut::default();
        for r in &rs {
            enc.push(&r.view(), &mut resp.results);
        }
        let old = v1::SubmitResponse {
            results: rs.iter().map(result_out).collect(),
            ..Default::default()
        };
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
