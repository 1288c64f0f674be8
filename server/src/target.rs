//! Targets: the names clients use for CPU groups, and their grammar.
//!
//! STUB — the groups work fills in the parser. The type below is the contract other modules use.

use crate::cpuset::CpuSet;

/// A parsed target. `Display` prints the canonical form (`cpus:` lists in canonical cpulist
/// form), so two spellings of the same group map to the same queue.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// `cpu:N`
    Cpu(u32),
    /// `core:N` — the SMT siblings of CPU N.
    Core(u32),
    /// `cache:N` — last-level cache N.
    Cache(u32),
    /// `shard:N` — slice N of an LLC.
    Shard(u32),
    /// `node:N` — NUMA node N.
    Node(u32),
    /// `package:N` — physical package N.
    Package(u32),
    /// `cpus:LIST` — any cpulist.
    Cpus(CpuSet),
    /// `NAME` — a named group from config.
    Named(String),
    /// `NAME:N` — range N of a named partition from config.
    Partition { name: String, index: u32 },
    /// `all`
    All,
}
