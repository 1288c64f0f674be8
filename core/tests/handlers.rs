//! Built-in and `exec` handlers, called directly through a hand-built `WorkCtx` (unpinned unless
//! a test says otherwise). Timing asserts are lower bounds or generous upper bounds only: the
//! machine is small and shared.

use std::collections::BTreeMap;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::resource::{getrusage, UsageWho};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;
use wqd_core::handler::builtin::{Digest, Noop, Sleep, Spin};
use wqd_core::handler::exec::{Exec, ExecCommand, ExecConfig};
use wqd_core::handler::{Args, CancelToken, Handler, HandlerError, HandlerKind, Registry, WorkCtx};

// ---------------------------------------------------------------------------------------------
// helpers

fn args(kv: &[(&str, &str)]) -> Args {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn ctx<'a>(args: &'a Args, payload: &'a [u8], cancel: &'a CancelToken) -> WorkCtx<'a> {
    WorkCtx {
        item: 7,
        cpu: 0,
        pinned: false,
        args,
        payload,
        cancel,
    }
}

fn run(h: &dyn Handler, kv: &[(&str, &str)], payload: &[u8]) -> Result<Vec<u8>, HandlerError> {
    let a = args(kv);
    h.validate(&a, payload)?;
    h.run(&ctx(&a, payload, &CancelToken::new()))
}

/// The text of the validation error for `kv`; panics if validation passes.
fn invalid(h: &dyn Handler, kv: &[(&str, &str)]) -> String {
    match h.validate(&args(kv), b"") {
        Err(e @ HandlerError::InvalidArgument(_)) => e.to_string(),
        other => panic!("expected InvalidArgument for {kv:?}, got {other:?}"),
    }
}

/// Runs `h` on another thread, cancels it after `after`, and returns its result and how long
/// the run took after the cancel.
fn run_and_cancel(
    h: &(dyn Handler + Sync),
    kv: &[(&str, &str)],
    after: Duration,
) -> (Result<Vec<u8>, HandlerError>, Duration) {
    let a = args(kv);
    let cancel = CancelToken::new();
    thread::scope(|s| {
        let worker = s.spawn(|| h.run(&ctx(&a, b"", &cancel)));
        thread::sleep(after);
        let t = Instant::now();
        cancel.cancel();
        let r = worker.join().expect("handler thread panicked");
        (r, t.elapsed())
    })
}

fn thread_cpu_time() -> Duration {
    let u = getrusage(UsageWho::RUSAGE_THREAD).expect("getrusage");
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    tv(u.user_time()) + tv(u.system_time())
}

// ---------------------------------------------------------------------------------------------
// registry and kinds

#[test]
fn registry_has_builtins_and_exec_only_when_configured() {
    assert_eq!(
        Registry::with_builtins(None).names(),
        ["digest", "noop", "sleep", "spin"]
    );
    assert_eq!(
        Registry::with_builtins(Some(ExecConfig::default())).names(),
        ["digest", "exec", "noop", "sleep", "spin"]
    );
}

#[test]
fn kinds() {
    assert_eq!(Noop.kind(), HandlerKind::CpuBound);
    assert_eq!(Spin.kind(), HandlerKind::CpuBound);
    assert_eq!(Digest.kind(), HandlerKind::CpuBound);
    assert_eq!(Sleep.kind(), HandlerKind::Waits);
    assert_eq!(Exec::new(ExecConfig::default()).kind(), HandlerKind::Waits);
}

// ---------------------------------------------------------------------------------------------
// noop

#[test]
fn noop_returns_empty_output() {
    assert_eq!(run(&Noop, &[], b"ignored").unwrap(), b"");
}

#[test]
fn noop_names_unknown_arguments() {
    assert_eq!(
        invalid(&Noop, &[("x", "1")]),
        "invalid argument: noop: unknown argument x (allowed: fail, panic)"
    );
    assert_eq!(
        invalid(&Noop, &[("b", "1"), ("a", "2")]),
        "invalid argument: noop: unknown arguments a, b (allowed: fail, panic)"
    );
}

#[test]
fn fail_and_panic_affordances() {
    assert_eq!(
        run(&Noop, &[("fail", "boom")], b""),
        Err(HandlerError::Failed("boom".into()))
    );
    assert_eq!(
        run(&Spin, &[("ms", "1"), ("fail", "late boom")], b""),
        Err(HandlerError::Failed("late boom".into()))
    );
    for (h, kv) in [
        (&Noop as &dyn Handler, &[("panic", "1")][..]),
        (&Spin, &[("us", "10"), ("panic", "1")]),
    ] {
        let a = args(kv);
        h.validate(&a, b"").unwrap();
        let cancel = CancelToken::new();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            h.run(&ctx(&a, b"", &cancel))
        }));
        assert!(r.is_err(), "{} with panic=1 must panic", h.name());
    }
    assert_eq!(
        invalid(&Noop, &[("panic", "yes")]),
        r#"invalid argument: panic must be 1, got "yes""#
    );
    assert_eq!(
        invalid(&Noop, &[("fail", "")]),
        "invalid argument: fail needs a non-empty message"
    );
    assert_eq!(
        invalid(&Noop, &[("fail", "x"), ("panic", "1")]),
        "invalid argument: noop: fail and panic are mutually exclusive"
    );
}

// ---------------------------------------------------------------------------------------------
// spin

#[test]
fn spin_validation_errors() {
    assert_eq!(
        invalid(&Spin, &[]),
        "invalid argument: spin needs exactly one of ms, us (got none)"
    );
    assert_eq!(
        invalid(&Spin, &[("ms", "1"), ("us", "1")]),
        "invalid argument: spin needs exactly one of ms, us (got both)"
    );
    assert_eq!(
        invalid(&Spin, &[("ms", "abc")]),
        r#"invalid argument: ms must be a whole number of milliseconds, got "abc""#
    );
    for bad in ["", "-1", "+5", "1.5", " 1", "99999999999999999999999"] {
        assert_eq!(
            invalid(&Spin, &[("us", bad)]),
            format!("invalid argument: us must be a whole number of microseconds, got {bad:?}")
        );
    }
    assert_eq!(
        invalid(&Spin, &[("ms", "600001")]),
        "invalid argument: spin: 600.001s exceeds the limit of 600s"
    );
    assert!(Spin.validate(&args(&[("ms", "600000")]), b"").is_ok());
    assert_eq!(
        invalid(&Spin, &[("ms", "1"), ("sec", "1")]),
        "invalid argument: spin: unknown argument sec (allowed: ms, us, fail, panic)"
    );
}

#[test]
fn spin_run_rechecks_arguments() {
    // An item that never went through validate fails with the same text instead of running.
    let a = args(&[("ms", "abc")]);
    let cancel = CancelToken::new();
    assert_eq!(
        Spin.run(&ctx(&a, b"", &cancel)),
        Err(HandlerError::Failed(
            r#"invalid argument: ms must be a whole number of milliseconds, got "abc""#.into()
        ))
    );
}

#[test]
fn spin_burns_cpu_for_about_the_duration() {
    let cpu0 = thread_cpu_time();
    let t0 = Instant::now();
    let out = run(&Spin, &[("ms", "300")], b"").unwrap();
    let wall = t0.elapsed();
    let cpu = thread_cpu_time() - cpu0;
    let iterations: u64 = std::str::from_utf8(&out).unwrap().parse().unwrap();
    assert!(
        wall >= Duration::from_millis(300),
        "returned early: {wall:?}"
    );
    assert!(iterations > 1000, "did hardly any work: {iterations}");
    // A busy loop is on CPU whenever it is scheduled; even on a loaded 2-core box it gets far
    // more than a fifth of its wall time. A sleep would show ~0.
    assert!(
        cpu >= Duration::from_millis(60),
        "spin used only {cpu:?} of CPU in {wall:?}"
    );
}

#[test]
fn spin_us_and_zero() {
    assert!(run(&Spin, &[("us", "500")], b"").is_ok());
    let out = run(&Spin, &[("ms", "0")], b"").unwrap();
    assert!(std::str::from_utf8(&out).unwrap().parse::<u64>().is_ok());
}

#[test]
fn spin_stops_on_cancel() {
    let (r, after_cancel) = run_and_cancel(&Spin, &[("ms", "60000")], Duration::from_millis(50));
    assert_eq!(r, Err(HandlerError::Cancelled));
    assert!(
        after_cancel < Duration::from_secs(5),
        "took {after_cancel:?}"
    );
}

#[test]
fn cancelled_before_start() {
    let cancel = CancelToken::new();
    cancel.cancel();
    for (h, kv) in [
        (&Spin as &dyn Handler, &[("ms", "60000")][..]),
        (&Sleep, &[("ms", "60000")]),
        (&Noop, &[]),
        (&Digest, &[]),
    ] {
        let a = args(kv);
        assert_eq!(
            h.run(&ctx(&a, b"x", &cancel)),
            Err(HandlerError::Cancelled),
            "{}",
            h.name()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// sleep

#[test]
fn sleep_validation_errors() {
    assert_eq!(
        invalid(&Sleep, &[]),
        "invalid argument: sleep needs ms (got none)"
    );
    assert_eq!(
        invalid(&Sleep, &[("ms", "1s")]),
        r#"invalid argument: ms must be a whole number of milliseconds, got "1s""#
    );
    assert_eq!(
        invalid(&Sleep, &[("us", "1")]),
        "invalid argument: sleep: unknown argument us (allowed: ms)"
    );
}

#[test]
fn sleep_waits_without_burning_cpu() {
    let cpu0 = thread_cpu_time();
    let t0 = Instant::now();
    assert_eq!(run(&Sleep, &[("ms", "100")], b"").unwrap(), b"");
    assert!(t0.elapsed() >= Duration::from_millis(100));
    assert!(thread_cpu_time() - cpu0 < Duration::from_millis(50));
}

#[test]
fn sleep_returns_promptly_on_cancel() {
    let (r, after_cancel) = run_and_cancel(&Sleep, &[("ms", "60000")], Duration::from_millis(50));
    assert_eq!(r, Err(HandlerError::Cancelled));
    assert!(
        after_cancel < Duration::from_secs(5),
        "took {after_cancel:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// digest

#[test]
fn digest_known_vectors() {
    assert_eq!(
        run(&Digest, &[], b"abc").unwrap(),
        b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(
        run(&Digest, &[("algo", "sha256")], b"").unwrap(),
        b"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        run(&Digest, &[("algo", "sha512")], b"abc").unwrap(),
        &b"ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a\
           2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"[..]
    );
    // Chunked hashing gives the same answer as one-shot hashing.
    let big = vec![0xa5u8; 3 * 1024 * 1024 + 17];
    let mut one_shot = <sha2::Sha256 as sha2::Digest>::new();
    sha2::Digest::update(&mut one_shot, &big);
    assert_eq!(
        run(&Digest, &[], &big).unwrap(),
        hex::encode(sha2::Digest::finalize(one_shot)).into_bytes()
    );
}

#[test]
fn digest_validation_errors() {
    assert_eq!(
        invalid(&Digest, &[("algo", "md5")]),
        r#"invalid argument: algo must be sha256 or sha512, got "md5""#
    );
    assert_eq!(
        invalid(&Digest, &[("alg", "sha256")]),
        "invalid argument: digest: unknown argument alg (allowed: algo)"
    );
}

// ---------------------------------------------------------------------------------------------
// exec: helpers

fn command(path: &str, fixed: &[&str]) -> ExecCommand {
    ExecCommand {
        path: path.into(),
        args: fixed.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// A `/bin/sh -c SCRIPT` entry. Allowed in tests only because it is *configured*: the handler
/// itself never invokes a shell.
fn sh(script: &str) -> ExecCommand {
    command("/bin/sh", &["-c", script])
}

fn exec(cmds: Vec<(&str, ExecCommand)>) -> Exec {
    let cfg = ExecConfig {
        commands: cmds
            .into_iter()
            .map(|(n, c)| (n.to_string(), c))
            .collect::<BTreeMap<_, _>>(),
        ..Default::default()
    };
    Exec::try_new(cfg).expect("valid exec config")
}

/// Whether `pid` is gone or dead (a zombie waiting for some other reaper counts as dead).
fn is_dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state == 'Z' || state == 'X'),
    }
}

fn wait_dead(pid: i32) -> bool {
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if is_dead(pid) {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Reads `LEADER GRANDCHILD` pids that a test script wrote.
fn read_pids(path: &Path) -> (i32, i32) {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            let v: Vec<i32> = s
                .split_whitespace()
                .filter_map(|t| t.parse().ok())
                .collect();
            if v.len() == 2 {
                return (v[0], v[1]);
            }
        }
        assert!(Instant::now() < until, "script never wrote {path:?}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// The leader was reaped by the handler: it is no longer our child (nor a zombie of ours).
fn assert_reaped(leader: i32) {
    assert_eq!(
        waitpid(Pid::from_raw(leader), Some(WaitPidFlag::WNOHANG)),
        Err(nix::errno::Errno::ECHILD),
        "leader {leader} was left unreaped"
    );
}

/// A script that leaves a `sleep 30` grandchild in its group, records both pids, then waits.
fn leaves_grandchild(pidfile: &Path, then: &str) -> ExecCommand {
    sh(&format!(
        "/bin/sleep 30 & echo $$ $! > {}; {then}",
        pidfile.display()
    ))
}

// ---------------------------------------------------------------------------------------------
// exec: running

#[test]
fn exec_cat_echoes_payload() {
    let h = exec(vec![("cat", command("/bin/cat", &[]))]);
    assert_eq!(
        run(&h, &[("cmd", "cat")], b"hello\0world").unwrap(),
        b"hello\0world"
    );
    assert_eq!(run(&h, &[("cmd", "cat")], b"").unwrap(), b"");
}

#[test]
fn exec_large_payload_does_not_deadlock() {
    // Far beyond a pipe's buffer both ways: stdin must be fed while stdout is drained.
    let mut c = command("/bin/cat", &[]);
    c.max_output_bytes = 8 << 20;
    let h = exec(vec![("cat", c)]);
    let payload: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    assert_eq!(run(&h, &[("cmd", "cat")], &payload).unwrap(), payload);
}

#[test]
fn exec_nonzero_exit_fails_with_status_and_stderr_tail() {
    let h = exec(vec![
        ("three", sh("echo partial; echo oops >&2; exit 3")),
        ("quiet", sh("exit 4")),
        (
            "noisy",
            sh("i=0; while [ $i -lt 2000 ]; do echo line$i >&2; i=$((i+1)); done; exit 1"),
        ),
        ("segv", sh("kill -SEGV $$")),
    ]);
    assert_eq!(
        run(&h, &[("cmd", "three")], b""),
        Err(HandlerError::Failed("exit status 3: oops".into()))
    );
    assert_eq!(
        run(&h, &[("cmd", "quiet")], b""),
        Err(HandlerError::Failed("exit status 4".into()))
    );
    match run(&h, &[("cmd", "noisy")], b"") {
        Err(HandlerError::Failed(t)) => {
            assert!(t.starts_with("exit status 1: ..."), "{t}");
            assert!(t.ends_with("line1999"), "keeps the end: {t}");
            assert!(t.len() < 4200, "bounded: {} bytes", t.len());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        run(&h, &[("cmd", "segv")], b""),
        Err(HandlerError::Failed("killed by signal 11 (SIGSEGV)".into()))
    );
}

#[test]
fn exec_stdout_bound_exceeded_fails_and_kills() {
    let mut cat = command("/bin/cat", &[]);
    cat.max_output_bytes = 16;
    let mut yes = command("/usr/bin/yes", &[]);
    yes.max_output_bytes = 1024;
    let h = exec(vec![("cat", cat), ("yes", yes)]);
    assert_eq!(
        run(&h, &[("cmd", "cat")], &[b'x'; 100]),
        Err(HandlerError::Failed("stdout exceeded 16 bytes".into()))
    );
    assert_eq!(run(&h, &[("cmd", "cat")], &[b'x'; 16]).unwrap(), [b'x'; 16]);
    // `yes` never ends by itself: only the kill ends it.
    let t0 = Instant::now();
    assert_eq!(
        run(&h, &[("cmd", "yes")], b""),
        Err(HandlerError::Failed("stdout exceeded 1024 bytes".into()))
    );
    assert!(t0.elapsed() < Duration::from_secs(10));
}

#[test]
fn exec_timeout_kills_the_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pids");
    let mut c = leaves_grandchild(&pidfile, "wait");
    c.timeout_ms = 300;
    let h = exec(vec![("hang", c)]);
    let t0 = Instant::now();
    assert_eq!(
        run(&h, &[("cmd", "hang")], b""),
        Err(HandlerError::TimedOut(Duration::from_millis(300)))
    );
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let (leader, grandchild) = read_pids(&pidfile);
    assert_reaped(leader);
    assert!(
        wait_dead(grandchild),
        "grandchild {grandchild} survived the timeout"
    );
}

#[test]
fn exec_cancel_kills_the_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pids");
    let h = exec(vec![("hang", leaves_grandchild(&pidfile, "wait"))]);
    let (r, after_cancel) = run_and_cancel(&h, &[("cmd", "hang")], Duration::from_millis(300));
    assert_eq!(r, Err(HandlerError::Cancelled));
    assert!(
        after_cancel < Duration::from_secs(5),
        "took {after_cancel:?}"
    );
    let (leader, grandchild) = read_pids(&pidfile);
    assert_reaped(leader);
    assert!(
        wait_dead(grandchild),
        "grandchild {grandchild} survived the cancel"
    );
}

#[test]
fn exec_background_descendants_do_not_outlive_a_normal_exit() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pids");
    let h = exec(vec![("bg", leaves_grandchild(&pidfile, "echo done"))]);
    let t0 = Instant::now();
    assert_eq!(run(&h, &[("cmd", "bg")], b"").unwrap(), b"done\n");
    // The grandchild holds stdout open; returning quickly proves it was killed, not awaited.
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let (leader, grandchild) = read_pids(&pidfile);
    assert_reaped(leader);
    assert!(
        wait_dead(grandchild),
        "background grandchild {grandchild} survived"
    );
}

#[test]
fn exec_env_is_cleared_and_cwd_is_root() {
    assert!(
        std::env::var_os("PATH").is_some(),
        "the test itself has an environment"
    );
    let h = exec(vec![
        ("env", command("/usr/bin/env", &[])),
        ("pwd", command("/bin/pwd", &[])),
    ]);
    assert_eq!(run(&h, &[("cmd", "env")], b"").unwrap(), b"");
    assert_eq!(run(&h, &[("cmd", "pwd")], b"").unwrap(), b"/\n");
}

#[test]
fn exec_fixed_args_come_first_then_extra_args() {
    let mut c = command("/bin/echo", &["fixed"]);
    c.arg_patterns = vec!["[a-z]+".into(), "[0-9]+".into()];
    let h = exec(vec![("echo", c)]);
    assert_eq!(
        run(&h, &[("cmd", "echo"), ("arg1", "abc"), ("arg2", "42")], b"").unwrap(),
        b"fixed abc 42\n"
    );
    // Extra arguments are never split or interpreted.
    let mut c = command("/usr/bin/printf", &["[%s]"]);
    c.arg_patterns = vec![".*".into()];
    let h = exec(vec![("printf", c)]);
    assert_eq!(
        run(&h, &[("cmd", "printf"), ("arg1", "a b; $(id) `x`")], b"").unwrap(),
        b"[a b; $(id) `x`]"
    );
}

#[test]
fn exec_pins_the_child_when_the_worker_is_pinned() {
    let allowed = nix::sched::sched_getaffinity(Pid::from_raw(0)).unwrap();
    let cpu = (0..nix::sched::CpuSet::count())
        .rev()
        .find(|&c| allowed.is_set(c).unwrap_or(false))
        .unwrap();
    let h = exec(vec![(
        "status",
        command("/bin/cat", &["/proc/self/status"]),
    )]);
    let a = args(&[("cmd", "status")]);
    let cancel = CancelToken::new();
    let mut c = ctx(&a, b"", &cancel);
    c.pinned = true;
    c.cpu = cpu as u32;
    let out = String::from_utf8(h.run(&c).unwrap()).unwrap();
    let line = out
        .lines()
        .find(|l| l.starts_with("Cpus_allowed_list:"))
        .unwrap();
    assert_eq!(
        line.split_whitespace().nth(1),
        Some(cpu.to_string().as_str())
    );

    c.cpu = 1_000_000;
    match h.run(&c) {
        Err(HandlerError::Failed(t)) => assert!(t.starts_with("cannot pin to cpu 1000000"), "{t}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn exec_runs_as_configured_user() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") else {
        eprintln!("skipped: no user nobody");
        return;
    };
    let cfg = ExecConfig {
        commands: [
            ("uid".to_string(), command("/usr/bin/id", &["-u"])),
            ("groups".to_string(), command("/usr/bin/id", &["-G"])),
        ]
        .into(),
        run_as_user: Some("nobody".into()),
        run_as_group: None,
    };
    let h = Exec::try_new(cfg).unwrap();
    assert_eq!(
        run(&h, &[("cmd", "uid")], b"").unwrap(),
        format!("{}\n", nobody.uid).into_bytes()
    );
    // Primary group of the user, and root's supplementary groups dropped.
    assert_eq!(
        run(&h, &[("cmd", "groups")], b"").unwrap(),
        format!("{}\n", nobody.gid).into_bytes()
    );
}

// ---------------------------------------------------------------------------------------------
// exec: refusing

#[test]
fn exec_argument_outside_pattern_is_refused_and_nothing_runs() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let mut c = sh(&format!("echo \"$1\" > {}", marker.display()));
    c.args.push("sh".into()); // $0
    c.arg_patterns = vec!["[a-z]+".into()];
    let h = exec(vec![("mark", c)]);

    let bad = [("cmd", "mark"), ("arg1", "abc; rm -rf x")];
    assert_eq!(
        invalid(&h, &bad),
        r#"invalid argument: exec: arg1 of "mark" must match ^(?:[a-z]+)$, got "abc; rm -rf x""#
    );
    // Even an item that skipped validate does not run.
    let a = args(&bad);
    let cancel = CancelToken::new();
    assert!(matches!(
        h.run(&ctx(&a, b"", &cancel)),
        Err(HandlerError::Failed(t)) if t.starts_with("invalid argument: exec: arg1")
    ));
    assert!(!marker.exists(), "the command ran");

    // The control: a matching argument runs.
    assert_eq!(
        run(&h, &[("cmd", "mark"), ("arg1", "abc")], b"").unwrap(),
        b""
    );
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "abc\n");
}

#[test]
fn exec_argument_errors() {
    let mut one = command("/bin/echo", &[]);
    one.arg_patterns = vec!["[a-z]+".into()];
    let mut two = command("/bin/echo", &[]);
    two.arg_patterns = vec!["[a-z]+".into(), "[0-9]+".into()];
    let h = exec(vec![("one", one), ("two", two)]);
    assert_eq!(
        invalid(&h, &[]),
        "invalid argument: exec needs cmd (allowed: one, two)"
    );
    assert_eq!(
        invalid(&h, &[("cmd", "rm")]),
        r#"invalid argument: exec: unknown command "rm" (allowed: one, two)"#
    );
    assert_eq!(
        invalid(&h, &[("cmd", "one"), ("arg1", "a"), ("arg2", "b")]),
        r#"invalid argument: exec: command "one" takes at most 1 extra argument, got arg2"#
    );
    assert_eq!(
        invalid(&h, &[("cmd", "two"), ("arg2", "1")]),
        "invalid argument: exec: extra arguments must be contiguous from arg1 (arg2 given, arg1 missing)"
    );
    assert_eq!(
        invalid(&h, &[("cmd", "two"), ("arg1", "a"), ("arg2", "x")]),
        r#"invalid argument: exec: arg2 of "two" must match ^(?:[0-9]+)$, got "x""#
    );
    // Anchoring: a pattern must match the whole argument, alternation included.
    let mut alt = command("/bin/echo", &[]);
    alt.arg_patterns = vec!["a|b".into()];
    let h2 = exec(vec![("alt", alt)]);
    assert!(h2
        .validate(&args(&[("cmd", "alt"), ("arg1", "b")]), b"")
        .is_ok());
    assert!(h2
        .validate(&args(&[("cmd", "alt"), ("arg1", "ab")]), b"")
        .is_err());
    assert!(h2
        .validate(&args(&[("cmd", "alt"), ("arg1", "xa")]), b"")
        .is_err());
    assert_eq!(
        invalid(&h, &[("cmd", "one"), ("arg01", "a"), ("env", "X=1")]),
        "invalid argument: exec: unknown arguments arg01, env (allowed: cmd, arg1, arg2, ...)"
    );
    assert_eq!(
        invalid(&Exec::new(ExecConfig::default()), &[("cmd", "x")]),
        r#"invalid argument: exec: unknown command "x" (no commands are configured)"#
    );
}

#[test]
fn exec_config_validation() {
    let cfg = |c: ExecCommand| ExecConfig {
        commands: [("c".to_string(), c)].into(),
        ..Default::default()
    };
    let rel = cfg(command("bin/cat", &[]));
    assert_eq!(
        rel.validate(),
        Err(r#"exec: command "c": path "bin/cat" must be absolute"#.into())
    );
    // Exec::new fails closed: the bad entry is left out of the allowlist.
    assert_eq!(
        invalid(&Exec::new(rel.clone()), &[("cmd", "c")]),
        r#"invalid argument: exec: unknown command "c" (no commands are configured)"#
    );
    assert!(Exec::try_new(rel).is_err());

    let mut bad_re = command("/bin/cat", &[]);
    bad_re.arg_patterns = vec!["(".into()];
    let e = cfg(bad_re).validate().unwrap_err();
    assert!(
        e.starts_with(r#"exec: command "c": arg_patterns[0] "(" is not a valid regex"#),
        "{e}"
    );

    let mut zero = command("/bin/cat", &[]);
    zero.timeout_ms = 0;
    assert!(cfg(zero)
        .validate()
        .unwrap_err()
        .contains("timeout_ms must be > 0"));

    let mut nobody_here = cfg(command("/bin/cat", &[]));
    nobody_here.run_as_user = Some("no-such-user-wqd".into());
    assert_eq!(
        nobody_here.validate(),
        Err(r#"exec: run_as_user "no-such-user-wqd" does not exist"#.into())
    );
    // The pure check looks nothing up; it still sees what is wrong in the file itself.
    assert_eq!(nobody_here.check(), Ok(()));
    let mut zero = command("/bin/cat", &[]);
    zero.timeout_ms = 0;
    assert!(cfg(zero)
        .check()
        .unwrap_err()
        .contains("timeout_ms must be > 0"));
    // Fails closed: an unresolvable user disables the handler rather than running as root.
    assert_eq!(
        invalid(&Exec::new(nobody_here), &[("cmd", "c")]),
        r#"invalid argument: exec is disabled: exec: run_as_user "no-such-user-wqd" does not exist"#
    );
    assert!(cfg(command("/bin/cat", &[])).validate().is_ok());
}

#[test]
fn exec_spawn_failure_is_failed() {
    let h = exec(vec![("missing", command("/nonexistent/wqd-test-bin", &[]))]);
    match run(&h, &[("cmd", "missing")], b"") {
        Err(HandlerError::Failed(t)) => {
            assert!(
                t.starts_with("cannot start /nonexistent/wqd-test-bin:"),
                "{t}"
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn exec_config_from_toml_uses_defaults() {
    let cfg: ExecConfig = toml::from_str(
        r#"
        run_as_user = "nobody"
        [commands.cat]
        path = "/bin/cat"
        [commands.grep]
        path = "/bin/grep"
        args = ["-c", "--"]
        arg_patterns = ["[a-z]+"]
        max_output_bytes = 4096
        timeout_ms = 500
        "#,
    )
    .unwrap();
    assert_eq!(cfg.run_as_user.as_deref(), Some("nobody"));
    assert_eq!(cfg.run_as_group, None);
    assert_eq!(cfg.commands["cat"], command("/bin/cat", &[]));
    assert_eq!(cfg.commands["cat"].max_output_bytes, 1 << 20);
    assert_eq!(cfg.commands["cat"].timeout_ms, 30_000);
    assert_eq!(cfg.commands["grep"].args, ["-c", "--"]);
    assert_eq!(cfg.commands["grep"].timeout_ms, 500);
    assert_eq!(
        toml::from_str::<ExecConfig>("").unwrap(),
        ExecConfig::default()
    );
    assert!(
        toml::from_str::<ExecConfig>("[commands.x]\npath = \"/bin/x\"\ntimeout = 1\n").is_err()
    );
}

/// The token's protocol: a waiter sleeping in `wait_timeout` is woken by a `cancel` from
/// another thread (many rounds, each racing the cancel against the waiter going to sleep:
/// a lost wake-up shows as a round that waits out its 10 s); `reset` lowers the flag for the
/// next item; a token never raised times out `false`; clones share one flag.
#[test]
fn a_cancel_always_wakes_a_waiter_and_reset_lowers_the_flag() {
    let t = CancelToken::new();
    assert!(!t.wait_timeout(Duration::from_millis(20)), "never raised");
    for round in 0..200 {
        t.reset();
        assert!(!t.is_cancelled(), "round {round}: reset lowers it");
        let c = t.clone();
        let canceller = std::thread::spawn(move || {
            if round % 2 == 0 {
                std::thread::yield_now();
            }
            c.cancel();
        });
        let t0 = Instant::now();
        assert!(t.wait_timeout(Duration::from_secs(10)), "round {round}");
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "round {round}: woken, not timed out ({:?})",
            t0.elapsed()
        );
        canceller.join().unwrap();
        assert!(
            t.is_cancelled() && t.clone().is_cancelled(),
            "clones share it"
        );
        assert!(t.wait_timeout(Duration::ZERO), "raised before the wait");
    }
}
