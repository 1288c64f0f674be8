//! wqd-core: run work on CPU groups that survive CPU hotplug, in process.
//!
//! This crate is the library: everything that reads the machine and runs work, and nothing of
//! the daemon (no gRPC, TLS, Prometheus or command line; the `wqd` crate in `server/` adds
//! those and depends on this one, never the reverse). Layers, from the machine up: [`cpuset`]
//! (sets and the kernel cpulist grammar), [`topology`] (reading sysfs/procfs, netlink uevents,
//! and remembering membership), [`load`] (per-CPU busy fractions), [`target`] and [`groups`]
//! (what a target names, how it widens, and the one placement rule), [`live`] (versioned
//! snapshots of the live CPUs and what changes them), [`handler`] (what items do) and
//! [`engine`] (workqueues, pinned pools, late-binding dispatch, flush and cancel; its
//! `README.md` is the protocol's home). Observers (the daemon's metrics among them) see the
//! engine through [`engine::Observer`]. Each layer has its own error enum.

/// `Display` for an enum that spells itself with `as_str` (the word config, results, metrics
/// and docs use), so the spelling lives once, next to `FromStr`.
macro_rules! display_as_str {
    ($t:ty) => {
        impl ::std::fmt::Display for $t {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use display_as_str;

pub mod cpuset;
pub mod engine;
pub mod failpoint;
pub mod groups;
pub mod handler;
pub mod live;
pub mod load;
pub mod malloc;
pub mod quote;
pub mod target;
pub mod topology;

pub use cpuset::CpuSet;
