//! The live view (provisional; replaced by the topology work).
use std::sync::Arc;

use crate::cpuset::CpuSet;
use crate::groups::GroupMap;
use crate::topology::Topology;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Initial,
    Uevent,
    Rescan,
    Worker,
    Manual,
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub epoch: u64,
    pub topology: Arc<Topology>,
    pub groups: Arc<GroupMap>,
    pub live: CpuSet,
    pub source: Source,
    pub at: std::time::SystemTime,
}
