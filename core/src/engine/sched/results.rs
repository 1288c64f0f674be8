//! Results: the store of terminal results ([`Results`], bounded by count, age and bytes,
//! oldest forgotten first), the compact record it keeps per result ([`Stored`], made into an
//! [`ItemResult`] only when read), what one costs, the output cut to `max_result_bytes`, and
//! look-ups of an item's result or current state.
//!
//! The store has its own lock, **R** (the first piece of the sharded engine's split, see
//! `engine/README.md`): the scheduler takes it inside L (`terminal` stores, flush
//! registration and cancel read), and a look-up of terminal results takes R alone, so a
//! large `GetResults` never holds the workers' lock. Lock order: L → R; nothing holding R
//! takes L.
//!
//! Invariant (under R): `map` names exactly the stored results, each by the sequence number
//! of the one slot that holds it; `bytes` is the sum of [`result_bytes`] over them; every
//! stored record names its workqueue, handler and target by a live entry of `names`, whose
//! entries are counted by exactly the records naming them; and after each insert the store
//! is within `max` results and `max_bytes` (`bytes` plus the name table's and the index's,
//! keeping at least one).
//! An item leaves `items` and enters the store in one L hold, or (a worker's finish batch,
//! `finish.rs`'s `Finished`) after it, with R taken before that hold ended; so a reader
//! holding L, then R, finds every issued, unforgotten item in exactly one of them.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::engine::idhash::IdMap;
use crate::engine::{ItemResult, ResultView, State, WorkerRef};
use crate::groups::Level;
use crate::target::Target;

use super::item::{Body, ItemId, Started};
use super::Sched;

/// Cuts a handler's output to `max` bytes (limits.max_result_bytes).
pub(super) fn cut_output(mut out: Vec<u8>, max: usize) -> Vec<u8> {
    if out.len() > max {
        tracing::debug!(
            bytes = out.len(),
            max,
            "result output cut to limits.max_result_bytes"
        );
        out.truncate(max);
        out.shrink_to_fit();
    }
    out
}

/// A terminal result as the store keeps it: inline in a slot of the store's chunks (no
/// allocation of its own), the fields most results leave empty out of line in
/// [`StoredExtra`], and made into an [`ItemResult`] only when someone reads it
/// ([`Stored::to_result`]). Its workqueue, handler and target are one entry of the store's
/// [`NameTable`], shared with the results naming the same three. Under half the bytes of an
/// `Arc<ItemResult>` (size checked below; with its slot a result is estimated at 136 bytes,
/// and about 9 more for its share of an index page when its neighbours are stored too,
/// instead of 352: `results_memory` holds 2.4 times the results), and a worker ending an
/// item nobody waits for allocates nothing for its result.
pub(crate) struct Stored {
    pub(super) id: ItemId,
    pub(super) batch: u64,
    /// Its workqueue, handler and target.
    pub(super) names: Names,
    pub(super) queued_at: SystemTime,
    pub(super) started: Option<Started>,
    pub(super) finished_at: SystemTime,
    pub(super) cpu_finished: Option<u32>,
    pub(super) rebinds: u16,
    pub(super) state: State,
    pub(super) fallback: Option<Level>,
    pub(super) extra: Option<Box<StoredExtra>>,
}

/// What few results have: output, an error or a reason, a decision's epoch, an attached
/// worker.
#[derive(Clone, Default)]
pub(crate) struct StoredExtra {
    pub(super) output: Vec<u8>,
    pub(super) error: String,
    pub(super) reason: String,
    pub(super) epoch_decided: Option<u64>,
    pub(super) worker: Option<WorkerRef>,
    pub(super) worker_lost: u32,
}

impl Stored {
    pub(crate) fn state(&self) -> State {
        self.state
    }
    /// The result as the engine's API gives it; `table` is the store's name table, which a
    /// stored record needs (`None` for a record not stored yet: its names are its body's).
    pub(crate) fn to_result(&self, table: Option<&NameTable>) -> ItemResult {
        self.view(table).to_result()
    }
    pub(crate) fn id(&self) -> ItemId {
        self.id
    }
    /// Its fields, borrowed; `table` as for [`Stored::to_result`].
    pub(crate) fn view<'a>(&'a self, table: Option<&'a NameTable>) -> ResultView<'a> {
        let x = self.extra.as_deref();
        let (workqueue, handler, target) = match (&self.names, table) {
            (Names::Body(b), _) => (&b.workqueue, b.handler_name(), &b.target),
            (Names::Interned(i), Some(t)) => t.names(*i),
            (Names::Interned(_), None) => no_names(),
        };
        ResultView {
            id: self.id,
            batch: self.batch,
            workqueue,
            state: self.state,
            output: x.map_or(&[][..], |x| &x.output),
            error: x.map_or("", |x| &x.error),
            target,
            handler,
            cpu_started: self.started.as_ref().map(|s| s.cpu),
            cpu_finished: self.cpu_finished,
            fallback: self.fallback,
            reason: x.map_or("", |x| &x.reason),
            rebinds: self.rebinds.into(),
            queued_at: self.queued_at,
            started_at: self.started.as_ref().map(|s| s.at),
            finished_at: Some(self.finished_at),
            epoch_started: self.started.as_ref().map(|s| s.epoch),
            epoch_decided: x.and_then(|x| x.epoch_decided),
            worker: x.and_then(|x| x.worker),
            worker_lost: x.map_or(0, |x| x.worker_lost),
        }
    }
    /// A copy of a record not stored yet, for a flush that delivers at the end (see
    /// `flush::Kept`): one more count on its body. (A stored record is never copied: the
    /// name table counts its holders.)
    pub(super) fn unstored_copy(&self) -> Stored {
        debug_assert!(
            matches!(self.names, Names::Body(_)),
            "copied before it is stored"
        );
        let names = match &self.names {
            Names::Body(b) => Names::Body(b.clone()),
            Names::Interned(i) => Names::Interned(*i),
        };
        Stored {
            id: self.id,
            batch: self.batch,
            names,
            queued_at: self.queued_at,
            started: self.started,
            finished_at: self.finished_at,
            cpu_finished: self.cpu_finished,
            rebinds: self.rebinds,
            state: self.state,
            fallback: self.fallback,
            extra: self.extra.clone(),
        }
    }
    /// Time from start to finish.
    pub(super) fn run_time(&self) -> Option<Duration> {
        let s = self.started.as_ref()?;
        self.finished_at.duration_since(s.at).ok()
    }
}

/// Which workqueue, handler and target a result names.
pub(crate) enum Names {
    /// Not stored yet: the item's body, moved out of the item as it ended (no count taken
    /// on a name shared by every worker). The store interns it and drops the body.
    Body(Arc<Body>),
    /// Stored: an entry of the store's [`NameTable`], which counts this result.
    Interned(u32),
}

/// Empty names, for a record whose entry is missing: unreachable, as a stored result's
/// entry lives as long as the result and only a stored result is interned.
fn no_names() -> (&'static Arc<str>, &'static Arc<str>, &'static Target) {
    debug_assert!(false, "a result's names are missing");
    static NONE: std::sync::OnceLock<(Arc<str>, Arc<str>, Target)> = std::sync::OnceLock::new();
    let (w, h, t) = NONE.get_or_init(|| (Arc::from(""), Arc::from(""), Target::All));
    (w, h, t)
}

/// The names of the stored results, each distinct (workqueue, handler, target) once,
/// counted by the stored results naming it.
///
/// A full result used to hold its own counts on the workqueue's and handler's names (taken
/// under L as its item ended, given back as it was forgotten: four atomic operations on
/// lines every worker writes) and its own copy of the target (an allocation for a cpulist
/// or a named group). The results of a run share one entry instead, found in the store
/// under R: the last entry used is compared first, the others are found by hash.
///
/// Invariant (under R): an entry is live exactly while `refs` > 0, i.e. while a stored
/// result names it; `index` holds exactly the live entries; `bytes` is the sum of
/// [`NameTable::cost`] over them.
#[derive(Default)]
pub(crate) struct NameTable {
    entries: Vec<NameEntry>,
    /// Indexes of dead entries, for reuse, lowest first: the live entries crowd the front,
    /// and the dead ones at the back are let go (a burst of distinct names does not leave
    /// its table behind).
    free: std::collections::BTreeSet<u32>,
    index: hashbrown::HashTable<u32>,
    hasher: std::hash::RandomState,
    /// The entry interned last (a run's results come together), and the body it was
    /// interned from when that body has no arguments or payload: kept, so that its address
    /// names no other body while it is compared (copies share one body: the common case is
    /// one pointer comparison). A body with a payload is not kept (the store would hold its
    /// bytes uncounted); results of such copies match by name instead.
    last: Option<(u32, Option<Arc<Body>>)>,
    bytes: usize,
}

struct NameEntry {
    /// (workqueue, handler, target); `None` while the entry is dead.
    names: Option<(Arc<str>, Arc<str>, Target)>,
    refs: u32,
}

impl NameTable {
    /// The names of live entry `i`.
    fn names(&self, i: u32) -> (&Arc<str>, &Arc<str>, &Target) {
        match self.entries.get(i as usize).and_then(|e| e.names.as_ref()) {
            Some((w, h, t)) => (w, h, t),
            None => no_names(),
        }
    }

    /// Live entries.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.index.len()
    }

    /// Entry slots held, live or dead, and their capacity.
    #[cfg(test)]
    fn slots(&self) -> (usize, usize) {
        (self.entries.len(), self.entries.capacity())
    }

    /// What an entry costs, estimated: its record, its index slot and the text and sets it
    /// holds (counted in full, though live items may share them).
    fn cost(w: &str, h: &str, t: &Target) -> usize {
        let held = match t {
            Target::Cpus(s) => s.last().map_or(0, |l| (l as usize / 64 + 1) * 8),
            Target::Named(n) | Target::Partition { name: n, .. } => n.len(),
            _ => 0,
        };
        std::mem::size_of::<NameEntry>() + 16 + w.len() + h.len() + held
    }

    fn hash(&self, w: &str, h: &str, t: &Target) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one((w, h, t))
    }

    /// [`NameTable::hash`] of entry `j` (live: only live entries are in `index`), for the
    /// index's moves.
    fn rehash(entries: &[NameEntry], hasher: &std::hash::RandomState, j: &u32) -> u64 {
        use std::hash::BuildHasher;
        match entries.get(*j as usize).and_then(|e| e.names.as_ref()) {
            Some((w, h, t)) => hasher.hash_one((&**w, &**h, t)),
            None => 0,
        }
    }

    /// The entry naming `b`'s workqueue, handler and target, counted once more; `b` is
    /// dropped (or kept as the last one interned).
    fn intern(&mut self, b: Arc<Body>) -> u32 {
        if let Some((i, Some(lb))) = &self.last {
            if let Some(e) = self
                .entries
                .get_mut(*i as usize)
                .filter(|_| Arc::ptr_eq(lb, &b))
            {
                e.refs += 1;
                return *i;
            }
        }
        let i = self.find_or_add(&b);
        let keep = b.args().is_empty() && b.payload().is_empty();
        self.last = Some((i, keep.then_some(b)));
        i
    }

    fn find_or_add(&mut self, b: &Body) -> u32 {
        let (w, h, t) = (&b.workqueue, b.handler_name(), &b.target);
        let same = |e: &NameEntry| {
            e.names.as_ref().is_some_and(|(ew, eh, et)| {
                (Arc::ptr_eq(ew, w) || **ew == **w)
                    && (Arc::ptr_eq(eh, h) || **eh == **h)
                    && et == t
            })
        };
        let found = match &self.last {
            Some((i, _)) if self.entries.get(*i as usize).is_some_and(same) => Some(*i),
            _ => {
                let hash = self.hash(w, h, t);
                let entries = &self.entries;
                self.index
                    .find(hash, |&i| same(&entries[i as usize]))
                    .copied()
            }
        };
        let i = match found {
            Some(i) => {
                self.entries[i as usize].refs += 1;
                i
            }
            None => {
                let hash = self.hash(w, h, t);
                let e = NameEntry {
                    names: Some((w.clone(), h.clone(), t.clone())),
                    refs: 1,
                };
                let i = match self.free.pop_first() {
                    Some(i) => {
                        self.entries[i as usize] = e;
                        i
                    }
                    None => {
                        self.entries.push(e);
                        (self.entries.len() - 1) as u32
                    }
                };
                let (entries, hasher) = (&self.entries, &self.hasher);
                self.index
                    .insert_unique(hash, i, |j| Self::rehash(entries, hasher, j));
                self.bytes += Self::cost(w, h, t);
                i
            }
        };
        i
    }

    /// A stored result naming entry `i` is gone: one count less, and the entry goes with
    /// its last.
    fn release(&mut self, i: u32) {
        let Some(e) = self.entries.get_mut(i as usize) else {
            return;
        };
        e.refs -= 1;
        if e.refs > 0 {
            return;
        }
        let Some((w, h, t)) = e.names.take() else {
            return;
        };
        let hash = self.hash(&w, &h, &t);
        if let Ok(slot) = self.index.find_entry(hash, |&j| j == i) {
            slot.remove();
        }
        self.bytes -= Self::cost(&w, &h, &t);
        self.free.insert(i);
        if self.last.as_ref().is_some_and(|l| l.0 == i) {
            self.last = None;
        }
        // Dead entries at the back go, and the memory of a table that shrank to a quarter.
        while self.entries.last().is_some_and(|e| e.names.is_none()) {
            self.entries.pop();
            self.free.remove(&(self.entries.len() as u32));
        }
        if self.entries.len() * 4 < self.entries.capacity() {
            self.entries.shrink_to(self.entries.len() * 2);
            let (entries, hasher) = (&self.entries, &self.hasher);
            self.index
                .shrink_to(self.index.len() * 2, |j| Self::rehash(entries, hasher, j));
        }
    }
}

/// Stored results per chunk of [`Results::order`].
const CHUNK: usize = 256;

/// Ids per page of the [`Index`].
const IPAGE: u64 = 32;

/// Stored id → sequence number, in pages of [`IPAGE`] consecutive ids found by hash of the
/// page number.
///
/// An id-keyed hash map of up to `results_max` (2^20) entries was a tenth of a full item's
/// time in cache misses: an insert and a removal per result, each in a different corner of a
/// 16 MiB table. Stored ids come in runs (a batch's ids are consecutive and end in about
/// their order), so a page's slots are written one after the other and forgotten the same
/// way, and the page map is small (2^15 pages for 2^20 dense results).
///
/// The page the last insert wrote and the page the last removal cleared are held out of the
/// map, in `hot`: most inserts and removals find their page there without hashing (a page
/// changes hands between the map and `hot` once per run of [`IPAGE`] ids).
///
/// Invariant: a page is held exactly while one of its slots is set, either in `pages` or in
/// `hot`, never in both, and `hot`'s two pages are different ones; `len` counts the set
/// slots. A slot holds `seq + 1` (0 = none).
#[derive(Default)]
struct Index {
    pages: IdMap<u64, Box<IndexPage>>,
    /// `[the last insert's page, the last removal's page]`, with their page numbers.
    hot: [Option<(u64, Box<IndexPage>)>; 2],
    len: usize,
}

struct IndexPage {
    seqs: [u64; IPAGE as usize],
    live: u32,
}

/// Which of [`Index::hot`]'s pages an operation keeps at hand.
const HOT_INSERT: usize = 0;
const HOT_REMOVE: usize = 1;

impl Index {
    /// What a held page costs, estimated: the page and its map entry.
    const PAGE_BYTES: usize = std::mem::size_of::<IndexPage>() + 24;

    fn page(&self, k: u64) -> Option<&IndexPage> {
        match &self.hot {
            [Some((h, p)), _] | [_, Some((h, p))] if *h == k => Some(p),
            _ => self.pages.get(&k).map(|p| &**p),
        }
    }

    /// Page `k`, made hot as `which` (the page hot as `which` before goes back to the map);
    /// made afresh when `create` and it is held nowhere.
    fn hot_page(&mut self, k: u64, which: usize, create: bool) -> Option<&mut IndexPage> {
        let at = match &self.hot {
            [Some((h, _)), _] if *h == k => HOT_INSERT,
            [_, Some((h, _))] if *h == k => HOT_REMOVE,
            _ => {
                let page = match self.pages.remove(&k) {
                    Some(p) => p,
                    None if create => Box::new(IndexPage {
                        seqs: [0; IPAGE as usize],
                        live: 0,
                    }),
                    None => return None,
                };
                if let Some((h, old)) = self.hot[which].replace((k, page)) {
                    self.pages.insert(h, old);
                }
                which
            }
        };
        self.hot[at].as_mut().map(|(_, p)| &mut **p)
    }

    fn get(&self, id: ItemId) -> Option<u64> {
        let v = self.page(id / IPAGE)?.seqs[(id % IPAGE) as usize];
        v.checked_sub(1)
    }

    /// Sets `id`'s sequence number, returning the one it replaces.
    fn insert(&mut self, id: ItemId, seq: u64) -> Option<u64> {
        let page = self.hot_page(id / IPAGE, HOT_INSERT, true)?;
        let old = std::mem::replace(&mut page.seqs[(id % IPAGE) as usize], seq + 1);
        if old == 0 {
            page.live += 1;
            self.len += 1;
        }
        old.checked_sub(1)
    }

    fn remove(&mut self, id: ItemId) -> Option<u64> {
        let k = id / IPAGE;
        let page = self.hot_page(k, HOT_REMOVE, false)?;
        let old = std::mem::take(&mut page.seqs[(id % IPAGE) as usize]).checked_sub(1)?;
        page.live -= 1;
        let empty = page.live == 0;
        self.len -= 1;
        if empty {
            // The page is hot (`hot_page` made it so): dropped from there.
            for h in &mut self.hot {
                if h.as_ref().is_some_and(|(hk, _)| *hk == k) {
                    *h = None;
                }
            }
        }
        Some(old)
    }

    /// Pages held.
    fn held(&self) -> usize {
        self.pages.len() + self.hot.iter().filter(|h| h.is_some()).count()
    }

    fn bytes(&self) -> usize {
        self.held() * Self::PAGE_BYTES
    }

    /// Panics unless the invariant holds: every held page has a set slot and counts them,
    /// `len` counts all, and no page is held twice (in `pages` and `hot`, or hot twice).
    #[cfg(test)]
    fn check(&self) {
        let hot = self.hot.iter().flatten().map(|(k, p)| (*k, &**p));
        let all: Vec<(u64, &IndexPage)> = hot
            .chain(self.pages.iter().map(|(k, p)| (*k, &**p)))
            .collect();
        let mut keys: Vec<u64> = all.iter().map(|(k, _)| *k).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), all.len(), "a page held twice");
        let mut len = 0;
        for (k, p) in all {
            let set = p.seqs.iter().filter(|&&v| v != 0).count();
            assert!(set > 0, "page {k} held with no slot set");
            assert_eq!(p.live as usize, set, "page {k}'s count");
            len += set;
        }
        assert_eq!(self.len, len, "slots counted");
    }
}

/// Terminal results, bounded by count, age and bytes (oldest forgotten first).
///
/// The records sit in insertion order (the order they are forgotten in) in chunks of
/// [`CHUNK`], each slot with its insertion time; an [`Index`] gives each stored id its
/// sequence number, which is its slot. A store that grows moves no record (a new chunk is added), and
/// forgetting the oldest is a pop at the front. A slot whose result was taken out (a batch
/// rolled back) or replaced is empty and skipped when its turn comes.
pub(crate) struct Results {
    /// Stored id → sequence number (its slot in `order`); its bytes count toward
    /// `max_bytes`.
    map: Index,
    /// The slots, oldest first: `order[0][head]` has sequence number `base + head`.
    order: VecDeque<Vec<(Instant, Option<Stored>)>>,
    /// Sequence number of `order[0][0]`.
    base: u64,
    /// Slots of `order[0]` already forgotten.
    head: usize,
    /// The last chunk forgotten, emptied, kept for the next one needed (a full store forgets
    /// a chunk for each it adds: no allocation then).
    spare: Option<Vec<(Instant, Option<Stored>)>>,
    pub(super) max: usize,
    pub(super) ttl: Duration,
    /// Estimated bytes of the stored results ([`result_bytes`]).
    pub(super) bytes: usize,
    pub(super) max_bytes: usize,
    /// The names the stored results share; its bytes count toward `max_bytes`.
    pub(super) names: NameTable,
}

/// The results one look-up made, by id: each is made at most once, however many times the
/// look-up names its id (a request naming an id a million times must not make a million).
#[derive(Default)]
pub(crate) struct Made(IdMap<ItemId, Arc<ItemResult>>);

impl Made {
    /// `id`'s result made before in this look-up, or `make`'s (kept when there is one).
    pub(crate) fn once(
        &mut self,
        id: ItemId,
        make: impl FnOnce() -> Option<Arc<ItemResult>>,
    ) -> Option<Arc<ItemResult>> {
        if let Some(r) = self.0.get(&id) {
            return Some(r.clone());
        }
        let r = make()?;
        self.0.insert(id, r.clone());
        Some(r)
    }
}

/// The store behind R, shared by the scheduler (inside L) and look-ups (R alone).
pub(crate) type Store = Arc<crate::engine::lock::Mutex<Results>>;

/// R, held.
pub(crate) type ResultsGuard<'a> = crate::engine::lock::MutexGuard<'a, Results>;

/// What one stored result costs, estimated: its slot, and its out-of-line part with its texts
/// when it has one (its index slot and names are counted by the [`Index`] and the
/// [`NameTable`]).
fn result_bytes(r: &Stored) -> usize {
    const OVERHEAD: usize = std::mem::size_of::<(Instant, Option<Stored>)>();
    OVERHEAD
        + r.extra.as_deref().map_or(0, |x| {
            std::mem::size_of::<StoredExtra>() + x.output.len() + x.error.len() + x.reason.len()
        })
}

impl Results {
    pub(crate) fn new(max: usize, ttl: Duration, max_bytes: usize) -> Results {
        Results {
            map: Index::default(),
            order: VecDeque::new(),
            base: 0,
            head: 0,
            spare: None,
            max: max.max(1),
            ttl,
            bytes: 0,
            max_bytes,
            names: NameTable::default(),
        }
    }
    /// Results stored.
    pub(crate) fn len(&self) -> usize {
        self.map.len
    }
    /// The slot of sequence number `seq`.
    fn slot(&self, seq: u64) -> Option<&(Instant, Option<Stored>)> {
        let i = usize::try_from(seq.checked_sub(self.base)?).ok()?;
        self.order.get(i / CHUNK)?.get(i % CHUNK)
    }
    /// The stored record of `id`.
    pub(super) fn stored(&self, id: ItemId) -> Option<&Stored> {
        let seq = self.map.get(id)?;
        self.slot(seq)?.1.as_ref()
    }
    /// A stored result, taken with R alone (see the module docs).
    pub(crate) fn get(&self, id: ItemId) -> Option<Arc<ItemResult>> {
        self.stored(id)
            .map(|r| Arc::new(r.to_result(Some(&self.names))))
    }
    /// A stored result's state.
    pub(crate) fn state(&self, id: ItemId) -> Option<State> {
        self.stored(id).map(Stored::state)
    }
    /// Stores the results of `rs` (emptying it), inserted at `now`; then forgets the oldest
    /// beyond the bounds.
    pub(super) fn insert(&mut self, rs: &mut Vec<Stored>, now: Instant) {
        let mut rs = rs.drain(..);
        // Slots of ids stored again (none, as each item ends once; kept correct anyway).
        let mut replaced = Vec::new();
        loop {
            if self.order.back().is_none_or(|c| c.len() == CHUNK) {
                if rs.len() == 0 {
                    break;
                }
                let chunk = self
                    .spare
                    .take()
                    .unwrap_or_else(|| Vec::with_capacity(CHUNK));
                self.order.push_back(chunk);
            }
            let n = self.order.len();
            let Some(chunk) = self.order.back_mut() else {
                break;
            };
            let first = self.base + ((n - 1) * CHUNK + chunk.len()) as u64;
            let room = CHUNK - chunk.len();
            let from = chunk.len();
            chunk.extend(rs.by_ref().take(room).map(|r| (now, Some(r))));
            if chunk.len() == from {
                break;
            }
            for (seq, (_, r)) in (first..).zip(&mut chunk[from..]) {
                let Some(r) = r else { continue };
                if let Names::Body(_) = r.names {
                    r.names = match std::mem::replace(&mut r.names, Names::Interned(0)) {
                        Names::Body(b) => Names::Interned(self.names.intern(b)),
                        stored => stored,
                    };
                }
                self.bytes += result_bytes(r);
                if let Some(old) = self.map.insert(r.id, seq) {
                    replaced.push(old);
                }
            }
        }
        drop(rs);
        for old in replaced {
            self.clear(old);
        }
        while self.map.len > self.max
            || (self.bytes + self.names.bytes + self.map.bytes() > self.max_bytes
                && self.map.len > 1)
        {
            if !self.pop_oldest() {
                break;
            }
        }
    }
    /// Empties the slot of sequence number `seq` (its id already out of `map`), returning
    /// its record.
    fn clear(&mut self, seq: u64) -> Option<Stored> {
        let i = usize::try_from(seq.checked_sub(self.base)?).ok()?;
        let old = self
            .order
            .get_mut(i / CHUNK)?
            .get_mut(i % CHUNK)?
            .1
            .take()?;
        self.bytes -= result_bytes(&old);
        if let Names::Interned(i) = old.names {
            self.names.release(i);
        }
        Some(old)
    }
    /// Forgets the oldest slot (a result, or an empty slot); `false` when there is none.
    fn pop_oldest(&mut self) -> bool {
        let Some(front) = self.order.front_mut() else {
            return false;
        };
        let Some(slot) = front.get_mut(self.head) else {
            return false;
        };
        // Read and dropped where it lies: moving a record out (to drop it) copied it whole.
        if let Some(old) = &slot.1 {
            self.map.remove(old.id);
            self.bytes -= result_bytes(old);
            if let Names::Interned(i) = old.names {
                self.names.release(i);
            }
        }
        slot.1 = None;
        self.head += 1;
        if self.head == CHUNK {
            if let Some(mut spent) = self.order.pop_front() {
                spent.clear();
                self.spare = Some(spent);
            }
            self.base += CHUNK as u64;
            self.head = 0;
        }
        true
    }
    /// Removes one result (a batch rolled back) and returns its state.
    pub(super) fn take(&mut self, id: ItemId) -> Option<State> {
        let seq = self.map.remove(id)?;
        self.clear(seq).map(|old| old.state)
    }
    pub(super) fn expire(&mut self, now: Instant) {
        while let Some(&(at, _)) = self.order.front().and_then(|c| c.get(self.head)) {
            if now.duration_since(at) < self.ttl {
                break;
            }
            self.pop_oldest();
        }
    }
}

impl Sched {
    /// Whether `id` was ever handed out (as an item or a duplicate's reserved slot).
    pub(crate) fn issued(&self, id: ItemId) -> bool {
        id != 0 && id < self.next_item.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The store behind R, for look-ups that do not take L.
    pub(crate) fn results_store(&self) -> Store {
        self.results.clone()
    }

    /// An item's current state (live), or its stored result; under L, so an item that ends
    /// meanwhile is found in one or the other.
    pub(crate) fn result_of(&mut self, id: ItemId) -> Option<Arc<ItemResult>> {
        let cpu_started = self.bound(id).map(|b| b.cpu);
        let Some(it) = self.items.get_mut().get(&id) else {
            return self.results.lock().get(id);
        };
        Some(Arc::new(ItemResult {
            id,
            batch: it.batch,
            workqueue: self.wqs[it.wi()].get_mut().name.clone(),
            state: it.state,
            output: Vec::new(),
            error: String::new(),
            target: it.body.target.clone(),
            handler: it.body.handler_name().clone(),
            cpu_started,
            cpu_finished: None,
            fallback: it.fallback,
            reason: if it.state == State::Pending {
                self.queues[it.qid()].get_mut().reason.clone()
            } else {
                it.reason().to_string()
            },
            rebinds: it.rebinds.into(),
            queued_at: it.queued_at,
            started_at: None,
            finished_at: None,
            epoch_started: None,
            epoch_decided: it
                .cold
                .as_ref()
                .and_then(|c| (c.decided != 0).then_some(c.decided)),
            worker: it.cold.as_ref().and_then(|c| c.worker),
            worker_lost: it.cold.as_ref().map_or(0, |c| c.lost),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::cpuset::CpuSet;
    use crate::engine::{ItemSpec, State};
    use crate::handler::Registry;
    use crate::target::Target;

    /// A stored result stays compact: 128 bytes at most, under half of what an
    /// `Arc<ItemResult>` took per result (the record, its `Arc` counts and the allocator's
    /// header). Fails when a field grows `Stored` past that; move rarely used fields to
    /// `StoredExtra` instead.
    #[test]
    fn a_stored_result_is_compact() {
        let stored = std::mem::size_of::<super::Stored>();
        let arc_result = std::mem::size_of::<crate::engine::ItemResult>() + 16 + 16;
        eprintln!("Stored {stored} bytes, Arc<ItemResult> {arc_result}");
        assert!(stored <= 128, "Stored is {stored} bytes");
        assert!(100 * stored <= 55 * arc_result, "{stored} vs {arc_result}");
    }

    /// The target a test result of `id` names: one of three (runs of four ids alike), so
    /// that the name table holds up to three entries.
    fn target_of(id: u64) -> Target {
        match id / 4 % 3 {
            0 => Target::Cpu(0),
            1 => Target::Named("group-one".into()),
            _ => Target::Cpus(CpuSet::range(0, 200)),
        }
    }

    /// The record of the built-in `noop` as a batch makes it.
    fn noop() -> Arc<crate::engine::sched::HandlerRef> {
        let reg = Registry::with_builtins(None);
        let Some(h) = reg.get("noop") else {
            panic!("noop is a built-in")
        };
        Arc::new(crate::engine::sched::HandlerRef {
            name: Arc::from("noop"),
            handler: h.clone(),
            kind: h.kind(),
            remote: false,
        })
    }

    /// A body of workqueue "wq", handler "noop" and `id`'s target, made afresh (as every
    /// batch makes its own: the table must match names by content, not by address).
    fn body(id: u64) -> Arc<crate::engine::sched::Body> {
        Arc::new(crate::engine::sched::Body::new(
            Arc::from("wq"),
            noop(),
            target_of(id),
            crate::handler::Args::new(),
            Vec::new(),
        ))
    }

    /// The store keeps no item's payload: once a result is stored, the body it came with
    /// (arguments and a megabyte of payload) is held by nobody else, and its copies' results
    /// still share one name entry. Fails if the name table keeps the last body it interned
    /// whatever it carries (a payload held past its item's end, counted nowhere).
    #[test]
    fn the_store_keeps_no_payload() {
        let mut store = super::Results::new(100, Duration::from_secs(60), 64 << 20);
        let b = Arc::new(crate::engine::sched::Body::new(
            Arc::from("wq"),
            noop(),
            Target::All,
            crate::handler::Args::new(),
            vec![7u8; 1 << 20],
        ));
        let mut rs: Vec<_> = (1..=3).map(|id| stored_with(id, 0, b.clone())).collect();
        store.insert(&mut rs, std::time::Instant::now());
        assert_eq!(
            Arc::strong_count(&b),
            1,
            "the store holds the payload's body"
        );
        assert_eq!((store.len(), store.names.len()), (3, 1));
    }

    /// A burst of distinct names leaves no table behind: 20 000 results each naming its own
    /// CPU, forgotten oldest first while a few later ones stay, end with the table at
    /// the size of what is still stored. Fails if dead entries are kept (the table grew
    /// with every distinct name ever stored).
    #[test]
    fn a_burst_of_distinct_names_leaves_no_table_behind() {
        let mut store = super::Results::new(20_000, Duration::from_secs(60), usize::MAX);
        let t0 = std::time::Instant::now();
        let on_cpu = |id: u64| {
            let b = body(id);
            let b = Arc::new(crate::engine::sched::Body::new(
                Arc::from("wq"),
                b.handler.clone(),
                Target::Cpu(id as u32),
                crate::handler::Args::new(),
                Vec::new(),
            ));
            stored_with(id, 0, b)
        };
        let mut rs: Vec<_> = (1..=20_000u64).map(on_cpu).collect();
        store.insert(&mut rs, t0);
        assert_eq!((store.len(), store.names.len()), (20_000, 20_000));
        // Forget all but the last three (the newest sit at the back of the table).
        store.max = 3;
        store.insert(&mut vec![stored_with(20_001, 0, body(20_001))], t0);
        assert_eq!(store.len(), 3);
        let (held, cap) = store.names.slots();
        assert!(held <= 20_001 && store.names.len() == 3, "{held} slots");
        // The newest forgotten too, for one more result with names of its own (which take
        // the lowest free slot): the slots behind it go, and the memory with them.
        store.max = 1;
        store.insert(&mut vec![on_cpu(30_000)], t0);
        let (held, cap_after) = store.names.slots();
        assert_eq!(store.names.len(), 1);
        assert!(held <= 2, "{held} slots held for one live entry");
        assert!(cap_after * 100 <= cap, "capacity {cap} -> {cap_after}");
    }

    /// A stored result with `id`, state `Ok`, and an error text of `text` bytes (so that
    /// results differ in size).
    fn stored(id: u64, text: usize) -> super::Stored {
        stored_with(id, text, body(id))
    }

    fn stored_with(id: u64, text: usize, body: Arc<crate::engine::sched::Body>) -> super::Stored {
        let now = std::time::SystemTime::now();
        super::Stored {
            id,
            batch: 1,
            names: super::Names::Body(body),
            queued_at: now,
            started: None,
            finished_at: now,
            cpu_finished: None,
            rebinds: 0,
            state: State::Ok,
            fallback: None,
            extra: (text > 0).then(|| {
                Box::new(super::StoredExtra {
                    error: "e".repeat(text),
                    ..Default::default()
                })
            }),
        }
    }

    /// The index against a plain map, in an order that moves pages between its hot slots
    /// and its map every way: inserts and removals in one page and in others, a removal that
    /// empties the insert's hot page, ids stored again. Fails on a slot read from the wrong
    /// page, a page kept with no slot set, or one held twice.
    #[test]
    fn the_index_finds_what_a_map_finds() {
        use std::collections::BTreeMap;
        let mut index = super::Index::default();
        let mut model: BTreeMap<u64, u64> = BTreeMap::new();
        let mut seq = 0u64;
        let page = super::IPAGE;
        // Ids from five pages, interleaved; some stored twice.
        let ids: Vec<u64> = (0..400u64)
            .map(|i| (i * 7919) % (5 * page) + (i % 3) * 100 * page)
            .collect();
        for (n, &id) in ids.iter().enumerate() {
            seq += 1;
            assert_eq!(index.insert(id, seq), model.insert(id, seq), "insert {id}");
            // Every third step forgets an id: the oldest, a recent one, or one never stored.
            if n % 3 == 2 {
                let gone = match n % 9 {
                    2 => model.keys().next().copied(),
                    5 => Some(id),
                    _ => Some(id + 1_000_000),
                };
                if let Some(g) = gone {
                    assert_eq!(index.remove(g), model.remove(&g), "remove {g}");
                }
            }
            index.check();
            for (&k, &v) in &model {
                assert_eq!(index.get(k), Some(v), "get {k}");
            }
        }
        // Everything forgotten, in reverse: nothing held after.
        let keys: Vec<u64> = model.keys().rev().copied().collect();
        for k in keys {
            assert_eq!(index.remove(k), model.remove(&k));
            assert_eq!(index.get(k), None);
            index.check();
        }
        assert_eq!(index.held(), 0);
        assert_eq!(index.bytes(), 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Store a batch of this many new ids (each with this many text bytes).
        Insert(usize, usize),
        /// Store again the id this far back from the newest (an id stored twice).
        Again(usize),
        /// Take the id this far back from the newest out (a roll-back).
        Take(usize),
        /// Let this many ms pass and expire.
        Expire(u64),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0usize..300, prop_oneof![Just(0usize), 1usize..200])
                .prop_map(|(n, t)| Op::Insert(n, t)),
            1 => (0usize..600).prop_map(Op::Again),
            2 => (0usize..600).prop_map(Op::Take),
            1 => (0u64..40).prop_map(Op::Expire),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// The chunked store against a model (a list of (id, stored at) oldest first): after
        /// every step the same ids are stored, each with its own record, the byte count is
        /// the sum over them (and the name table's and the index's are what their entries
        /// and pages cost), and the bounds hold (count, bytes keeping at least one, age).
        /// Fails on a sequence number pointing at the wrong slot, a forgotten result still
        /// found, or bytes leaked by a taken, replaced or forgotten result.
        #[test]
        fn the_store_keeps_what_a_model_keeps(
            max in 1usize..700,
            max_bytes in 1usize..200_000,
            ops in proptest::collection::vec(op(), 1..40),
        ) {
            use std::time::{Duration, Instant};
            let ttl = Duration::from_millis(50);
            let mut store = super::Results::new(max, ttl, max_bytes);
            let mut model: Vec<(u64, Instant, usize)> = Vec::new();
            let mut next = 1u64;
            let t0 = Instant::now();
            let mut now = t0;
            let mut newest = 0u64;
            // What the name table should cost for the results of `model`: one entry per
            // distinct target among them.
            let names_cost = |model: &[(u64, Instant, usize)]| {
                let mut ts: Vec<Target> = model.iter().map(|m| target_of(m.0)).collect();
                ts.sort();
                ts.dedup();
                let cost = ts.iter().map(|t| super::NameTable::cost("wq", "noop", t)).sum::<usize>();
                (ts.len(), cost)
            };
            // What the index should cost: one page per run of `IPAGE` ids holding a result.
            let index_cost = |model: &[(u64, Instant, usize)]| {
                let mut pages: Vec<u64> = model.iter().map(|m| m.0 / super::IPAGE).collect();
                pages.sort_unstable();
                pages.dedup();
                pages.len() * super::Index::PAGE_BYTES
            };
            let check = |store: &super::Results, model: &[(u64, Instant, usize)], next: u64| {
                assert_eq!(store.len(), model.len());
                assert_eq!(store.bytes, model.iter().map(|m| m.2).sum::<usize>());
                let (entries, cost) = names_cost(model);
                assert_eq!(store.names.len(), entries, "name entries");
                assert_eq!(store.names.bytes, cost, "name bytes");
                assert_eq!(store.map.bytes(), index_cost(model), "index bytes");
                store.map.check();
                for m in model {
                    let r = store.stored(m.0).expect("stored");
                    assert_eq!(r.id, m.0);
                    let res = r.to_result(Some(&store.names));
                    assert_eq!(res.target, target_of(m.0));
                    assert_eq!(&*res.workqueue, "wq");
                    assert_eq!(&*res.handler, "noop");
                }
                for id in 1..next {
                    if !model.iter().any(|m| m.0 == id) {
                        assert!(store.get(id).is_none(), "{id} forgotten but found");
                    }
                }
            };
            for op in ops {
                let inserted = matches!(op, Op::Insert(..) | Op::Again(_));
                match op {
                    Op::Insert(n, text) => {
                        // Runs of ids naming one target share one body, as copies do.
                        let mut shared: Option<(Target, Arc<crate::engine::sched::Body>)> = None;
                        let mut rs: Vec<_> = (0..n)
                            .map(|i| {
                                let id = next + i as u64;
                                let b = match &shared {
                                    Some((t, b)) if *t == target_of(id) => b.clone(),
                                    _ => {
                                        let b = body(id);
                                        shared = Some((target_of(id), b.clone()));
                                        b
                                    }
                                };
                                stored_with(id, text, b)
                            })
                            .collect();
                        for r in &rs {
                            model.retain(|m| m.0 != r.id);
                            model.push((r.id, now, super::result_bytes(r)));
                        }
                        next += n as u64;
                        newest = next - 1;
                        store.insert(&mut rs, now);
                        assert!(rs.is_empty());
                    }
                    Op::Again(back) => {
                        let Some(id) = newest.checked_sub(back as u64).filter(|&id| id > 0) else {
                            continue;
                        };
                        let r = stored(id, 3);
                        model.retain(|m| m.0 != id);
                        model.push((id, now, super::result_bytes(&r)));
                        store.insert(&mut vec![r], now);
                    }
                    Op::Take(back) => {
                        let Some(id) = newest.checked_sub(back as u64) else { continue };
                        let had = model.iter().position(|m| m.0 == id);
                        let got = store.take(id);
                        assert_eq!(got.is_some(), had.is_some(), "take {id}");
                        if let Some(i) = had {
                            model.remove(i);
                        }
                    }
                    Op::Expire(ms) => {
                        now += Duration::from_millis(ms);
                        store.expire(now);
                        model.retain(|m| now.duration_since(m.1) < ttl);
                    }
                }
                // The bounds (after an insert), oldest forgotten first.
                while inserted && {
                    let bytes: usize = model.iter().map(|m| m.2).sum::<usize>()
                        + names_cost(&model).1
                        + index_cost(&model);
                    model.len() > max || (bytes > max_bytes && model.len() > 1)
                } {
                    model.remove(0);
                }
                check(&store, &model, next);
            }
        }
    }

    use crate::engine::tests::engine;

    /// Results of batches of two workqueues, alike but for the workqueue (same handler,
    /// same targets, several runs each), read back from the store: each names its own
    /// workqueue and target, and once the store has forgotten them all its name table is
    /// empty. Fails if the store's name table matches entries on handler and target alone,
    /// or keeps an entry no stored result names.
    #[test]
    fn stored_results_keep_their_own_names() {
        let engine = engine();
        engine
            .create_workqueue(crate::engine::WorkqueueAttrs::named("other"))
            .unwrap();
        let targets = [
            Target::All,
            Target::Cpus(CpuSet::range(0, 1)),
            Target::Cpu(1),
        ];
        let mut want = Vec::new();
        for round in 0..6 {
            let wq = ["default", "other"][round % 2];
            let mut batch = crate::engine::Batch::new();
            for t in &targets {
                batch.copies(ItemSpec::new(t.clone(), "noop"), 3);
            }
            let (receipt, flush) = engine.submit_and_flush(wq, batch, false).unwrap();
            flush.wait(Some(Duration::from_secs(30))).unwrap();
            for (i, s) in receipt.items.iter().enumerate() {
                want.push((s.id, wq, targets[i / 3].clone()));
            }
        }
        let ids: Vec<_> = want.iter().map(|w| w.0).collect();
        for (got, (id, wq, t)) in engine.results(&ids).iter().zip(&want) {
            let got = got.as_ref().expect("stored");
            assert_eq!((got.id, &*got.workqueue, &got.target), (*id, *wq, t));
            assert_eq!(&*got.handler, "noop");
        }
        let store = engine.inner.sched.write().results_store();
        assert_eq!(
            store.lock().names.len(),
            6,
            "one entry per workqueue and target"
        );
        // Forget them all (a roll-back's path), and the table goes with them.
        for id in &ids {
            assert!(store.lock().take(*id).is_some());
        }
        let s = store.lock();
        assert_eq!((s.names.len(), s.names.bytes, s.bytes), (0, 0, 0));
        drop(s);
        engine.shutdown(Duration::from_secs(5));
    }

    /// Results are made when read, once per distinct id: a look-up naming one stored id
    /// 100 000 times (and a live one as often) gets one shared `ItemResult` per id, not
    /// 100 000 (the daemon's memory bound: a `GetResults` of a million copies of one id took
    /// over 300 MiB when each copy was made apart). Fails if copies are made one by one.
    #[test]
    fn copies_of_an_id_share_one_result() {
        let engine = engine();
        let (receipt, flush) = engine
            .submit_and_flush("default", vec![ItemSpec::new(Target::All, "noop")], false)
            .unwrap();
        let done = receipt.items[0].id;
        flush.wait(Some(Duration::from_secs(30))).unwrap();
        let mut delayed = ItemSpec::new(Target::All, "noop");
        delayed.delay = Some(Duration::from_secs(3600));
        let live = engine.submit("default", vec![delayed]).unwrap().items[0].id;
        let mut ids = vec![done; 100_000];
        ids.extend(std::iter::repeat_n(live, 100_000));
        let got = engine.results(&ids);
        let (a, b) = got.split_at(100_000);
        let first = a[0].as_ref().expect("stored result");
        assert_eq!((first.id, first.state), (done, State::Ok));
        assert!(a
            .iter()
            .all(|r| r.as_ref().is_some_and(|r| Arc::ptr_eq(r, first))));
        let first = b[0].as_ref().expect("live item's state");
        assert_eq!((first.id, first.state), (live, State::Delayed));
        assert!(b
            .iter()
            .all(|r| r.as_ref().is_some_and(|r| Arc::ptr_eq(r, first))));
        // A flush naming the ended id many times: its `Done` events share one result too.
        let mut f = engine
            .flush(crate::engine::FlushScope::Items(vec![done; 10_000]))
            .unwrap();
        let mut shared: Option<Arc<crate::engine::ItemResult>> = None;
        let mut n = 0;
        while let Ok(Some(ev)) = f.next_blocking(None) {
            let crate::engine::FlushEvent::Done(r) = ev else {
                panic!("not a Done event: {ev:?}");
            };
            let first = shared.get_or_insert_with(|| r.clone());
            assert!(Arc::ptr_eq(&r, first), "a copy made apart");
            n += 1;
        }
        assert_eq!(n, 10_000);
        engine.shutdown(Duration::from_secs(5));
    }

    /// Terminal results are read under R alone: with L held by someone else (a long submit,
    /// a topology change), a look-up of stored results still returns, and one of a live item
    /// waits for L and then sees it live. Fails if `Engine::results` takes L for stored ids.
    #[test]
    fn stored_results_are_read_without_the_scheduler_lock() {
        let engine = engine();
        let items: Vec<ItemSpec> = (0..100)
            .map(|_| ItemSpec::new(Target::All, "noop"))
            .collect();
        let (receipt, flush) = engine.submit_and_flush("default", items, false).unwrap();
        let ids: Vec<_> = receipt.items.iter().map(|s| s.id).collect();
        let sum = flush.wait(Some(Duration::from_secs(30))).unwrap();
        assert_eq!(sum.covered, 100);

        let (tx, rx) = std::sync::mpsc::channel();
        let held = engine.inner.sched.write();
        std::thread::scope(|s| {
            s.spawn(|| {
                let got = engine.results(&ids);
                let _ = tx.send(got);
            });
            let got = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("a look-up of stored results waited for L");
            assert_eq!(got.len(), 100);
            for (r, id) in got.iter().zip(&ids) {
                let r = r.as_ref().expect("stored result");
                assert_eq!((r.id, r.state), (*id, State::Ok));
            }
            drop(held);
        });
        // An id never issued is looked up under L too, and is unknown.
        assert!(engine.results(&[1 << 40]).iter().all(Option::is_none));
        engine.shutdown(Duration::from_secs(5));
    }
}
