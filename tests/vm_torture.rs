//! The CPU hotplug torture in a VM (`tests/vm/run.sh`, see `docs/torture.md`): boots the Debian
//! kernel under qemu TCG with 4 vCPUs, then again with two NUMA nodes, runs `wqd-torture` inside
//! and fails on a `WQD-TORTURE: FAIL` marker, a missing marker or a timeout.
//!
//! Opt-in, because it builds release binaries and boots two VMs (about 2 minutes after the
//! build on a 2-core host): set `WQD_VM_TORTURE=1`. The harness's own variables
//! (`WQD_VM_DURATION`, `WQD_VM_SEED`, `WQD_VM_MODE`, ...) pass through. The test is skipped,
//! saying so, only when the harness cannot fetch its packages (exit 77: no network or no apt);
//! set `WQD_VM_TORTURE=require` to make that a failure too.

use std::path::PathBuf;
use std::process::Command;

fn harness() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vm/run.sh")
}

enum Outcome {
    Pass,
    CannotFetch,
}

fn boot(what: &str, args: &[&str]) -> Outcome {
    eprintln!(
        "vm_torture: {what}: {} {}",
        harness().display(),
        args.join(" ")
    );
    let status = Command::new("bash")
        .arg(harness())
        .args(args)
        .status()
        .expect("run tests/vm/run.sh with bash");
    match status.code() {
        Some(0) => Outcome::Pass,
        Some(77) => Outcome::CannotFetch,
        _ => panic!("VM hotplug torture ({what}) failed: run.sh exited with {status}; its output above has the log's tail"),
    }
}

#[test]
fn vm_hotplug_torture() {
    let Some(mode) = std::env::var_os("WQD_VM_TORTURE") else {
        eprintln!(
            "vm_torture: SKIPPED: set WQD_VM_TORTURE=1 to build the release binaries and boot \
             two VMs (4 vCPUs, then two NUMA nodes; about 2 minutes plus the build)"
        );
        return;
    };
    let require = mode == "require";
    for (what, args) in [
        ("4 vCPUs", &[][..]),
        ("two NUMA nodes", &["--numa", "--no-build"][..]),
    ] {
        match boot(what, args) {
            Outcome::Pass => {}
            Outcome::CannotFetch if !require => {
                eprintln!(
                    "vm_torture: SKIPPED: the harness cannot fetch qemu/kernel/busybox packages \
                     (no network or no apt); nothing was tested"
                );
                return;
            }
            Outcome::CannotFetch => panic!("the harness cannot fetch its packages"),
        }
    }
}
