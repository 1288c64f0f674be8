//! `wqd.v1.TopologyService`: the current snapshot, and a stream of snapshots per epoch.
//!
//! Invariant: a watcher first gets the snapshot current when it subscribed, then only newer
//! epochs (the live view's watch channel keeps the latest, so a slow reader skips epochs but
//! always ends up at the newest); the stream ends when the client goes away or the daemon
//! stops.

use std::pin::Pin;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use wqd_proto::v1;

use super::convert::snapshot_out;
use super::Rpc;
use crate::shared::stopped;
use wqd_core::live::Snapshot;

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl Rpc {
    /// A snapshot on the wire, with the sampler's busy column.
    pub fn topology_out(&self, s: &Snapshot) -> v1::TopologySnapshot {
        match &self.load {
            Some(l) => snapshot_out(s, &|c| l.busy(c)),
            None => snapshot_out(s, &|_| 0.0),
        }
    }
}

#[tonic::async_trait]
impl v1::topology_service_server::TopologyService for Rpc {
    async fn get_topology(
        &self,
        _req: Request<v1::GetTopologyRequest>,
    ) -> Result<Response<v1::GetTopologyResponse>, Status> {
        let snap = self.view.current();
        Ok(Response::new(v1::GetTopologyResponse {
            snapshot: Some(self.topology_out(&snap)),
        }))
    }

    type WatchTopologyStream = Out<v1::WatchTopologyResponse>;

    async fn watch_topology(
        &self,
        _req: Request<v1::WatchTopologyRequest>,
    ) -> Result<Response<Self::WatchTopologyStream>, Status> {
        let mut rx = self.view.subscribe();
        let (tx, out) = mpsc::channel(2);
        let me = self.clone();
        tokio::spawn(async move {
            let stop = stopped(me.stopping.clone());
            tokio::pin!(stop);
            loop {
                let snap = rx.borrow_and_update().clone();
                let msg = v1::WatchTopologyResponse {
                    snapshot: Some(me.topology_out(&snap)),
                };
                tokio::select! {
                    r = tx.send(Ok(msg)) => if r.is_err() { return },
                    _ = &mut stop => return,
                }
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                    _ = &mut stop => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }
}
