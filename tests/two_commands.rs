//! The README's two commands share one build: every compilation unit `cargo run --release
//! --bin wqd` needs is one that `cargo test --workspace --release` already built (same
//! package, target, features and profile), so running the daemon after the tests compiles
//! nothing. Cargo's unit graph (`--unit-graph`, read with `RUSTC_BOOTSTRAP=1` on a stable
//! toolchain; nothing is compiled) says what each command would build. When this fails, the
//! message names the crates whose features differ: name those features in `server/Cargo.toml`
//! (see the comment there).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// (package id, target name, target kinds, features, profile) of every unit `args` builds.
fn units(args: &[&str]) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(cargo)
        .args(args)
        .args(["--unit-graph", "-Z", "unstable-options", "--offline"])
        .env("RUSTC_BOOTSTRAP", "1")
        .current_dir(&root)
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "cargo {args:?} --unit-graph failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let graph: Value = serde_json::from_slice(&out.stdout).expect("unit graph is JSON");
    graph["units"]
        .as_array()
        .expect("units")
        .iter()
        .filter(|u| u["mode"] == "build")
        .map(|u| {
            format!(
                "{} {} {} features={} profile={}",
                u["pkg_id"].as_str().unwrap_or_default(),
                u["target"]["name"],
                u["target"]["kind"],
                u["features"],
                u["profile"]
            )
        })
        .collect()
}

#[test]
fn running_the_daemon_after_the_tests_compiles_nothing() {
    let tests = units(&["test", "--workspace", "--release", "--no-run"]);
    let run = units(&["build", "--release", "--bin", "wqd"]);
    assert!(
        run.len() > 100,
        "the daemon's build has {} units",
        run.len()
    );
    let extra: Vec<&String> = run.difference(&tests).collect();
    assert!(
        extra.is_empty(),
        "`cargo run --release --bin wqd` would compile {} unit(s) the test build does not \
         have:\n{}",
        extra.len(),
        extra
            .iter()
            .map(|u| format!("  {u}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
