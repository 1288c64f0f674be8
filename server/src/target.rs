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

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Cpu(n) => write!(f, "cpu:{n}"),
            Target::Core(n) => write!(f, "core:{n}"),
            Target::Cache(n) => write!(f, "cache:{n}"),
            Target::Shard(n) => write!(f, "shard:{n}"),
            Target::Node(n) => write!(f, "node:{n}"),
            Target::Package(n) => write!(f, "package:{n}"),
            Target::Cpus(s) => write!(f, "cpus:{s}"),
            Target::Named(n) => write!(f, "{n}"),
            Target::Partition { name, index } => write!(f, "{name}:{index}"),
            Target::All => write!(f, "all"),
        }
    }
}
