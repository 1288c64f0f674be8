//! The table of live items: every accepted item that has not reached a terminal state.
//!
//! Ids are handed out in sequence and an item is inserted under a fresh id (entry *i* of a
//! batch is `first + i`), so the live items crowd the newest ids and mostly end in about the
//! order they came. They sit in **pages** of [`PAGE`] consecutive ids, found by arithmetic:
//! `(id - base) / PAGE`, then the slot `(id - base) % PAGE`. A look-up, an insert and a
//! removal cost an index, not a hash (the id → slot hash map this replaced was about a fifth
//! of the work per item under the engine lock: insert, look-ups, removal). A page is freed
//! when its last item ends, and the run of freed pages at the front is dropped.
//!
//! Stragglers go to the **spill**, the previous layout (a slab and an id → slot index): while
//! the held pages average fewer than [`PAGE`]` / 2` live items, or the page deque has grown
//! past twice the pages held (a few long-lived items must not pin a deque that grows with
//! every id handed out after them), the oldest page's items move there and the page is freed.
//! An item moves at most once. An insert under an id below the newest page (never done by the
//! engine, kept correct all the same) goes to the spill too.
//!
//! Invariants: an id is in at most one place (a page slot or the spill), and `len` counts
//! both; each page held has at least one live item; with more than one page held, they hold
//! at least `PAGE / 2` live items each on average (less one page's worth) and the deque has at
//! most `2 × held + 2` entries, the first held. Memory is therefore bounded by the live items
//! (about 160 bytes of page per live item at worst, 80 when dense), never by how many ids
//! were handed out.

use std::collections::VecDeque;

use slab::Slab;

use super::idhash::IdMap;
use super::sched::{Item, ItemId};

/// Ids per page.
pub(crate) const PAGE: usize = 64;

/// Freed pages kept for reuse: 64 pages (about 330 KiB, held for the engine's life) cover
/// the pages of a few batches of 1 000 in flight, so a submit writes items into pages still
/// in cache instead of fresh allocations (two busy groups through one engine: 6.0-6.1M ->
/// 6.5-6.7M items/s with 4 spares -> 32-256; batches of 10 000 gain nothing either way).
const SPARES: usize = 64;

struct Page {
    slots: [Option<Item>; PAGE],
    live: u32,
}

impl Page {
    fn new() -> Box<Page> {
        Box::new(Page {
            slots: std::array::from_fn(|_| None),
            live: 0,
        })
    }
}

/// See the module docs.
#[derive(Default)]
pub(crate) struct Items {
    /// Page `k` holds the ids `base + k * PAGE ..`; `None` for a page freed (or never needed).
    pages: VecDeque<Option<Box<Page>>>,
    /// The first id of `pages[0]`, a multiple of [`PAGE`].
    base: ItemId,
    /// Pages held (the `Some` entries of `pages`).
    held: usize,
    /// Freed pages kept for the next ones (a page is a 5 KiB allocation, and dropping one
    /// walks its slots), at most [`SPARES`].
    spare: Vec<Box<Page>>,
    spill: Slab<Item>,
    spill_index: IdMap<ItemId, u32>,
    len: usize,
    /// The highest id inserted so far.
    max_id: Option<ItemId>,
    /// See [`Items::set_floor`].
    floor: usize,
}

impl Items {
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Where `id`'s page slot would be: (page, slot); the page may not be held, or not exist.
    #[inline]
    fn place(&self, id: ItemId) -> (usize, usize) {
        // An id below `base` wraps to an offset far past the deque: no page.
        let off = id.wrapping_sub(self.base);
        ((off / PAGE as u64) as usize, (off as usize) & (PAGE - 1))
    }

    #[inline]
    pub(crate) fn get(&self, id: &ItemId) -> Option<&Item> {
        let (k, i) = self.place(*id);
        if let Some(Some(p)) = self.pages.get(k) {
            if let Some(it) = &p.slots[i] {
                return Some(it);
            }
        }
        self.spilled(*id).and_then(|s| self.spill.get(s as usize))
    }

    #[inline]
    pub(crate) fn get_mut(&mut self, id: &ItemId) -> Option<&mut Item> {
        let (k, i) = self.place(*id);
        let paged = matches!(self.pages.get(k), Some(Some(p)) if p.slots[i].is_some());
        if paged {
            return self.pages.get_mut(k)?.as_mut()?.slots[i].as_mut();
        }
        let s = self.spilled(*id)?;
        self.spill.get_mut(s as usize)
    }

    #[inline]
    fn spilled(&self, id: ItemId) -> Option<u32> {
        if self.spill_index.is_empty() {
            return None;
        }
        self.spill_index.get(&id).copied()
    }

    /// Adds item `id`, replacing (and returning) an item already under that id.
    pub(crate) fn insert(&mut self, id: ItemId, item: Item) -> Option<Item> {
        // The engine's case, a batch's next entry: the id after the highest so far, on the
        // newest page held. Its slot is free (never used), and the bounds cannot be passed:
        // `len` grows, the pages do not (so `keep_bounded` would return at once).
        if self.max_id.is_some_and(|m| m.checked_add(1) == Some(id)) && id >= self.base {
            let (k, i) = self.place(id);
            if k + 1 == self.pages.len() {
                if let Some(Some(page)) = self.pages.back_mut() {
                    page.slots[i] = Some(item);
                    page.live += 1;
                    self.len += 1;
                    self.max_id = Some(id);
                    return None;
                }
            }
        }
        // A fresh id (above every id inserted so far) replaces nothing.
        let old = match self.max_id {
            Some(m) if id <= m => self.remove(&id),
            _ => None,
        };
        self.max_id = Some(self.max_id.map_or(id, |m| m.max(id)));
        self.len += 1;
        if self.pages.is_empty() {
            self.base = id - id % PAGE as u64;
        }
        // Only at the newest page or past it (fresh ids); anything older goes to the spill.
        let newest = self.base + (self.pages.len().max(1) as u64 - 1) * PAGE as u64;
        if id < newest || id < self.base {
            let s = self.spill.insert(item);
            // More than 2^32 live items cannot be queued (`max_queued` and memory bound them
            // long before); the slot number is kept in 4 bytes.
            self.spill_index.insert(id, s as u32);
            return old;
        }
        let (mut k, mut i) = self.place(id);
        if k > self.pages.len() + 2 * self.held + 2 {
            // Far past the newest page (ids handed out without items, as duplicates' are):
            // the pages so far go to the spill rather than a deque of empty entries between.
            while self.held > 0 {
                self.spill_page(0);
            }
            self.base = id - id % PAGE as u64;
            (k, i) = self.place(id);
        }
        while self.pages.len() <= k {
            self.pages.push_back(None);
        }
        if self.pages[k].is_none() {
            self.pages[k] = Some(self.spare.pop().unwrap_or_else(Page::new));
            self.held += 1;
            self.set_floor();
        }
        let Some(page) = self.pages[k].as_mut() else {
            unreachable!("page {k} was just made")
        };
        page.slots[i] = Some(item);
        page.live += 1;
        self.keep_bounded();
        old
    }

    pub(crate) fn remove(&mut self, id: &ItemId) -> Option<Item> {
        let (k, i) = self.place(*id);
        if let Some(Some(page)) = self.pages.get_mut(k) {
            if let Some(it) = page.slots[i].take() {
                page.live -= 1;
                self.len -= 1;
                if page.live == 0 {
                    self.free_page(k);
                }
                self.keep_bounded();
                return Some(it);
            }
        }
        let s = self.spill_index.remove(id)?;
        self.len -= 1;
        let it = self.spill.try_remove(s as usize);
        self.keep_bounded();
        it
    }

    /// Frees page `k` (its items have ended or moved) and drops the freed pages at both ends.
    fn free_page(&mut self, k: usize) {
        if let Some(p) = self.pages[k].take() {
            self.held -= 1;
            if self.spare.len() < SPARES {
                self.spare.push(p);
            }
        }
        while let Some(None) = self.pages.front() {
            self.pages.pop_front();
            self.base += PAGE as u64;
        }
        while let Some(None) = self.pages.back() {
            self.pages.pop_back();
        }
        if self.pages.is_empty() {
            self.base = 0;
        }
        self.set_floor();
    }

    /// Moves page `k`'s live items to the spill and frees it.
    fn spill_page(&mut self, k: usize) {
        let first = self.base + (k * PAGE) as u64;
        if let Some(p) = self.pages[k].as_mut() {
            for (i, slot) in p.slots.iter_mut().enumerate() {
                if let Some(it) = slot.take() {
                    let s = self.spill.insert(it);
                    self.spill_index.insert(first + i as u64, s as u32);
                }
            }
            p.live = 0;
        }
        self.free_page(k);
    }

    /// Keeps the pages dense enough: while the held pages average fewer than `PAGE / 2` live
    /// items (allowing one page's worth of slack), or the deque has more than `2 × held + 2`
    /// entries, the oldest page (the front, always held) goes to the spill. Items that end in
    /// about the order they came empty their pages whole and never trigger it.
    #[inline]
    fn keep_bounded(&mut self) {
        // One comparison in the common case: `held` and the deque change once per page.
        if self.len >= self.floor {
            return;
        }
        while self.held > 1
            && (self.held * (PAGE / 2) > self.len + PAGE || self.pages.len() > 2 * self.held + 2)
        {
            self.spill_page(0);
        }
        self.set_floor();
    }

    /// The `len` below which [`keep_bounded`](Self::keep_bounded) has something to check:
    /// past either bound with the pages as they are now. (Call whenever `held` or the deque's
    /// length changes.)
    fn set_floor(&mut self) {
        self.floor = if self.held > 1 && self.pages.len() > 2 * self.held + 2 {
            usize::MAX
        } else if self.held > 1 {
            (self.held * (PAGE / 2)).saturating_sub(PAGE)
        } else {
            0
        };
    }

    /// The ids of all live items, in no particular order.
    pub(crate) fn keys(&self) -> impl Iterator<Item = ItemId> + '_ {
        self.iter().map(|(id, _)| id)
    }

    /// All live items with their ids, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (ItemId, &Item)> + '_ {
        let base = self.base;
        let paged = self.pages.iter().enumerate().flat_map(move |(k, p)| {
            p.iter().flat_map(move |p| {
                p.slots.iter().enumerate().filter_map(move |(i, it)| {
                    let id = base + (k * PAGE + i) as u64;
                    it.as_ref().map(|it| (id, it))
                })
            })
        });
        let spilled = self
            .spill_index
            .iter()
            .filter_map(|(&id, &s)| self.spill.get(s as usize).map(|it| (id, it)));
        paged.chain(spilled)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::SystemTime;

    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::{Items, PAGE};
    use crate::engine::sched::{Body, HandlerRef, Item};
    use crate::engine::State;
    use crate::handler::{Args, Registry};
    use crate::target::Target;

    fn item(batch: u64) -> Item {
        let reg = Registry::with_builtins(None);
        let Some(h) = reg.get("noop") else {
            panic!("noop is a built-in")
        };
        Item {
            batch,
            body: Arc::new(Body::new(
                Arc::from("wq"),
                Arc::new(HandlerRef {
                    name: Arc::from("noop"),
                    handler: h.clone(),
                    kind: h.kind(),
                    remote: false,
                }),
                Target::All,
                Args::new(),
                Vec::new(),
            )),
            key: None,
            queued_at: SystemTime::now(),
            waiter: 0,
            cold: None,
            wq: 0,
            queue: 0,
            bound: crate::engine::sched::NOT_BOUND,
            rebinds: 0,
            state: State::Pending,
            fallback: None,
        }
    }

    #[test]
    fn item_and_body_sizes_hold() {
        // The slab's slot (`slab::Entry<Item>`) reuses the item's niche; a bigger item costs
        // every pending item the difference, and so does a bigger body when each item has its
        // own (the scale bench's worst case).
        assert_eq!(std::mem::size_of::<Item>(), 80);
        assert_eq!(std::mem::size_of::<Body>(), 64);
    }

    /// Checks `t` against the model: the same ids, each with its item, and the bounds of the
    /// module docs.
    fn same(t: &Items, model: &HashMap<u64, u64>) -> Result<(), TestCaseError> {
        prop_assert_eq!(t.len(), model.len());
        let mut got: Vec<(u64, u64)> = t.iter().map(|(id, it)| (id, it.batch)).collect();
        got.sort_unstable();
        let mut want: Vec<(u64, u64)> = model.iter().map(|(&k, &v)| (k, v)).collect();
        want.sort_unstable();
        prop_assert_eq!(got, want);
        for (&id, &b) in model {
            prop_assert_eq!(t.get(&id).map(|it| it.batch), Some(b));
        }
        let held = t.pages.iter().filter(|p| p.is_some()).count();
        prop_assert_eq!(held, t.held);
        prop_assert!(
            t.pages.iter().flatten().all(|p| p.live > 0),
            "no empty page held"
        );
        prop_assert!(
            matches!(t.pages.front(), None | Some(Some(_))),
            "the front is held"
        );
        if t.held > 1 {
            prop_assert!(t.held * (PAGE / 2) <= t.len + PAGE, "dense enough");
            prop_assert!(t.pages.len() <= 2 * t.held + 2, "deque bounded");
        }
        prop_assert_eq!(t.spill.len(), t.spill_index.len());
        Ok(())
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Insert the next `n` ids (a batch), after skipping `gap` (duplicates' unused ids).
        Batch { n: usize, gap: u64 },
        /// Remove the live item at this rank (in id order), if any.
        Remove(usize),
        /// Remove the `n` oldest live items (ending in order).
        RemoveOldest(usize),
        /// Remove an id that is not live (ended, or never handed out).
        RemoveDead(u64),
        /// Insert under an id already handed out (replacing, or below the newest page).
        Reinsert(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1usize..200, prop_oneof![0u64..300, 5_000u64..20_000])
                .prop_map(|(n, gap)| Op::Batch { n, gap }),
            any::<usize>().prop_map(Op::Remove),
            (1usize..150).prop_map(Op::RemoveOldest),
            any::<u64>().prop_map(Op::RemoveDead),
            any::<usize>().prop_map(Op::Reinsert),
        ]
    }

    proptest! {
        /// The table answers as a hash map of items would, whatever the order of inserts and
        /// removals, and keeps its pages within the bounds of the module docs.
        #[test]
        fn pages_and_spill_answer_as_a_map_would(ops in proptest::collection::vec(op(), 1..80)) {
            let mut t = Items::default();
            let mut model: HashMap<u64, u64> = HashMap::new();
            let mut next = 1u64;
            let mut tag = 0u64;
            for op in ops {
                match op {
                    Op::Batch { n, gap } => {
                        next += gap;
                        for _ in 0..n {
                            tag += 1;
                            prop_assert!(t.insert(next, item(tag)).is_none());
                            model.insert(next, tag);
                            next += 1;
                        }
                    }
                    Op::Remove(r) | Op::Reinsert(r) if model.is_empty() => {
                        let _ = r;
                    }
                    Op::Remove(r) => {
                        let mut ids: Vec<u64> = model.keys().copied().collect();
                        ids.sort_unstable();
                        let id = ids[r % ids.len()];
                        let want = model.remove(&id);
                        prop_assert_eq!(t.remove(&id).map(|it| it.batch), want);
                        prop_assert!(t.get(&id).is_none());
                    }
                    Op::RemoveOldest(n) => {
                        let mut ids: Vec<u64> = model.keys().copied().collect();
                        ids.sort_unstable();
                        for id in ids.into_iter().take(n) {
                            let want = model.remove(&id);
                            prop_assert_eq!(t.remove(&id).map(|it| it.batch), want);
                        }
                    }
                    Op::RemoveDead(x) => {
                        let id = x % (next + 100);
                        if !model.contains_key(&id) {
                            prop_assert!(t.remove(&id).is_none());
                        }
                    }
                    Op::Reinsert(r) => {
                        let id = (r as u64) % next;
                        tag += 1;
                        let old = model.insert(id, tag);
                        prop_assert_eq!(t.insert(id, item(tag)).map(|it| it.batch), old);
                    }
                }
                same(&t, &model)?;
            }
        }
    }

    #[test]
    fn items_ending_in_order_never_spill() {
        let mut t = Items::default();
        let mut next = 1u64;
        for _ in 0..50 {
            for _ in 0..300 {
                t.insert(next, item(next));
                next += 1;
            }
            // Half of them end, oldest first, before the next batch comes.
            let mut ids: Vec<u64> = t.keys().collect();
            ids.sort_unstable();
            for id in ids.iter().take(ids.len() / 2 + 7) {
                assert!(t.remove(id).is_some());
            }
            assert!(
                t.spill_index.is_empty(),
                "in-order ends keep every item paged"
            );
        }
        assert!(
            t.held <= t.len / PAGE + 2,
            "{} pages for {} items",
            t.held,
            t.len
        );
    }

    #[test]
    fn removed_ids_are_gone_and_pages_are_freed() {
        let mut t = Items::default();
        for id in 1..=4 {
            t.insert(id, item(id));
        }
        assert!(t.remove(&2).is_some());
        assert!(t.remove(&2).is_none());
        assert!(t.get(&2).is_none());
        t.insert(5, item(5));
        assert_eq!(t.len(), 4);
        assert_eq!((t.held, t.pages.len()), (1, 1), "ids 1 to 5 share a page");
        let mut ids: Vec<_> = t.iter().map(|(id, it)| (id, it.batch)).collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![(1, 1), (3, 3), (4, 4), (5, 5)]);
        assert_eq!(t.get_mut(&5).map(|it| it.batch), Some(5));
        assert_eq!(t.insert(5, item(6)).map(|it| it.batch), Some(5), "replaced");
        assert_eq!((t.len(), t.get(&5).map(|it| it.batch)), (4, Some(6)));
        for id in [1, 3, 4, 5] {
            assert!(t.remove(&id).is_some());
        }
        assert_eq!(
            (t.len(), t.held, t.pages.len()),
            (0, 0, 0),
            "the last end frees the page"
        );
        assert_eq!(t.spare.len(), 1, "kept for the next");
    }
}
