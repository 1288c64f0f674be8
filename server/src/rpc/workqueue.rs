//! `wqd.v1.WorkqueueService`: create, list, update and delete workqueues.
//!
//! Invariant: every change goes through the engine's checked calls (`validate` runs there);
//! this module only applies the request's fields (as `WorkqueueChanges`, read in `convert.rs`)
//! to the defaults (`WorkqueueAttrs::new`) or the current attributes and, for delete, drains
//! (or cancels) first so the engine's "delete only when empty" rule holds when it is asked.

use std::time::Instant;

use tonic::{Request, Response, Status};
use wqd_proto::v1;

use super::convert::{attrs_in, attrs_out, changes_in, count_state, wq_info_out};
use super::{deadline_of, status, Rpc, RpcError};
use wqd_core::engine::{EngineError, WorkqueueAttrs};

fn required_name(name: &str) -> Result<(), RpcError> {
    if name.is_empty() {
        return Err(RpcError::Field {
            field: "name".into(),
            problem: "required".into(),
        });
    }
    Ok(())
}

impl Rpc {
    fn current_attrs(&self, name: &str) -> Result<WorkqueueAttrs, RpcError> {
        self.engine
            .workqueues()
            .into_iter()
            .find(|w| w.attrs.name == name)
            .map(|w| w.attrs)
            .ok_or_else(|| EngineError::UnknownWorkqueue(name.to_string()).into())
    }

    fn do_update(&self, r: v1::UpdateWorkqueueRequest) -> Result<v1::WorkqueueAttrs, RpcError> {
        required_name(&r.name)?;
        let a = self.current_attrs(&r.name)?.with(&changes_in(&r)?);
        self.engine.update_workqueue(a.clone())?;
        Ok(attrs_out(&a))
    }

    async fn do_delete(
        &self,
        r: v1::DeleteWorkqueueRequest,
        deadline: Option<Instant>,
    ) -> Result<v1::DeleteWorkqueueResponse, RpcError> {
        required_name(&r.name)?;
        if r.name == "default" {
            return Err(EngineError::DefaultWorkqueue.into());
        }
        self.current_attrs(&r.name)?;
        let mut counts = v1::StateCounts::default();
        // A submission can slip in between the end of a drain and the delete; drain again.
        for attempt in 0..3 {
            let (c, _) = self
                .drain_wait(r.name.clone(), deadline, r.cancel_pending)
                .await?;
            for (s, n) in [
                (wqd_core::engine::State::Ok, c.ok),
                (wqd_core::engine::State::Failed, c.failed),
                (wqd_core::engine::State::Cancelled, c.cancelled),
                (wqd_core::engine::State::Expired, c.expired),
                (wqd_core::engine::State::Rejected, c.rejected),
            ] {
                count_state(&mut counts, s, n);
            }
            match self.engine.delete_workqueue(&r.name) {
                Ok(()) => {
                    return Ok(v1::DeleteWorkqueueResponse {
                        counts: Some(counts),
                    })
                }
                Err(EngineError::WorkqueueNotEmpty { .. }) if attempt < 2 => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(RpcError::Internal(
            "unreachable: delete retries exhausted".into(),
        ))
    }
}

#[tonic::async_trait]
impl v1::workqueue_service_server::WorkqueueService for Rpc {
    async fn create_workqueue(
        &self,
        req: Request<v1::CreateWorkqueueRequest>,
    ) -> Result<Response<v1::CreateWorkqueueResponse>, Status> {
        let r = req.into_inner();
        let create = || {
            let a = r.attrs.ok_or_else(|| RpcError::Field {
                field: "attrs".into(),
                problem: "required".into(),
            })?;
            let a = attrs_in(a, self.limits.load().max_queued)?;
            self.engine.create_workqueue(a.clone())?;
            Ok(v1::CreateWorkqueueResponse {
                attrs: Some(attrs_out(&a)),
            })
        };
        create().map(Response::new).map_err(status)
    }

    async fn list_workqueues(
        &self,
        req: Request<v1::ListWorkqueuesRequest>,
    ) -> Result<Response<v1::ListWorkqueuesResponse>, Status> {
        let name = req.into_inner().name;
        let all = self.engine.workqueues();
        let workqueues: Vec<_> = all
            .iter()
            .filter(|w| name.is_empty() || w.attrs.name == name)
            .map(wq_info_out)
            .collect();
        if !name.is_empty() && workqueues.is_empty() {
            return Err(status(EngineError::UnknownWorkqueue(name).into()));
        }
        Ok(Response::new(v1::ListWorkqueuesResponse { workqueues }))
    }

    async fn update_workqueue(
        &self,
        req: Request<v1::UpdateWorkqueueRequest>,
    ) -> Result<Response<v1::UpdateWorkqueueResponse>, Status> {
        self.do_update(req.into_inner())
            .map(|a| Response::new(v1::UpdateWorkqueueResponse { attrs: Some(a) }))
            .map_err(status)
    }

    async fn delete_workqueue(
        &self,
        req: Request<v1::DeleteWorkqueueRequest>,
    ) -> Result<Response<v1::DeleteWorkqueueResponse>, Status> {
        let deadline = deadline_of(req.metadata());
        self.do_delete(req.into_inner(), deadline)
            .await
            .map(Response::new)
            .map_err(status)
    }
}
