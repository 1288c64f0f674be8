//! The sysfs reader against the fixture trees (and the real host), remembered membership across
//! hotplug, and the cpulist grammar under random input.

mod common;

use std::collections::BTreeMap;
use std::fs;

use common::fixtures::{copy_fixture, fixture, possible400, set_offline, set_online, write};
use proptest::prelude::*;
use wqd_core::topology::sysfs::Reader;
use wqd_core::topology::{AllowedSource, CacheInfo, CpuTopo, Topology, TopologyError};
use wqd_core::CpuSet;

fn set(s: &str) -> CpuSet {
    CpuSet::parse_list(s).unwrap()
}

fn nodes(pairs: &[(u32, &str)]) -> BTreeMap<u32, CpuSet> {
    pairs.iter().map(|(n, s)| (*n, set(s))).collect()
}

#[test]
fn two_socket_masks_and_per_cpu_info() {
    let r = Reader::fixture(fixture("two-socket")).read().unwrap();
    assert_eq!(r.possible, set("0-15"));
    assert_eq!(r.present, set("0-15"));
    assert_eq!(r.online, set("0-15"));
    assert_eq!(r.isolated, set("14-15"));
    assert_eq!(r.allowed, set("0-15"));
    assert_eq!(r.allowed_source, AllowedSource::AllOnline);
    assert_eq!(r.nodes, nodes(&[(0, "0-3,8-11"), (1, "4-7,12-15")]));
    assert_eq!(r.cpus.keys().copied().collect::<CpuSet>(), set("0-15"));

    // CPU 9 is the second thread of core 1 (package 0, LLC 0).
    assert_eq!(
        r.cpus[&9],
        CpuTopo {
            cpu: 9,
            core_id: Some(1),
            core_cpus: set("1,9"),
            cluster_id: Some(1),
            cluster_cpus: Some(set("1,9")),
            die_id: Some(0),
            die_cpus: Some(set("0-3,8-11")),
            package_id: Some(0),
            package_cpus: set("0-3,8-11"),
            llc: Some(CacheInfo {
                level: 3,
                id: Some(0),
                cpus: set("0-1,8-9"),
            }),
            node: Some(0),
        }
    );
    // core_id restarts per package: CPU 12 is core 4 overall, core_id 0 of package 1.
    let c12 = &r.cpus[&12];
    assert_eq!(c12.core_id, Some(0));
    assert_eq!(c12.core_cpus, set("4,12"));
    assert_eq!(c12.package_id, Some(1));
    assert_eq!(c12.package_cpus, set("4-7,12-15"));
    assert_eq!(c12.node, Some(1));
    let llc = c12.llc.as_ref().unwrap();
    assert_eq!((llc.level, llc.id), (3, Some(2)));
    assert_eq!(llc.cpus, set("4-5,12-13"));
    // Four LLCs of four CPUs each, partitioning the machine.
    let mut llcs: BTreeMap<u32, CpuSet> = BTreeMap::new();
    for t in r.cpus.values() {
        let l = t.llc.as_ref().unwrap();
        llcs.entry(l.id.unwrap()).or_default().insert(t.cpu);
        assert_eq!(l.level, 3);
    }
    assert_eq!(
        llcs,
        nodes(&[
            (0, "0-1,8-9"),
            (1, "2-3,10-11"),
            (2, "4-5,12-13"),
            (3, "6-7,14-15")
        ])
    );
}

#[test]
fn llc_is_highest_data_or_unified_level() {
    let dir = copy_fixture("two-socket");
    let cache = dir.path().join("devices/system/cpu/cpu0/cache");
    // Make L3 an instruction cache: the LLC must fall back to the unified L2.
    write(&cache.join("index3/type"), "Instruction\n");
    // And a cache without an id file (some architectures) still counts.
    fs::remove_file(cache.join("index2/id")).unwrap();
    let r = Reader::fixture(dir.path()).read().unwrap();
    assert_eq!(
        r.cpus[&0].llc,
        Some(CacheInfo {
            level: 2,
            id: None,
            cpus: set("0,8"),
        })
    );
    assert_eq!(r.cpus[&1].llc.as_ref().unwrap().level, 3);
}

#[test]
fn vm8_offline_cpus_have_no_topology() {
    let r = Reader::fixture(fixture("vm8-offline")).read().unwrap();
    assert_eq!(r.possible, set("0-7"));
    assert_eq!(r.present, set("0-7"));
    assert_eq!(r.online, set("0-4,7"));
    assert!(r.isolated.is_empty());
    assert_eq!(r.allowed, set("0-4,7"));
    assert_eq!(r.allowed_source, AllowedSource::AllOnline);
    assert_eq!(r.cpus.keys().copied().collect::<CpuSet>(), set("0-4,7"));
    assert_eq!(r.nodes, nodes(&[(0, "0-4,7")]));
    let c7 = &r.cpus[&7];
    assert_eq!(c7.core_cpus, set("7"));
    assert_eq!(c7.package_cpus, set("0-4,7"));
    assert_eq!(c7.llc.as_ref().unwrap().cpus, set("0-4,7"));
    assert_eq!(c7.node, Some(0));
    // Never seen online: no remembered membership, but still possible and present.
    let t = Topology::merge(None, r);
    assert!(!t.cpus.contains_key(&5) && !t.cpus.contains_key(&6));
    assert!(t.present.contains(5));
}

#[test]
fn possible400_reads_only_present_cpus() {
    let dir = possible400();
    let r = Reader::fixture(dir.path()).read().unwrap();
    assert_eq!(r.possible, set("0-399"));
    assert_eq!(r.present, set("0-75"));
    assert_eq!(r.online, set("0-75"));
    assert_eq!(r.allowed, set("0-75"));
    assert_eq!(r.cpus.len(), 76);
    assert_eq!(r.nodes, nodes(&[(0, "0-37"), (1, "38-75")]));
    let c40 = &r.cpus[&40];
    assert_eq!(c40.package_id, Some(1));
    assert_eq!(c40.core_id, Some(2));
    // cluster_id -1 means "unknown".
    assert_eq!(c40.cluster_id, None);
    assert_eq!(c40.llc.as_ref().unwrap().cpus, set("38-75"));
    assert_eq!(c40.node, Some(1));
}

#[test]
fn cgroup_v1_root_cpuset_in_fixture_mode() {
    let r = Reader::fixture(fixture("cgroup-restricted"))
        .read()
        .unwrap();
    assert_eq!(r.online, set("0-3"));
    assert_eq!(r.allowed, set("1-2"));
    assert_eq!(r.allowed_source, AllowedSource::CgroupV1);
    assert!(r.nodes.is_empty(), "no node folder: a non-NUMA kernel");
    assert!(r.cpus.values().all(|t| t.node.is_none()));
}

#[test]
fn cgroup_v2_root_cpuset_in_fixture_mode() {
    let dir = copy_fixture("empty-node");
    write(&dir.path().join("fs/cgroup/cpuset.cpus.effective"), "0,2\n");
    let r = Reader::fixture(dir.path()).read().unwrap();
    assert_eq!(r.allowed, set("0,2"));
    assert_eq!(r.allowed_source, AllowedSource::CgroupV2);
}

fn with_proc(variant: &str) -> wqd_core::topology::Reading {
    let proc = fixture("cgroup-restricted-proc").join(variant);
    Reader::with_proc(fixture("cgroup-restricted"), proc)
        .read()
        .unwrap()
}

#[test]
fn cgroup_v1_nested_through_mountinfo() {
    let r = with_proc("v1");
    assert_eq!(r.allowed, set("2"));
    assert_eq!(r.allowed_source, AllowedSource::CgroupV1);
    // isolcpus=domain,managed_irq,3 and nohz_full=0; the isolcpus=1 after `--` is init's.
    assert_eq!(r.isolated, set("0,3"));
}

#[test]
fn cgroup_v1_bind_mounted_subtree() {
    // The hierarchy is mounted from /wqd, so the cgroup /wqd/job is <mount>/job.
    let r = with_proc("v1-bind");
    assert_eq!(r.allowed, set("1"));
    assert_eq!(r.allowed_source, AllowedSource::CgroupV1);
}

#[test]
fn cgroup_v2_walks_up_to_nearest_cpuset() {
    let r = with_proc("v2");
    assert_eq!(r.allowed, set("3"));
    assert_eq!(r.allowed_source, AllowedSource::CgroupV2);
}

#[test]
fn no_cgroup_falls_back_to_affinity() {
    let r = with_proc("none");
    assert_eq!(r.allowed_source, AllowedSource::Affinity);
    let aff = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
    let expect: CpuSet = (0..nix::sched::CpuSet::count() as u32)
        .filter(|c| aff.is_set(*c as usize).unwrap())
        .collect();
    assert_eq!(r.allowed, expect);
}

#[test]
fn empty_node_is_kept() {
    let r = Reader::fixture(fixture("empty-node")).read().unwrap();
    assert_eq!(r.nodes, nodes(&[(0, "0-3"), (1, "")]));
    assert!(r.cpus.values().all(|t| t.node == Some(0)));
    let t = Topology::merge(None, r);
    assert_eq!(t.nodes, nodes(&[(0, "0-3"), (1, "")]));
}

#[test]
fn offline_cpu_keeps_its_membership_and_comes_back() {
    let pristine = fixture("two-socket");
    let dir = copy_fixture("two-socket");
    let reader = Reader::fixture(dir.path());
    let r1 = reader.read().unwrap();
    let t1 = Topology::merge(None, r1.clone());

    set_offline(dir.path(), 9);
    let r2 = reader.read().unwrap();
    assert_eq!(r2.online, set("0-8,10-15"));
    assert!(!r2.cpus.contains_key(&9));
    // What the kernel shows now: 9 is gone from its sibling's lists and its node.
    assert_eq!(r2.cpus[&1].core_cpus, set("1"));
    assert_eq!(r2.cpus[&0].llc.as_ref().unwrap().cpus, set("0-1,8"));
    assert_eq!(r2.nodes[&0], set("0-3,8,10-11"));

    let t2 = Topology::merge(Some(&t1), r2);
    assert_eq!(t2.online, set("0-8,10-15"));
    assert_eq!(
        t2.cpus[&9], t1.cpus[&9],
        "remembered as it was while online"
    );
    assert_eq!(t2.cpus[&1].core_cpus, set("1,9"));
    assert_eq!(t2.cpus[&0].llc.as_ref().unwrap().cpus, set("0-1,8-9"));
    assert_eq!(t2.cpus[&3].package_cpus, set("0-3,8-11"));
    assert_eq!(t2.nodes[&0], set("0-3,8-11"));
    assert!(!wqd_core::live::live_set(&t2, true).contains(9));

    set_online(dir.path(), &pristine, 9);
    let r3 = reader.read().unwrap();
    assert_eq!(r3, r1, "the tree is back to the fixture");
    let t3 = Topology::merge(Some(&t2), r3);
    assert_eq!(t3, t1);
}

/// What a CPU's `topology/core_id` says, as a test edit of the tree.
fn set_core_id(root: &std::path::Path, cpu: u32, id: u32) {
    let f = root.join(format!("devices/system/cpu/cpu{cpu}/topology/core_id"));
    write(&f, &format!("{id}\n"));
}

#[test]
fn unchanged_rescan_rereads_nothing_but_named_cpus() {
    let dir = copy_fixture("two-socket");
    let reader = Reader::fixture(dir.path());
    let first = reader.read().unwrap();
    let mut r = first.clone();
    assert!(reader.rescan(&mut r, &CpuSet::new()).unwrap().is_empty());
    assert_eq!(r, first);

    // CPU 3's files change without a hotplug: a rescan keeps what it read before (this is
    // what it saves), a full read sees it, and so does a rescan told about CPU 3.
    set_core_id(dir.path(), 3, 9);
    let reread = reader.rescan(&mut r, &CpuSet::new()).unwrap();
    assert!(reread.is_empty(), "{reread}");
    assert_eq!(r.cpus[&3].core_id, Some(3));
    let full = reader.read().unwrap();
    assert_eq!(full.cpus[&3].core_id, Some(9));

    let reread = reader.rescan(&mut r, &set("3")).unwrap();
    // CPU 3 and every CPU whose lists name it (core 3,11; package and LLC 0-3,8-11).
    assert_eq!(reread, set("0-3,8-11"));
    assert_eq!(r, full);

    // Masks are read every time: an allowed-set change alone shows without re-reading CPUs.
    write(&dir.path().join("fs/cgroup/cpuset.cpus.effective"), "0-7\n");
    assert!(reader.rescan(&mut r, &CpuSet::new()).unwrap().is_empty());
    assert_eq!(r.allowed, set("0-7"));
    assert_eq!(r, reader.read().unwrap());
}

#[test]
fn rescan_after_hotplug_rereads_the_cpu_and_its_siblings() {
    let pristine = fixture("two-socket");
    let dir = copy_fixture("two-socket");
    let reader = Reader::fixture(dir.path());
    let mut r = reader.read().unwrap();

    set_offline(dir.path(), 9);
    let reread = reader.rescan(&mut r, &CpuSet::new()).unwrap();
    // 9's siblings as last read (core 1,9; package, die and LLC 0-3,8-11), 9 itself offline.
    assert_eq!(reread, set("0-3,8,10-11"));
    assert_eq!(r, reader.read().unwrap());
    assert_eq!(r.cpus[&1].core_cpus, set("1"), "sibling lists are re-read");
    assert!(!r.cpus.contains_key(&9));

    // 9 comes back with another topology (some kernels renumber): its files are read again.
    set_online(dir.path(), &pristine, 9);
    set_core_id(dir.path(), 9, 7);
    let reread = reader.rescan(&mut r, &CpuSet::new()).unwrap();
    assert_eq!(reread, set("0-3,8-11"));
    assert_eq!(r.cpus[&9].core_id, Some(7));
    assert_eq!(r.cpus[&1].core_cpus, set("1,9"));
    assert_eq!(r, reader.read().unwrap());

    // Offline and back between two reads: the masks look unchanged, so only a rescan told
    // about the CPU (as the monitor is, by its uevent) re-reads it.
    set_offline(dir.path(), 9);
    set_online(dir.path(), &pristine, 9);
    assert!(reader.rescan(&mut r, &CpuSet::new()).unwrap().is_empty());
    assert_eq!(r.cpus[&9].core_id, Some(7), "not re-read");
    reader.rescan(&mut r, &set("9")).unwrap();
    assert_eq!(r.cpus[&9].core_id, Some(1));
    assert_eq!(r, reader.read().unwrap());
}

#[test]
fn failed_rescan_leaves_the_reading_alone() {
    let dir = copy_fixture("vm8-offline");
    let reader = Reader::fixture(dir.path());
    let first = reader.read().unwrap();
    let mut r = first.clone();
    set_offline(dir.path(), 2);
    set_core_id(dir.path(), 1, 99);
    write(
        &dir.path().join("devices/system/cpu/cpu3/topology/core_id"),
        "three\n",
    );
    let e = reader.rescan(&mut r, &CpuSet::new()).unwrap_err();
    assert!(matches!(e, TopologyError::Number { .. }), "{e:?}");
    assert_eq!(r, first);
}

#[test]
fn errors_name_the_path() {
    let dir = copy_fixture("vm8-offline");
    let online = dir.path().join("devices/system/cpu/online");
    fs::remove_file(&online).unwrap();
    let e = Reader::fixture(dir.path()).read().unwrap_err();
    assert!(matches!(e, TopologyError::Io { .. }), "{e:?}");
    assert!(e.to_string().contains(&online.display().to_string()), "{e}");

    write(&online, "0-4,x\n");
    let e = Reader::fixture(dir.path()).read().unwrap_err();
    assert!(matches!(e, TopologyError::CpuList { .. }), "{e:?}");
    assert!(e.to_string().contains("devices/system/cpu/online"), "{e}");

    write(&online, "0-4,7\n");
    let core_id = dir.path().join("devices/system/cpu/cpu2/topology/core_id");
    write(&core_id, "two\n");
    let e = Reader::fixture(dir.path()).read().unwrap_err();
    match &e {
        TopologyError::Number { path, found } => {
            assert_eq!(path, &core_id.display().to_string());
            assert_eq!(found, "two");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn host_smoke() {
    let r = Reader::host().read().unwrap();
    assert!(!r.online.is_empty());
    assert!(r.online.is_subset(&r.present));
    assert!(r.present.is_subset(&r.possible));
    assert!(
        r.allowed.is_subset(&r.online),
        "{:?} {:?}",
        r.allowed,
        r.online
    );
    assert!(!r.allowed.is_empty());
    assert_ne!(r.allowed_source, AllowedSource::AllOnline);
    // Our own affinity lies within whatever cpuset confines us.
    let aff = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
    for c in r.online.iter() {
        if aff.is_set(c as usize).unwrap() {
            assert!(r.allowed.contains(c), "cpu {c} in affinity but not allowed");
        }
    }
    for (cpu, t) in &r.cpus {
        assert_eq!(*cpu, t.cpu);
        assert!(r.online.contains(*cpu));
        assert!(t.core_cpus.contains(*cpu));
        assert!(t.core_cpus.is_subset(&t.package_cpus));
        if let Some(l) = &t.llc {
            assert!(l.cpus.contains(*cpu));
        }
    }
}

/// The reference expansion of `lo-hi:used/group`.
fn expand(lo: u32, hi: u32, used: u32, group: u32) -> Vec<u32> {
    (lo..=hi).filter(|c| (c - lo) % group < used).collect()
}

proptest! {
    #[test]
    fn cpulist_round_trip(cpus in proptest::collection::btree_set(0u32..wqd_core::cpuset::MAX_CPUS, 0..200)) {
        let s: CpuSet = cpus.iter().copied().collect();
        let text = s.to_string();
        let back = CpuSet::parse_list(&format!("{text}\n")).unwrap();
        prop_assert_eq!(&back, &s);
        prop_assert_eq!(back.iter().collect::<Vec<_>>(), cpus.into_iter().collect::<Vec<_>>());
        // Canonical: formatting the parse gives the same text.
        prop_assert_eq!(back.to_string(), text);
    }

    #[test]
    fn stride_forms_match_reference(
        items in proptest::collection::vec(
            (0u32..2000, 0u32..600, 1u32..40, 0u32..40),
            1..5,
        )
    ) {
        let mut text = Vec::new();
        let mut want = std::collections::BTreeSet::new();
        for (lo, len, group, used_off) in items {
            let hi = lo + len;
            let used = 1 + used_off % group;
            text.push(format!("{lo}-{hi}:{used}/{group}"));
            want.extend(expand(lo, hi, used, group));
        }
        let got = CpuSet::parse_list(&text.join(",")).unwrap();
        prop_assert_eq!(got.iter().collect::<Vec<_>>(), want.into_iter().collect::<Vec<_>>());
    }
}

proptest! {
    // File system work per case: fewer cases than the default.
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// Any sequence of hotplugs, each seen by a rescan of the previous reading: the rescan
    /// always equals a full read of the tree.
    #[test]
    fn rescan_after_hotplug_equals_full_read(
        tree in prop_oneof![Just("two-socket"), Just("vm8-offline")],
        ops in proptest::collection::vec((0u32..16, any::<bool>()), 1..6),
    ) {
        let pristine = fixture(tree);
        let dir = copy_fixture(tree);
        let reader = Reader::fixture(dir.path());
        let mut r = reader.read().unwrap();
        let has = |c: u32| pristine.join(format!("devices/system/cpu/cpu{c}/topology")).is_dir();
        for (cpu, online) in ops {
            let cpu = cpu % r.possible.len() as u32;
            // The helper restores a CPU's files from the fixture: only for an offline one, as
            // the kernel does.
            if online && has(cpu) && !r.online.contains(cpu) {
                set_online(dir.path(), &pristine, cpu);
            } else if !online {
                set_offline(dir.path(), cpu);
            }
            reader.rescan(&mut r, &CpuSet::new()).unwrap();
            prop_assert_eq!(&r, &reader.read().unwrap(), "after cpu {} online={}", cpu, online);
        }
    }
}
