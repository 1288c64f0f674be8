//! Groups: which CPUs each target names, the widening chain, and placement (pure functions).
//!
//! STUB — filled in by the groups work; the signatures below are the contract.

use std::collections::BTreeMap;

use crate::cpuset::CpuSet;
use crate::target::Target;
use crate::topology::Topology;

/// Group settings from config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupsConfig {
    /// Cores per shard when an LLC is split into shards.
    pub shard_cores: u32,
    /// Named groups: `NAME` -> CPUs.
    pub named: BTreeMap<String, CpuSet>,
    /// Named partitions: `NAME:N` -> the N-th range.
    pub partitions: BTreeMap<String, Vec<CpuSet>>,
}

impl Default for GroupsConfig {
    fn default() -> Self {
        Self {
            shard_cores: 8,
            named: BTreeMap::new(),
            partitions: BTreeMap::new(),
        }
    }
}

/// Levels, narrowest first; `List` is any explicit cpulist (cpus:, named, partition).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Level {
    Cpu,
    Core,
    Shard,
    Cache,
    Node,
    Package,
    All,
    List,
}

/// Every group of one topology.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupMap {}

impl GroupMap {
    pub fn build(_topo: &Topology, _cfg: &GroupsConfig) -> GroupMap {
        GroupMap {}
    }
    pub fn members(&self, _t: &Target) -> Option<CpuSet> {
        None
    }
}

// ---- provisional implementation (replaced by the groups work) ----

/// What a workqueue does when a target's group has no live CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fallback {
    Widen,
    Wait,
    Reject,
}

/// Where in a group an item runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Placement {
    First,
    Spread,
    LeastLoaded,
    Idle,
}

/// Errors resolving a target against the topology.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    #[error("cpu {cpu} is not a possible CPU")]
    UnknownCpu { cpu: u32, possible: CpuSet },
}

/// The CPUs an item of a target may start on now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    pub eligible: CpuSet,
    pub fallback: Option<Level>,
    pub members: CpuSet,
}

impl GroupMap {
    pub fn resolve(
        &self,
        t: &Target,
        live: &CpuSet,
        policy: Fallback,
    ) -> Result<Resolution, GroupError> {
        let members = match t {
            Target::Cpu(c) => CpuSet::single(*c),
            Target::Cpus(s) => s.clone(),
            _ => CpuSet::range(0, 63),
        };
        let eligible = members.intersection(live);
        if !eligible.is_empty() {
            return Ok(Resolution {
                eligible,
                fallback: None,
                members,
            });
        }
        if policy == Fallback::Widen {
            return Ok(Resolution {
                eligible: live.clone(),
                fallback: Some(Level::All),
                members,
            });
        }
        Ok(Resolution {
            eligible,
            fallback: None,
            members,
        })
    }
}
