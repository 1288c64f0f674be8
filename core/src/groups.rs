//! Groups: which CPUs each [`Target`] names on a remembered [`Topology`], the widening chain
//! tried when none of them is live, and placement inside the eligible set ([`Ranking`], the one
//! placement rule: the engine wakes workers in its order). Everything here is a pure function
//! of its arguments (a [`Ranking`] only keeps its buffers between calls); `docs/targets.md` is
//! the user-facing version of this text.
//!
//! # Invariants
//!
//! * A [`GroupMap`] is immutable and built from the *remembered* topology, so a CPU going
//!   offline never changes what a target names: `members(t)` changes only when a CPU is seen
//!   online for the first time (or config changes).
//! * Topology-level groups (core, shard, cache, node, package) hold only CPUs that were seen
//!   online at least once (`Topology.cpus`). A possible CPU never seen online belongs only to
//!   `cpu:N`/`core:N` of itself (`{N}`), `cpus:` lists, named groups, partitions and `all`.
//! * Every widening chain is strictly increasing: each entry contains the target's members and
//!   every earlier entry, and differs from the one before it.
//!
//! # Terms and numbering
//!
//! * **known CPU**: a key of `Topology.cpus` (seen online at least once).
//! * **core of CPU N** (`core:N`): `{N} ∪ (core_cpus(N) ∩ known)`; `{N}` if N is possible but
//!   not known.
//! * **LLC**: CPUs are joined when one lists the other in its LLC `shared_cpu_list`, or when
//!   their LLCs have the same cache level and kernel `id`; the connected groups of known CPUs
//!   are the LLCs. CPUs without LLC information belong to no LLC (and no shard).
//! * **LLC number** (`cache:N`): the kernel cache `id` when *every* LLC has exactly one id and
//!   the ids are distinct; otherwise all LLCs are numbered 0, 1, ... in order of their lowest
//!   CPU. Kernel ids do not move when a new LLC is first seen; ordinals can (a newly seen LLC
//!   below an existing one shifts the numbers), which is why ids are preferred.
//! * **cores of an LLC**: its known CPUs in ascending order; each CPU not yet placed opens a
//!   core holding itself and its `core_cpus` that are in the LLC and not yet placed. Cores are
//!   ordered by their lowest CPU.
//! * **shard** (`shard:N`): consecutive slices of `shard_cores` cores of one LLC (the last slice
//!   may be smaller; `shard_cores == 0` means one shard per LLC). Shards are numbered globally
//!   in order of (LLC number, slice).
//! * **node** (`node:N`): `Topology.nodes[N] ∩ known`, plus known CPUs whose `node` is N. A node
//!   may be empty (memory-only nodes). A CPU's node is its `node` field, else the lowest node
//!   listing it.
//! * **package** (`package:N`): known CPUs with `package_id == N`, with their `package_cpus`
//!   that are known.
//! * **all**: `Topology.possible`.
//! * **named group** (`NAME`) / **partition range** (`NAME:N`): from [`GroupsConfig`]; they must
//!   be non-empty subsets of `possible`.
//!
//! # Widening
//!
//! The chain of a target lists levels to try, narrowest first (see [`GroupMap::widen_chain`]).
//! Entry k is the previous entry united with every group of level k that the previous entry
//! touches (via its CPUs' per-CPU index); entries equal to the previous one (the first is
//! compared with the target's members) are skipped.
//!
//! # Cost
//!
//! [`GroupMap::build`] is about O(known CPUs × levels × set words) thanks to interning and
//! memoised widening. [`GroupMap::members`] is one map or vector lookup plus a set clone;
//! [`GroupMap::resolve`] is that plus at most one intersection per chain entry (≤ 6). Chains
//! of every built-in group, named group and partition range are precomputed; only `cpus:`
//! lists compute theirs per call, in O(|list| + nodes touched × set words). Intersections in
//! `resolve` start at the set's lowest CPU (recorded per interned set) and allocate only
//! when they find a live CPU, so a chain entry that has none costs the words it spans: a
//! widening `cpu:4095` costs what a widening `cpu:63` does, but for the one entry that hits
//! (whose result has to be built) and the clone of the members. Measured on a made-up
//! 512-CPU machine (release build): build ≈ 1 ms, `resolve` ≈ 50 ns per target (test
//! `big_machine_builds_and_resolves`).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::str::FromStr;

use crate::cpuset::CpuSet;
use crate::target::{check_name, Each, Target, TargetError};
use crate::topology::Topology;

/// Group settings from config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupsConfig {
    /// Cores per shard when an LLC is split into shards (0: one shard per LLC).
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

impl GroupsConfig {
    /// Adds (or replaces) partition `name` made of `cpus` cut at multiples of `size` CPU
    /// numbers: range k holds the members of `cpus` numbered `k*size ..= k*size + size - 1`,
    /// for k from 0 to `last / size`. This is the rcu_node leaf layout (`RCU_FANOUT_LEAF`):
    /// `partition_ranges("rcu", &"0-63".parse()?, 16)` gives `rcu:0` = 0-15 ... `rcu:3` =
    /// 48-63. Ranges with no member of `cpus` are kept (empty) so that index k always means
    /// CPU numbers `k*size..`; addressing one is a [`GroupError::EmptyList`]. Returns the number
    /// of ranges.
    ///
    /// # Errors
    /// [`GroupError::Name`] for a bad name, [`GroupError::ZeroRangeSize`] for `size == 0`,
    /// [`GroupError::EmptyList`] for an empty `cpus`.
    pub fn partition_ranges(
        &mut self,
        name: &str,
        cpus: &CpuSet,
        size: u32,
    ) -> Result<usize, GroupError> {
        check_name(name)?;
        if size == 0 {
            return Err(GroupError::ZeroRangeSize {
                name: name.to_string(),
            });
        }
        let Some(last) = cpus.last() else {
            return Err(GroupError::EmptyList {
                target: Target::Named(name.to_string()),
            });
        };
        let mut ranges = vec![CpuSet::new(); (last / size) as usize + 1];
        for c in cpus.iter() {
            if let Some(r) = ranges.get_mut((c / size) as usize) {
                r.insert(c);
            }
        }
        let n = ranges.len();
        self.partitions.insert(name.to_string(), ranges);
        Ok(n)
    }

    /// Checks every name (grammar, not reserved) and that no name is both a named group and a
    /// partition. Membership against `possible` is checked per target by
    /// [`GroupMap::members`], since one config may serve machines of several sizes.
    ///
    /// # Errors
    /// The first [`GroupError::Name`] or [`GroupError::DuplicateName`] found, in name order.
    pub fn validate(&self) -> Result<(), GroupError> {
        for name in self.named.keys().chain(self.partitions.keys()) {
            check_name(name)?;
        }
        if let Some(name) = self.named.keys().find(|n| self.partitions.contains_key(*n)) {
            return Err(GroupError::DuplicateName { name: name.clone() });
        }
        Ok(())
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

impl Level {
    /// The level of a target.
    pub fn of(t: &Target) -> Level {
        match t {
            Target::Cpu(_) => Level::Cpu,
            Target::Core(_) => Level::Core,
            Target::Shard(_) => Level::Shard,
            Target::Cache(_) => Level::Cache,
            Target::Node(_) => Level::Node,
            Target::Package(_) => Level::Package,
            Target::All => Level::All,
            Target::Cpus(_) | Target::Named(_) | Target::Partition { .. } => Level::List,
        }
    }

    /// The lowercase word used in targets and listings.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Cpu => "cpu",
            Level::Core => "core",
            Level::Shard => "shard",
            Level::Cache => "cache",
            Level::Node => "node",
            Level::Package => "package",
            Level::All => "all",
            Level::List => "list",
        }
    }
}

crate::display_as_str!(Level);

/// Why a target does not name a usable group on this topology and config.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    #[error("CPU {cpu} is not possible on this machine (possible CPUs: {possible})")]
    UnknownCpu { cpu: u32, possible: CpuSet },
    #[error("no NUMA node {node} (nodes: {})", id_list(.known))]
    UnknownNode { node: u32, known: Vec<u32> },
    #[error("no LLC numbered {cache} (LLCs: {})", id_list(.known))]
    UnknownCache { cache: u32, known: Vec<u32> },
    #[error("no shard {shard} (shards: {})", if *.count == 0 { "none".to_string() } else { format!("0-{}", .count - 1) })]
    UnknownShard { shard: u32, count: u32 },
    #[error("no package {package} (packages: {})", id_list(.known))]
    UnknownPackage { package: u32, known: Vec<u32> },
    #[error("unknown group name {} (configured: {}){hint}", crate::quote::quote(.name),
        if .known.is_empty() { "none".to_string() } else { .known.join(", ") })]
    UnknownName {
        name: String,
        known: Vec<String>,
        /// `; did you mean "cpu:3"?` when the name is a level keyword glued to a number.
        hint: String,
    },
    #[error("{name}:{index} is out of range: partition {name:?} has {len} ranges ({name}:0 to {name}:{})", .len.saturating_sub(1))]
    PartitionIndex { name: String, index: u32, len: u32 },
    #[error("{name:?} is a partition of {len} ranges; expected {name}:N with N from 0 to {}", .len.saturating_sub(1))]
    PartitionNeedsIndex { name: String, len: u32 },
    #[error("{name:?} is a named group, not a partition; expected {name} without an index")]
    NotAPartition { name: String },
    #[error("target {target} names no CPU")]
    EmptyList { target: Target },
    #[error("target {target} names CPUs {extra} that are not possible on this machine (possible CPUs: {possible})")]
    NotPossible {
        target: Target,
        extra: CpuSet,
        possible: CpuSet,
    },
    #[error("bad group name: {0}")]
    Name(#[from] TargetError),
    #[error("{name:?} is both a named group and a partition")]
    DuplicateName { name: String },
    #[error("partition {name:?}: range size must be at least 1")]
    ZeroRangeSize { name: String },
    #[error("unknown placement {found:?}; expected one of first, spread, least-loaded, idle")]
    UnknownPlacement { found: String },
    #[error("unknown fallback {found:?}; expected one of widen, wait, reject")]
    UnknownFallback { found: String },
    /// `each:NAME` where NAME is a named group: it is one group, there is nothing to fan out.
    #[error("each:{name}: {name:?} is a named group, not a partition; each: fans out over a level (cpu, core, shard, cache, node, package) or a partition's ranges; submit to {name} for the one group")]
    EachOfNamed { name: String },
    /// A fan-out with no group to fan out to (no LLC data, a partition of empty ranges, ...).
    #[error("{each} names no group on this machine ({why})")]
    EachEmpty { each: Each, why: &'static str },
}

/// `0-3, 7` style list of ids ("none" when empty).
fn id_list(ids: &[u32]) -> String {
    if ids.is_empty() {
        return "none".to_string();
    }
    let mut out = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        let lo = ids[i];
        let mut hi = lo;
        while i + 1 < ids.len() && Some(ids[i + 1]) == hi.checked_add(1) {
            i += 1;
            hi = ids[i];
        }
        out.push(if lo == hi {
            lo.to_string()
        } else {
            format!("{lo}-{hi}")
        });
        i += 1;
    }
    out.join(", ")
}

/// Index of an interned set in [`GroupMap::sets`].
type SetId = u32;

/// One group: its members and its precomputed widening chain.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Group {
    set: SetId,
    chain: Vec<(Level, SetId)>,
}

/// Per-CPU index of a known CPU: the group of each level it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KnownCpu {
    cpu: Group,
    core: Group,
    shard: Option<SetId>,
    cache: Option<SetId>,
    node: Option<SetId>,
    package: Option<SetId>,
}

/// Every group of one topology and config, with per-CPU indexes and precomputed chains.
/// Immutable once built; cheap to share behind an `Arc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMap {
    /// Interned sets; every `SetId` in this struct indexes it.
    sets: Vec<CpuSet>,
    /// The lowest CPU of each interned set (0 for the empty set), where `resolve` starts
    /// reading it: a set's cost is then its span, not the height of its CPU numbers.
    firsts: Vec<u32>,
    /// Indexed by CPU number; `Some` for known CPUs.
    known: Vec<Option<KnownCpu>>,
    shards: Vec<Group>,
    caches: BTreeMap<u32, Group>,
    nodes: BTreeMap<u32, Group>,
    packages: BTreeMap<u32, Group>,
    named: BTreeMap<String, Group>,
    partitions: BTreeMap<String, Vec<Group>>,
    all: SetId,
}

impl Default for GroupMap {
    /// The groups of a machine with no CPU.
    fn default() -> Self {
        GroupMap {
            sets: vec![CpuSet::new()],
            firsts: vec![0],
            known: Vec::new(),
            shards: Vec::new(),
            caches: BTreeMap::new(),
            nodes: BTreeMap::new(),
            packages: BTreeMap::new(),
            named: BTreeMap::new(),
            partitions: BTreeMap::new(),
            all: 0,
        }
    }
}

/// One row of [`GroupMap::listing`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    pub level: Level,
    /// The canonical target naming this group.
    pub target: Target,
    pub members: CpuSet,
}

/// What to do when none of a target's members is live. Spelled `widen`, `wait`, `reject` in
/// config, results and docs ([`Display`](std::fmt::Display) and [`FromStr`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Fallback {
    /// Use the first widening-chain entry that has a live CPU (the default).
    #[default]
    Widen,
    /// Keep the work queued until a member comes back (the engine decides).
    Wait,
    /// Fail the submission (the engine decides).
    Reject,
}

impl Fallback {
    /// The word used in config, results and docs; what [`FromStr`] reads.
    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::Widen => "widen",
            Fallback::Wait => "wait",
            Fallback::Reject => "reject",
        }
    }
}

crate::display_as_str!(Fallback);

impl FromStr for Fallback {
    type Err = GroupError;
    /// `widen`, `wait`, `reject`; surrounding white space is ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "widen" => Ok(Fallback::Widen),
            "wait" => Ok(Fallback::Wait),
            "reject" => Ok(Fallback::Reject),
            _ => Err(GroupError::UnknownFallback {
                found: s.to_string(),
            }),
        }
    }
}

/// The outcome of [`GroupMap::resolve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// The CPUs the work may run on now; empty when nothing fits the policy.
    pub eligible: CpuSet,
    /// The chain level used when the target's own members had no live CPU.
    pub fallback: Option<Level>,
    /// The target's members (live or not).
    pub members: CpuSet,
}

/// A looked-up target.
struct Found<'a> {
    members: Cow<'a, CpuSet>,
    /// The lowest member (0 when there is none): where intersections with it start.
    floor: u32,
    chain: ChainRef<'a>,
}

/// Where a looked-up target's chain comes from.
enum ChainRef<'a> {
    Pre(&'a [(Level, SetId)]),
    /// A possible CPU never seen online: straight to `all`.
    Unseen,
    /// A `cpus:` list: computed per call.
    List,
}

/// The chain of a known `cpu:N`; every other chain is a tail of it or [`LIST_CHAIN`].
const CPU_CHAIN: [Level; 6] = [
    Level::Core,
    Level::Shard,
    Level::Cache,
    Level::Node,
    Level::Package,
    Level::All,
];
const LIST_CHAIN: [Level; 2] = [Level::Node, Level::All];

/// Every level work can widen to, narrowest first (core, shard, cache, node, package, all):
/// the levels a [`Resolution::fallback`] can name. Every widening chain is made of these, in
/// this order.
pub fn widen_levels() -> &'static [Level] {
    &CPU_CHAIN
}

/// Build-time state: the set arena, the per-CPU group ids, and the widening memo.
struct Builder {
    sets: Vec<CpuSet>,
    ids: HashMap<CpuSet, SetId>,
    /// Per known CPU: (core, shard, cache, node, package) set ids.
    idx: BTreeMap<u32, [Option<SetId>; 5]>,
    all: SetId,
    memo: HashMap<(SetId, Level), SetId>,
}

impl Builder {
    fn intern(&mut self, s: CpuSet) -> SetId {
        if let Some(&id) = self.ids.get(&s) {
            return id;
        }
        let id = self.sets.len() as SetId;
        self.sets.push(s.clone());
        self.ids.insert(s, id);
        id
    }

    /// `prev` united with every group of `level` that touches it.
    fn widen(&mut self, prev: SetId, level: Level) -> SetId {
        if let Some(&id) = self.memo.get(&(prev, level)) {
            return id;
        }
        let slot = match level {
            Level::Core => Some(0),
            Level::Shard => Some(1),
            Level::Cache => Some(2),
            Level::Node => Some(3),
            Level::Package => Some(4),
            _ => None,
        };
        let mut touched = BTreeSet::new();
        match slot {
            Some(k) => {
                for c in self.sets[prev as usize].iter() {
                    if let Some(Some(g)) = self.idx.get(&c).map(|i| i[k]) {
                        touched.insert(g);
                    }
                }
            }
            None if level == Level::All => {
                touched.insert(self.all);
            }
            None => {}
        }
        let mut out = self.sets[prev as usize].clone();
        for g in touched {
            out = out.union(&self.sets[g as usize]);
        }
        let id = self.intern(out);
        self.memo.insert((prev, level), id);
        id
    }

    fn chain(&mut self, start: SetId, levels: &[Level]) -> Vec<(Level, SetId)> {
        let mut prev = start;
        let mut out = Vec::new();
        for &l in levels {
            let next = self.widen(prev, l);
            if next != prev {
                out.push((l, next));
                prev = next;
            }
        }
        out
    }

    fn group(&mut self, set: CpuSet, levels: &[Level]) -> Group {
        let set = self.intern(set);
        let chain = self.chain(set, levels);
        Group { set, chain }
    }
}

/// Disjoint-set forest over positions `0..n`.
struct Dsu(Vec<usize>);

impl Dsu {
    fn find(&mut self, mut x: usize) -> usize {
        while self.0[x] != x {
            self.0[x] = self.0[self.0[x]];
            x = self.0[x];
        }
        x
    }
    fn join(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            self.0[ra.max(rb)] = ra.min(rb);
        }
    }
}

/// The LLCs of the known CPUs: (number, members), sorted by number. See the module docs.
fn llcs(topo: &Topology, known: &CpuSet) -> Vec<(u32, CpuSet)> {
    let cpus: Vec<u32> = known.iter().collect();
    let pos: HashMap<u32, usize> = cpus.iter().enumerate().map(|(i, &c)| (c, i)).collect();
    let mut dsu = Dsu((0..cpus.len()).collect());
    let mut in_llc = vec![false; cpus.len()];
    let mut by_id: HashMap<(u8, u32), usize> = HashMap::new();
    for (i, c) in cpus.iter().enumerate() {
        let Some(llc) = topo.cpus.get(c).and_then(|t| t.llc.as_ref()) else {
            continue;
        };
        in_llc[i] = true;
        for d in llc.cpus.intersection(known).iter() {
            if let Some(&j) = pos.get(&d) {
                in_llc[j] = true;
                dsu.join(i, j);
            }
        }
        if let Some(id) = llc.id {
            let first = *by_id.entry((llc.level, id)).or_insert(i);
            dsu.join(i, first);
        }
    }
    // Components keyed by root, in order of their lowest CPU (roots are the lowest position).
    let mut comps: BTreeMap<usize, (CpuSet, BTreeSet<u32>)> = BTreeMap::new();
    for (i, &c) in cpus.iter().enumerate() {
        if !in_llc[i] {
            continue;
        }
        let root = dsu.find(i);
        let e = comps.entry(root).or_default();
        e.0.insert(c);
        if let Some(id) = topo
            .cpus
            .get(&c)
            .and_then(|t| t.llc.as_ref())
            .and_then(|l| l.id)
        {
            e.1.insert(id);
        }
    }
    let ids: Vec<Option<u32>> = comps
        .values()
        .map(|(_, ids)| match ids.len() {
            1 => ids.first().copied(),
            _ => None,
        })
        .collect();
    let distinct: BTreeSet<u32> = ids.iter().flatten().copied().collect();
    let use_ids = ids.iter().all(Option::is_some) && distinct.len() == ids.len();
    let mut out: Vec<(u32, CpuSet)> = comps
        .into_values()
        .zip(ids)
        .enumerate()
        .map(|(ord, ((set, _), id))| match id {
            Some(id) if use_ids => (id, set),
            _ => (ord as u32, set),
        })
        .collect();
    out.sort_by_key(|(n, _)| *n);
    out
}

/// The cores of one LLC in order of their lowest CPU. See the module docs.
fn cores_of(topo: &Topology, llc: &CpuSet) -> Vec<CpuSet> {
    let mut placed = CpuSet::new();
    let mut out = Vec::new();
    for c in llc.iter() {
        if placed.contains(c) {
            continue;
        }
        let mut core = CpuSet::single(c);
        if let Some(t) = topo.cpus.get(&c) {
            core = core.union(&t.core_cpus.intersection(llc).difference(&placed));
        }
        placed = placed.union(&core);
        out.push(core);
    }
    out
}

impl GroupMap {
    /// Computes every group of `topo` and `cfg`, with per-CPU indexes and widening chains.
    /// Config names are not checked here (see [`GroupsConfig::validate`]); a named group or
    /// range that is empty or not within `possible` fails when addressed.
    pub fn build(topo: &Topology, cfg: &GroupsConfig) -> GroupMap {
        let known: CpuSet = topo.cpus.keys().copied().collect();
        let mut b = Builder {
            sets: Vec::new(),
            ids: HashMap::new(),
            idx: BTreeMap::new(),
            all: 0,
            memo: HashMap::new(),
        };
        b.all = b.intern(topo.possible.clone());

        // Per-CPU group sets, level by level.
        let mut idx: BTreeMap<u32, [Option<SetId>; 5]> = BTreeMap::new();
        for (&c, t) in &topo.cpus {
            let core = CpuSet::single(c).union(&t.core_cpus.intersection(&known));
            idx.entry(c).or_default()[0] = Some(b.intern(core));
        }

        let mut caches_raw = Vec::new();
        let mut shards_raw = Vec::new();
        for (number, set) in llcs(topo, &known) {
            let id = b.intern(set.clone());
            for c in set.iter() {
                idx.entry(c).or_default()[2] = Some(id);
            }
            let cores = cores_of(topo, &set);
            let per = if cfg.shard_cores == 0 {
                cores.len().max(1)
            } else {
                cfg.shard_cores as usize
            };
            for slice in cores.chunks(per) {
                let shard = slice.iter().fold(CpuSet::new(), |a, c| a.union(c));
                let sid = b.intern(shard.clone());
                for c in shard.iter() {
                    idx.entry(c).or_default()[1] = Some(sid);
                }
                shards_raw.push(shard);
            }
            caches_raw.push((number, set));
        }

        let mut nodes_raw: BTreeMap<u32, CpuSet> = topo
            .nodes
            .iter()
            .map(|(&n, s)| (n, s.intersection(&known)))
            .collect();
        for t in topo.cpus.values() {
            if let Some(n) = t.node {
                nodes_raw.entry(n).or_default().insert(t.cpu);
            }
        }
        for (&c, t) in &topo.cpus {
            let node = t.node.or_else(|| {
                nodes_raw
                    .iter()
                    .find(|(_, s)| s.contains(c))
                    .map(|(&n, _)| n)
            });
            if let Some(set) = node.and_then(|n| nodes_raw.get(&n)) {
                let id = b.intern(set.clone());
                idx.entry(c).or_default()[3] = Some(id);
            }
        }

        let mut packages_raw: BTreeMap<u32, CpuSet> = BTreeMap::new();
        for (&c, t) in &topo.cpus {
            if let Some(p) = t.package_id {
                let e = packages_raw.entry(p).or_default();
                *e = e.union(&t.package_cpus.intersection(&known));
                e.insert(c);
            }
        }
        for (&c, t) in &topo.cpus {
            if let Some(set) = t.package_id.and_then(|p| packages_raw.get(&p)) {
                let id = b.intern(set.clone());
                idx.entry(c).or_default()[4] = Some(id);
            }
        }
        b.idx = idx;

        // Groups and their chains.
        let len = known.last().map_or(0, |l| l as usize + 1);
        let mut known_v: Vec<Option<KnownCpu>> = vec![None; len];
        let idx = b.idx.clone();
        for (&c, slots) in &idx {
            let cpu = b.group(CpuSet::single(c), &CPU_CHAIN);
            let core_set = slots[0].unwrap_or(cpu.set);
            let core = Group {
                set: core_set,
                chain: b.chain(core_set, &CPU_CHAIN[1..]),
            };
            if let Some(slot) = known_v.get_mut(c as usize) {
                *slot = Some(KnownCpu {
                    cpu,
                    core,
                    shard: slots[1],
                    cache: slots[2],
                    node: slots[3],
                    package: slots[4],
                });
            }
        }
        let shards = shards_raw
            .into_iter()
            .map(|s| b.group(s, &CPU_CHAIN[2..]))
            .collect();
        let caches = caches_raw
            .into_iter()
            .map(|(n, s)| (n, b.group(s, &CPU_CHAIN[3..])))
            .collect();
        let nodes = nodes_raw
            .into_iter()
            .map(|(n, s)| (n, b.group(s, &CPU_CHAIN[4..])))
            .collect();
        let packages = packages_raw
            .into_iter()
            .map(|(n, s)| (n, b.group(s, &CPU_CHAIN[5..])))
            .collect();
        let named = cfg
            .named
            .iter()
            .map(|(n, s)| (n.clone(), b.group(s.clone(), &LIST_CHAIN)))
            .collect();
        let partitions = cfg
            .partitions
            .iter()
            .map(|(n, ranges)| {
                let groups = ranges
                    .iter()
                    .map(|s| b.group(s.clone(), &LIST_CHAIN))
                    .collect();
                (n.clone(), groups)
            })
            .collect();
        let firsts = b.sets.iter().map(|s| s.first().unwrap_or(0)).collect();
        GroupMap {
            sets: b.sets,
            firsts,
            known: known_v,
            shards,
            caches,
            nodes,
            packages,
            named,
            partitions,
            all: b.all,
        }
    }

    fn set(&self, id: SetId) -> &CpuSet {
        &self.sets[id as usize]
    }

    fn known_cpu(&self, cpu: u32) -> Option<&KnownCpu> {
        self.known.get(cpu as usize).and_then(Option::as_ref)
    }

    /// Checks a list target's members: non-empty and within `possible`.
    fn check_list<'a>(&self, t: &Target, set: &'a CpuSet) -> Result<&'a CpuSet, GroupError> {
        if set.is_empty() {
            return Err(GroupError::EmptyList { target: t.clone() });
        }
        let extra = set.difference(self.set(self.all));
        if !extra.is_empty() {
            return Err(GroupError::NotPossible {
                target: t.clone(),
                extra,
                possible: self.set(self.all).clone(),
            });
        }
        Ok(set)
    }

    fn first(&self, id: SetId) -> u32 {
        self.firsts[id as usize]
    }

    fn group_ref<'a>(&'a self, g: &'a Group) -> Found<'a> {
        Found {
            members: Cow::Borrowed(self.set(g.set)),
            floor: self.first(g.set),
            chain: ChainRef::Pre(&g.chain),
        }
    }

    fn lookup<'a>(&'a self, t: &'a Target) -> Result<Found<'a>, GroupError> {
        let ids = |m: &BTreeMap<u32, Group>| m.keys().copied().collect::<Vec<_>>();
        match t {
            Target::Cpu(n) | Target::Core(n) => {
                if let Some(k) = self.known_cpu(*n) {
                    let g = if matches!(t, Target::Cpu(_)) {
                        &k.cpu
                    } else {
                        &k.core
                    };
                    return Ok(self.group_ref(g));
                }
                if self.set(self.all).contains(*n) {
                    return Ok(Found {
                        members: Cow::Owned(CpuSet::single(*n)),
                        floor: *n,
                        chain: ChainRef::Unseen,
                    });
                }
                Err(GroupError::UnknownCpu {
                    cpu: *n,
                    possible: self.set(self.all).clone(),
                })
            }
            Target::Shard(n) => match self.shards.get(*n as usize) {
                Some(g) => Ok(self.group_ref(g)),
                None => Err(GroupError::UnknownShard {
                    shard: *n,
                    count: self.shards.len() as u32,
                }),
            },
            Target::Cache(n) => match self.caches.get(n) {
                Some(g) => Ok(self.group_ref(g)),
                None => Err(GroupError::UnknownCache {
                    cache: *n,
                    known: ids(&self.caches),
                }),
            },
            Target::Node(n) => match self.nodes.get(n) {
                Some(g) => Ok(self.group_ref(g)),
                None => Err(GroupError::UnknownNode {
                    node: *n,
                    known: ids(&self.nodes),
                }),
            },
            Target::Package(n) => match self.packages.get(n) {
                Some(g) => Ok(self.group_ref(g)),
                None => Err(GroupError::UnknownPackage {
                    package: *n,
                    known: ids(&self.packages),
                }),
            },
            Target::All => Ok(Found {
                members: Cow::Borrowed(self.set(self.all)),
                floor: self.first(self.all),
                chain: ChainRef::Pre(&[]),
            }),
            Target::Cpus(set) => Ok(Found {
                members: Cow::Borrowed(self.check_list(t, set)?),
                floor: set.first().unwrap_or(0),
                chain: ChainRef::List,
            }),
            Target::Named(name) => match self.named.get(name) {
                Some(g) => {
                    self.check_list(t, self.set(g.set))?;
                    Ok(self.group_ref(g))
                }
                None => match self.partitions.get(name) {
                    Some(r) => Err(GroupError::PartitionNeedsIndex {
                        name: name.clone(),
                        len: r.len() as u32,
                    }),
                    None => Err(self.unknown_name(name)),
                },
            },
            Target::Partition { name, index } => match self.partitions.get(name) {
                Some(ranges) => match ranges.get(*index as usize) {
                    Some(g) => {
                        self.check_list(t, self.set(g.set))?;
                        Ok(self.group_ref(g))
                    }
                    None => Err(GroupError::PartitionIndex {
                        name: name.clone(),
                        index: *index,
                        len: ranges.len() as u32,
                    }),
                },
                None if self.named.contains_key(name) => {
                    Err(GroupError::NotAPartition { name: name.clone() })
                }
                None => Err(self.unknown_name(name)),
            },
        }
    }

    fn unknown_name(&self, name: &str) -> GroupError {
        let mut known: Vec<String> = self.named.keys().cloned().collect();
        known.extend(self.partitions.keys().map(|n| format!("{n}:N")));
        known.sort();
        let hint = ["cpu", "core", "cache", "shard", "node", "package"]
            .iter()
            .find_map(|kw| {
                let rest = name.strip_prefix(kw)?;
                (!rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| format!("; did you mean \"{kw}:{rest}\"?"))
            })
            .unwrap_or_default();
        GroupError::UnknownName {
            name: name.to_string(),
            known,
            hint,
        }
    }

    /// The chain entries of a looked-up target, borrowing precomputed sets where possible.
    fn chain_of<'a>(
        &'a self,
        members: &CpuSet,
        chain: ChainRef<'a>,
    ) -> Vec<(Level, Cow<'a, CpuSet>)> {
        match chain {
            ChainRef::Pre(c) => c
                .iter()
                .map(|&(l, id)| (l, Cow::Borrowed(self.set(id))))
                .collect(),
            ChainRef::Unseen => {
                let all = members.union(self.set(self.all));
                if all == *members {
                    Vec::new()
                } else {
                    vec![(Level::All, Cow::Owned(all))]
                }
            }
            ChainRef::List => {
                let mut touched = BTreeSet::new();
                for c in members.iter() {
                    if let Some(n) = self.known_cpu(c).and_then(|k| k.node) {
                        touched.insert(n);
                    }
                }
                let node = touched
                    .into_iter()
                    .fold(members.clone(), |a, n| a.union(self.set(n)));
                let all = node.union(self.set(self.all));
                let mut out = Vec::new();
                if node != *members {
                    out.push((Level::Node, Cow::Owned(node.clone())));
                }
                if all != node {
                    out.push((Level::All, Cow::Owned(all)));
                }
                out
            }
        }
    }

    /// The CPUs target `t` names (live or not).
    ///
    /// # Errors
    /// [`GroupError`] says precisely why `t` names nothing here: an impossible CPU, an unknown
    /// node/LLC/shard/package/name, a partition index out of range, or a list that is empty or
    /// not within `possible`.
    pub fn members(&self, t: &Target) -> Result<CpuSet, GroupError> {
        self.lookup(t).map(|f| f.members.into_owned())
    }

    /// The enclosing groups to try when none of `t`'s members is live, narrowest first, each
    /// strictly containing the one before (and the members):
    ///
    /// | target | chain |
    /// |---|---|
    /// | `cpu:N` (known) | core, shard, cache, node, package, all |
    /// | `core:N` (known) | shard, cache, node, package, all |
    /// | `shard:N` | cache, node, package, all |
    /// | `cache:N` | node (all nodes it touches), package, all |
    /// | `node:N` | package (all packages containing its CPUs), all |
    /// | `package:N` | all |
    /// | `cpus:`, `NAME`, `NAME:N` | node (union of the nodes it touches), all |
    /// | `cpu:N`/`core:N` never seen online | all |
    /// | `all` | (empty) |
    ///
    /// Levels a CPU has no data for are skipped, as are entries equal to the previous one.
    ///
    /// # Errors
    /// As [`GroupMap::members`].
    pub fn widen_chain(&self, t: &Target) -> Result<Vec<(Level, CpuSet)>, GroupError> {
        let Found { members, chain, .. } = self.lookup(t)?;
        Ok(self
            .chain_of(&members, chain)
            .into_iter()
            .map(|(l, s)| (l, s.into_owned()))
            .collect())
    }

    /// Where work for `t` may run given the `live` CPUs (online ∩ allowed ∖ isolated, as the
    /// caller defines it).
    ///
    /// `eligible = members ∩ live` when that is non-empty (`fallback: None`). Otherwise, with
    /// [`Fallback::Widen`], the first chain entry with a live CPU gives `eligible = entry ∩
    /// live` and `fallback: Some(level)`; with nothing live anywhere, or with
    /// [`Fallback::Wait`]/[`Fallback::Reject`], `eligible` is empty and `fallback` is `None`.
    ///
    /// Cost: one lookup, one clone of the members, one intersection, plus (only when widening)
    /// one intersection per chain entry — at most six, each over the words its entry spans,
    /// allocating only for the entry that has a live CPU; `cpus:` lists add their chain build.
    ///
    /// # Errors
    /// As [`GroupMap::members`].
    pub fn resolve(
        &self,
        t: &Target,
        live: &CpuSet,
        policy: Fallback,
    ) -> Result<Resolution, GroupError> {
        let Found {
            members,
            floor,
            chain,
        } = self.lookup(t)?;
        let eligible = members.intersection_from(live, floor);
        if !eligible.is_empty() || policy != Fallback::Widen {
            return Ok(Resolution {
                eligible,
                fallback: None,
                members: members.into_owned(),
            });
        }
        let hit = self.first_live_entry(&members, chain, live);
        let (eligible, fallback) = match hit {
            Some((level, e)) => (e, Some(level)),
            None => (CpuSet::new(), None),
        };
        Ok(Resolution {
            eligible,
            fallback,
            members: members.into_owned(),
        })
    }

    /// The first widening-chain entry with a live CPU, with its live CPUs. Each entry is read
    /// from its lowest CPU on and only the hit allocates, so a miss costs the words its entry
    /// spans, not the height of its CPU numbers. Kept out of `resolve` (which mostly does not
    /// widen) so that its fast path stays small.
    #[inline(never)]
    fn first_live_entry(
        &self,
        members: &CpuSet,
        chain: ChainRef<'_>,
        live: &CpuSet,
    ) -> Option<(Level, CpuSet)> {
        match chain {
            ChainRef::Pre(c) => c.iter().find_map(|&(level, id)| {
                let e = self.set(id).intersection_from(live, self.first(id));
                (!e.is_empty()).then_some((level, e))
            }),
            chain => self
                .chain_of(members, chain)
                .into_iter()
                .find_map(|(level, set)| {
                    let e = set.intersection_from(live, set.first().unwrap_or(0));
                    (!e.is_empty()).then_some((level, e))
                }),
        }
    }

    /// The groups a fan-out names, one target per group, in ascending group number (for a
    /// partition, ascending range index). Every group that can be addressed is included,
    /// whether or not it has a live CPU — a memory-only node too, as `node:N` resolves (to the
    /// fallback) — so per-group work is never silently skipped; only the empty ranges of a
    /// partition are left out, since addressing one is an error ([`GroupError::EmptyList`]):
    ///
    /// | fan-out | targets |
    /// |---|---|
    /// | `each:cpu` | `cpu:N` for every possible or known CPU |
    /// | `each:core` | `core:N` once per core, N its lowest CPU (as [`GroupMap::listing`]); a possible CPU never seen online is its own core |
    /// | `each:shard` | `shard:0` ... `shard:K-1` |
    /// | `each:cache`, `each:node`, `each:package` | every LLC / node / package by number (memory-only nodes included) |
    /// | `each:NAME` | `NAME:k` for every non-empty range k of partition NAME |
    ///
    /// Every target returned resolves with [`GroupMap::members`] on this map.
    ///
    /// # Errors
    /// [`GroupError::EachOfNamed`] for a named group, [`GroupError::UnknownName`] for a name
    /// that is neither, [`GroupError::NotPossible`] for a partition range that names CPUs that
    /// are not possible (as addressing that range would), [`GroupError::EachEmpty`] when no
    /// group is left.
    pub fn each(&self, e: &Each) -> Result<Vec<Target>, GroupError> {
        let out: Vec<Target> = match e {
            Each::Cpu => {
                let mut cpus = self.set(self.all).clone();
                for (c, k) in self.known.iter().enumerate() {
                    if k.is_some() {
                        cpus.insert(c as u32);
                    }
                }
                cpus.iter().map(Target::Cpu).collect()
            }
            Each::Core => {
                // Lowest CPU of every known core, plus every possible CPU never seen online
                // (its own core); ascending, each once.
                let mut firsts = self.set(self.all).clone();
                for (c, k) in self.known.iter().enumerate() {
                    if let Some(k) = k {
                        if self.set(k.core.set).first() != Some(c as u32) {
                            firsts.remove(c as u32);
                        } else {
                            firsts.insert(c as u32);
                        }
                    }
                }
                firsts.iter().map(Target::Core).collect()
            }
            Each::Shard => (0..self.shards.len() as u32).map(Target::Shard).collect(),
            Each::Cache => self.caches.keys().copied().map(Target::Cache).collect(),
            Each::Node => self.nodes.keys().copied().map(Target::Node).collect(),
            Each::Package => self.packages.keys().copied().map(Target::Package).collect(),
            Each::Partition(name) => {
                let Some(ranges) = self.partitions.get(name) else {
                    if self.named.contains_key(name) {
                        return Err(GroupError::EachOfNamed { name: name.clone() });
                    }
                    return Err(self.unknown_name(name));
                };
                let mut out = Vec::with_capacity(ranges.len());
                for (i, g) in ranges.iter().enumerate() {
                    if self.set(g.set).is_empty() {
                        continue;
                    }
                    let t = Target::Partition {
                        name: name.clone(),
                        index: i as u32,
                    };
                    self.check_list(&t, self.set(g.set))?;
                    out.push(t);
                }
                out
            }
        };
        if out.is_empty() {
            let why = match e {
                Each::Cpu | Each::Core => "no possible CPU",
                Each::Shard | Each::Cache => "no CPU has last-level cache data",
                Each::Node => "no NUMA node",
                Each::Package => "no CPU has package data",
                Each::Partition(_) => "every range of the partition is empty",
            };
            return Err(GroupError::EachEmpty {
                each: e.clone(),
                why,
            });
        }
        Ok(out)
    }

    /// Every group, ordered by level (cpu, core, shard, cache, node, package, all, list) then
    /// index: `cpu:N` for every possible CPU, `core:N` once per core (N its lowest CPU),
    /// shards, LLCs, nodes and packages by number, `all`, then named groups by name and
    /// partition ranges by (name, index). Named groups and ranges are listed as configured,
    /// even when addressing them would fail.
    pub fn listing(&self) -> Vec<GroupInfo> {
        let mut out = Vec::new();
        let info = |level, target, members: &CpuSet| GroupInfo {
            level,
            target,
            members: members.clone(),
        };
        let all = self.set(self.all);
        let mut cpus = all.clone();
        for (c, k) in self.known.iter().enumerate() {
            if k.is_some() {
                cpus.insert(c as u32);
            }
        }
        for c in cpus.iter() {
            out.push(info(Level::Cpu, Target::Cpu(c), &CpuSet::single(c)));
        }
        for (c, k) in self.known.iter().enumerate() {
            if let Some(k) = k {
                let core = self.set(k.core.set);
                if core.first() == Some(c as u32) {
                    out.push(info(Level::Core, Target::Core(c as u32), core));
                }
            }
        }
        for (i, g) in self.shards.iter().enumerate() {
            out.push(info(Level::Shard, Target::Shard(i as u32), self.set(g.set)));
        }
        for (&n, g) in &self.caches {
            out.push(info(Level::Cache, Target::Cache(n), self.set(g.set)));
        }
        for (&n, g) in &self.nodes {
            out.push(info(Level::Node, Target::Node(n), self.set(g.set)));
        }
        for (&n, g) in &self.packages {
            out.push(info(Level::Package, Target::Package(n), self.set(g.set)));
        }
        out.push(info(Level::All, Target::All, all));
        for (name, g) in &self.named {
            out.push(info(
                Level::List,
                Target::Named(name.clone()),
                self.set(g.set),
            ));
        }
        for (name, ranges) in &self.partitions {
            for (i, g) in ranges.iter().enumerate() {
                let t = Target::Partition {
                    name: name.clone(),
                    index: i as u32,
                };
                out.push(info(Level::List, t, self.set(g.set)));
            }
        }
        out
    }
}

/// How to pick one CPU from an eligible set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Placement {
    /// The lowest eligible CPU: "the first online CPU of the group" (the RCU rule).
    First,
    /// Round robin: the `rr % len`-th eligible CPU in ascending order. Default: a group of N
    /// live CPUs runs N items at once.
    #[default]
    Spread,
    /// The CPU with the lowest load, the caller giving queue length as load.
    LeastLoaded,
    /// The CPU with the lowest load, the caller giving host CPU busy fraction as load.
    Idle,
}

impl Placement {
    /// The word used in config, `wqctl` and docs (`least-loaded`, ...); what [`FromStr`]
    /// reads.
    pub fn as_str(self) -> &'static str {
        match self {
            Placement::First => "first",
            Placement::Spread => "spread",
            Placement::LeastLoaded => "least-loaded",
            Placement::Idle => "idle",
        }
    }
}

crate::display_as_str!(Placement);

impl FromStr for Placement {
    type Err = GroupError;
    /// `first`, `spread`, `least-loaded`, `idle`; surrounding white space is ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "first" => Ok(Placement::First),
            "spread" => Ok(Placement::Spread),
            "least-loaded" => Ok(Placement::LeastLoaded),
            "idle" => Ok(Placement::Idle),
            _ => Err(GroupError::UnknownPlacement {
                found: s.to_string(),
            }),
        }
    }
}

impl serde::Serialize for Placement {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Placement {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The CPUs of an eligible set that may take work, best first: the one placement rule, used by
/// the engine (which wakes workers in this order) and by [`choose`].
///
/// * `First`: only the lowest CPU (the others may not take the work at all).
/// * `Spread`: every CPU, ascending, starting at the `rr % len`-th and wrapping around; the
///   caller advances `rr`.
/// * `LeastLoaded`, `Idle`: every CPU by ascending `load(cpu)`; equal loads (`-0.0` equals
///   `0.0`) go to the lowest CPU first; a NaN load counts as +∞, so a CPU whose load is unknown
///   comes after every CPU with a known load. `load` is called once per eligible CPU, so a
///   load that changes while ranking cannot make the order inconsistent.
///
/// The buffers are kept between calls: once they have grown to the largest eligible set,
/// ranking allocates nothing (the engine ranks on every wake-up, under its lock).
#[derive(Debug, Clone, Default)]
pub struct Ranking {
    order: Vec<u32>,
    keyed: Vec<(f64, u32)>,
}

impl Ranking {
    /// Empty buffers.
    pub fn new() -> Ranking {
        Ranking::default()
    }

    /// Ranks `eligible` under `placement` (see [`Ranking`]) and returns the order; empty only
    /// when `eligible` is empty. Pure apart from reusing the buffers.
    pub fn rank(
        &mut self,
        placement: Placement,
        eligible: &CpuSet,
        mut load: impl FnMut(u32) -> f64,
        rr: u64,
    ) -> &[u32] {
        self.order.clear();
        match placement {
            Placement::First => self.order.extend(eligible.first()),
            Placement::Spread => {
                let len = eligible.len() as u64;
                if len > 0 {
                    let k = (rr % len) as usize;
                    self.order.extend(eligible.iter().skip(k));
                    self.order.extend(eligible.iter().take(k));
                }
            }
            Placement::LeastLoaded | Placement::Idle => {
                self.keyed.clear();
                self.keyed.extend(eligible.iter().map(|c| {
                    let l = load(c);
                    (if l.is_nan() { f64::INFINITY } else { l }, c)
                }));
                // No NaN is left, so `partial_cmp` is total here; it (unlike `total_cmp`)
                // holds -0.0 and 0.0 equal. CPUs are distinct, so an unstable sort is exact
                // and allocates nothing.
                self.keyed.sort_unstable_by(|a, b| {
                    a.0.partial_cmp(&b.0)
                        .unwrap_or(std::cmp::Ordering::Equal)
                        .then(a.1.cmp(&b.1))
                });
                self.order.extend(self.keyed.iter().map(|&(_, c)| c));
            }
        }
        &self.order
    }

    /// Whether `cpu` is one of the CPUs [`rank`](Ranking::rank) would list for `eligible`
    /// (the lowest for `First`, any member otherwise), without ranking: O(1) for a member.
    pub fn admits(placement: Placement, eligible: &CpuSet, cpu: u32) -> bool {
        match placement {
            Placement::First => eligible.first() == Some(cpu),
            Placement::Spread | Placement::LeastLoaded | Placement::Idle => eligible.contains(cpu),
        }
    }

    /// Moves `cpu` to the front of the last [`rank`](Ranking::rank)'s order, the others
    /// keeping theirs; nothing when it is not listed. Returns the order.
    pub fn prefer(&mut self, cpu: u32) -> &[u32] {
        if let Some(i) = self.order.iter().position(|&c| c == cpu) {
            self.order[..=i].rotate_right(1);
        }
        &self.order
    }

    /// The order of the last [`rank`](Ranking::rank).
    pub fn as_slice(&self) -> &[u32] {
        &self.order
    }
}

/// Picks one CPU of `eligible`: the first of its [`Ranking`] (`None` only when `eligible` is
/// empty). For one-off use; it allocates the ranking's buffers.
///
/// * `First`: the lowest CPU.
/// * `Spread`: the `rr % len`-th CPU in ascending order; the caller increments `rr`.
/// * `LeastLoaded`, `Idle`: the CPU with the lowest `load(cpu)`; ties go to the lowest CPU; a
///   NaN load counts as +∞.
pub fn choose(
    placement: Placement,
    eligible: &CpuSet,
    load: &dyn Fn(u32) -> f64,
    rr: u64,
) -> Option<u32> {
    Ranking::new()
        .rank(placement, eligible, load, rr)
        .first()
        .copied()
}
