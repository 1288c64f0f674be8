//! The server's side of `SubmitRequest`: its items decoded as runs of identical items.
//!
//! A client submitting N copies of one item (the common "N of this on that group", or
//! `wqctl submit --count N`) sends N identical `WorkItem` encodings. Decoding each into its own
//! `WorkItem` (two `String`s, a map, a `Vec`) and checking and converting each was most of what
//! the daemon spent per item. [`SubmitRequestIn`] compares each item's bytes with the previous
//! item's and, when they are the same, counts one more copy instead of decoding them again;
//! the daemon then checks and converts a run once.
//!
//! Invariant: the items, expanded (each run's item repeated its count), are exactly what prost
//! decodes from the same bytes into the stock [`v1::SubmitRequest`], in order: equal bytes
//! decode to equal items, and an item whose bytes differ is decoded by prost itself. A
//! message the stock type refuses, this refuses too. Only the daemon's generated
//! `DispatchService` server uses this type (see `build.rs`); clients keep the stock one.

use prost::bytes::{Buf, BufMut};
use prost::encoding::{self, decode_varint, DecodeContext, WireType};
use prost::{DecodeError, Message};

use crate::v1;

/// [`v1::SubmitRequest`] with its items as runs (see the module docs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubmitRequestIn {
    /// Field 1.
    pub workqueue: String,
    /// Field 2, as (item, number of consecutive identical copies), in order; no count is 0.
    pub items: Vec<(v1::WorkItem, usize)>,
    /// Field 3.
    pub wait: bool,
    /// Field 4, the `ReceiptsMode` as sent (an unknown value is the daemon's to refuse).
    pub receipts: i32,
    /// The record of the last item decoded — field 2's key, its length, its bytes — and where
    /// its bytes begin in it, when they were seen whole (decoding state; an item that follows
    /// with the same bytes is one more copy of it).
    last: Option<(Vec<u8>, usize)>,
}

/// Field 2's key (length-delimited), as one byte.
const ITEM_KEY: u8 = (2 << 3) | 2;

impl SubmitRequestIn {
    /// Items in the request, copies counted.
    pub fn item_count(&self) -> usize {
        self.items.iter().map(|(_, n)| n).sum()
    }

    /// The stock message with the same content (runs expanded).
    pub fn into_stock(self) -> v1::SubmitRequest {
        v1::SubmitRequest {
            workqueue: self.workqueue,
            items: self
                .items
                .into_iter()
                .flat_map(|(it, n)| std::iter::repeat_n(it, n))
                .collect(),
            wait: self.wait,
            receipts: self.receipts,
        }
    }

    fn merge_item(&mut self, buf: &mut impl Buf, ctx: DecodeContext) -> Result<(), DecodeError> {
        // Peek at the item's length and bytes in the buffer's current chunk; when the chunk
        // does not hold them whole (a body split across frames), decode as prost does.
        let chunk = buf.chunk();
        let mut peek = chunk;
        let mut raw = None;
        if let Ok(len) = decode_varint(&mut peek) {
            let head = chunk.len() - peek.len();
            if let Some(body) = usize::try_from(len).ok().and_then(|l| peek.get(..l)) {
                if let (Some((_, n)), Some((last, at))) = (self.items.last_mut(), &self.last) {
                    if last.get(*at..) == Some(body) {
                        buf.advance(head + body.len());
                        *n += 1;
                        self.take_copies(buf);
                        return Ok(());
                    }
                }
                // Its record as a copy that follows it would repeat it: key, length, bytes.
                let mut rec = Vec::with_capacity(1 + head + body.len());
                rec.push(ITEM_KEY);
                rec.extend_from_slice(&chunk[..head + body.len()]);
                raw = Some((rec, 1 + head));
            }
        }
        let mut item = v1::WorkItem::default();
        encoding::message::merge(WireType::LengthDelimited, &mut item, buf, ctx)?;
        self.items.push((item, 1));
        self.last = raw;
        self.take_copies(buf);
        Ok(())
    }

    /// Counts the records right after the last item that repeat its record byte for byte
    /// (key, length and bytes) as more copies of it, and skips them: one comparison per copy
    /// instead of one trip through prost's field loop. Only whole records within the
    /// buffer's current chunk; anything else is left to the field loop.
    fn take_copies(&mut self, buf: &mut impl Buf) {
        let (Some((_, n)), Some((rec, _))) = (self.items.last_mut(), &self.last) else {
            return;
        };
        let chunk = buf.chunk();
        let copies = chunk
            .chunks_exact(rec.len())
            .take_while(|c| c == rec)
            .count();
        if copies > 0 {
            *n += copies;
            buf.advance(copies * rec.len());
        }
    }
}

impl Message for SubmitRequestIn {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if !self.workqueue.is_empty() {
            encoding::string::encode(1, &self.workqueue, buf);
        }
        for (it, n) in &self.items {
            for _ in 0..*n {
                encoding::message::encode(2, it, buf);
            }
        }
        if self.wait {
            encoding::bool::encode(3, &self.wait, buf);
        }
        if self.receipts != 0 {
            encoding::int32::encode(4, &self.receipts, buf);
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
            1 => encoding::string::merge(wire_type, &mut self.workqueue, buf, ctx),
            2 => {
                encoding::check_wire_type(WireType::LengthDelimited, wire_type)?;
                self.merge_item(buf, ctx)
            }
            3 => encoding::bool::merge(wire_type, &mut self.wait, buf, ctx),
            4 => encoding::int32::merge(wire_type, &mut self.receipts, buf, ctx),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let wq = if self.workqueue.is_empty() {
            0
        } else {
            encoding::string::encoded_len(1, &self.workqueue)
        };
        let items: usize = self
            .items
            .iter()
            .map(|(it, n)| encoding::message::encoded_len(2, it) * n)
            .sum();
        let wait = if self.wait {
            encoding::bool::encoded_len(3, &self.wait)
        } else {
            0
        };
        let receipts = if self.receipts != 0 {
            encoding::int32::encoded_len(4, &self.receipts)
        } else {
            0
        };
        wq + items + wait + receipts
    }

    fn clear(&mut self) {
        *self = SubmitRequestIn::default();
    }
}

/// [`v1::SessionRequest`] with its batch as a [`SubmitRequestIn`].
///
/// The batch's bytes are cut out of the message before they are decoded, so that
/// [`SubmitRequestIn`]'s look-ahead (which compares the bytes that follow an item with it)
/// sees only the batch's own bytes, whatever follows it in the session message.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionRequestIn {
    /// Field 1.
    pub tag: u64,
    /// Field 2.
    pub submit: Option<SubmitRequestIn>,
    /// Field 3, as the stock type decodes it.
    pub wait_timeout: Option<prost_types::Duration>,
}

impl Message for SessionRequestIn {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if self.tag != 0 {
            encoding::uint64::encode(1, &self.tag, buf);
        }
        if let Some(s) = &self.submit {
            encoding::message::encode(2, s, buf);
        }
        if let Some(d) = &self.wait_timeout {
            encoding::message::encode(3, d, buf);
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
                let mut body = prost::bytes::Bytes::new();
                encoding::bytes::merge(wire_type, &mut body, buf, ctx)?;
                // A second occurrence of the field merges into the first, as prost does.
                self.submit.get_or_insert_with(Default::default).merge(body)
            }
            3 => encoding::message::merge(
                wire_type,
                self.wait_timeout.get_or_insert_with(Default::default),
                buf,
                ctx,
            ),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let tag = if self.tag != 0 {
            encoding::uint64::encoded_len(1, &self.tag)
        } else {
            0
        };
        tag + self
            .submit
            .as_ref()
            .map_or(0, |s| encoding::message::encoded_len(2, s))
            + self
                .wait_timeout
                .as_ref()
                .map_or(0, |d| encoding::message::encoded_len(3, d))
    }

    fn clear(&mut self) {
        *self = SessionRequestIn::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn item(
        target: &str,
        handler: &str,
        arg: Option<(&str, &str)>,
        payload: &[u8],
    ) -> v1::WorkItem {
        v1::WorkItem {
            target: target.into(),
            handler: handler.into(),
            args: arg
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            payload: payload.to_vec(),
            ..Default::default()
        }
    }

    /// A buffer that hands out its bytes in chunks of `step`, as a body split across frames.
    struct Chunked<'a> {
        bytes: &'a [u8],
        step: usize,
    }

    impl Buf for Chunked<'_> {
        fn remaining(&self) -> usize {
            self.bytes.len()
        }
        fn chunk(&self) -> &[u8] {
            &self.bytes[..self.step.min(self.bytes.len())]
        }
        fn advance(&mut self, n: usize) {
            self.bytes = &self.bytes[n..];
        }
    }

    proptest! {
        /// Any sequence of items, runs or not, in one buffer or split in small chunks, decodes
        /// to what the stock type decodes, and the runs merge exactly the equal neighbours.
        #[test]
        fn runs_expand_to_the_stock_decoding(
            picks in proptest::collection::vec(0usize..5, 0..40),
            step in 1usize..64,
            wait: bool,
            receipts in 0i32..4,
        ) {
            let pool = [
                item("cpu:0", "noop", None, b""),
                item("cpu:1", "noop", None, b""),
                item("cpu:0", "noop", Some(("k", "v")), b""),
                item("cpu:0", "noop", None, b"x"),
                item("each:cache", "sleep", Some(("ms", "1")), b"payload"),
            ];
            let stock = v1::SubmitRequest {
                workqueue: "wq".into(),
                items: picks.iter().map(|&i| pool[i].clone()).collect(),
                wait,
                receipts,
            };
            let bytes = stock.encode_to_vec();
            let whole = SubmitRequestIn::decode(bytes.as_slice()).unwrap();
            let split = SubmitRequestIn::decode(Chunked { bytes: &bytes, step }).unwrap();
            let mut runs = 0;
            for w in picks.windows(2) {
                runs += usize::from(w[0] != w[1]);
            }
            prop_assert_eq!(whole.items.len(), if picks.is_empty() { 0 } else { runs + 1 });
            prop_assert_eq!(whole.item_count(), picks.len());
            prop_assert_eq!(whole.encode_to_vec(), bytes.clone());
            prop_assert_eq!(whole.into_stock(), stock.clone());
            prop_assert_eq!(split.into_stock(), stock);
        }
    }

    /// Copies whose key or length is encoded differently (valid, not minimal) still count as
    /// copies of the item before them when their bytes are equal, and decode as the stock
    /// type decodes them; the byte-for-byte run that follows is counted too.
    #[test]
    fn copies_encoded_differently_still_merge() {
        let one = item("cpu:1", "noop", None, b"");
        let body = one.encode_to_vec();
        let len = u8::try_from(body.len()).unwrap();
        assert!(len < 0x80);
        let mut bytes = Vec::new();
        // The item, then a copy with a two-byte length, one with a two-byte key, then three
        // plain copies.
        for head in [
            vec![ITEM_KEY, len],
            vec![ITEM_KEY, 0x80 | len, 0],
            vec![0x80 | ITEM_KEY, 0, len],
            vec![ITEM_KEY, len],
            vec![ITEM_KEY, len],
            vec![ITEM_KEY, len],
        ] {
            bytes.extend_from_slice(&head);
            bytes.extend_from_slice(&body);
        }
        let ours = SubmitRequestIn::decode(bytes.as_slice()).unwrap();
        assert_eq!(ours.items.len(), 1, "one run: {:?}", ours.items);
        assert_eq!(ours.item_count(), 6);
        let stock = v1::SubmitRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(ours.into_stock(), stock);
    }

    /// A session request decodes as the stock type, even when its batch is followed by bytes
    /// that repeat the batch's last item record byte for byte: here a second `submit` field
    /// (which protobuf merges into the first) whose bytes are at once a valid `WorkItem` and
    /// a valid `SubmitRequest`. Decoded without cutting the batch out first, the look-ahead
    /// would count it as a third copy of the item.
    #[test]
    fn a_session_request_decodes_as_the_stock_type() {
        let x = item("cpu:0", "", None, b"");
        let body = x.encode_to_vec();
        let batch = v1::SubmitRequest {
            workqueue: String::new(),
            items: vec![x.clone(), x.clone()],
            wait: true,
            receipts: 0,
        };
        let plain = v1::SessionRequest {
            tag: 42,
            submit: Some(batch.clone()),
            wait_timeout: Some(prost_types::Duration {
                seconds: 3,
                nanos: 500,
            }),
        };
        let check = |bytes: &[u8]| {
            let stock = v1::SessionRequest::decode(bytes).unwrap();
            let ours = SessionRequestIn::decode(bytes).unwrap();
            assert_eq!(ours.tag, stock.tag);
            assert_eq!(ours.wait_timeout, stock.wait_timeout);
            assert_eq!(ours.submit.map(SubmitRequestIn::into_stock), stock.submit);
        };
        let bytes = plain.encode_to_vec();
        check(&bytes);
        assert_eq!(
            SessionRequestIn::decode(bytes.as_slice())
                .unwrap()
                .encode_to_vec(),
            bytes
        );
        // The batch without `wait` (so that its last record is the item's), then a second
        // `submit` whose bytes are the item's record's.
        let mut tricky = v1::SessionRequest {
            tag: 0,
            submit: Some(v1::SubmitRequest {
                wait: false,
                ..batch
            }),
            wait_timeout: None,
        }
        .encode_to_vec();
        tricky.push(ITEM_KEY);
        tricky.push(u8::try_from(body.len()).unwrap());
        tricky.extend_from_slice(&body);
        let stock = v1::SessionRequest::decode(tricky.as_slice()).unwrap();
        assert_eq!(stock.submit.as_ref().unwrap().items.len(), 2);
        assert_eq!(stock.submit.as_ref().unwrap().workqueue, "cpu:0");
        check(&tricky);
        // No batch at all, and a truncated one.
        check(
            &v1::SessionRequest {
                tag: 1,
                submit: None,
                wait_timeout: None,
            }
            .encode_to_vec(),
        );
        for cut in 0..bytes.len() {
            assert_eq!(
                SessionRequestIn::decode(&bytes[..cut]).is_ok(),
                v1::SessionRequest::decode(&bytes[..cut]).is_ok(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_truncated_or_garbled_item_is_refused_as_the_stock_type_refuses_it() {
        let stock = v1::SubmitRequest {
            workqueue: String::new(),
            items: vec![item("cpu:0", "noop", None, b""); 3],
            wait: false,
            receipts: 0,
        };
        let bytes = stock.encode_to_vec();
        for cut in 0..bytes.len() {
            let ours = SubmitRequestIn::decode(&bytes[..cut]).map(SubmitRequestIn::into_stock);
            let theirs = v1::SubmitRequest::decode(&bytes[..cut]);
            assert_eq!(ours.is_ok(), theirs.is_ok(), "cut at {cut}");
            if let (Ok(a), Ok(b)) = (ours, theirs) {
                assert_eq!(a, b);
            }
        }
        // A string that is not UTF-8 inside the second (different) item.
        let mut bad = v1::SubmitRequest {
            workqueue: String::new(),
            items: vec![
                item("cpu:0", "noop", None, b""),
                item("cpu:1", "noop", None, b""),
            ],
            wait: false,
            receipts: 0,
        }
        .encode_to_vec();
        let at = bad.iter().rposition(|&b| b == b'1').unwrap();
        bad[at] = 0xff;
        assert!(v1::SubmitRequest::decode(bad.as_slice()).is_err());
        assert!(SubmitRequestIn::decode(bad.as_slice()).is_err());
    }
}
