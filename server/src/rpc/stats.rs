//! `wqd.v1.StatsService`: daemon-wide counters, read from the engine, the live view and this
//! layer's own counters. Read-only; every number is a consistent copy of its source taken at
//! the call (sources are not read atomically together).

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use tonic::{Request, Response, Status};
use wqd_proto::v1;

use super::convert::{count_state, duration_out, timestamp_out};
use super::Rpc;
use wqd_core::engine::State;

#[tonic::async_trait]
impl v1::stats_service_server::StatsService for Rpc {
    async fn get_stats(
        &self,
        _req: Request<v1::GetStatsRequest>,
    ) -> Result<Response<v1::GetStatsResponse>, Status> {
        let es = self.engine.stats();
        let wqs = self.engine.workqueues();
        let mut items = v1::StateCounts::default();
        // One engine snapshot for live counts and totals, so an item ending meanwhile is
        // counted exactly once. Terminal totals are the engine's own, kept across workqueue
        // deletions: documented as totals since start, they never go down.
        count_state(&mut items, State::Delayed, es.delayed as u64);
        count_state(&mut items, State::Pending, es.pending as u64);
        count_state(&mut items, State::Running, es.running as u64);
        for (s, n) in &es.totals {
            count_state(&mut items, *s, *n);
        }
        let c = &self.counters;
        Ok(Response::new(v1::GetStatsResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: Some(timestamp_out(self.started)),
            uptime: Some(duration_out(
                SystemTime::now()
                    .duration_since(self.started)
                    .unwrap_or_default(),
            )),
            topology_epoch: self.view.current().epoch,
            items: Some(items),
            batches_accepted: c.batches_accepted.load(Ordering::Relaxed),
            batches_refused: c.batches_refused.load(Ordering::Relaxed),
            deduplicated: c.deduplicated.load(Ordering::Relaxed),
            rebinds: es.rebinds.values().sum(),
            fallbacks: es.fallbacks.values().sum(),
            workqueues: wqs.len() as u32,
            handlers: self.engine.known_names(),
            results_retained: es.results as u64,
            flushes_active: es.flushes as u64,
            watchdog_lockups: es.lockups,
            cpu_hogs: es.hogs,
            workers: es.workers as u64,
        }))
    }
}
