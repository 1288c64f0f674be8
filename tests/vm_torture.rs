//! The CPU hotplug torture in a VM (`tests/vm/run.sh`, see `docs/torture.md`): boots the Debian
//! kernel under qemu TCG with 4 vCPUs, then again with two NUMA nodes; inside, the real `wqd`
//! runs and `wqd-torture` drives it through `wqd-client` while it offlines and onlines CPUs.
//! The test fails on a `WQD-TORTURE: FAIL` marker, a missing marker or a timeout.
//!
//! On by default: `cargo test --workspace --release` runs it (30 s of torture
//! per boot, about 2 minutes in all after the harness's release build of `wqd` and
//! `wqd-torture`). `WQD_VM_TORTURE=0` turns it off. It is skipped, printing `SKIPPED` and why,
//! only when the harness cannot fetch its packages (exit 77: no network or no apt); with
//! `WQD_VM_TORTURE=require` that is a failure too. The harness's own variables
//! (`WQD_VM_DURATION`, `WQD_VM_SEED`, `WQD_VM_MODE=library`, ...) pass through.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

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
    let t = Instant::now();
    let status = Command::new("bash")
        .arg(harness())
        .args(args)
        .status()
        .expect("run tests/vm/run.sh with bash");
    eprintln!(
        "vm_torture: {what}: run.sh exited with {status} after {} s",
        t.elapsed().as_secs()
    );
    match status.code() {
        Some(0) => Outcome::Pass,
        Some(77) => Outcome::CannotFetch,
        _ => panic!("VM hotplug torture ({what}) failed: run.sh exited with {status}; its output above has the log's tail"),
    }
}

#[test]
fn vm_hotplug_torture() {
    let mode = std::env::var("WQD_VM_TORTURE").unwrap_or_default();
    if mode == "0" {
        eprintln!("vm_torture: SKIPPED: WQD_VM_TORTURE=0 turns the VM hotplug torture off");
        return;
    }
    let require = mode == "require";
    for (what, args) in [
        ("4 vCPUs", &[][..]),
        ("two NUMA nodes", &["--numa", "--no-build"][..]),
    ] {
        match boot(what, args) {
            Outcome::Pass => {}
            Outcome::CannotFetch if !require => {
                eprintln!(
                    "vm_torture: SKIPPED: the harness cannot fetch the qemu, kernel and busybox \
                     packages (no network or no apt; see the fetch: lines above); nothing was \
                     tested. WQD_VM_TORTURE=require makes this a failure"
                );
                return;
            }
            Outcome::CannotFetch => panic!(
                "WQD_VM_TORTURE=require but the harness cannot fetch its packages (see the \
                 fetch: lines above)"
            ),
        }
    }
}
