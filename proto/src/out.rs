//! The server's side of the responses that carry item results (`SubmitResponse`,
//! `FlushResponse`, and `SessionResponse`, which wraps a `SubmitResponse`), with the results
//! already encoded, and the `DispatchService` server that sends them.
//!
//! A daemon converting each engine result into a [`v1::ItemResult`] (a `String` per text, a
//! `Vec` per output) only to have prost encode and drop it spent more on that than on running
//! the item. Here the server encodes each result once, straight into an [`EncodedResults`]
//! buffer, and [`SubmitResponseOut`] / [`FlushResponseOut`] copy those bytes into the message.
//!
//! Invariant: the bytes are the ones prost writes for the stock [`v1::SubmitResponse`] /
//! [`v1::FlushResponse`] with the same content, fields in number order, so every client decodes
//! them with the stock types (the server's tests compare field by field). Only the server's
//! view changes: the `.proto` files, the descriptor set and the clients are untouched. The
//! generated server in [`dispatch_service_server`] is `wqd.v1.DispatchService` compiled a
//! second time with these two types in place of the stock ones (see `build.rs`).

use prost::bytes::{Buf, BufMut};
use prost::encoding::{self, encode_key, encode_varint, encoded_len_varint, key_len};
use prost::encoding::{DecodeContext, WireType};
use prost::{DecodeError, Message};

use crate::v1;

/// `wqd.v1.DispatchService`'s server, answering `Submit` with [`SubmitResponseOut`] and
/// `Flush` with a stream of [`FlushResponseOut`]; every other method as generated.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/out/wqd.v1.rs"));
}
pub use generated::dispatch_service_server;

/// The entries of one `repeated ItemResult` field, encoded: for each result its key, its length
/// and its body, as prost writes them. Field 3 of `SubmitResponse`, field 1 of `ItemResults`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedResults {
    field: u32,
    buf: Vec<u8>,
    count: usize,
}

impl EncodedResults {
    /// No results, for `repeated ItemResult` field number `field`.
    pub fn new(field: u32) -> Self {
        EncodedResults {
            field,
            buf: Vec::new(),
            count: 0,
        }
    }

    /// Appends one result whose encoded body (an `ItemResult` without key or length) is `body`.
    pub fn push(&mut self, body: &[u8]) {
        // The key and the length as prost's `encode_key` / `encode_varint` write them, without
        // their generic `BufMut` (a capacity check per byte): this runs once per result.
        let key = u64::from(self.field << 3 | WireType::LengthDelimited as u32);
        for mut v in [key, body.len() as u64] {
            while v >= 0x80 {
                self.buf.push((v as u8) | 0x80);
                v >>= 7;
            }
            self.buf.push(v as u8);
        }
        self.buf.extend_from_slice(body);
        self.count += 1;
    }

    /// Reserves room for about `bytes` more encoded bytes.
    pub fn reserve(&mut self, bytes: usize) {
        self.buf.reserve(bytes);
    }

    /// How many results.
    pub fn len(&self) -> usize {
        self.count
    }

    /// No results.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Encoded bytes of all the entries (keys and lengths included).
    pub fn bytes_len(&self) -> usize {
        self.buf.len()
    }

    /// Takes the results out, leaving none (the field number stays).
    pub fn take(&mut self) -> EncodedResults {
        EncodedResults {
            field: self.field,
            buf: std::mem::take(&mut self.buf),
            count: std::mem::replace(&mut self.count, 0),
        }
    }

    /// Decodes one entry (its length-delimited body) from `buf` and keeps it as sent.
    fn merge(&mut self, buf: &mut impl Buf) -> Result<(), DecodeError> {
        let mut body = Vec::new();
        encoding::bytes::merge(
            WireType::LengthDelimited,
            &mut body,
            buf,
            DecodeContext::default(),
        )?;
        self.push(&body);
        Ok(())
    }
}

/// The entries of `SubmitResponse.items` (field 2), encoded as prost writes them: per receipt
/// its key, its length and its body. A batch of a thousand items answered with a thousand
/// `ItemReceipt` values cost prost's generic encoder about 200 instructions each (sized once,
/// then written, through `BufMut`); a plain receipt (queued, no `each:` expansion) is written
/// here in a handful of bytes at once.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EncodedReceipts {
    buf: Vec<u8>,
    count: usize,
}

impl EncodedReceipts {
    /// Room for `n` plain receipts.
    pub fn with_capacity(n: usize) -> Self {
        EncodedReceipts {
            // Key, length, item id (at most 10 bytes), `queued`.
            buf: Vec::with_capacity(n * 14),
            count: 0,
        }
    }

    /// Appends the receipt of a queued item that named one group: `item_id` and `queued`
    /// only, the bytes prost writes for `ItemReceipt { item_id, queued: true, .. }`.
    pub fn push_queued(&mut self, item_id: u64) {
        if item_id == 0 {
            // proto3 leaves a zero id out: not the fixed layout below.
            return self.push(&v1::ItemReceipt {
                queued: true,
                ..Default::default()
            });
        }
        let mut tmp = [0u8; 16];
        tmp[0] = (2 << 3 | WireType::LengthDelimited as u32) as u8;
        tmp[2] = 1 << 3 | WireType::Varint as u8;
        let mut n = 3;
        let mut v = item_id;
        while v >= 0x80 {
            tmp[n] = (v as u8) | 0x80;
            v >>= 7;
            n += 1;
        }
        tmp[n] = v as u8;
        tmp[n + 1] = 2 << 3 | WireType::Varint as u8;
        tmp[n + 2] = 1;
        n += 3;
        tmp[1] = (n - 2) as u8;
        self.buf.extend_from_slice(&tmp[..n]);
        self.count += 1;
    }

    /// Appends any receipt (prost's encoder).
    pub fn push(&mut self, r: &v1::ItemReceipt) {
        encoding::message::encode(2, r, &mut self.buf);
        self.count += 1;
    }

    /// How many receipts.
    pub fn len(&self) -> usize {
        self.count
    }

    /// No receipts.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Encoded bytes of all the entries (keys and lengths included).
    pub fn bytes_len(&self) -> usize {
        self.buf.len()
    }

    /// The receipts, decoded (for tests and tools; the server only appends).
    pub fn decoded(&self) -> Result<Vec<v1::ItemReceipt>, DecodeError> {
        // The entries are field 2 of a `SubmitResponse`, and nothing else.
        v1::SubmitResponse::decode(&self.buf[..]).map(|r| r.items)
    }

    /// Decodes one entry (its length-delimited body) from `buf` and keeps it as sent.
    fn merge(&mut self, buf: &mut impl Buf) -> Result<(), DecodeError> {
        let mut r = v1::ItemReceipt::default();
        encoding::message::merge(
            WireType::LengthDelimited,
            &mut r,
            buf,
            DecodeContext::default(),
        )?;
        self.push(&r);
        Ok(())
    }
}

/// [`v1::SubmitResponse`] with its `results` (field 3) pre-encoded; same wire bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct SubmitResponseOut {
    pub batch_id: u64,
    pub items: EncodedReceipts,
    pub results: EncodedResults,
    pub counts: Option<v1::StateCounts>,
    pub first_item_id: u64,
    pub item_count: u64,
    pub queued_count: u64,
    pub duplicates: Vec<v1::DuplicateItem>,
}

impl Default for SubmitResponseOut {
    fn default() -> Self {
        SubmitResponseOut {
            batch_id: 0,
            items: EncodedReceipts::default(),
            results: EncodedResults::new(3),
            counts: None,
            first_item_id: 0,
            item_count: 0,
            queued_count: 0,
            duplicates: Vec::new(),
        }
    }
}

impl SubmitResponseOut {
    /// Fields 5–7 with their numbers, in order: the batch's shape, whatever the receipts mode.
    fn tail(&self) -> [(u32, u64); 3] {
        [
            (5, self.first_item_id),
            (6, self.item_count),
            (7, self.queued_count),
        ]
    }
}

impl Message for SubmitResponseOut {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if self.batch_id != 0 {
            encoding::uint64::encode(1, &self.batch_id, buf);
        }
        buf.put_slice(&self.items.buf);
        buf.put_slice(&self.results.buf);
        if let Some(c) = &self.counts {
            encoding::message::encode(4, c, buf);
        }
        for (tag, v) in self.tail() {
            if v != 0 {
                encoding::uint64::encode(tag, &v, buf);
            }
        }
        encoding::message::encode_repeated(8, &self.duplicates, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => encoding::uint64::merge(wire_type, &mut self.batch_id, buf, ctx),
            2 => {
                encoding::check_wire_type(WireType::LengthDelimited, wire_type)?;
                self.items.merge(buf)
            }
            3 => {
                encoding::check_wire_type(WireType::LengthDelimited, wire_type)?;
                self.results.merge(buf)
            }
            4 => encoding::message::merge(
                wire_type,
                self.counts.get_or_insert_with(Default::default),
                buf,
                ctx,
            ),
            5 => encoding::uint64::merge(wire_type, &mut self.first_item_id, buf, ctx),
            6 => encoding::uint64::merge(wire_type, &mut self.item_count, buf, ctx),
            7 => encoding::uint64::merge(wire_type, &mut self.queued_count, buf, ctx),
            8 => encoding::message::merge_repeated(wire_type, &mut self.duplicates, buf, ctx),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let tail: usize = self
            .tail()
            .into_iter()
            .filter(|&(_, v)| v != 0)
            .map(|(tag, v)| encoding::uint64::encoded_len(tag, &v))
            .sum();
        let batch = if self.batch_id != 0 {
            encoding::uint64::encoded_len(1, &self.batch_id)
        } else {
            0
        };
        batch
            + self.items.bytes_len()
            + self.results.bytes_len()
            + self
                .counts
                .as_ref()
                .map_or(0, |c| encoding::message::encoded_len(4, c))
            + tail
            + encoding::message::encoded_len_repeated(8, &self.duplicates)
    }

    fn clear(&mut self) {
        *self = SubmitResponseOut::default();
    }
}

/// [`v1::FlushResponse`] with the results of its `results` event pre-encoded; same wire bytes.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FlushResponseOut {
    pub event: Option<FlushEventOut>,
}

/// The `event` oneof of [`FlushResponseOut`].
#[derive(Debug, Clone, PartialEq)]
pub enum FlushEventOut {
    /// Field 1, `ItemResults`: its `results` (field 1 of `ItemResults`) pre-encoded.
    Results(EncodedResults),
    /// Field 2.
    Summary(v1::FlushSummary),
}

impl Message for FlushResponseOut {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match &self.event {
            None => {}
            Some(FlushEventOut::Results(r)) => {
                encode_key(1, WireType::LengthDelimited, buf);
                encode_varint(r.bytes_len() as u64, buf);
                buf.put_slice(&r.buf);
            }
            Some(FlushEventOut::Summary(s)) => encoding::message::encode(2, s, buf),
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => {
                // An `ItemResults` message: decoded as the stock type, then re-encoded.
                let mut m = v1::ItemResults::default();
                encoding::message::merge(wire_type, &mut m, buf, ctx)?;
                let mut r = match self.event.take() {
                    Some(FlushEventOut::Results(r)) => r,
                    _ => EncodedResults::new(1),
                };
                for x in &m.results {
                    r.push(&x.encode_to_vec());
                }
                self.event = Some(FlushEventOut::Results(r));
                Ok(())
            }
            2 => {
                let mut s = match self.event.take() {
                    Some(FlushEventOut::Summary(s)) => s,
                    _ => v1::FlushSummary::default(),
                };
                encoding::message::merge(wire_type, &mut s, buf, ctx)?;
                self.event = Some(FlushEventOut::Summary(s));
                Ok(())
            }
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        match &self.event {
            None => 0,
            Some(FlushEventOut::Results(r)) => {
                key_len(1) + encoded_len_varint(r.bytes_len() as u64) + r.bytes_len()
            }
            Some(FlushEventOut::Summary(s)) => encoding::message::encoded_len(2, s),
        }
    }

    fn clear(&mut self) {
        self.event = None;
    }
}

/// [`v1::SessionResponse`] with its `submitted` outcome a [`SubmitResponseOut`]; same wire
/// bytes.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SessionResponseOut {
    /// Field 1.
    pub tag: u64,
    pub outcome: Option<SessionOutcomeOut>,
}

/// The `outcome` oneof of [`SessionResponseOut`].
#[derive(Debug, Clone, PartialEq)]
pub enum SessionOutcomeOut {
    /// Field 2.
    Submitted(SubmitResponseOut),
    /// Field 3.
    Error(v1::SessionError),
}

impl Message for SessionResponseOut {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if self.tag != 0 {
            encoding::uint64::encode(1, &self.tag, buf);
        }
        match &self.outcome {
            None => {}
            Some(SessionOutcomeOut::Submitted(r)) => encoding::message::encode(2, r, buf),
            Some(SessionOutcomeOut::Error(e)) => encoding::message::encode(3, e, buf),
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => encoding::uint64::merge(wire_type, &mut self.tag, buf, ctx),
            2 => {
                let mut r = match self.outcome.take() {
                    Some(SessionOutcomeOut::Submitted(r)) => r,
                    _ => SubmitResponseOut::default(),
                };
                encoding::message::merge(wire_type, &mut r, buf, ctx)?;
                self.outcome = Some(SessionOutcomeOut::Submitted(r));
                Ok(())
            }
            3 => {
                let mut e = match self.outcome.take() {
                    Some(SessionOutcomeOut::Error(e)) => e,
                    _ => v1::SessionError::default(),
                };
                encoding::message::merge(wire_type, &mut e, buf, ctx)?;
                self.outcome = Some(SessionOutcomeOut::Error(e));
                Ok(())
            }
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let tag = if self.tag != 0 {
            encoding::uint64::encoded_len(1, &self.tag)
        } else {
            0
        };
        tag + match &self.outcome {
            None => 0,
            Some(SessionOutcomeOut::Submitted(r)) => encoding::message::encoded_len(2, r),
            Some(SessionOutcomeOut::Error(e)) => encoding::message::encoded_len(3, e),
        }
    }

    fn clear(&mut self) {
        *self = SessionResponseOut::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(id: u64) -> v1::ItemResult {
        v1::ItemResult {
            item_id: id,
            batch_id: 2,
            workqueue: "default".into(),
            output: b"out".to_vec(),
            handler: "noop".into(),
            queued_at: Some(prost_types::Timestamp {
                seconds: 5,
                nanos: 6,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn submit_response_is_the_stock_encoding() {
        let receipts = vec![
            v1::ItemReceipt {
                item_id: 1,
                queued: true,
                ..Default::default()
            },
            v1::ItemReceipt {
                duplicate_of: 1,
                ..Default::default()
            },
            v1::ItemReceipt {
                item_id: 300,
                queued: true,
                target: "cache:3".into(),
                source_index: Some(0),
                ..Default::default()
            },
        ];
        let stock = v1::SubmitResponse {
            batch_id: 9,
            items: receipts,
            results: vec![result(1), result(2)],
            counts: Some(v1::StateCounts {
                ok: 2,
                ..Default::default()
            }),
            first_item_id: 1,
            item_count: 3,
            queued_count: 2,
            duplicates: Vec::new(),
        };
        let mut items = EncodedReceipts::default();
        items.push_queued(1);
        items.push(&stock.items[1]);
        items.push(&stock.items[2]);
        let mut out = SubmitResponseOut {
            batch_id: 9,
            items,
            counts: stock.counts,
            first_item_id: 1,
            item_count: 3,
            queued_count: 2,
            ..Default::default()
        };
        for r in &stock.results {
            out.results.push(&r.encode_to_vec());
        }
        let bytes = out.encode_to_vec();
        assert_eq!(bytes, stock.encode_to_vec());
        assert_eq!(out.encoded_len(), bytes.len());
        assert_eq!(SubmitResponseOut::decode(&bytes[..]).ok(), Some(out));
        let empty = SubmitResponseOut::default();
        assert_eq!(
            empty.encode_to_vec(),
            v1::SubmitResponse::default().encode_to_vec()
        );
        // Without receipts (`RECEIPTS_MODE_NONE`): the batch's shape alone, ids of any length.
        let duplicates = vec![
            v1::DuplicateItem {
                index: 0,
                duplicate_of: 3,
            },
            v1::DuplicateItem {
                index: 1 << 35,
                duplicate_of: u64::MAX,
            },
        ];
        let bare = v1::SubmitResponse {
            batch_id: 9,
            first_item_id: u64::MAX - 5,
            item_count: 1 << 40,
            queued_count: 127,
            duplicates: duplicates.clone(),
            ..Default::default()
        };
        let out = SubmitResponseOut {
            batch_id: 9,
            first_item_id: u64::MAX - 5,
            item_count: 1 << 40,
            queued_count: 127,
            duplicates,
            ..Default::default()
        };
        let bytes = out.encode_to_vec();
        assert_eq!(bytes, bare.encode_to_vec());
        assert_eq!(out.encoded_len(), bytes.len());
        assert_eq!(SubmitResponseOut::decode(&bytes[..]).ok(), Some(out));
    }

    #[test]
    fn a_plain_receipt_is_prosts_bytes_for_every_id_length() {
        // Every varint length of an id (1 to 10 bytes), and the id 0 prost leaves out.
        let ids: Vec<u64> = std::iter::once(0)
            .chain((0..64).map(|b| 1u64 << b))
            .chain((1..64).map(|b| (1u64 << b) - 1))
            .chain([u64::MAX])
            .collect();
        let mut fast = EncodedReceipts::with_capacity(ids.len());
        let mut stock = Vec::new();
        for &id in &ids {
            fast.push_queued(id);
            stock.push(v1::ItemReceipt {
                item_id: id,
                queued: true,
                ..Default::default()
            });
        }
        let stock = v1::SubmitResponse {
            items: stock,
            ..Default::default()
        };
        let out = SubmitResponseOut {
            items: fast.clone(),
            ..Default::default()
        };
        assert_eq!(out.encode_to_vec(), stock.encode_to_vec());
        assert_eq!(fast.len(), ids.len());
        assert_eq!(fast.decoded().ok(), Some(stock.items));
    }

    #[test]
    fn session_response_is_the_stock_encoding() {
        let submitted = v1::SubmitResponse {
            batch_id: 3,
            items: vec![v1::ItemReceipt {
                item_id: 7,
                queued: true,
                ..Default::default()
            }],
            results: vec![result(7)],
            counts: Some(v1::StateCounts {
                ok: 1,
                ..Default::default()
            }),
            first_item_id: 7,
            item_count: 1,
            queued_count: 1,
            duplicates: Vec::new(),
        };
        let mut items = EncodedReceipts::default();
        items.push_queued(7);
        let mut out = SubmitResponseOut {
            batch_id: 3,
            items,
            counts: submitted.counts,
            first_item_id: 7,
            item_count: 1,
            queued_count: 1,
            ..Default::default()
        };
        out.results.push(&result(7).encode_to_vec());
        let error = v1::SessionError {
            code: 4,
            message: "waiting for batch 9: ...".into(),
            batch_id: 9,
        };
        use v1::session_response::Outcome;
        for (tag, stock, ours) in [
            (
                9,
                Some(Outcome::Submitted(submitted)),
                Some(SessionOutcomeOut::Submitted(out)),
            ),
            (
                0,
                Some(Outcome::Error(error.clone())),
                Some(SessionOutcomeOut::Error(error)),
            ),
            (1, None, None),
        ] {
            let stock = v1::SessionResponse {
                tag,
                outcome: stock,
            };
            let ours = SessionResponseOut { tag, outcome: ours };
            let bytes = ours.encode_to_vec();
            assert_eq!(bytes, stock.encode_to_vec());
            assert_eq!(ours.encoded_len(), bytes.len());
            assert_eq!(SessionResponseOut::decode(&bytes[..]).ok(), Some(ours));
        }
    }

    #[test]
    fn flush_response_is_the_stock_encoding() {
        use v1::flush_response::Event;
        let stock = v1::FlushResponse {
            event: Some(Event::Results(v1::ItemResults {
                results: vec![result(3), result(4)],
            })),
        };
        let mut r = EncodedResults::new(1);
        for x in [result(3), result(4)] {
            r.push(&x.encode_to_vec());
        }
        let out = FlushResponseOut {
            event: Some(FlushEventOut::Results(r)),
        };
        let bytes = out.encode_to_vec();
        assert_eq!(bytes, stock.encode_to_vec());
        assert_eq!(out.encoded_len(), bytes.len());
        assert_eq!(FlushResponseOut::decode(&bytes[..]).ok(), Some(out));
        let summary = v1::FlushSummary {
            items_covered: 3,
            unknown_item_ids: vec![7],
            ..Default::default()
        };
        let stock = v1::FlushResponse {
            event: Some(Event::Summary(summary.clone())),
        };
        let out = FlushResponseOut {
            event: Some(FlushEventOut::Summary(summary)),
        };
        assert_eq!(out.encode_to_vec(), stock.encode_to_vec());
    }
}
