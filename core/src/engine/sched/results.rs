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
//! of the one slot that holds it; `bytes` is the sum of [`result_bytes`] over them; and after
//! each insert the store is within `max` results and `max_bytes` (keeping at least one).
//! An item leaves `items` and enters the store in one L hold, or (a worker's finish batch,
//! `finish.rs`'s `Finished`) after it, with R taken before that hold ended; so a reader
//! holding L, then R, finds every issued, unforgotten item in exactly one of them.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::engine::idhash::IdMap;
use crate::engine::{ItemResult, State, WorkerRef};
use crate::groups::Level;
use crate::target::Target;

use super::item::{ItemId, Started};
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
/// ([`Stored::to_result`]). About half the bytes of an `Arc<ItemResult>` (size checked
/// below; with its slot and map entry a result is estimated at 216 bytes instead of 352, so
/// `results_memory` holds 1.6 times the results), and a worker ending an item nobody waits
/// for allocates nothing for its result.
#[derive(Clone)]
pub(crate) struct Stored {
    pub(super) id: ItemId,
    pub(super) batch: u64,
    pub(super) workqueue: Arc<str>,
    pub(super) handler: Arc<str>,
    pub(super) target: Target,
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
    /// The result as the engine's API gives it.
    pub(crate) fn to_result(&self) -> ItemResult {
        let x = self.extra.as_deref();
        ItemResult {
            id: self.id,
            batch: self.batch,
            workqueue: self.workqueue.clone(),
            state: self.state,
            output: x.map(|x| x.output.clone()).unwrap_or_default(),
            error: x.map(|x| x.error.clone()).unwrap_or_default(),
            target: self.target.clone(),
            handler: self.handler.clone(),
            cpu_started: self.started.as_ref().map(|s| s.cpu),
            cpu_finished: self.cpu_finished,
            fallback: self.fallback,
            reason: x.map(|x| x.reason.clone()).unwrap_or_default(),
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
    /// Time from start to finish.
    pub(super) fn run_time(&self) -> Option<Duration> {
        let s = self.started.as_ref()?;
        self.finished_at.duration_since(s.at).ok()
    }
}

/// Stored results per chunk of [`Results::order`].
const CHUNK: usize = 256;

/// Terminal results, bounded by count, age and bytes (oldest forgotten first).
///
/// The records sit in insertion order (the order they are forgotten in) in chunks of
/// [`CHUNK`], each slot with its insertion time; a map gives each stored id its sequence
/// number, which is its slot. A store that grows moves no record (a new chunk is added), and
/// forgetting the oldest is a pop at the front. A slot whose result was taken out (a batch
/// rolled back) or replaced is empty and skipped when its turn comes.
pub(crate) struct Results {
    /// Stored id → sequence number (its slot in `order`).
    map: IdMap<ItemId, u64>,
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
pub(crate) type Store = Arc<parking_lot::Mutex<Results>>;

/// R, held.
pub(crate) type ResultsGuard<'a> = parking_lot::MutexGuard<'a, Results>;

/// What one stored result costs, estimated: its slot, its map entry, and its out-of-line part
/// with its texts when it has one.
fn result_bytes(r: &Stored) -> usize {
    const OVERHEAD: usize = std::mem::size_of::<(Instant, Option<Stored>)>() + 32;
    OVERHEAD
        + r.extra.as_deref().map_or(0, |x| {
            std::mem::size_of::<StoredExtra>() + x.output.len() + x.error.len() + x.reason.len()
        })
}

impl Results {
    pub(crate) fn new(max: usize, ttl: Duration, max_bytes: usize) -> Results {
        Results {
            map: IdMap::default(),
            order: VecDeque::new(),
            base: 0,
            head: 0,
            spare: None,
            max: max.max(1),
            ttl,
            bytes: 0,
            max_bytes,
        }
    }
    /// Results stored.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
    /// The slot of sequence number `seq`.
    fn slot(&self, seq: u64) -> Option<&(Instant, Option<Stored>)> {
        let i = usize::try_from(seq.checked_sub(self.base)?).ok()?;
        self.order.get(i / CHUNK)?.get(i % CHUNK)
    }
    /// The stored record of `id`.
    pub(super) fn stored(&self, id: ItemId) -> Option<&Stored> {
        let seq = *self.map.get(&id)?;
        self.slot(seq)?.1.as_ref()
    }
    /// A stored result, taken with R alone (see the module docs).
    pub(crate) fn get(&self, id: ItemId) -> Option<Arc<ItemResult>> {
        self.stored(id).map(|r| Arc::new(r.to_result()))
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
            for (seq, (_, r)) in (first..).zip(&chunk[from..]) {
                let Some(r) = r else { continue };
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
        while self.map.len() > self.max || (self.bytes > self.max_bytes && self.map.len() > 1) {
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
            self.map.remove(&old.id);
            self.bytes -= result_bytes(old);
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
        let seq = self.map.remove(&id)?;
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
        id != 0 && id < self.next_item
    }

    /// The store behind R, for look-ups that do not take L.
    pub(crate) fn results_store(&self) -> Store {
        self.results.clone()
    }

    /// An item's current state (live), or its stored result; under L, so an item that ends
    /// meanwhile is found in one or the other.
    pub(crate) fn result_of(&self, id: ItemId) -> Option<Arc<ItemResult>> {
        let Some(it) = self.items.get(&id) else {
            return self.results.lock().get(id);
        };
        Some(Arc::new(ItemResult {
            id,
            batch: it.batch,
            workqueue: self.wqs[it.wi()].name.clone(),
            state: it.state,
            output: Vec::new(),
            error: String::new(),
            target: it.body.target.clone(),
            handler: it.body.handler_name().clone(),
            cpu_started: self.bound(id).map(|b| b.cpu),
            cpu_finished: None,
            fallback: it.fallback,
            reason: if it.state == State::Pending {
                self.queues[it.qid()].reason.clone()
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
    use crate::engine::{Engine, EngineConfig, ItemSpec, State};
    use crate::handler::Registry;
    use crate::target::Target;

    /// A stored result stays compact: 176 bytes at most, about half of what an
    /// `Arc<ItemResult>` took per result (the record, its `Arc` counts and the allocator's
    /// header). Fails when a field grows `Stored` past that; move rarely used fields to
    /// `StoredExtra` instead.
    #[test]
    fn a_stored_result_is_compact() {
        let stored = std::mem::size_of::<super::Stored>();
        let arc_result = std::mem::size_of::<crate::engine::ItemResult>() + 16 + 16;
        eprintln!("Stored {stored} bytes, Arc<ItemResult> {arc_result}");
        assert!(stored <= 176, "Stored is {stored} bytes");
        assert!(100 * stored <= 55 * arc_result, "{stored} vs {arc_result}");
    }

    /// A stored result with `id`, state `Ok`, and an error text of `text` bytes (so that
    /// results differ in size).
    fn stored(id: u64, text: usize) -> super::Stored {
        let now = std::time::SystemTime::now();
        super::Stored {
            id,
            batch: 1,
            workqueue: "wq".into(),
            handler: "noop".into(),
            target: Target::All,
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
        /// the sum over them, and the bounds hold (count, bytes keeping at least one, age).
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
            let check = |store: &super::Results, model: &[(u64, Instant, usize)], next: u64| {
                assert_eq!(store.len(), model.len());
                assert_eq!(store.bytes, model.iter().map(|m| m.2).sum::<usize>());
                for m in model {
                    let r = store.stored(m.0).expect("stored");
                    assert_eq!(r.id, m.0);
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
                        let mut rs: Vec<_> = (0..n).map(|i| stored(next + i as u64, text)).collect();
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
                    let bytes: usize = model.iter().map(|m| m.2).sum();
                    model.len() > max || (bytes > max_bytes && model.len() > 1)
                } {
                    model.remove(0);
                }
                check(&store, &model, next);
            }
        }
    }

    fn engine() -> Engine {
        let snap = crate::live::flat_snapshot(&CpuSet::range(0, 1));
        let cfg = EngineConfig {
            pinning: false,
            ..EngineConfig::default()
        };
        Engine::start(cfg, Registry::with_builtins(None), snap).unwrap()
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
        let held = engine.inner.sched.lock();
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
