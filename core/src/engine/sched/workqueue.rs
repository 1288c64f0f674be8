//! Workqueues: the [`Wq`] record (attributes, queues by target, pending keys, counters) and create,
//! update, delete, drain and per-workqueue stats.
//!
//! Invariant (under L): `delayed`, `pending` and `running` count the workqueue's live items in each
//! state, so `live()` is zero exactly when none is left; a workqueue is deleted only when empty,
//! and its drain mark is cleared by `terminal` when its last live item ends, or by
//! [`Sched::update_wq`]. A key in `keys` belongs to a delayed or pending (not yet bound) item.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::engine::lock::Mutex;

use crate::engine::idhash::IdMap;
use crate::engine::{EngineError, ResultsMode, State, WorkqueueAttrs, WorkqueueStats};
use crate::target::Target;

use super::item::ItemId;
use super::{Effects, Sched};

pub(super) struct Wq {
    pub(super) attrs: WorkqueueAttrs,
    pub(super) name: Arc<str>,
    pub(super) queues: HashMap<Target, usize>,
    /// Queues of attached-worker handlers, by (target, handler name).
    pub(super) remote_queues: HashMap<(Target, Arc<str>), usize>,
    /// Keys of pending (not yet started) items.
    pub(super) keys: HashMap<Arc<str>, ItemId>,
    pub(super) draining: bool,
    pub(super) delayed: usize,
    pub(super) pending: usize,
    pub(super) running: usize,
    /// (CPU-bound, waiting) items running per CPU.
    pub(super) running_on: IdMap<u32, [u32; 2]>,
    /// Ordered workqueues: every pending item in submission order (with tombstones).
    pub(super) ordered: VecDeque<ItemId>,
    pub(super) totals: [u64; 8],
    pub(super) submitted: u64,
}

impl Wq {
    /// Its concurrency limits, as [`super::queue::room`] takes them: `max_active`,
    /// `max_waiting`, `group_max_active`.
    pub(super) fn slots(&self) -> [u32; 3] {
        let a = &self.attrs;
        [a.max_active, a.max_waiting, a.group_max_active]
    }

    pub(super) fn live(&self) -> usize {
        self.delayed + self.pending + self.running
    }
    fn all_queues(&self) -> impl Iterator<Item = usize> + '_ {
        self.queues
            .values()
            .chain(self.remote_queues.values())
            .copied()
    }
}

impl Sched {
    pub(crate) fn create_wq(&mut self, attrs: WorkqueueAttrs) -> Result<(), EngineError> {
        if self.wq_names.contains_key(&attrs.name) {
            return Err(EngineError::WorkqueueExists(attrs.name));
        }
        let name: Arc<str> = Arc::from(attrs.name.as_str());
        let idx = self.wqs.insert(Mutex::new(Wq {
            attrs,
            name: name.clone(),
            queues: HashMap::new(),
            remote_queues: HashMap::new(),
            keys: HashMap::new(),
            draining: false,
            delayed: 0,
            pending: 0,
            running: 0,
            running_on: IdMap::default(),
            ordered: VecDeque::new(),
            totals: [0; 8],
            submitted: 0,
        }));
        self.wq_names.insert(name.to_string(), idx);
        Ok(())
    }

    pub(super) fn wq_index(&self, name: &str) -> Result<usize, EngineError> {
        self.wq_names
            .get(name)
            .copied()
            .ok_or_else(|| EngineError::UnknownWorkqueue(name.to_string()))
    }

    /// What workqueue `name` keeps of each item.
    pub(crate) fn results_mode(&mut self, name: &str) -> Result<ResultsMode, EngineError> {
        let wi = self.wq_index(name)?;
        Ok(self.wqs[wi].get_mut().attrs.results)
    }

    pub(crate) fn update_wq(
        &mut self,
        attrs: WorkqueueAttrs,
        fx: &mut Effects,
    ) -> Result<(), EngineError> {
        let wi = self.wq_index(&attrs.name)?;
        let wq = self.wqs[wi].get_mut();
        if wq.attrs.ordered != attrs.ordered && wq.live() > 0 {
            return Err(EngineError::WorkqueueNotEmpty {
                name: attrs.name,
                items: wq.live(),
            });
        }
        wq.attrs = attrs;
        if wq.draining {
            // A drain (or delete) whose caller stopped waiting left it refusing work; an update
            // is the operator's way to take it back.
            tracing::info!(workqueue = %wq.name, items = wq.live(), "workqueue update ends its drain; it accepts work again");
            wq.draining = false;
        }
        let qids: Vec<usize> = wq.all_queues().collect();
        for qid in qids {
            self.resolve_queue(qid, fx);
        }
        Ok(())
    }

    pub(crate) fn delete_wq(&mut self, name: &str) -> Result<(), EngineError> {
        if name == "default" {
            return Err(EngineError::DefaultWorkqueue);
        }
        let wi = self.wq_index(name)?;
        let live = self.wqs[wi].get_mut().live();
        if live > 0 {
            return Err(EngineError::WorkqueueNotEmpty {
                name: name.to_string(),
                items: live,
            });
        }
        let qids: Vec<usize> = self.wqs[wi].get_mut().all_queues().collect();
        for qid in qids {
            self.remove_queue(qid);
        }
        self.wqs.remove(wi);
        self.wq_names.remove(name);
        Ok(())
    }

    pub(crate) fn start_drain(&mut self, name: &str) -> Result<(), EngineError> {
        let wi = self.wq_index(name)?;
        let wq = self.wqs[wi].get_mut();
        if wq.live() > 0 {
            wq.draining = true;
        }
        Ok(())
    }

    pub(crate) fn wq_stats(&mut self) -> Vec<WorkqueueStats> {
        let mut v: Vec<_> = self
            .wqs
            .iter_mut()
            .map(|(_, wq)| wq.get_mut())
            .map(|wq| WorkqueueStats {
                attrs: wq.attrs.clone(),
                draining: wq.draining,
                delayed: wq.delayed,
                pending: wq.pending,
                running: wq.running,
                totals: State::ALL
                    .iter()
                    .filter(|s| s.is_terminal())
                    .map(|s| (*s, wq.totals[s.index()]))
                    .collect(),
                submitted: wq.submitted,
            })
            .collect();
        v.sort_by(|a, b| a.attrs.name.cmp(&b.attrs.name));
        v
    }
}
