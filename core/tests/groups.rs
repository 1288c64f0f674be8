//! Groups on made-up topologies: exact members, chains, error texts, placement, and
//! properties of `resolve` on random topologies and live sets.

use std::collections::BTreeMap;

use proptest::prelude::*;
use wqd_core::groups::{
    choose, Fallback, GroupError, GroupMap, GroupsConfig, Level, Placement, Ranking,
};
use wqd_core::target::Target;
use wqd_core::topology::{AllowedSource, CacheInfo, CpuTopo, Topology};
use wqd_core::CpuSet;

/// Where one known CPU sits. `core` is a machine-wide core number (SMT siblings share it).
#[derive(Clone, Copy)]
struct Loc {
    cpu: u32,
    core: u32,
    llc: u32,
    node: u32,
    package: u32,
}

fn cpu_loc(cpu: u32, core: u32, llc: u32, node: u32, package: u32) -> Loc {
    Loc {
        cpu,
        core,
        llc,
        node,
        package,
    }
}

/// A topology with `possible` CPUs of which `locs` were seen online; `extra_nodes` are nodes
/// without CPUs. `llc_ids` says whether sysfs gave cache ids (the `llc` value) or none.
fn topo(possible: &str, locs: &[Loc], extra_nodes: &[u32], llc_ids: bool) -> Topology {
    let set = |f: &dyn Fn(&Loc) -> bool| {
        locs.iter()
            .filter(|l| f(l))
            .map(|l| l.cpu)
            .collect::<CpuSet>()
    };
    let mut cpus = BTreeMap::new();
    let mut nodes: BTreeMap<u32, CpuSet> =
        extra_nodes.iter().map(|&n| (n, CpuSet::new())).collect();
    for l in locs {
        cpus.insert(
            l.cpu,
            CpuTopo {
                cpu: l.cpu,
                core_id: Some(l.core),
                core_cpus: set(&|o| o.core == l.core),
                cluster_id: None,
                cluster_cpus: None,
                die_id: None,
                die_cpus: None,
                package_id: Some(l.package),
                package_cpus: set(&|o| o.package == l.package),
                llc: Some(CacheInfo {
                    level: 3,
                    id: llc_ids.then_some(l.llc),
                    cpus: set(&|o| o.llc == l.llc),
                }),
                node: Some(l.node),
            },
        );
        nodes.entry(l.node).or_default().insert(l.cpu);
    }
    let possible: CpuSet = possible.parse().unwrap();
    let online: CpuSet = locs.iter().map(|l| l.cpu).collect();
    Topology {
        possible: possible.clone(),
        present: possible,
        online: online.clone(),
        isolated: CpuSet::new(),
        allowed: online,
        allowed_source: AllowedSource::AllOnline,
        cpus,
        nodes,
    }
}

fn s(list: &str) -> CpuSet {
    list.parse().unwrap()
}

fn t(target: &str) -> Target {
    target.parse().unwrap()
}

/// 2 packages x 4 cores x 2 threads; CPU k and k+8 are siblings; one LLC and one node per
/// package; node 2 has no CPU; CPUs 16-17 are possible but never seen online.
fn two_socket() -> Topology {
    let mut locs = Vec::new();
    for core in 0..8 {
        let pkg = core / 4;
        locs.push(cpu_loc(core, core, pkg, pkg, pkg));
        locs.push(cpu_loc(core + 8, core, pkg, pkg, pkg));
    }
    topo("0-17", &locs, &[2], true)
}

fn config() -> GroupsConfig {
    let mut cfg = GroupsConfig {
        shard_cores: 2,
        ..GroupsConfig::default()
    };
    cfg.named.insert("db".into(), s("0-3"));
    cfg.named.insert("far".into(), s("0-31"));
    cfg.named.insert("none".into(), CpuSet::new());
    assert_eq!(cfg.partition_ranges("rcu", &s("0-17"), 8).unwrap(), 3);
    cfg.validate().unwrap();
    cfg
}

fn map() -> GroupMap {
    GroupMap::build(&two_socket(), &config())
}

fn members(m: &GroupMap, target: &str) -> String {
    m.members(&t(target)).unwrap().to_string()
}

fn err(m: &GroupMap, target: &str) -> String {
    m.members(&t(target)).unwrap_err().to_string()
}

#[test]
fn two_socket_members() {
    let m = map();
    assert_eq!(members(&m, "cpu:3"), "3");
    assert_eq!(members(&m, "core:3"), "3,11");
    assert_eq!(members(&m, "core:11"), "3,11");
    assert_eq!(members(&m, "shard:0"), "0-1,8-9");
    assert_eq!(members(&m, "shard:1"), "2-3,10-11");
    assert_eq!(members(&m, "shard:3"), "6-7,14-15");
    assert_eq!(members(&m, "cache:1"), "4-7,12-15");
    assert_eq!(members(&m, "node:0"), "0-3,8-11");
    assert_eq!(members(&m, "node:2"), "");
    assert_eq!(members(&m, "package:1"), "4-7,12-15");
    assert_eq!(members(&m, "all"), "0-17");
    assert_eq!(members(&m, "cpus:0-15:1/4"), "0,4,8,12");
    assert_eq!(members(&m, "db"), "0-3");
    assert_eq!(members(&m, "rcu:0"), "0-7");
    assert_eq!(members(&m, "rcu:2"), "16-17");
}

#[test]
fn never_seen_cpu_is_only_itself_and_widens_to_all() {
    let m = map();
    assert_eq!(members(&m, "cpu:16"), "16");
    assert_eq!(members(&m, "core:17"), "17");
    assert_eq!(
        m.widen_chain(&t("cpu:16")).unwrap(),
        vec![(Level::All, s("0-17"))]
    );
    // It is in no topology-level group.
    for g in m.listing() {
        if matches!(
            g.level,
            Level::Core | Level::Shard | Level::Cache | Level::Node | Level::Package
        ) {
            assert!(!g.members.contains(16), "{}", g.target);
        }
    }
}

#[test]
fn chains() {
    let m = map();
    let chain = |target: &str| {
        m.widen_chain(&t(target))
            .unwrap()
            .into_iter()
            .map(|(l, s)| format!("{l} {s}"))
            .collect::<Vec<_>>()
    };
    // Cache = node = package here, so node and package are skipped.
    assert_eq!(
        chain("cpu:3"),
        ["core 3,11", "shard 2-3,10-11", "cache 0-3,8-11", "all 0-17"]
    );
    assert_eq!(
        chain("core:3"),
        ["shard 2-3,10-11", "cache 0-3,8-11", "all 0-17"]
    );
    assert_eq!(chain("shard:2"), ["cache 4-7,12-15", "all 0-17"]);
    assert_eq!(chain("cache:0"), ["all 0-17"]);
    assert_eq!(chain("node:2"), ["all 0-17"]);
    assert_eq!(chain("package:0"), ["all 0-17"]);
    assert_eq!(chain("cpus:0,4"), ["node 0-15", "all 0-17"]);
    assert_eq!(chain("rcu:2"), ["all 0-17"]);
    assert_eq!(chain("db"), ["node 0-3,8-11", "all 0-17"]);
    assert!(chain("all").is_empty());
}

#[test]
fn resolve_widens_only_when_nothing_is_live() {
    let m = map();
    let cpu3 = t("cpu:3");
    let r = m.resolve(&cpu3, &s("0-17"), Fallback::Widen).unwrap();
    assert_eq!((r.eligible, r.fallback, r.members), (s("3"), None, s("3")));

    let live = s("0-2,4-10,12-17"); // 3 and 11 offline
    let r = m.resolve(&cpu3, &live, Fallback::Widen).unwrap();
    assert_eq!(
        (r.eligible.to_string(), r.fallback),
        ("2,10".into(), Some(Level::Shard))
    );
    for p in [Fallback::Wait, Fallback::Reject] {
        let r = m.resolve(&cpu3, &live, p).unwrap();
        assert_eq!((r.eligible, r.fallback), (CpuSet::new(), None));
    }

    // The rcu_node case: the partition's online CPUs, else the node(s), else anything.
    let rcu1 = t("rcu:1");
    let r = m.resolve(&rcu1, &s("0-1,12"), Fallback::Widen).unwrap();
    assert_eq!((r.eligible.to_string(), r.fallback), ("12".into(), None));
    let r = m
        .resolve(&t("rcu:0"), &s("8-9,17"), Fallback::Widen)
        .unwrap();
    assert_eq!(
        (r.eligible.to_string(), r.fallback),
        ("8-9".into(), Some(Level::Node))
    );
    let r = m.resolve(&t("rcu:2"), &s("5"), Fallback::Widen).unwrap();
    assert_eq!(
        (r.eligible.to_string(), r.fallback),
        ("5".into(), Some(Level::All))
    );

    // Nothing live anywhere.
    let r = m.resolve(&cpu3, &CpuSet::new(), Fallback::Widen).unwrap();
    assert_eq!((r.eligible, r.fallback), (CpuSet::new(), None));
}

#[test]
fn error_texts() {
    let m = map();
    assert_eq!(
        err(&m, "cpu:18"),
        "CPU 18 is not possible on this machine (possible CPUs: 0-17)"
    );
    assert_eq!(
        err(&m, "core:99"),
        "CPU 99 is not possible on this machine (possible CPUs: 0-17)"
    );
    assert_eq!(err(&m, "node:7"), "no NUMA node 7 (nodes: 0-2)");
    assert_eq!(err(&m, "cache:2"), "no LLC numbered 2 (LLCs: 0-1)");
    assert_eq!(err(&m, "shard:4"), "no shard 4 (shards: 0-3)");
    assert_eq!(err(&m, "package:2"), "no package 2 (packages: 0-1)");
    assert_eq!(
        err(&m, "cpus:16-20"),
        "target cpus:16-20 names CPUs 18-20 that are not possible on this machine (possible CPUs: 0-17)"
    );
    assert_eq!(
        err(&m, "far"),
        "target far names CPUs 18-31 that are not possible on this machine (possible CPUs: 0-17)"
    );
    assert_eq!(err(&m, "none"), "target none names no CPU");
    assert_eq!(
        m.members(&Target::Cpus(CpuSet::new())).unwrap_err(),
        GroupError::EmptyList {
            target: Target::Cpus(CpuSet::new())
        }
    );
    assert_eq!(
        err(&m, "rcu:3"),
        "rcu:3 is out of range: partition \"rcu\" has 3 ranges (rcu:0 to rcu:2)"
    );
    assert_eq!(
        err(&m, "rcu"),
        "\"rcu\" is a partition of 3 ranges; expected rcu:N with N from 0 to 2"
    );
    assert_eq!(
        err(&m, "db:0"),
        "\"db\" is a named group, not a partition; expected db without an index"
    );
    assert_eq!(
        err(&m, "cpu3"),
        "unknown group name \"cpu3\" (configured: db, far, none, rcu:N); did you mean \"cpu:3\"?"
    );
    assert_eq!(
        err(&m, "web"),
        "unknown group name \"web\" (configured: db, far, none, rcu:N)"
    );
    // Errors come from resolve and widen_chain too.
    assert!(m.resolve(&t("node:7"), &s("0"), Fallback::Widen).is_err());
    assert!(m.widen_chain(&t("node:7")).is_err());
}

#[test]
fn config_errors() {
    let mut cfg = GroupsConfig::default();
    assert_eq!(
        cfg.partition_ranges("rcu", &s("0-3"), 0)
            .unwrap_err()
            .to_string(),
        "partition \"rcu\": range size must be at least 1"
    );
    assert_eq!(
        cfg.partition_ranges("Rcu", &s("0-3"), 4).unwrap_err().to_string(),
        "bad group name: at byte 0 of group name \"Rcu\": expected a lowercase letter a-z, found 'R'"
    );
    cfg.named.insert("node".into(), s("0"));
    assert!(cfg
        .validate()
        .unwrap_err()
        .to_string()
        .contains("is reserved"));
    cfg.named.clear();
    cfg.named.insert("x".into(), s("0"));
    cfg.partitions.insert("x".into(), vec![s("0")]);
    assert_eq!(
        cfg.validate().unwrap_err().to_string(),
        "\"x\" is both a named group and a partition"
    );
}

#[test]
fn partition_ranges_follow_cpu_numbers() {
    let mut cfg = GroupsConfig::default();
    assert_eq!(cfg.partition_ranges("rcu", &s("4-35"), 16).unwrap(), 3);
    let r = &cfg.partitions["rcu"];
    assert_eq!(
        r.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        ["4-15", "16-31", "32-35"]
    );
    assert_eq!(cfg.partition_ranges("gap", &s("0-3,40-47"), 16).unwrap(), 3);
    assert!(cfg.partitions["gap"][1].is_empty());
}

#[test]
fn shards_split_an_eight_core_llc_in_pairs() {
    let locs: Vec<Loc> = (0..8).map(|c| cpu_loc(c, c, 0, 0, 0)).collect();
    let cfg = GroupsConfig {
        shard_cores: 2,
        ..GroupsConfig::default()
    };
    let m = GroupMap::build(&topo("0-7", &locs, &[], true), &cfg);
    let shards: Vec<String> = (0..4).map(|i| members(&m, &format!("shard:{i}"))).collect();
    assert_eq!(shards, ["0-1", "2-3", "4-5", "6-7"]);
    assert!(m.members(&t("shard:4")).is_err());
    // shard_cores 0: one shard per LLC; 3: the last slice is smaller.
    let whole = GroupMap::build(
        &topo("0-7", &locs, &[], true),
        &GroupsConfig {
            shard_cores: 0,
            ..cfg.clone()
        },
    );
    assert_eq!(members(&whole, "shard:0"), "0-7");
    let threes = GroupMap::build(
        &topo("0-7", &locs, &[], true),
        &GroupsConfig {
            shard_cores: 3,
            ..cfg
        },
    );
    assert_eq!(members(&threes, "shard:2"), "6-7");
}

#[test]
fn llc_numbering_uses_kernel_ids_else_order_of_lowest_cpu() {
    // LLC ids 9 (CPUs 0-3) and 5 (CPUs 4-7).
    let locs: Vec<Loc> = (0..8)
        .map(|c| cpu_loc(c, c, if c < 4 { 9 } else { 5 }, 0, 0))
        .collect();
    let cfg = GroupsConfig::default();
    let with_ids = GroupMap::build(&topo("0-7", &locs, &[], true), &cfg);
    assert_eq!(members(&with_ids, "cache:9"), "0-3");
    assert_eq!(members(&with_ids, "cache:5"), "4-7");
    // Shards follow LLC number order: LLC 5 first.
    assert_eq!(members(&with_ids, "shard:0"), "4-7");
    let without = GroupMap::build(&topo("0-7", &locs, &[], false), &cfg);
    assert_eq!(members(&without, "cache:0"), "0-3");
    assert_eq!(members(&without, "cache:1"), "4-7");
    assert_eq!(err(&without, "cache:9"), "no LLC numbered 9 (LLCs: 0-1)");
}

#[test]
fn llc_spanning_two_nodes_widens_to_both() {
    // Sub-NUMA clustering: one LLC, two nodes.
    let locs: Vec<Loc> = (0..4).map(|c| cpu_loc(c, c, 0, c / 2, 0)).collect();
    let m = GroupMap::build(&topo("0-3", &locs, &[], true), &GroupsConfig::default());
    let chain = m.widen_chain(&t("cpu:0")).unwrap();
    assert_eq!(chain, vec![(Level::Shard, s("0-3"))]);
    assert_eq!(
        m.widen_chain(&t("node:0")).unwrap(),
        vec![(Level::Package, s("0-3"))]
    );
}

#[test]
fn listing_is_ordered_by_level_then_index() {
    let m = map();
    let rows: Vec<String> = m
        .listing()
        .iter()
        .map(|g| format!("{} {}", g.target, g.members))
        .collect();
    let levels: Vec<Level> = m.listing().iter().map(|g| g.level).collect();
    assert!(levels.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(rows[0], "cpu:0 0");
    assert_eq!(rows[17], "cpu:17 17");
    let cores: Vec<&String> = rows.iter().filter(|r| r.starts_with("core:")).collect();
    assert_eq!(cores.len(), 8);
    assert_eq!(cores[0], "core:0 0,8");
    let rest: Vec<&String> = rows.iter().skip(26).collect();
    assert_eq!(
        rest,
        [
            "shard:0 0-1,8-9",
            "shard:1 2-3,10-11",
            "shard:2 4-5,12-13",
            "shard:3 6-7,14-15",
            "cache:0 0-3,8-11",
            "cache:1 4-7,12-15",
            "node:0 0-3,8-11",
            "node:1 4-7,12-15",
            "node:2 ",
            "package:0 0-3,8-11",
            "package:1 4-7,12-15",
            "all 0-17",
            "db 0-3",
            "far 0-31",
            "none ",
            "rcu:0 0-7",
            "rcu:1 8-15",
            "rcu:2 16-17",
        ]
    );
}

#[test]
fn ranking_puts_nan_last_and_breaks_ties_by_cpu() {
    let e = s("1,3,4,6,8");
    let mut r = Ranking::new();
    // A NaN load is +inf whatever its sign bit; -0.0 and 0.0 are equal loads.
    let load = |c: u32| match c {
        1 => -f64::NAN,
        3 => 0.5,
        4 => 0.0,
        6 => -0.0,
        _ => f64::NAN,
    };
    for p in [Placement::LeastLoaded, Placement::Idle] {
        assert_eq!(r.rank(p, &e, load, 0), [4, 6, 3, 1, 8]);
        assert_eq!(choose(p, &e, &load, 0), Some(4));
    }
    assert_eq!(r.rank(Placement::Spread, &e, load, 7), [4, 6, 8, 1, 3]);
    assert_eq!(r.rank(Placement::First, &e, load, 7), [1]);
    assert_eq!(r.as_slice(), [1]);
    assert!(r.rank(Placement::Idle, &CpuSet::new(), load, 0).is_empty());
    assert!(Ranking::admits(Placement::First, &e, 1));
    assert!(!Ranking::admits(Placement::First, &e, 3));
    assert!(Ranking::admits(Placement::Spread, &e, 3));
    assert!(!Ranking::admits(Placement::Idle, &e, 2));
    // `prefer` moves one listed CPU to the front, the rest keeping their order; an unlisted
    // one (not eligible, or not the `first`) changes nothing.
    r.rank(Placement::Spread, &e, load, 7);
    assert_eq!(r.prefer(8), [8, 4, 6, 1, 3]);
    assert_eq!(r.prefer(3), [3, 8, 4, 6, 1]);
    assert_eq!(r.prefer(3), [3, 8, 4, 6, 1]);
    assert_eq!(r.prefer(2), [3, 8, 4, 6, 1]);
    r.rank(Placement::First, &e, load, 7);
    assert_eq!(r.prefer(4), [1]);
}

#[test]
fn placement() {
    let e = s("2,5,9");
    let zero = |_: u32| 0.0;
    assert_eq!(choose(Placement::First, &e, &zero, 7), Some(2));
    let spread: Vec<_> = (0..4)
        .map(|rr| choose(Placement::Spread, &e, &zero, rr))
        .collect();
    assert_eq!(spread, [Some(2), Some(5), Some(9), Some(2)]);
    let load = |c: u32| match c {
        2 => 3.0,
        5 | 9 => 1.0,
        _ => 0.0,
    };
    assert_eq!(choose(Placement::LeastLoaded, &e, &load, 0), Some(5));
    assert_eq!(choose(Placement::Idle, &e, &load, 0), Some(5));
    let nan = |c: u32| if c == 2 { f64::NAN } else { 0.5 };
    assert_eq!(choose(Placement::Idle, &e, &nan, 0), Some(5));
    for p in [
        Placement::First,
        Placement::Spread,
        Placement::LeastLoaded,
        Placement::Idle,
    ] {
        assert_eq!(choose(p, &CpuSet::new(), &zero, 3), None);
        assert_eq!(p.to_string().parse::<Placement>().unwrap(), p);
    }
    assert_eq!(
        "least-loaded".parse::<Placement>().unwrap(),
        Placement::LeastLoaded
    );
    assert_eq!(
        "lru".parse::<Placement>().unwrap_err().to_string(),
        "unknown placement \"lru\"; expected one of first, spread, least-loaded, idle"
    );
}

#[test]
fn fallback_words() {
    for f in [Fallback::Widen, Fallback::Wait, Fallback::Reject] {
        assert_eq!(f.to_string().parse::<Fallback>().unwrap(), f);
    }
    assert_eq!(Fallback::default(), Fallback::Widen);
    assert_eq!(" reject ".parse::<Fallback>().unwrap(), Fallback::Reject);
    // The message config errors have always shown.
    assert_eq!(
        "shrink".parse::<Fallback>().unwrap_err().to_string(),
        "unknown fallback \"shrink\"; expected one of widen, wait, reject"
    );
}

// ---- properties ----

/// A random machine: packages x LLCs x cores x threads, nodes per package or per LLC, some
/// CPUs never seen, two possible CPUs beyond the last.
fn random_topology() -> impl Strategy<Value = (Topology, u32)> {
    (
        1u32..=2,
        1u32..=2,
        1u32..=4,
        1u32..=2,
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
        0u32..=3,
    )
        .prop_map(
            |(pkgs, llcs, cores, smt, node_per_llc, ids, unseen, shard_cores)| {
                let total_cores = pkgs * llcs * cores;
                let mut locs = Vec::new();
                for th in 0..smt {
                    for core in 0..total_cores {
                        let cpu = th * total_cores + core;
                        let llc = core / cores;
                        let pkg = llc / llcs;
                        let node = if node_per_llc { llc } else { pkg };
                        if unseen >> (cpu % 64) & 1 == 0 || cpu == 0 {
                            locs.push(cpu_loc(cpu, core, llc, node, pkg));
                        }
                    }
                }
                let last = smt * total_cores + 1;
                (topo(&format!("0-{last}"), &locs, &[9], ids), shard_cores)
            },
        )
}

fn targets_of(m: &GroupMap, extra: &CpuSet) -> Vec<Target> {
    let mut ts: Vec<Target> = m.listing().into_iter().map(|g| g.target).collect();
    if !extra.is_empty() {
        ts.push(Target::Cpus(extra.clone()));
    }
    ts
}

/// `topo` with every CPU number `c` renamed `c * stride + offset`, so that its groups spread
/// over many words of a `CpuSet` and sit high in it, as on a big machine.
fn spread(topo: &Topology, stride: u32, offset: u32) -> Topology {
    let f = |c: u32| c * stride + offset;
    let m = |s: &CpuSet| s.iter().map(f).collect::<CpuSet>();
    Topology {
        possible: m(&topo.possible),
        present: m(&topo.present),
        online: m(&topo.online),
        isolated: m(&topo.isolated),
        allowed: m(&topo.allowed),
        allowed_source: topo.allowed_source,
        cpus: topo
            .cpus
            .values()
            .map(|t| {
                let t = CpuTopo {
                    cpu: f(t.cpu),
                    core_cpus: m(&t.core_cpus),
                    cluster_cpus: t.cluster_cpus.as_ref().map(m),
                    die_cpus: t.die_cpus.as_ref().map(m),
                    package_cpus: m(&t.package_cpus),
                    llc: t.llc.as_ref().map(|l| CacheInfo {
                        cpus: m(&l.cpus),
                        ..l.clone()
                    }),
                    ..t.clone()
                };
                (t.cpu, t)
            })
            .collect(),
        nodes: topo.nodes.iter().map(|(&n, s)| (n, m(s))).collect(),
    }
}

/// `resolve` agrees with its definition on `topo`: the members' live CPUs, else the first
/// widening-chain entry with a live CPU (as `widen_chain` lists them), else nothing.
fn check_resolve(
    topo: &Topology,
    shard_cores: u32,
    live_bits: u64,
    list_bits: u64,
) -> Result<(), TestCaseError> {
    let mut cfg = GroupsConfig {
        shard_cores,
        ..GroupsConfig::default()
    };
    cfg.partition_ranges("rcu", &topo.possible, 3).unwrap();
    let m = GroupMap::build(topo, &cfg);
    // By position in `possible`, so that spread machines draw as many live sets.
    let pick = |bits: u64| -> CpuSet {
        topo.possible
            .iter()
            .enumerate()
            .filter(|(i, _)| bits >> (i % 64) & 1 == 1)
            .map(|(_, c)| c)
            .collect()
    };
    let (live, list) = (pick(live_bits), pick(list_bits));
    let known: CpuSet = topo.cpus.keys().copied().collect();
    for target in targets_of(&m, &list) {
        let members = match m.members(&target) {
            // A partition range with no CPU (spread machines have holes): an error either way.
            Err(GroupError::EmptyList { .. }) => {
                prop_assert!(m.resolve(&target, &live, Fallback::Widen).is_err());
                continue;
            }
            r => r.unwrap(),
        };
        let own = members.intersection(&live);
        let chain = m.widen_chain(&target).unwrap();
        // Chains strictly grow from the members.
        let mut prev = members.clone();
        for (_, set) in &chain {
            prop_assert!(prev.is_subset(set) && prev != *set, "{target}: {chain:?}");
            prev = set.clone();
        }
        // Topology-level groups hold only known CPUs (except a never-seen cpu:/core: itself).
        if matches!(
            target,
            Target::Shard(_) | Target::Cache(_) | Target::Node(_) | Target::Package(_)
        ) {
            prop_assert!(members.is_subset(&known), "{target}");
        }
        let r = m.resolve(&target, &live, Fallback::Widen).unwrap();
        prop_assert_eq!(&r.members, &members);
        prop_assert!(r.eligible.is_subset(&live));
        match r.fallback {
            None if !own.is_empty() => prop_assert_eq!(&r.eligible, &own),
            None => {
                prop_assert!(r.eligible.is_empty());
                prop_assert!(chain.iter().all(|(_, s)| !s.intersects(&live)));
            }
            Some(level) => {
                prop_assert!(own.is_empty());
                let pos = chain.iter().position(|(l, _)| *l == level).unwrap();
                prop_assert_eq!(&r.eligible, &chain[pos].1.intersection(&live));
                prop_assert!(!r.eligible.is_empty());
                prop_assert!(chain[..pos].iter().all(|(_, s)| !s.intersects(&live)));
            }
        }
        for p in [Fallback::Wait, Fallback::Reject] {
            let r = m.resolve(&target, &live, p).unwrap();
            prop_assert_eq!(&r.eligible, &own);
            prop_assert_eq!(r.fallback, None);
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn resolve_lands_in_members_or_a_recorded_fallback(
        (topo, shard_cores) in random_topology(),
        live_bits in any::<u64>(),
        list_bits in any::<u64>(),
    ) {
        check_resolve(&topo, shard_cores, live_bits, list_bits)?;
    }

    /// The same on machines whose CPU numbers are spread over many words and sit high (up to
    /// about 4 400): `resolve` reads sets from their lowest CPU on, which must not change what
    /// it finds.
    #[test]
    fn resolve_is_the_same_with_high_and_scattered_cpus(
        (topo, shard_cores) in random_topology(),
        stride in prop_oneof![Just(1u32), Just(3), Just(64), Just(67), Just(129)],
        offset in prop_oneof![Just(0u32), 1u32..64, Just(4000)],
        live_bits in any::<u64>(),
        list_bits in any::<u64>(),
    ) {
        let topo = spread(&topo, stride, offset.min(8191 - 33 * stride));
        check_resolve(&topo, shard_cores, live_bits, list_bits)?;
    }

    #[test]
    fn every_placement_picks_an_eligible_cpu(bits in any::<u64>(), rr in any::<u64>(), seed in any::<u32>()) {
        let e: CpuSet = (0..64).filter(|c| bits >> c & 1 == 1).collect();
        let load = move |c: u32| f64::from((c ^ seed) % 4);
        for p in [Placement::First, Placement::Spread, Placement::LeastLoaded, Placement::Idle] {
            match choose(p, &e, &load, rr) {
                Some(c) => prop_assert!(e.contains(c)),
                None => prop_assert!(e.is_empty()),
            }
        }
        let mut ranking = Ranking::new();
        for p in [Placement::First, Placement::Spread, Placement::LeastLoaded, Placement::Idle] {
            let order = ranking.rank(p, &e, load, rr).to_vec();
            prop_assert_eq!(order.first().copied(), choose(p, &e, &load, rr));
            prop_assert!(order.iter().all(|&c| Ranking::admits(p, &e, c)));
            if p != Placement::First {
                let mut sorted = order.clone();
                sorted.sort_unstable();
                prop_assert_eq!(sorted, e.iter().collect::<Vec<_>>());
            }
        }
        if let Some(c) = choose(Placement::LeastLoaded, &e, &load, rr) {
            let min = e.iter().map(load).fold(f64::INFINITY, f64::min);
            prop_assert_eq!(load(c), min);
            prop_assert_eq!(Some(c), e.iter().find(|&x| load(x) == min));
        }
    }
}

#[test]
fn big_machine_builds_and_resolves() {
    // 2 packages x 8 LLCs x 16 cores x 2 threads = 512 CPUs; 8 possible CPUs never seen.
    let mut locs = Vec::new();
    for th in 0..2 {
        for core in 0..256 {
            let llc = core / 16;
            locs.push(cpu_loc(th * 256 + core, core, llc, llc / 4, llc / 8));
        }
    }
    let topo = topo("0-519", &locs, &[], true);
    let mut cfg = GroupsConfig::default();
    cfg.partition_ranges("rcu", &topo.possible, 16).unwrap();
    let start = std::time::Instant::now();
    let m = GroupMap::build(&topo, &cfg);
    let built = start.elapsed();
    let live = s("0-99,300-519");
    let targets: Vec<Target> = m.listing().into_iter().map(|g| g.target).collect();
    let start = std::time::Instant::now();
    for target in &targets {
        let r = m.resolve(target, &live, Fallback::Widen).unwrap();
        assert!(!r.eligible.is_empty(), "{target}");
    }
    eprintln!(
        "build {built:?}; {} resolves in {:?}",
        targets.len(),
        start.elapsed()
    );
    assert_eq!(members(&m, "shard:1"), "8-15,264-271");
    assert_eq!(members(&m, "node:3"), "192-255,448-511");
}
