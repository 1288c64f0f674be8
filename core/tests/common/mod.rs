//! The test support of wqd-core, shared by its tests (and included by path by the daemon's
//! tests and the benchmarks): made-up topologies and snapshots here, the committed sysfs
//! fixture trees and the edits hotplug makes to them in [`fixtures`].
#![allow(dead_code)]

pub mod fixtures;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use wqd_core::cpuset::CpuSet;
use wqd_core::groups::{GroupMap, GroupsConfig};
use wqd_core::live::{Snapshot, Source};
use wqd_core::topology::{AllowedSource, CacheInfo, CpuTopo, Topology};

/// `n` CPUs: SMT pairs, 4 CPUs per LLC, 8 per node and package.
pub fn topology(n: u32) -> Topology {
    let all = CpuSet::range(0, n - 1);
    let mut cpus = BTreeMap::new();
    let mut nodes: BTreeMap<u32, CpuSet> = BTreeMap::new();
    for c in 0..n {
        let core = CpuSet::range(c & !1, (c & !1) + 1).intersection(&all);
        let llc = CpuSet::range(c & !3, (c & !3) + 3).intersection(&all);
        let node = CpuSet::range(c & !7, (c & !7) + 7).intersection(&all);
        nodes.entry(c / 8).or_default().insert(c);
        cpus.insert(
            c,
            CpuTopo {
                cpu: c,
                core_id: Some(c / 2),
                core_cpus: core,
                cluster_id: None,
                cluster_cpus: None,
                die_id: None,
                die_cpus: None,
                package_id: Some(c / 8),
                package_cpus: node.clone(),
                llc: Some(CacheInfo {
                    level: 3,
                    id: Some(c / 4),
                    cpus: llc,
                }),
                node: Some(c / 8),
            },
        );
    }
    Topology {
        possible: all.clone(),
        present: all.clone(),
        online: all.clone(),
        isolated: CpuSet::new(),
        allowed: all,
        allowed_source: AllowedSource::AllOnline,
        cpus,
        nodes,
    }
}

/// A snapshot of `topo` in which only `live` CPUs are live.
pub fn snapshot(topo: &Topology, epoch: u64, live: &CpuSet) -> Arc<Snapshot> {
    let groups = GroupMap::build(topo, &GroupsConfig::default());
    Arc::new(Snapshot {
        epoch,
        topology: Arc::new(topo.clone()),
        groups: Arc::new(groups),
        live: live.clone(),
        source: Source::Manual,
        at: SystemTime::now(),
    })
}

/// Same topology and groups as `prev`, another live set, the next epoch.
pub fn next(prev: &Snapshot, live: &CpuSet) -> Arc<Snapshot> {
    Arc::new(Snapshot {
        epoch: prev.epoch + 1,
        topology: prev.topology.clone(),
        groups: prev.groups.clone(),
        live: live.clone(),
        source: Source::Manual,
        at: SystemTime::now(),
    })
}
