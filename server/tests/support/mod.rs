//! Test support for the daemon's tests: the sysfs fixture trees (the same helpers as
//! wqd-core's tests, included by path), a daemon [`Config`] on a fixture that touches nothing
//! of the host (its socket in a temporary folder, no netlink, a short shutdown grace), a
//! `[[workqueue]]` entry with every key unset, and a throwaway PKI ([`pki`]).
#![allow(dead_code)]

#[path = "../../../core/tests/common/fixtures.rs"]
mod fixtures;
pub mod pki;

use std::path::Path;
use std::time::Duration;

pub use fixtures::*;
use wqd::config::{Config, Pinning, WorkqueueEntry};

/// A daemon config serving on `dir/wqd.sock` over the sysfs tree at `sysfs` (a fixture or a
/// copy of one), with pinning that works without the fixture's CPUs, no netlink and a 200 ms
/// shutdown grace.
pub fn config(dir: &Path, sysfs: &Path) -> Config {
    let mut c = Config::default();
    c.listen.socket = Some(dir.join("wqd.sock"));
    c.topology.sysfs_root = Some(sysfs.to_path_buf());
    c.topology.netlink = false;
    c.topology.pinning = Pinning::Auto;
    c.engine.shutdown_grace = Duration::from_millis(200);
    c
}

/// A `[[workqueue]]` entry named `name` with every other key unset (the engine's defaults).
pub fn workqueue(name: &str) -> WorkqueueEntry {
    WorkqueueEntry {
        name: name.into(),
        max_active: None,
        max_waiting: None,
        group_max_active: None,
        ordered: None,
        nice: None,
        placement: None,
        fallback: None,
        max_queued: None,
        on_worker_lost: None,
        unserved: None,
        results: None,
    }
}
