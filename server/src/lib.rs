//! wqd: run work on CPU groups that survive CPU hotplug.
//!
//! The library is the whole engine; the `wqd` binary wraps it in a gRPC service. Layers, from
//! the machine up: [`cpuset`] (sets and the kernel cpulist grammar), [`topology`] (reading
//! sysfs/procfs and remembering membership), [`target`] and [`groups`] (what a target names and
//! how it widens), [`live`] (versioned snapshots of the live CPUs and what changes them),
//! [`handler`] (what items do) and [`engine`] (workqueues, pinned pools, late-binding dispatch,
//! flush and cancel). Each layer has its own error enum.

pub mod authority;
pub mod config;
pub mod conn;
pub mod daemon;
pub mod listen;
pub mod logging;
pub mod metrics;
pub mod peer;
pub mod reload;
pub mod rpc;
pub mod security;
pub mod settings;
pub mod shared;
pub mod systemd;
