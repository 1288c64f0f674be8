//! The table of live items: every accepted item that has not reached a terminal state.
//!
//! Items sit in a slab (a `Vec` of slots with a free list) and an id → slot index. A hash map
//! of whole items needs about twice the item's size per entry once it is large (hashbrown keeps
//! at most 7/8 of its buckets full and doubles, so at one million items it is ~48% full);
//! here only the 16-byte index entry pays that factor, and the 80-byte items sit densely.
//!
//! Invariant: `index` maps exactly the ids of the occupied slots, each to its own slot, so
//! `len()` is both maps' size. Memory is bounded by the peak number of live items (freed slots
//! are reused), never by how many ids were handed out.

use slab::Slab;

use super::idhash::IdMap;
use super::sched::{Item, ItemId};

/// See the module docs.
#[derive(Default)]
pub(crate) struct Items {
    slots: Slab<Item>,
    index: IdMap<ItemId, u32>,
}

impl Items {
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    #[inline]
    pub(crate) fn get(&self, id: &ItemId) -> Option<&Item> {
        let &s = self.index.get(id)?;
        self.slots.get(s as usize)
    }

    #[inline]
    pub(crate) fn get_mut(&mut self, id: &ItemId) -> Option<&mut Item> {
        let &s = self.index.get(id)?;
        self.slots.get_mut(s as usize)
    }

    /// The slot of item `id`, for [`at`](Self::at) and [`at_mut`](Self::at_mut): valid until
    /// the next insert or remove.
    #[inline]
    pub(crate) fn slot(&self, id: &ItemId) -> Option<u32> {
        self.index.get(id).copied()
    }

    /// The item in `slot` (from [`slot`](Self::slot), with no insert or remove since).
    #[inline]
    pub(crate) fn at(&self, slot: u32) -> Option<&Item> {
        self.slots.get(slot as usize)
    }

    /// [`at`](Self::at), to change the item.
    #[inline]
    pub(crate) fn at_mut(&mut self, slot: u32) -> Option<&mut Item> {
        self.slots.get_mut(slot as usize)
    }

    /// Adds item `id`, replacing (and returning) an item already under that id.
    #[inline]
    pub(crate) fn insert(&mut self, id: ItemId, item: Item) -> Option<Item> {
        let s = self.slots.insert(item);
        // More than 2^32 live items cannot be queued (`max_queued` and memory bound them long
        // before); the slot number is kept in 4 bytes to keep the index entry at 16.
        let old = self.index.insert(id, s as u32)?;
        self.slots.try_remove(old as usize)
    }

    #[inline]
    pub(crate) fn remove(&mut self, id: &ItemId) -> Option<Item> {
        let s = self.index.remove(id)?;
        self.slots.try_remove(s as usize)
    }

    /// The ids of all live items, in no particular order.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &ItemId> + '_ {
        self.index.keys()
    }

    /// All live items with their ids, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&ItemId, &Item)> + '_ {
        self.index
            .iter()
            .filter_map(|(id, &s)| self.slots.get(s as usize).map(|it| (id, it)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::SystemTime;

    use super::Items;
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
        assert_eq!(std::mem::size_of::<Body>(), 48);
    }

    #[test]
    fn removed_ids_are_gone_and_slots_are_reused() {
        let mut t = Items::default();
        for id in 1..=4 {
            t.insert(id, item(id));
        }
        assert!(t.remove(&2).is_some());
        assert!(t.remove(&2).is_none());
        assert!(t.get(&2).is_none());
        t.insert(5, item(5));
        assert_eq!(t.len(), 4);
        assert_eq!(t.slots.capacity(), 4, "the freed slot is reused");
        let mut ids: Vec<_> = t.iter().map(|(&id, it)| (id, it.batch)).collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![(1, 1), (3, 3), (4, 4), (5, 5)]);
        assert_eq!(t.get_mut(&5).map(|it| it.batch), Some(5));
        assert_eq!(t.insert(5, item(6)).map(|it| it.batch), Some(5), "replaced");
        assert_eq!((t.len(), t.get(&5).map(|it| it.batch)), (4, Some(6)));
    }
}
