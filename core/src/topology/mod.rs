//! The machine's CPU topology: what one read of sysfs/procfs says ([`Reading`]) and what wqd
//! remembers across reads ([`Topology`]).
//!
//! Invariant: a [`Topology`] never forgets a CPU's membership once it has been seen online.
//! The kernel removes `cpuN/topology/` and `cpuN/cache/` while CPU N is offline and drops it
//! from its node's `cpulist`, so membership is the union of everything read while it was up.
//! A CPU that is possible but never seen online has no [`CpuTopo`] and belongs only to explicit
//! cpulist groups and `all`.
//!
//! Reading the machine (I/O, root injectable) lives in [`sysfs`]; CPU hotplug events in
//! [`uevent`]. Everything else in wqd works on these plain values.

pub mod sysfs;
pub mod uevent;

use std::collections::BTreeMap;

use crate::cpuset::CpuSet;

/// Errors of the topology layer.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    CpuList {
        path: String,
        #[source]
        source: crate::cpuset::CpuListError,
    },
    #[error("parsing {path}: expected a number, found {found:?}")]
    Number { path: String, found: String },
    #[error("netlink uevent socket: {0}")]
    Netlink(#[source] nix::Error),
}

/// A cache as sysfs describes it (`cpuN/cache/indexK/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheInfo {
    /// `level` (1, 2, 3, ...).
    pub level: u8,
    /// The kernel's cache `id` file, where present.
    pub id: Option<u32>,
    /// `shared_cpu_list`.
    pub cpus: CpuSet,
}

/// What sysfs says about one CPU while it is online.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuTopo {
    pub cpu: u32,
    /// `topology/core_id`.
    pub core_id: Option<u32>,
    /// SMT siblings: `topology/core_cpus_list`, else `thread_siblings_list`; at least the CPU.
    pub core_cpus: CpuSet,
    /// `topology/cluster_id` and `cluster_cpus_list`, where present.
    pub cluster_id: Option<u32>,
    pub cluster_cpus: Option<CpuSet>,
    /// `topology/die_id` and `die_cpus_list`, where present.
    pub die_id: Option<u32>,
    pub die_cpus: Option<CpuSet>,
    /// `topology/physical_package_id` and `package_cpus_list` (else `core_siblings_list`).
    pub package_id: Option<u32>,
    pub package_cpus: CpuSet,
    /// The last-level cache: the highest-level `Data` or `Unified` cache.
    pub llc: Option<CacheInfo>,
    /// The NUMA node (`cpuN/nodeK` link, else the node whose `cpulist` holds N).
    pub node: Option<u32>,
}

/// Where the set of CPUs this process may use came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllowedSource {
    /// cgroup v1 `cpuset.effective_cpus` (or `cpuset.cpus`).
    CgroupV1,
    /// cgroup v2 `cpuset.cpus.effective`.
    CgroupV2,
    /// `sched_getaffinity` of the process (no cpuset found).
    Affinity,
    /// A fixture tree without cpuset files: every online CPU is allowed.
    AllOnline,
}

/// One read of the machine: the fields of a [`Topology`] as this one read saw them, so `cpus`
/// holds only the CPUs whose `topology/` folder could be read now (the online ones) and
/// `nodes` each `node/nodeK/cpulist` as read now. Plain data; produced by
/// [`sysfs::Reader::read`] (or brought up to date by [`sysfs::Reader::rescan`], which keeps the
/// `cpus` entries that hotplug cannot have changed), remembered by [`Topology::merge`]. Reads
/// as a [`Topology`] (`Deref`); the type says that nothing has been merged into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading(pub Topology);

impl std::ops::Deref for Reading {
    type Target = Topology;
    fn deref(&self) -> &Topology {
        &self.0
    }
}

/// The remembered topology: the latest reading plus membership learned from earlier ones
/// (inside a [`Reading`], the same fields as one read saw them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub possible: CpuSet,
    pub present: CpuSet,
    pub online: CpuSet,
    /// `isolated` plus the `isolcpus=`/`nohz_full=` CPUs of the kernel command line.
    pub isolated: CpuSet,
    /// The CPUs this process may run on.
    pub allowed: CpuSet,
    pub allowed_source: AllowedSource,
    /// Every CPU ever seen online, with the union of the memberships read for it.
    pub cpus: BTreeMap<u32, CpuTopo>,
    /// Every node ever seen, with every CPU ever read in it (from its cpulist or a CPU's node).
    pub nodes: BTreeMap<u32, CpuSet>,
}

impl Topology {
    /// Folds a new reading into what was remembered (`prev`), keeping membership of CPUs that
    /// are now offline and widening sets with CPUs read now (siblings lists shrink while a
    /// sibling is offline; the union is the real membership).
    pub fn merge(prev: Option<&Topology>, reading: Reading) -> Topology {
        let Reading(reading) = reading;
        let mut cpus = prev.map(|p| p.cpus.clone()).unwrap_or_default();
        for (cpu, now) in reading.cpus {
            match cpus.get_mut(&cpu) {
                None => {
                    cpus.insert(cpu, now);
                }
                Some(old) => {
                    let union = |a: &CpuSet, b: &CpuSet| a.union(b);
                    let merged = CpuTopo {
                        cpu,
                        core_id: now.core_id.or(old.core_id),
                        core_cpus: union(&old.core_cpus, &now.core_cpus),
                        cluster_id: now.cluster_id.or(old.cluster_id),
                        cluster_cpus: merge_opt(&old.cluster_cpus, &now.cluster_cpus),
                        die_id: now.die_id.or(old.die_id),
                        die_cpus: merge_opt(&old.die_cpus, &now.die_cpus),
                        package_id: now.package_id.or(old.package_id),
                        package_cpus: union(&old.package_cpus, &now.package_cpus),
                        llc: match (&old.llc, &now.llc) {
                            (Some(o), Some(n)) if o.level == n.level => Some(CacheInfo {
                                level: n.level,
                                id: n.id.or(o.id),
                                cpus: o.cpus.union(&n.cpus),
                            }),
                            (_, Some(n)) => Some(n.clone()),
                            (o, None) => o.clone(),
                        },
                        node: now.node.or(old.node),
                    };
                    *old = merged;
                }
            }
        }
        let mut nodes = prev.map(|p| p.nodes.clone()).unwrap_or_default();
        for (node, set) in reading.nodes {
            let e = nodes.entry(node).or_default();
            *e = e.union(&set);
        }
        for t in cpus.values() {
            if let Some(n) = t.node {
                nodes.entry(n).or_default().insert(t.cpu);
            }
        }
        Topology {
            cpus,
            nodes,
            ..reading
        }
    }
}

fn merge_opt(a: &Option<CpuSet>, b: &Option<CpuSet>) -> Option<CpuSet> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.union(b)),
        (a, b) => b.clone().or_else(|| a.clone()),
    }
}
