//! The exact groups and live sets each sysfs fixture tree yields, read through the real reader,
//! the live view and the group map — and how they behave when a CPU goes offline in the tree.

#[path = "fixtures/support.rs"]
mod support;

use wqd::cpuset::CpuSet;
use wqd::groups::{Fallback, GroupsConfig, Level};
use wqd::live::{LiveConfig, LiveView, Snapshot, Source};
use wqd::target::Target;
use wqd::topology::sysfs::Reader;
use wqd::topology::AllowedSource;

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
    let v = view(&support::fixture("two-socket"), 1);
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
    let v = view(&support::fixture("vm8-offline"), 8);
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
    let v = view(&support::fixture("cgroup-restricted"), 8);
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
    let v = view(&support::fixture("empty-node"), 8);
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
    let tree = support::copy_fixture("two-socket");
    let v = view(tree.path(), 1);
    let before = v.current();
    support::set_offline(tree.path(), 5);
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
