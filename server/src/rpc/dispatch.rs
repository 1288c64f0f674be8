//! `wqd.v1.DispatchService`: submit (single message and streamed), flush, cancel, drain and
//! result look-ups.
//!
//! Invariants: a batch reaches `Engine::submit` (or, waited, `Engine::submit_and_flush`) once,
//! whole, after every item was converted and checked against the limits (streamed batches only
//! at a clean end of stream); a flush stream
//! ends with exactly one summary unless it ends with an error status (deadline, client gone);
//! every wait selects on the client's deadline, and the engine `Flush` it holds is dropped when
//! the wait ends, whatever ends it.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use wqd_proto::out::{
    EncodedReceipts, EncodedResults, FlushEventOut, FlushResponseOut, SessionResponseOut,
    SubmitResponseOut,
};
use wqd_proto::submit_in::{SessionRequestIn, SubmitRequestIn};
use wqd_proto::v1;

use super::convert::{
    count_state, duration_out, state_out, submit_response_len_bound, BatchSpecs, Origins,
    ResultsOut, LOOKUP_FIXED_MAX,
};
use super::encode::ResultEncoder;
use super::session::Session;
use super::wait::InOrder;
use super::{
    deadline_of, sleep_until, status, Rpc, RpcError, FLUSH_BATCH_DELAY, FLUSH_BATCH_ITEMS,
};
use crate::metrics::{FlushMethod, FlushOutcome, Metrics};
use wqd_core::engine::{
    Batch, CancelOutcome, Delivered, EngineError, Flush, FlushEvent, FlushScope, Receipt,
};
use wqd_core::groups::GroupMap;

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Cancels naming up to this many ids call `Engine::cancel` on the request's own task; larger
/// ones run as blocking calls ([`Rpc::blocking`]). A small cancel takes microseconds under the
/// engine's lock (64 pending items ≈ 10 µs), less than handing the async worker's other tasks
/// to another thread (or, on a current-thread runtime, the thread wake-up of a
/// `spawn_blocking`, ≈ 20 µs on a loaded 2-CPU VM), which would be on the latency path of
/// every small call; a large one runs as a blocking call so that it never stalls the other
/// connections.
/// A Cancel of a batch runs inline whatever its size, as Flush and Drain do: the daemon
/// cannot tell the batch's size without taking the engine lock, and the cancel's cost
/// (measured: ≈ 0.15 µs per pending item at 64, ≈ 0.5 µs at 10 000) is mostly spent under
/// that lock, which every other engine call waits for wherever it runs.
const INLINE_ITEMS: usize = 64;

/// Batches up to this many items call `Engine::submit` on the request's own task; larger ones
/// run as blocking calls ([`Rpc::blocking`]), so that one big submit never stalls the other
/// connections for long. A submit costs about 55 ns per item (its items made and queued; the
/// request was decoded and checked before), so the other connections wait at most about
/// 60 µs behind one submitted here, under a single item's round trip (once it holds the
/// engine's lock: one that waits for the lock waits on this task, as every smaller submit
/// and cancel always did). Handing the worker's other tasks to another thread instead
/// (`block_in_place`) wakes that thread on every such call, and on a host whose CPUs the item
/// workers keep busy it competes with them. Measured
/// at batches of 1 000 (old/new daemon alternated, 2 000 calls a run): `Submit(wait)`
/// 1.24–1.29M → 1.30–1.41M items/s (5 runs of 5), on a summary workqueue 2.15–2.31M →
/// 2.26–2.59M, `Submit` + `Flush(summary)` 1.75–1.78M → 2.03–2.09M; the RPC thread's CPU per
/// call 50 µs less at the last.
const INLINE_SUBMIT_ITEMS: usize = 1024;

/// How many groups of a batch's fan-outs the receipts keep written out (a fan-out over more
/// writes the rest out entry by entry).
const FAN_NAMES: usize = 16;

/// A wire `ReceiptsMode`: whether the response carries a receipt per item (unset is
/// `RECEIPTS_MODE_EACH`); a text for values outside the enum.
fn receipts_in(v: i32) -> Result<bool, String> {
    match v1::ReceiptsMode::try_from(v) {
        Ok(v1::ReceiptsMode::Unspecified | v1::ReceiptsMode::Each) => Ok(true),
        Ok(v1::ReceiptsMode::None) => Ok(false),
        Err(_) => Err(format!(
            "unknown receipts mode {v} (RECEIPTS_MODE_EACH = 1, RECEIPTS_MODE_NONE = 2, or unset)"
        )),
    }
}

/// The entries of a batch that were not queued, in index order (`SubmitStream`'s answer, and
/// `Submit`'s without receipts).
fn duplicates_of(rec: &Receipt) -> Vec<v1::DuplicateItem> {
    rec.items
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.queued)
        .map(|(i, s)| v1::DuplicateItem {
            index: i as u64,
            duplicate_of: s.id,
        })
        .collect()
}

fn wq_name(s: String) -> String {
    if s.is_empty() {
        "default".to_string()
    } else {
        s
    }
}

/// Hands every delivery of `flush` to `sink` until the flush completes, or the deadline
/// passes (`what` names the wait in the error; it is built only then).
async fn collect(
    flush: &mut Flush,
    deadline: Option<Instant>,
    what: impl FnOnce() -> String,
    mut sink: impl FnMut(Delivered),
) -> Result<(), RpcError> {
    let began = Instant::now();
    loop {
        tokio::select! {
            got = flush.next_delivered() => match got {
                Some(d) => sink(d),
                None => return Ok(()),
            },
            _ = sleep_until(deadline) => {
                return Err(RpcError::Deadline { waited: began.elapsed(), what: what() })
            }
        }
    }
}

/// Records a finished flush wait in the metrics, if they are on.
fn observe_flush(m: Option<&Metrics>, method: FlushMethod, outcome: FlushOutcome, began: Instant) {
    if let Some(m) = m {
        m.observe_flush(method, outcome, began.elapsed());
    }
}

impl Rpc {
    /// [`observe_flush`] for a wait that ended with `r`.
    fn flush_waited<T>(&self, method: FlushMethod, began: Instant, r: &Result<T, RpcError>) {
        let outcome = match r {
            Ok(_) => FlushOutcome::Complete,
            Err(RpcError::Deadline { .. }) => FlushOutcome::Deadline,
            Err(_) => FlushOutcome::Abandoned,
        };
        observe_flush(self.metrics.as_deref(), method, outcome, began);
    }

    /// Calls the engine for a long step (a large batch) without stalling the async worker's
    /// other tasks. On a multi-thread runtime (the daemon's) in place, with
    /// `block_in_place`: the worker's other tasks move to another thread while this one
    /// works, and the request skips the hop to the blocking pool and back (two thread
    /// wake-ups on its latency path: a `Submit(wait)` of 1 000 `noop` items ran about 15%
    /// faster). Elsewhere (a current-thread runtime, where `block_in_place` is not allowed)
    /// in the blocking pool. A panic is an internal error either way.
    pub(super) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&wqd_core::engine::Engine) -> T + Send + 'static,
    ) -> Result<T, RpcError> {
        let multi = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        // In place: the caller's task waits for the engine, so a session's next request is
        // not queued before this one (see `session.rs`).
        if multi {
            return tokio::task::block_in_place(|| self.inline("blocking call", f));
        }
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || f(&engine))
            .await
            .map_err(|e| RpcError::Internal(format!("engine call failed: {e}")))
    }

    fn check_count(&self, what: &str, n: usize) -> Result<(), RpcError> {
        let max = self.limits.load().max_batch_items;
        if n > max {
            return Err(RpcError::OverLimit {
                what: what.to_string(),
                found: n,
                limit: "limits.max_batch_items",
                max,
            });
        }
        Ok(())
    }

    /// Calls the engine on the request's own task (see [`INLINE_SUBMIT_ITEMS`] and
    /// [`INLINE_ITEMS`]); a panic there is an internal error, as in the blocking pool.
    fn inline<T>(
        &self,
        what: &str,
        f: impl FnOnce(&wqd_core::engine::Engine) -> T,
    ) -> Result<T, RpcError> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&self.engine)))
            .map_err(|_| RpcError::Internal(format!("engine call failed: {what} panicked")))
    }

    /// Submits a checked batch once, counting it. Small batches are submitted inline (see
    /// [`INLINE_SUBMIT_ITEMS`]).
    ///
    /// The submit and its counting happen together, in one synchronous step: if the client
    /// goes away while a large batch is in the blocking pool (a current-thread runtime: the
    /// handler is dropped at the `.await`), the batch that the pool accepted is still counted.
    ///
    /// With `wait`, the batch's flush is registered in the same engine step
    /// (`Engine::submit_and_flush`), so no item can end before the flush hears of it: an item
    /// of a workqueue that keeps no results (`results = summary | none`) that ended first would
    /// otherwise reach the flush only as gone, uncounted.
    async fn submit_specs(
        &self,
        wq: String,
        specs: Batch,
        wait: bool,
    ) -> Result<(Receipt, Option<Flush>), RpcError> {
        if specs.len() <= INLINE_SUBMIT_ITEMS {
            self.inline("submit", |e| {
                submit_counted(e, &self.counters, &wq, specs, wait)
            })?
        } else {
            let counters = self.counters.clone();
            self.blocking(move |e| submit_counted(e, &counters, &wq, specs, wait))
                .await?
        }
    }

    /// The groups `each:` targets expand against: the engine's own snapshot, so the expanded
    /// targets are the ones the engine resolves the batch with (unless a new topology epoch
    /// lands between the two, when a group that vanished refuses the batch like any target).
    fn groups(&self) -> Arc<GroupMap> {
        self.engine.snapshot().groups.clone()
    }

    pub(super) fn refused(&self) {
        self.counters
            .batches_refused
            .fetch_add(1, Ordering::Relaxed);
    }

    /// `Submit`: checks, queues all or nothing, and with `wait` collects the batch's results
    /// until `deadline`. `queued` is set to the batch's id once it is queued, so that a caller
    /// answering an error after that (the wait's deadline, results over the message limit)
    /// can name the batch whose work goes on.
    pub(super) async fn do_submit(
        &self,
        mut r: SubmitRequestIn,
        deadline: Option<Instant>,
        queued: &mut u64,
    ) -> Result<SubmitResponseOut, RpcError> {
        let limits = self.limits.load();
        let (wq, wait) = (wq_name(std::mem::take(&mut r.workqueue)), r.wait);
        let mut each = true;
        let (specs, origins) = (|| {
            each = receipts_in(r.receipts).map_err(|problem| RpcError::Field {
                field: "receipts".into(),
                problem,
            })?;
            if r.items.is_empty() {
                return Err(RpcError::Field {
                    field: "items".into(),
                    problem: "at least one item is required".into(),
                });
            }
            self.check_count("the batch's item count", r.item_count())?;
            let mut batch = BatchSpecs::default();
            // Runs of identical wire items are checked and converted once (see
            // `wqd_proto::submit_in`).
            for (it, copies) in r.items {
                batch.push_copies(it, copies, &limits, || self.groups())?;
            }
            Ok(batch.into_parts())
        })()
        .inspect_err(|_| self.refused())?;
        let (rec, flush) = self
            .submit_specs(wq, specs, wait)
            .await
            .map_err(|e| reindex(e, &origins))?;
        *queued = rec.batch;
        let queued_count = rec.items.iter().filter(|s| s.queued).count();
        // Encoded as they are made (see `EncodedReceipts`): a queued item that named one
        // group, the common case, is a few bytes written at once.
        let listed: &[_] = if each { &rec.items } else { &[] };
        let mut items = EncodedReceipts::with_capacity(listed.len());
        let fanned = origins.any();
        // A fan-out's groups, written out once each (its entries cycle through them), and
        // one receipt rewritten per entry (its `target` keeps its buffer).
        let mut names: Vec<(&wqd_core::target::Target, String)> = Vec::new();
        let mut r = v1::ItemReceipt::default();
        for (i, s) in listed.iter().enumerate() {
            let fan = fanned
                .then(|| origins.of(i))
                .and_then(|o| Some((o.fan?.1, o.wire)));
            if s.queued && fan.is_none() {
                items.push_queued(s.id);
                continue;
            }
            r.target.clear();
            r.source_index = None;
            if let Some((t, wire)) = fan {
                match names.iter().find(|(n, _)| *n == t) {
                    Some((_, name)) => r.target.push_str(name),
                    None => {
                        let name = t.to_string();
                        r.target.push_str(&name);
                        if names.len() < FAN_NAMES {
                            names.push((t, name));
                        }
                    }
                }
                r.source_index = Some(wire as u64);
            }
            r.item_id = if s.queued { s.id } else { 0 };
            r.queued = s.queued;
            r.duplicate_of = if s.queued { 0 } else { s.id };
            items.push(&r);
        }
        let mut resp = SubmitResponseOut {
            batch_id: rec.batch,
            items,
            first_item_id: rec.first,
            item_count: rec.items.len() as u64,
            queued_count: queued_count as u64,
            duplicates: if each || queued_count == rec.items.len() {
                Vec::new()
            } else {
                duplicates_of(&rec)
            },
            ..Default::default()
        };
        if let Some(mut flush) = flush {
            let batch = rec.batch;
            let what = || format!("waiting for batch {batch}");
            // The results are encoded as they come, in entry order (see `wait.rs`): by the
            // time the last item ends, most of them are.
            let mut got = InOrder::new(&rec.items, rec.first, resp.results.take());
            let waited = collect(&mut flush, deadline, what, |d| got.take(d)).await;
            self.flush_waited(FlushMethod::Submit, flush.began(), &waited);
            waited?;
            // Every item that ended counts, whatever its workqueue keeps: a full result
            // (`Done` or a record) or an event that says only its state, as `InOrder`
            // counted them, any other in the flush's tally (a workqueue that keeps no
            // per-item record sends no event per item, see `Engine::submit_and_wait`). A
            // `Gone` item (its result forgotten before the wait began) is in neither, as in
            // a flush, whose summary lists it apart.
            let (mut counts, results) = got.finish();
            if let Some((by_state, _)) = flush.tally() {
                for (state, n) in by_state {
                    count_state(&mut counts, state, n as u64);
                }
            }
            resp.counts = Some(counts);
            resp.results = results;
            // The exact size walks every result; a cheap upper bound spares that walk for a
            // response that plainly fits. Over the bound, the exact size decides, as before.
            let max = self.limits.load().max_message_bytes;
            if submit_response_len_bound(&resp) > max {
                let len = resp.encoded_len();
                if len > max {
                    return Err(RpcError::Exhausted {
                        what: format!(
                            "batch {} was accepted and is done, but its {} results take {len} \
                             bytes, over limits.max_message_bytes = {max}; fetch them with Flush \
                             (batch_id {})",
                            rec.batch,
                            resp.results.len(),
                            rec.batch
                        ),
                    });
                }
            }
        }
        Ok(resp)
    }

    async fn do_submit_stream(
        &self,
        mut s: Streaming<v1::SubmitStreamRequest>,
        deadline: Option<Instant>,
    ) -> Result<v1::SubmitStreamResponse, RpcError> {
        let mut wq: Option<String> = None;
        let mut batch = BatchSpecs::default();
        let mut committed = false;
        let began = Instant::now();
        let limits = self.limits.load();
        let read = async {
            loop {
                let msg = tokio::select! {
                    m = s.message() => m.map_err(RpcError::Transport)?,
                    _ = sleep_until(deadline) => return Err(RpcError::Deadline {
                        waited: began.elapsed(),
                        what: "reading the streamed batch (nothing was queued)".into(),
                    }),
                };
                let Some(m) = msg else {
                    if committed {
                        break;
                    }
                    // A clean end of stream — or a reset: hyper reports RST_STREAM(CANCEL or
                    // NO_ERROR) as the end of the body too, so only `commit` accepts.
                    return Err(RpcError::Field {
                        field: "commit".into(),
                        problem: "the stream ended without a message with commit = true; \
                                  nothing was queued"
                            .into(),
                    });
                };
                if committed {
                    return Err(RpcError::Field {
                        field: "commit".into(),
                        problem: "a message came after the one with commit = true; nothing \
                                  was queued"
                            .into(),
                    });
                }
                match (&wq, m.options) {
                    (None, Some(o)) => wq = Some(wq_name(o.workqueue)),
                    (None, None) => {
                        return Err(RpcError::Field {
                            field: "options".into(),
                            problem: "required on the first message of the stream".into(),
                        })
                    }
                    (Some(_), Some(_)) => {
                        return Err(RpcError::Field {
                            field: "options".into(),
                            problem: "allowed only on the first message of the stream".into(),
                        })
                    }
                    (Some(_), None) => {}
                }
                self.check_count(
                    "the streamed batch's item count",
                    batch.specs.len() + m.items.len(),
                )?;
                for it in m.items {
                    batch.push(it, &limits, || self.groups())?;
                }
                if m.commit {
                    // Accepted once the stream ends after this message (a further message
                    // refuses it); the client said so explicitly, so a reset from here on
                    // (which hyper reports as an end of stream) cannot take it back.
                    committed = true;
                }
            }
            Ok(())
        };
        read.await.inspect_err(|_| self.refused())?;
        let Some(wq) = wq else {
            self.refused();
            return Err(RpcError::Field {
                field: "options".into(),
                problem: "the stream carried no message".into(),
            });
        };
        let (specs, origins) = batch.into_parts();
        if specs.is_empty() {
            self.refused();
            return Err(RpcError::Field {
                field: "items".into(),
                problem: "at least one item is required".into(),
            });
        }
        let count = specs.len();
        let (rec, _) = self
            .submit_specs(wq, specs, false)
            .await
            .map_err(|e| reindex(e, &origins))?;
        let duplicates = duplicates_of(&rec);
        Ok(v1::SubmitStreamResponse {
            batch_id: rec.batch,
            first_item_id: rec.first,
            item_count: count as u64,
            queued_count: (count - duplicates.len()) as u64,
            duplicates,
        })
    }

    /// The engine scope of a flush request, and the never-issued ids of an items scope.
    fn flush_scope(
        &self,
        scope: Option<v1::flush_request::Scope>,
        include_delayed: bool,
    ) -> Result<(FlushScope, Vec<u64>), RpcError> {
        use v1::flush_request::Scope;
        match scope {
            None => Err(RpcError::Field {
                field: "scope".into(),
                problem: "required: items, batch_id or workqueue".into(),
            }),
            Some(Scope::Items(ids)) => {
                self.check_count("the number of item ids", ids.ids.len())?;
                let mut ids = ids.ids;
                ids.sort_unstable();
                ids.dedup();
                let (known, unknown): (Vec<u64>, Vec<u64>) =
                    ids.into_iter().partition(|id| self.engine.issued(*id));
                Ok((FlushScope::Items(known), unknown))
            }
            Some(Scope::BatchId(b)) => Ok((FlushScope::Batch(b), Vec::new())),
            Some(Scope::Workqueue(w)) if include_delayed => {
                Ok((FlushScope::WorkqueueAll(wq_name(w)), Vec::new()))
            }
            Some(Scope::Workqueue(w)) => Ok((FlushScope::Workqueue(wq_name(w)), Vec::new())),
        }
    }

    async fn do_cancel(
        &self,
        r: v1::CancelRequest,
        deadline: Option<Instant>,
    ) -> Result<v1::CancelResponse, RpcError> {
        use v1::cancel_request::Scope;
        let scope = match r.scope {
            None => {
                return Err(RpcError::Field {
                    field: "scope".into(),
                    problem: "required: items or batch_id".into(),
                })
            }
            Some(Scope::Items(ids)) => {
                self.check_count("the number of item ids", ids.ids.len())?;
                let mut ids = ids.ids;
                ids.sort_unstable();
                ids.dedup();
                FlushScope::Items(ids)
            }
            Some(Scope::BatchId(b)) => FlushScope::Batch(b),
        };
        // Pending items are cancelled here, at once; only the wait for running ones is async.
        let mut report = match &scope {
            FlushScope::Items(ids) if ids.len() > INLINE_ITEMS => {
                self.blocking(move |e| e.cancel(scope)).await??
            }
            _ => self.inline("cancel", |e| e.cancel(scope))??,
        };
        let running = report.running.covered();
        let waited = collect(
            &mut report.running,
            deadline,
            || format!("waiting for {running} running items to stop after cancel"),
            drop,
        )
        .await;
        self.flush_waited(FlushMethod::Cancel, report.running.began(), &waited);
        waited?;
        let mut outcomes = report.outcomes;
        outcomes.sort_unstable_by_key(|(id, _)| *id);
        let ids: Vec<u64> = outcomes.iter().map(|(id, _)| *id).collect();
        let results = self.engine.results(&ids);
        let items = outcomes
            .into_iter()
            .zip(results)
            .map(|((id, o), r)| {
                let outcome = match o {
                    CancelOutcome::CancelledPending => v1::CancelOutcome::CancelledPending,
                    CancelOutcome::WasRunning => v1::CancelOutcome::WaitedRunning,
                    CancelOutcome::AlreadyTerminal(_) => v1::CancelOutcome::AlreadyTerminal,
                    CancelOutcome::Unknown => v1::CancelOutcome::Unknown,
                };
                let state = match (o, r) {
                    (CancelOutcome::Unknown, _) => v1::ItemState::Unspecified,
                    (_, Some(r)) => state_out(r.state),
                    (CancelOutcome::AlreadyTerminal(s), None) => state_out(s),
                    (_, None) => v1::ItemState::Unspecified,
                };
                v1::CancelledItem {
                    item_id: id,
                    outcome: outcome as i32,
                    state: state as i32,
                }
            })
            .collect();
        Ok(v1::CancelResponse { items })
    }

    /// Drains `wq` and waits; the counts of what was in it.
    pub(super) async fn drain_wait(
        &self,
        wq: String,
        deadline: Option<Instant>,
        cancel_pending: bool,
    ) -> Result<(v1::StateCounts, Duration), RpcError> {
        let began = Instant::now();
        let w = wq.clone();
        // A drain's flush counts (no event per item), so this wait holds no results.
        let mut flush = self.engine.drain_with(&w, cancel_pending)?;
        let waited = collect(
            &mut flush,
            deadline,
            || {
                format!(
                    "draining workqueue {} (it stays draining, refusing submissions, until it \
                     is empty; UpdateWorkqueue takes it back)",
                    wqd_core::quote::quote(&wq)
                )
            },
            drop,
        )
        .await;
        self.flush_waited(FlushMethod::Drain, flush.began(), &waited);
        waited?;
        let mut counts = v1::StateCounts::default();
        if let Some((by_state, _)) = flush.tally() {
            for (st, n) in by_state {
                count_state(&mut counts, st, n as u64);
            }
        }
        Ok((counts, began.elapsed()))
    }

    fn do_get_results(&self, r: v1::GetResultsRequest) -> Result<v1::GetResultsResponse, RpcError> {
        self.check_count("the number of item ids", r.item_ids.len())?;
        let results = self.engine.results(&r.item_ids);
        let mut out = ResultsOut::default();
        // Refuse a response over the message limit before building it: the bound is cheap
        // (no conversion), and it is what the response could take at most.
        let max = self.limits.load().max_message_bytes;
        let mut bound = 16usize;
        for res in &results {
            bound += LOOKUP_FIXED_MAX + res.as_ref().map_or(0, |r| out.len_bound(r));
            if bound > max {
                return Err(RpcError::Exhausted {
                    what: format!(
                        "the results of {} ids would take more than limits.max_message_bytes = \
                         {max} bytes; ask for fewer ids at a time (or flush their batch, which \
                         streams results)",
                        r.item_ids.len()
                    ),
                });
            }
        }
        let items = r
            .item_ids
            .iter()
            .zip(results)
            .map(|(&id, res)| match res {
                Some(res) => v1::ItemLookup {
                    item_id: id,
                    status: v1::LookupStatus::Found as i32,
                    result: Some(out.result(&res)),
                },
                None => v1::ItemLookup {
                    item_id: id,
                    status: if self.engine.issued(id) {
                        v1::LookupStatus::Forgotten
                    } else {
                        v1::LookupStatus::Unknown
                    } as i32,
                    result: None,
                },
            })
            .collect();
        Ok(v1::GetResultsResponse { items })
    }
}

/// An engine error about entry `index` of a batch with fan-outs, re-addressed to the item the
/// client sent: `items[2]`, and for an expanded entry its group (`items[2].target: each:cache →
/// cache:3: no LLC numbered 3`). Batches without a fan-out keep the engine's indexes, which are
/// the wire indexes.
fn reindex(e: RpcError, origins: &Origins) -> RpcError {
    use EngineError as E;
    if !origins.any() {
        return e;
    }
    match e {
        RpcError::Engine(E::Group { index, source }) => {
            let o = origins.of(index);
            RpcError::Item {
                index: o.wire,
                field: "target",
                problem: match o.fan {
                    Some((each, t)) => format!("{each} → {t}: {source}"),
                    None => source.to_string(),
                },
            }
        }
        RpcError::Engine(E::UnknownHandler { index, name, known }) => {
            RpcError::Engine(E::UnknownHandler {
                index: origins.of(index).wire,
                name,
                known,
            })
        }
        RpcError::Engine(E::Handler { index, source }) => RpcError::Engine(E::Handler {
            index: origins.of(index).wire,
            source,
        }),
        RpcError::Engine(E::Duration {
            index,
            field,
            problem,
        }) => RpcError::Engine(E::Duration {
            index: origins.of(index).wire,
            field,
            problem,
        }),
        other => other,
    }
}

/// `Engine::submit` (with `wait`, `Engine::submit_and_flush`: the batch's flush too), then
/// the batch counters, in one step (see [`Rpc::submit_specs`]).
fn submit_counted(
    engine: &wqd_core::engine::Engine,
    c: &super::Counters,
    wq: &str,
    specs: Batch,
    wait: bool,
) -> Result<(Receipt, Option<Flush>), RpcError> {
    let r = if wait {
        engine
            .submit_and_wait(wq, specs)
            .map(|(rec, f)| (rec, Some(f)))
    } else {
        engine.submit(wq, specs).map(|rec| (rec, None))
    }
    .map_err(RpcError::from);
    match &r {
        Ok((rec, _)) => {
            c.batches_accepted.fetch_add(1, Ordering::Relaxed);
            let dups = rec.items.iter().filter(|s| !s.queued).count() as u64;
            c.deduplicated.fetch_add(dups, Ordering::Relaxed);
        }
        Err(_) => {
            c.batches_refused.fetch_add(1, Ordering::Relaxed);
        }
    }
    r
}

/// What a [`FlushBody`] sends next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlushPhase {
    /// Events still to come.
    Waiting,
    /// Every covered item is terminal (the last group may have gone): the summary is next.
    Summary,
    /// The summary or an error status went: the stream is over.
    Ended,
}

/// A `Flush` RPC's response stream: the flush's results in groups, then its summary. It is
/// the response body itself, polled by the connection's task as the client reads (no task
/// and no channel of its own between the engine's wake-up and the write), so a client that
/// goes away drops it, and with it the engine flush, never the work. Every wait selects on
/// the client's deadline, which ends the stream with `DEADLINE_EXCEEDED`.
struct FlushBody {
    /// Taken (dropped) as the summary is made.
    flush: Option<Flush>,
    phase: FlushPhase,
    deadline: Option<Instant>,
    summary_only: bool,
    unknown: Vec<u64>,
    /// A group of results goes as soon as it reaches this many bytes (half the message limit).
    budget: usize,
    counts: v1::StateCounts,
    group: EncodedResults,
    /// When the group being filled must go even if small.
    group_due: Option<Instant>,
    enc: ResultEncoder,
    began: Instant,
    metrics: Option<Arc<Metrics>>,
}

impl FlushBody {
    fn new(
        flush: Flush,
        deadline: Option<Instant>,
        summary_only: bool,
        unknown: Vec<u64>,
        max_bytes: usize,
        metrics: Option<Arc<Metrics>>,
    ) -> FlushBody {
        FlushBody {
            began: flush.began(),
            flush: Some(flush),
            phase: FlushPhase::Waiting,
            deadline,
            summary_only,
            unknown,
            budget: (max_bytes / 2).max(1),
            counts: v1::StateCounts::default(),
            // `ItemResults.results` is field 1.
            group: EncodedResults::new(1),
            group_due: None,
            enc: ResultEncoder::default(),
            metrics,
        }
    }

    /// The stream's end, observed once: by the summary, the deadline, or [`Drop`].
    fn end(&mut self, outcome: FlushOutcome) {
        self.phase = FlushPhase::Ended;
        observe_flush(
            self.metrics.as_deref(),
            FlushMethod::Flush,
            outcome,
            self.began,
        );
    }

    /// The next message, `None` once the stream is over.
    async fn next_message(&mut self) -> Option<Result<FlushResponseOut, Status>> {
        while self.phase == FlushPhase::Waiting {
            let Some(flush) = self.flush.as_mut() else {
                self.phase = FlushPhase::Summary;
                break;
            };
            let due = self.group_due;
            let ev = tokio::select! {
                _ = sleep_until(self.deadline) => {
                    self.end(FlushOutcome::Deadline);
                    return Some(Err(status(RpcError::Deadline {
                        waited: self.began.elapsed(),
                        what: "flushing".into(),
                    })));
                }
                _ = sleep_until(due), if due.is_some() => None,
                ev = flush.next() => Some(ev),
            };
            match ev {
                // The group's time is up.
                None => {}
                Some(None) => self.phase = FlushPhase::Summary,
                Some(Some(FlushEvent::Gone(id))) => {
                    self.unknown.push(id);
                    continue;
                }
                Some(Some(FlushEvent::Ended(_, state))) => {
                    count_state(&mut self.counts, state, 1);
                    continue;
                }
                Some(Some(FlushEvent::Done(r))) => {
                    count_state(&mut self.counts, r.state, 1);
                    if !self.summary_only {
                        self.enc.push(&r.view(), &mut self.group);
                        self.group_due
                            .get_or_insert_with(|| Instant::now() + FLUSH_BATCH_DELAY);
                        if self.group.len() < FLUSH_BATCH_ITEMS
                            && self.group.bytes_len() < self.budget
                        {
                            continue;
                        }
                    }
                }
            }
            self.group_due = None;
            if !self.group.is_empty() {
                return Some(Ok(FlushResponseOut {
                    event: Some(FlushEventOut::Results(self.group.take())),
                }));
            }
        }
        if self.phase != FlushPhase::Summary {
            return None;
        }
        let flush = self.flush.take()?;
        if let Some((by_state, gone)) = flush.tally() {
            for (st, n) in by_state {
                count_state(&mut self.counts, st, n as u64);
            }
            self.unknown.extend(gone);
        }
        self.end(FlushOutcome::Complete);
        let mut unknown = std::mem::take(&mut self.unknown);
        unknown.sort_unstable();
        let summary = v1::FlushSummary {
            counts: Some(self.counts),
            items_covered: flush.covered() as u64,
            waited: Some(duration_out(self.began.elapsed())),
            unknown_item_ids: unknown,
            delayed_not_covered: flush.delayed_not_covered() as u64,
        };
        Some(Ok(FlushResponseOut {
            event: Some(FlushEventOut::Summary(summary)),
        }))
    }

    /// The response body.
    fn into_stream(self) -> Out<FlushResponseOut> {
        Box::pin(futures_util::stream::unfold(self, |mut s| async move {
            s.next_message().await.map(|m| (m, s))
        }))
    }
}

impl Drop for FlushBody {
    fn drop(&mut self) {
        if self.phase != FlushPhase::Ended {
            tracing::debug!("flush client went away; the work goes on");
            self.end(FlushOutcome::Abandoned);
        }
    }
}

#[tonic::async_trait]
impl wqd_proto::out::dispatch_service_server::DispatchService for Rpc {
    async fn submit(
        &self,
        req: Request<SubmitRequestIn>,
    ) -> Result<Response<SubmitResponseOut>, Status> {
        let deadline = deadline_of(req.metadata());
        self.do_submit(req.into_inner(), deadline, &mut 0)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn submit_stream(
        &self,
        req: Request<Streaming<v1::SubmitStreamRequest>>,
    ) -> Result<Response<v1::SubmitStreamResponse>, Status> {
        let deadline = deadline_of(req.metadata());
        self.do_submit_stream(req.into_inner(), deadline)
            .await
            .map(Response::new)
            .map_err(status)
    }

    type SessionStream = Out<SessionResponseOut>;

    async fn session(
        &self,
        req: Request<Streaming<SessionRequestIn>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let deadline = deadline_of(req.metadata());
        Ok(Response::new(
            Session::new(self.clone(), req.into_inner(), deadline).into_stream(),
        ))
    }

    type FlushStream = Out<FlushResponseOut>;

    async fn flush(
        &self,
        req: Request<v1::FlushRequest>,
    ) -> Result<Response<Self::FlushStream>, Status> {
        let deadline = deadline_of(req.metadata());
        let r = req.into_inner();
        let (scope, unknown) = self
            .flush_scope(r.scope, r.include_delayed)
            .map_err(status)?;
        // A summary-only flush needs no per-item events: the engine tallies them.
        let flush = if r.summary_only {
            self.engine.flush_summary(scope)
        } else {
            self.engine.flush(scope)
        }
        .map_err(|e| status(e.into()))?;
        Ok(Response::new(
            FlushBody::new(
                flush,
                deadline,
                r.summary_only,
                unknown,
                self.limits.load().max_message_bytes,
                self.metrics.clone(),
            )
            .into_stream(),
        ))
    }

    async fn cancel(
        &self,
        req: Request<v1::CancelRequest>,
    ) -> Result<Response<v1::CancelResponse>, Status> {
        let deadline = deadline_of(req.metadata());
        self.do_cancel(req.into_inner(), deadline)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn drain(
        &self,
        req: Request<v1::DrainRequest>,
    ) -> Result<Response<v1::DrainResponse>, Status> {
        let deadline = deadline_of(req.metadata());
        let wq = wq_name(req.into_inner().workqueue);
        let (counts, waited) = self.drain_wait(wq, deadline, false).await.map_err(status)?;
        Ok(Response::new(v1::DrainResponse {
            counts: Some(counts),
            waited: Some(duration_out(waited)),
        }))
    }

    async fn get_results(
        &self,
        req: Request<v1::GetResultsRequest>,
    ) -> Result<Response<v1::GetResultsResponse>, Status> {
        self.do_get_results(req.into_inner())
            .map(Response::new)
            .map_err(status)
    }
}
