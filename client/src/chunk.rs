//! Splitting a batch of any size into `SubmitStreamRequest` messages that each stay under a
//! byte budget, for the client-streaming `SubmitStream` call.
//!
//! Invariants: the first message always carries the options (even for an empty batch, so
//! the daemon sees the workqueue and answers for itself), later ones never do; the last one,
//! and only it, sets `commit` (the daemon accepts the batch on it, never on a bare end of
//! stream); items keep their order; every message but one holding a single oversized item encodes to at most
//! the budget. Items are pulled lazily, so a million-item batch is never all in memory.

use prost::Message;
use wqd_proto::v1::{
    DuplicateItem, ItemReceipt, SubmitOptions, SubmitStreamRequest, SubmitStreamResponse, WorkItem,
};

/// Default encoded size of one stream message: well under gRPC's usual 4 MiB limit.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;

/// Lazily turns an item iterator into stream messages of at most `budget` encoded bytes.
pub struct Chunker<I> {
    items: I,
    options: Option<SubmitOptions>,
    budget: usize,
    carry: Option<WorkItem>,
    /// The message with `commit` was produced.
    done: bool,
}

impl<I: Iterator<Item = WorkItem>> Chunker<I> {
    /// Chunks `items` for a batch with `options`, each message at most `budget` bytes.
    pub fn new(items: I, options: SubmitOptions, budget: usize) -> Self {
        Chunker {
            items,
            options: Some(options),
            budget: budget.max(1),
            carry: None,
            done: false,
        }
    }
}

/// Encoded size of `item` as one element of the repeated `items` field (tag + length + body).
fn framed_len(item: &WorkItem) -> usize {
    let len = item.encoded_len();
    1 + prost::length_delimiter_len(len) + len
}

impl<I: Iterator<Item = WorkItem>> Iterator for Chunker<I> {
    type Item = SubmitStreamRequest;

    fn next(&mut self) -> Option<SubmitStreamRequest> {
        if self.done {
            return None;
        }
        let mut msg = SubmitStreamRequest {
            options: self.options.take(),
            items: Vec::new(),
            commit: false,
        };
        let mut size = msg.encoded_len();
        while let Some(item) = self.carry.take().or_else(|| self.items.next()) {
            let framed = framed_len(&item);
            if !msg.items.is_empty() && size + framed > self.budget {
                self.carry = Some(item);
                break;
            }
            size += framed;
            msg.items.push(item);
        }
        // The last message commits the batch: without it the daemon queues nothing, which is
        // what makes a reset stream safe. Look ahead one item to know.
        if self.carry.is_none() {
            self.carry = self.items.next();
        }
        if self.carry.is_none() {
            msg.commit = true;
            self.done = true;
        }
        Some(msg)
    }
}

/// Expands the compact receipt of a streamed batch into one [`ItemReceipt`] per item, in
/// stream order — the same shape `Submit` returns.
pub fn stream_receipts(resp: &SubmitStreamResponse) -> Vec<ItemReceipt> {
    shape_receipts(resp.first_item_id, resp.item_count, &resp.duplicates)
}

/// One [`ItemReceipt`] per item of a batch known by its shape: item `i` queued as
/// `first_item_id + i` unless `duplicates` (in index order) names it. A `SubmitStream`'s
/// answer, and a `Submit`'s without receipts (`Batch::receipts(false)`), which lack only the
/// groups `each:` items were expanded to.
pub fn shape_receipts(
    first_item_id: u64,
    item_count: u64,
    duplicates: &[DuplicateItem],
) -> Vec<ItemReceipt> {
    let mut dups = duplicates.iter().peekable();
    (0..item_count)
        .map(|i| match dups.peek() {
            Some(d) if d.index == i => {
                let r = ItemReceipt {
                    item_id: 0,
                    queued: false,
                    duplicate_of: d.duplicate_of,
                    ..Default::default()
                };
                dups.next();
                r
            }
            _ => ItemReceipt {
                item_id: first_item_id + i,
                queued: true,
                duplicate_of: 0,
                ..Default::default()
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use wqd_proto::v1::DuplicateItem;

    fn item(n: usize) -> WorkItem {
        WorkItem {
            target: "cache:0".into(),
            handler: "noop".into(),
            payload: vec![0u8; n],
            ..Default::default()
        }
    }

    fn opts() -> SubmitOptions {
        SubmitOptions {
            workqueue: "w".into(),
        }
    }

    #[test]
    fn chunks_stay_under_budget_and_keep_order() {
        let items: Vec<_> = (0..1000).map(|i| item(i % 50)).collect();
        let msgs: Vec<_> = Chunker::new(items.clone().into_iter(), opts(), 4096).collect();
        assert!(msgs.len() > 1);
        assert!(msgs[0].options.is_some());
        assert!(msgs[1..].iter().all(|m| m.options.is_none()));
        let commits: Vec<bool> = msgs.iter().map(|m| m.commit).collect();
        assert!(
            commits[..commits.len() - 1].iter().all(|c| !c),
            "{commits:?}"
        );
        assert!(commits[commits.len() - 1], "the last message commits");
        for m in &msgs {
            assert!(m.encoded_len() <= 4096, "{}", m.encoded_len());
            assert!(!m.items.is_empty());
        }
        let back: Vec<_> = msgs.into_iter().flat_map(|m| m.items).collect();
        assert_eq!(back, items);
    }

    #[test]
    fn empty_batch_still_sends_options() {
        let msgs: Vec<_> = Chunker::new(std::iter::empty(), opts(), 100).collect();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].options, Some(opts()));
        assert!(msgs[0].items.is_empty());
        assert!(msgs[0].commit);
    }

    #[test]
    fn oversized_item_goes_alone() {
        let items = vec![item(10), item(10_000), item(10)];
        let msgs: Vec<_> = Chunker::new(items.into_iter(), opts(), 1000).collect();
        let sizes: Vec<_> = msgs.iter().map(|m| m.items.len()).collect();
        assert_eq!(sizes, vec![1, 1, 1]);
    }

    #[test]
    fn exact_budget_is_respected() {
        // Every message must be <= budget even when items fit exactly.
        let one = framed_len(&item(10));
        let header = SubmitStreamRequest {
            options: Some(opts()),
            items: vec![],
            commit: true,
        }
        .encoded_len();
        let budget = header + 3 * one;
        let msgs: Vec<_> = Chunker::new((0..7).map(|_| item(10)), opts(), budget).collect();
        assert_eq!(msgs[0].items.len(), 3);
        assert!(msgs.iter().all(|m| m.encoded_len() <= budget));
        assert_eq!(msgs.iter().map(|m| m.items.len()).sum::<usize>(), 7);
    }

    #[test]
    fn receipts_expand_the_id_range() {
        let resp = SubmitStreamResponse {
            batch_id: 1,
            first_item_id: 100,
            item_count: 4,
            queued_count: 3,
            duplicates: vec![DuplicateItem {
                index: 2,
                duplicate_of: 7,
            }],
        };
        let r = stream_receipts(&resp);
        let ids: Vec<_> = r
            .iter()
            .map(|x| (x.item_id, x.queued, x.duplicate_of))
            .collect();
        assert_eq!(
            ids,
            vec![
                (100, true, 0),
                (101, true, 0),
                (0, false, 7),
                (103, true, 0)
            ]
        );
    }
}
