//! The exact groups and live sets each sysfs fixture tree yields, read through the real reader,
//! the live view and the group map — and how they behave when a CPU goes offline in the tree.

mod common;

use common::fixtures;
use wqd_core::cpuset::CpuSet;
use wqd_core::groups::{Fallback, GroupsConfig, Level};
use wqd_core::live::{LiveConfig, LiveView, Snapshot, Source};
use wqd_core::target::Target;
use wqd_core::topology::sysfs::Reader;
use wqd_core::topology::AllowedSource;

fn set(s: &str) -> CpuSet {
    s.parse().unwrap()
}

fn view(root: &std::path::Path, shard_cores: u32) -> std::sync::Arc<LiveView> {
    let reading = Reader::fixture(root).read().unwrap();
    let cfg = LiveConfig {
        include_isolated: false,
        groups: GroupsConfig {
            shard_cores,
            ..GroupsConfig::default()
        },
    };
    LiveView::new(reading, cfg)
}

fn members(s: &Snapshot, t: &str) -> String {
    s.groups
        .members(&t.parse::<Target>().unwrap())
        .unwrap()
        .to_string()
}

/// Every group of one level, as "target=members" strings.
fn level(s: &Snapshot, l: Level) -> Vec<String> {
    s.groups
        .listing()
        .into_iter()
        .filter(|g| g.level == l)
        .map(|g| format!("{}={}", g.target, g.members))
        .collect()
}

#[test]
fn two_socket_groups_are_exact() {
    let v = view(&fixtures::fixture("two-socket"), 1);
    let s = v.current();
    assert_eq!(s.live, set("0-13"), "isolated 14-15 are not live");
    assert_eq!(
        level(&s, Level::Core),
        (0..8)
            .map(|k| format!("core:{k}={k},{}", k + 8))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        level(&s, Level::Cache),
        vec![
            "cache:0=0-1,8-9",
            "cache:1=2-3,10-11",
            "cache:2=4-5,12-13",
            "cache:3=6-7,14-15"
        ]
    );
    assert_eq!(
        level(&s, Level::Node),
        vec!["node:0=0-3,8-11", "node:1=4-7,12-15"]
    );
    assert_eq!(
        level(&s, Level::Package),
        vec!["package:0=0-3,8-11", "package:1=4-7,12-15"]
    );
    // One core per shard: 8 shards, two per LLC.
    assert_eq!(level(&s, Level::Shard).len(), 8);
    assert_eq!(members(&s, "core:13"), "5,13");
    assert_eq!(members(&s, "all"), "0-15");
    // cpu:15 is isolated: widen to its core, whose other CPU (7) is live.
    let r = s
        .groups
        .resolve(&Target::Cpu(15), &s.live, Fallback::Widen)
        .unwrap();
    assert_eq!(
        (r.eligible.to_string(), r.fallback),
        ("7".into(), Some(Level::Core))
    );
}

#[test]
fn vm8_offline_keeps_never_seen_cpus_out_of_topology_groups() {
    let v = view(&fixtures::fixture("vm8-offline"), 8);
    let s = v.current();
    assert_eq!(s.live, set("0-4,7"));
    assert_eq!(members(&s, "node:0"), "0-4,7");
    assert_eq!(
        members(&s, "cache:0"),
        "0-4,7",
        "5 and 6 were never seen online"
    );
    assert_eq!(members(&s, "core:5"), "5");
    assert_eq!(members(&s, "all"), "0-7");
    let chain = s.groups.widen_chain(&Target::Cpu(6)).unwrap();
    assert_eq!(chain.last().map(|c| c.0), Some(Level::All));
    let r = s
        .groups
        .resolve(&Target::Cpu(6), &s.live, Fallback::Widen)
        .unwrap();
    assert_eq!((r.eligible, r.fallback), (set("0-4,7"), Some(Level::All)));
    let r = s
        .groups
        .resolve(&Target::Cpu(6), &s.live, Fallback::Wait)
        .unwrap();
    assert!(r.eligible.is_empty());
}

#[test]
fn cgroup_restricted_live_set_follows_the_cpuset() {
    let v = view(&fixtures::fixture("cgroup-restricted"), 8);
    let s = v.current();
    assert_eq!(s.topology.allowed_source, AllowedSource::CgroupV1);
    assert_eq!(s.live, set("1-2"));
    let r = s
        .groups
        .resolve(&Target::Cpu(0), &s.live, Fallback::Widen)
        .unwrap();
    assert!(r.eligible.is_subset(&set("1-2")) && r.fallback.is_some());
}

#[test]
fn empty_node_widens_or_waits() {
    let v = view(&fixtures::fixture("empty-node"), 8);
    let s = v.current();
    assert_eq!(s.live, set("0-3"));
    assert_eq!(members(&s, "node:1"), "");
    let r = s
        .groups
        .resolve(&Target::Node(1), &s.live, Fallback::Widen)
        .unwrap();
    assert_eq!((r.eligible, r.fallback), (set("0-3"), Some(Level::All)));
    let r = s
        .groups
        .resolve(&Target::Node(1), &s.live, Fallback::Wait)
        .unwrap();
    assert!(r.eligible.is_empty());
}

#[test]
fn an_offline_cpu_keeps_its_groups_and_leaves_the_live_set() {
    let tree = fixtures::copy_fixture("two-socket");
    let v = view(tree.path(), 1);
    let before = v.current();
    fixtures::set_offline(tree.path(), 5);
    let after = v
        .apply(Reader::fixture(tree.path()).read().unwrap(), Source::Rescan)
        .expect("a new epoch");
    assert!(after.epoch > before.epoch);
    assert!(!after.live.contains(5));
    assert_eq!(members(&after, "core:5"), "5,13", "membership remembered");
    assert_eq!(members(&after, "cache:2"), "4-5,12-13");
    assert_eq!(level(&after, Level::Node), level(&before, Level::Node));
    let r = after
        .groups
        .resolve(&Target::Cpu(5), &after.live, Fallback::Widen)
        .unwrap();
    assert_eq!(
        (r.eligible.to_string(), r.fallback),
        ("13".into(), Some(Level::Core))
    );
}

/// `each:` fan-outs on the fixture trees: one target per group, ascending, offline and
/// isolated groups included.
#[test]
fn each_fans_out_over_every_group_of_a_level() {
    use wqd_core::groups::{GroupError, GroupMap};
    use wqd_core::target::Each;
    let names = |ts: Vec<Target>| ts.iter().map(Target::to_string).collect::<Vec<_>>();
    let v = view(&fixtures::fixture("two-socket"), 1);
    let s = v.current();
    let each = |e: &str| names(s.groups.each(&e.parse::<Each>().unwrap()).unwrap());
    assert_eq!(
        each("each:cache"),
        ["cache:0", "cache:1", "cache:2", "cache:3"]
    );
    assert_eq!(
        each("each:cpu"),
        (0..16).map(|c| format!("cpu:{c}")).collect::<Vec<_>>(),
        "isolated 14-15 included"
    );
    assert_eq!(
        each("each:core"),
        (0..8).map(|c| format!("core:{c}")).collect::<Vec<_>>()
    );
    assert_eq!(
        each("each:shard"),
        (0..8).map(|c| format!("shard:{c}")).collect::<Vec<_>>()
    );
    assert_eq!(each("each:node"), ["node:0", "node:1"]);
    assert_eq!(each("each:package"), ["package:0", "package:1"]);
    // Every target resolves on the same map.
    for e in [
        "each:cpu",
        "each:core",
        "each:shard",
        "each:cache",
        "each:node",
    ] {
        for t in s.groups.each(&e.parse::<Each>().unwrap()).unwrap() {
            s.groups.members(&t).unwrap();
        }
    }

    // An LLC whose CPUs all went offline is still one of the groups.
    let tree = fixtures::copy_fixture("two-socket");
    let v = view(tree.path(), 1);
    for c in [6, 7] {
        fixtures::set_offline(tree.path(), c);
    }
    let after = v
        .apply(Reader::fixture(tree.path()).read().unwrap(), Source::Rescan)
        .expect("a new epoch");
    let caches = after.groups.each(&Each::Cache).unwrap();
    assert_eq!(names(caches), ["cache:0", "cache:1", "cache:2", "cache:3"]);
    assert!(after
        .groups
        .members(&Target::Cache(3))
        .unwrap()
        .intersection(&after.live)
        .is_empty());

    // Partitions: every non-empty range; named groups and unknown names are refused.
    let mut cfg = GroupsConfig::default();
    cfg.partition_ranges("rcu", &set("0-15"), 4).unwrap();
    cfg.partition_ranges("gappy", &set("0-3,12-15"), 4).unwrap();
    cfg.partition_ranges("wide", &set("0-63"), 16).unwrap();
    cfg.partition_ranges("none", &set("40"), 100).unwrap();
    cfg.named.insert("db".into(), set("0-3"));
    let g = GroupMap::build(&s.topology, &cfg);
    let each = |e: &str| g.each(&e.parse::<Each>().unwrap());
    assert_eq!(
        names(each("each:rcu").unwrap()),
        ["rcu:0", "rcu:1", "rcu:2", "rcu:3"]
    );
    assert_eq!(
        names(each("each:gappy").unwrap()),
        ["gappy:0", "gappy:3"],
        "empty ranges are left out"
    );
    let e = each("each:wide").unwrap_err();
    assert!(matches!(e, GroupError::NotPossible { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        "target wide:1 names CPUs 16-31 that are not possible on this machine (possible CPUs: 0-15)"
    );
    assert_eq!(
        each("each:db").unwrap_err().to_string(),
        "each:db: \"db\" is a named group, not a partition; each: fans out over a level (cpu, \
         core, shard, cache, node, package) or a partition's ranges; submit to db for the one \
         group"
    );
    assert!(matches!(
        each("each:nope").unwrap_err(),
        GroupError::UnknownName { .. }
    ));
    let e = each("each:none").unwrap_err();
    assert!(matches!(e, GroupError::NotPossible { .. }), "{e}");
}

#[test]
fn each_node_includes_a_memory_only_node() {
    use wqd_core::target::Each;
    let v = view(&fixtures::fixture("empty-node"), 8);
    let s = v.current();
    let nodes: Vec<String> = s
        .groups
        .each(&Each::Node)
        .unwrap()
        .iter()
        .map(Target::to_string)
        .collect();
    assert_eq!(nodes, ["node:0", "node:1"]);
}

#[test]
fn each_cpu_and_core_include_cpus_never_seen_online() {
    use wqd_core::groups::{GroupError, GroupMap};
    use wqd_core::target::Each;
    let v = view(&fixtures::fixture("vm8-offline"), 8);
    let s = v.current();
    let names = |e: Each| -> Vec<String> {
        s.groups
            .each(&e)
            .unwrap()
            .iter()
            .map(Target::to_string)
            .collect()
    };
    let every = |w: &str| (0..8).map(|c| format!("{w}:{c}")).collect::<Vec<_>>();
    assert_eq!(names(Each::Cpu), every("cpu"), "5 and 6 never seen online");
    assert_eq!(names(Each::Core), every("core"), "each CPU is its own core");
    assert_eq!(names(Each::Cache), ["cache:0"]);

    // A machine with no CPU (no topology at all) has no LLC to fan out to.
    let empty = GroupMap::default();
    assert_eq!(
        empty.each(&Each::Cache).unwrap_err(),
        GroupError::EachEmpty {
            each: Each::Cache,
            why: "no CPU has last-level cache data"
        }
    );
    assert_eq!(
        empty.each(&Each::Cache).unwrap_err().to_string(),
        "each:cache names no group on this machine (no CPU has last-level cache data)"
    );
}
