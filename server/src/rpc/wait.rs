//! `Submit(wait)`'s answer, put together while its batch runs: the counts by state, and the
//! full results, which an at-end flush hands over in parts (`Flush::next_delivered`, a part
//! every few hundred items), encoded in entry order as soon as every entry before them is in.
//! The encoding of the first parts thus overlaps the items still running, and only the last
//! part is left when the last item ends.
//!
//! Invariant: each queued entry's full result is encoded at most once, and entries are
//! encoded in entry order whatever order the parts come in: the bytes are those of encoding
//! every delivered result in entry order after the last one.

use wqd_core::engine::{Delivered, FlushEvent, ItemId, ResultRecord, Submitted};
use wqd_proto::out::EncodedResults;
use wqd_proto::v1;

use super::convert::count_state;
use super::encode::ResultEncoder;

/// Encoded bytes of a `noop` item's result, about (key and length included): what the
/// results reserve per entry once the first full result comes.
const NOOP_RESULT_BYTES: usize = 96;

/// An entry whose result has not come (yet).
const WAITING: u64 = u64::MAX;
/// An entry that ended without a full result (its event says only its state, or its result
/// was forgotten before the wait began).
const NONE: u64 = u64::MAX - 1;

/// Where a delivered full result is: part 0 is the events, part `p` the `p`th list of
/// records (from 1), and `at` the index in it.
fn loc(part: usize, at: usize) -> u64 {
    ((part as u64) << 32) | at as u64
}

/// The batch's full results and counts as they come (see the module's comment).
pub(super) struct InOrder<'r> {
    entries: &'r [Submitted],
    first: ItemId,
    /// Entries before it are encoded, or have nothing to encode.
    next: usize,
    /// Per entry, where its full result is ([`loc`]), [`WAITING`] or [`NONE`]; empty until
    /// the first full result comes (a batch whose workqueue keeps none never fills it).
    slots: Vec<u64>,
    events: Vec<FlushEvent>,
    parts: Vec<Vec<ResultRecord>>,
    enc: ResultEncoder,
    counts: v1::StateCounts,
    out: EncodedResults,
}

impl<'r> InOrder<'r> {
    /// For a batch whose entry `i` has id `first + i`; `out` takes the results.
    pub(super) fn new(entries: &'r [Submitted], first: ItemId, out: EncodedResults) -> Self {
        InOrder {
            entries,
            first,
            next: 0,
            slots: Vec::new(),
            events: Vec::new(),
            parts: Vec::new(),
            enc: ResultEncoder::default(),
            counts: v1::StateCounts::default(),
            out,
        }
    }

    /// The entry of item `id`, if it is one of this batch's.
    fn entry(&self, id: ItemId) -> Option<usize> {
        id.checked_sub(self.first)
            .and_then(|i| usize::try_from(i).ok())
            .filter(|&i| i < self.entries.len())
    }

    /// Notes where entry `id`'s result is (a first delivery only: an item ends once).
    fn place(&mut self, id: ItemId, at: u64) {
        let Some(i) = self.entry(id) else { return };
        if self.slots.is_empty() {
            if at == NONE {
                // Nothing to encode, and no slot needed yet to say so: without slots the
                // entries wait, and the end encodes whatever came.
                return;
            }
            self.slots.resize(self.entries.len(), WAITING);
            self.out.reserve(self.entries.len() * NOOP_RESULT_BYTES);
        }
        if let Some(s) = self.slots.get_mut(i).filter(|s| **s == WAITING) {
            *s = at;
        }
    }

    /// Takes one delivery, counts it, and encodes whatever entries it completes.
    pub(super) fn take(&mut self, d: Delivered) {
        match d {
            Delivered::Event(ev) => {
                let (id, at) = match &ev {
                    FlushEvent::Done(r) => {
                        count_state(&mut self.counts, r.state, 1);
                        (r.id, loc(0, self.events.len()))
                    }
                    FlushEvent::Ended(id, state) => {
                        count_state(&mut self.counts, *state, 1);
                        (*id, NONE)
                    }
                    FlushEvent::Gone(id) => (*id, NONE),
                };
                if at != NONE {
                    self.events.push(ev);
                }
                self.place(id, at);
            }
            Delivered::Records(rs) => {
                let part = self.parts.len() + 1;
                for (at, r) in rs.iter().enumerate() {
                    count_state(&mut self.counts, r.state(), 1);
                    self.place(r.id(), loc(part, at));
                }
                self.parts.push(rs);
            }
        }
        self.advance(false);
    }

    /// Encodes entries from `next` on while their results are in; at the `end`, every entry
    /// left (one still waiting has no result).
    fn advance(&mut self, end: bool) {
        if self.slots.is_empty() {
            return;
        }
        while let Some(e) = self.entries.get(self.next) {
            if e.queued {
                let at = self.entry(e.id).map_or(NONE, |i| self.slots[i]);
                match at {
                    WAITING if !end => return,
                    WAITING | NONE => {}
                    at => {
                        let (part, i) = ((at >> 32) as usize, (at & u64::from(u32::MAX)) as usize);
                        // Each view is built where it is encoded: a view returned from a
                        // `match` is moved (216 bytes, a `memcpy` call each time; 9% of the
                        // RPC thread at batches of 1 000 once).
                        if part == 0 {
                            if let Some(FlushEvent::Done(r)) = self.events.get(i) {
                                self.enc.push(&r.view(), &mut self.out);
                            }
                        } else if let Some(r) = self.parts.get(part - 1).and_then(|rs| rs.get(i)) {
                            self.enc.push(&r.view(), &mut self.out);
                        }
                    }
                }
            }
            self.next += 1;
        }
    }

    /// Once the flush ended: the counts so far and the results, every delivered one encoded.
    pub(super) fn finish(mut self) -> (v1::StateCounts, EncodedResults) {
        self.advance(true);
        (self.counts, self.out)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use wqd_core::engine::{ItemResult, State};
    use wqd_core::target::Target;

    use super::*;

    fn result(id: ItemId, state: State) -> Arc<ItemResult> {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000 + id);
        Arc::new(ItemResult {
            id,
            batch: 3,
            workqueue: Arc::from("default"),
            state,
            output: id.to_le_bytes().to_vec(),
            error: String::new(),
            target: Target::All,
            handler: Arc::from("noop"),
            cpu_started: Some(1),
            cpu_finished: Some(1),
            fallback: None,
            reason: String::new(),
            rebinds: 0,
            queued_at: t0,
            started_at: Some(t0 + Duration::from_millis(id)),
            finished_at: Some(t0 + Duration::from_millis(id + 1)),
            epoch_started: Some(2),
            epoch_decided: None,
            worker: None,
            worker_lost: 0,
        })
    }

    /// Deliveries in any order, with events that are not full results and ids of other
    /// batches, make the bytes of encoding the queued entries' results in entry order; an
    /// entry is encoded as soon as every entry before it is in (so most of the work is done
    /// before the end), and once.
    #[test]
    fn results_are_encoded_in_entry_order_as_soon_as_they_can_be() {
        // Ten entries, ids 100–109; entry 3 merged into entry 2 (not queued, no result of its
        // own); entry 5 ends without a full result, entry 6's result was forgotten.
        let first = 100;
        let entries: Vec<Submitted> = (0..10u64)
            .map(|i| Submitted {
                id: if i == 3 { 102 } else { first + i },
                queued: i != 3,
            })
            .collect();
        let done = |i: u64| Delivered::Event(FlushEvent::Done(result(first + i, State::Ok)));
        let mut got = InOrder::new(&entries, first, EncodedResults::new(3));
        // Entries 1 and 4 first: nothing can be encoded before entry 0.
        for d in [done(1), done(4)] {
            got.take(d);
        }
        assert_eq!(got.out.len(), 0);
        // Entry 0, then 2: 0, 1 and 2 are encoded (3 is merged, 4 is in, 5 is not yet).
        got.take(done(0));
        assert_eq!(got.out.len(), 2);
        got.take(done(2));
        assert_eq!(got.out.len(), 4);
        // Other batches' ids and a repeat of an encoded one change nothing.
        for d in [done(20), Delivered::Event(FlushEvent::Gone(7)), done(2)] {
            got.take(d);
        }
        assert_eq!(got.out.len(), 4);
        // 5 and 6 end without full results: the encoding goes on past them to 7.
        got.take(Delivered::Event(FlushEvent::Ended(
            first + 5,
            State::Cancelled,
        )));
        got.take(Delivered::Event(FlushEvent::Gone(first + 6)));
        got.take(done(7));
        assert_eq!(got.out.len(), 5);
        // 9 comes, 8 never does: the end encodes 9.
        got.take(Delivered::Event(FlushEvent::Done(result(
            first + 9,
            State::Failed,
        ))));
        let (counts, out) = got.finish();
        let mut want = EncodedResults::new(3);
        let mut enc = ResultEncoder::default();
        for (i, state) in [
            (0, State::Ok),
            (1, State::Ok),
            (2, State::Ok),
            (4, State::Ok),
        ]
        .into_iter()
        .chain([(7, State::Ok), (9, State::Failed)])
        {
            enc.push(&result(first + i, state).view(), &mut want);
        }
        assert_eq!(out, want);
        // The repeat of 2 and the other batch's item counted (as every event does), Gone not.
        assert_eq!(
            (counts.ok, counts.failed, counts.cancelled),
            (7, 1, 1),
            "{counts:?}"
        );
    }

    /// A batch whose workqueue keeps no full results: nothing is encoded, the counts still
    /// add up.
    #[test]
    fn no_full_results_encode_nothing() {
        let entries: Vec<Submitted> = (0..3u64)
            .map(|i| Submitted {
                id: 10 + i,
                queued: true,
            })
            .collect();
        let mut got = InOrder::new(&entries, 10, EncodedResults::new(3));
        for i in 0..3 {
            got.take(Delivered::Event(FlushEvent::Ended(10 + i, State::Ok)));
        }
        let (counts, out) = got.finish();
        assert!(out.is_empty());
        assert_eq!(counts.ok, 3);
    }
}
