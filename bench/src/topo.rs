//! Machines to benchmark on: the tests' made-up topologies and sysfs helpers (shared, not
//! copied, so the benchmarks build exactly what the tests build), the host, pinning, and a
//! generated sysfs tree of any size for the rescan cost.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use wqd_core::cpuset::CpuSet;
use wqd_core::live::{LiveConfig, LiveView, Snapshot};
use wqd_core::topology::sysfs::Reader;

#[path = "../../core/tests/common/mod.rs"]
mod common;

pub use common::fixtures::{copy_tree, set_offline, set_online, write};
pub use common::{next, snapshot, topology};

/// The committed sysfs fixture tree `name` (under `core/tests/fixtures`).
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../core/tests/fixtures")
        .join(name)
}

/// A temporary copy of fixture `name`.
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_tree(&fixture(name), dir.path());
    dir
}

/// The host's live view (real topology, the CPUs this process may use).
pub fn host_view() -> Arc<LiveView> {
    let reading = Reader::host().read().expect("read the host topology");
    LiveView::new(reading, LiveConfig::default())
}

/// The host's current snapshot.
pub fn host_snapshot() -> Arc<Snapshot> {
    host_view().current()
}

/// The CPUs this thread may run on.
pub fn affinity() -> CpuSet {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; the size is that of `set`.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    assert_eq!(r, 0, "sched_getaffinity");
    (0..libc::CPU_SETSIZE as u32)
        // SAFETY: c is below CPU_SETSIZE.
        .filter(|&c| unsafe { libc::CPU_ISSET(c as usize, &set) })
        .collect()
}

/// Pins the calling thread to `cpu`; returns whether it worked.
pub fn pin(cpu: u32) -> bool {
    // SAFETY: as in `affinity`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: cpu is checked against CPU_SETSIZE first.
    unsafe {
        if cpu as usize >= libc::CPU_SETSIZE as usize {
            return false;
        }
        libc::CPU_SET(cpu as usize, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) == 0
    }
}

/// Unpins the calling thread (back to `all`).
pub fn unpin(all: &CpuSet) {
    // SAFETY: as in `pin`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for c in all
        .iter()
        .filter(|&c| (c as usize) < libc::CPU_SETSIZE as usize)
    {
        // SAFETY: c is below CPU_SETSIZE.
        unsafe { libc::CPU_SET(c as usize, &mut set) };
    }
    // SAFETY: as in `pin`.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
}

/// Writes a sysfs tree of `n` online CPUs laid out as [`topology`] lays them out (SMT pairs,
/// 4 CPUs per L3, 8 per node and package), in the kernel's formats, and returns its folder.
pub fn sysfs_tree(n: u32) -> tempfile::TempDir {
    sysfs_tree_in(n, tempfile::tempdir().expect("tempdir"))
}

/// [`sysfs_tree`] on `/dev/shm` when it exists (tmpfs: a 4096-CPU tree is written and removed
/// in well under a second there, versus tens of seconds on a loaded disk), else as
/// [`sysfs_tree`]. For figures that only need the tree, not its file system's read cost.
pub fn sysfs_tree_tmpfs(n: u32) -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::Builder::new()
            .prefix("wqd-bench-sys")
            .tempdir_in(shm)
            .unwrap_or_else(|_| tempfile::tempdir().expect("tempdir"))
    } else {
        tempfile::tempdir().expect("tempdir")
    };
    sysfs_tree_in(n, dir)
}

fn sysfs_tree_in(n: u32, dir: tempfile::TempDir) -> tempfile::TempDir {
    let root = dir.path();
    let cpus = root.join("devices/system/cpu");
    let all = format!("0-{}\n", n - 1);
    write(&cpus.join("possible"), &all);
    write(&cpus.join("present"), &all);
    write(&cpus.join("online"), &all);
    write(&cpus.join("offline"), "\n");
    let range = |lo: u32, hi: u32| format!("{lo}-{}\n", hi.min(n - 1));
    for c in 0..n {
        let d = cpus.join(format!("cpu{c}"));
        if c != 0 {
            write(&d.join("online"), "1\n");
        }
        let t = d.join("topology");
        let (core, node) = (range(c & !1, (c & !1) + 1), range(c & !7, (c & !7) + 7));
        write(&t.join("core_id"), &format!("{}\n", c / 2));
        write(&t.join("core_cpus_list"), &core);
        write(&t.join("thread_siblings_list"), &core);
        write(&t.join("physical_package_id"), &format!("{}\n", c / 8));
        write(&t.join("package_cpus_list"), &node);
        write(&t.join("core_siblings_list"), &node);
        for (k, (level, ty, id, shared)) in [
            (1, "Data", c / 2, core.clone()),
            (3, "Unified", c / 4, range(c & !3, (c & !3) + 3)),
        ]
        .into_iter()
        .enumerate()
        {
            let i = d.join(format!("cache/index{k}"));
            write(&i.join("level"), &format!("{level}\n"));
            write(&i.join("type"), &format!("{ty}\n"));
            write(&i.join("id"), &format!("{id}\n"));
            write(&i.join("shared_cpu_list"), &shared);
        }
        std::os::unix::fs::symlink(
            format!("../../node/node{}", c / 8),
            d.join(format!("node{}", c / 8)),
        )
        .expect("symlink");
    }
    let nodes = root.join("devices/system/node");
    write(&nodes.join("possible"), &format!("0-{}\n", (n - 1) / 8));
    for k in 0..n.div_ceil(8) {
        write(
            &nodes.join(format!("node{k}/cpulist")),
            &range(k * 8, k * 8 + 7),
        );
    }
    dir
}
