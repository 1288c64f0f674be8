//! The Python package `client/python` against the real daemon: its unit tests, the freshness
//! of its generated code, `pip install`, the client's round trips, attached Python workers
//! (handlers, CPUs, cancel, graceful stop, hotplug) and the `rcu_like.py` example.
//!
//! Each test starts its own daemon on a fixture tree and runs a Python program from
//! `client/python/tests/` (stdlib unittest, or a script that prints progress lines the test
//! reacts to) with the venv of [`wqd_e2e::python::python`], `PYTHONPATH=client/python` and
//! the daemon's socket in `WQD_SOCKET`. The Python side asserts what it can see; the Rust
//! side changes the fixture tree (hotplug) and checks the daemon's own view. Every Python run
//! is bounded by a watchdog that kills it; a Python worker left behind dies with its program.
//!
//! On `two-socket`, `cache:1` is CPUs 2, 3, 10 and 11 (CPU 3's SMT sibling is 11).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use wqd_client::Client;
use wqd_e2e::{parse_cpulist, wait_for, Daemon};

/// Bound of one Python program.
const PY_LIMIT: Duration = Duration::from_secs(180);
const LONG: Duration = Duration::from_secs(30);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the repository")
        .to_path_buf()
}

fn pkg() -> PathBuf {
    repo().join("client/python")
}

fn python() -> PathBuf {
    wqd_e2e::python::python().unwrap_or_else(|e| panic!("the Python venv: {e}"))
}

/// `python ARGS...` with the package on PYTHONPATH and, when given, the daemon's socket.
fn py_command(d: Option<&Daemon>, args: &[&str]) -> Command {
    let mut cmd = Command::new(python());
    cmd.args(args)
        .current_dir(pkg())
        .env(
            "PYTHONPATH",
            format!("{}:{}", pkg().display(), pkg().join("tests").display()),
        )
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("WQD_ADDR")
        .env_remove("WQD_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(d) = d {
        cmd.env("WQD_SOCKET", d.socket());
    }
    cmd
}

/// A running Python program: its stdout lines arrive on a channel; dropping it kills it.
struct Py {
    child: Child,
    lines: mpsc::Receiver<String>,
    stdin: Option<ChildStdin>,
    stderr: std::thread::JoinHandle<String>,
    started: Instant,
    what: String,
}

impl Py {
    fn spawn(d: Option<&Daemon>, args: &[&str]) -> Py {
        let mut cmd = py_command(d, args);
        cmd.stdin(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start python {args:?}: {e}"));
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut BufReader::new(err), &mut s);
            s
        });
        Py {
            stdin: child.stdin.take(),
            child,
            lines,
            stderr,
            started: Instant::now(),
            what: format!("{args:?}"),
        }
    }

    /// Waits (bounded) for a stdout line starting with `prefix`; returns the line.
    fn expect_line(&mut self, prefix: &str) -> String {
        let end = self.started + PY_LIMIT;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(l) => eprintln!("python {}: {l}", self.what),
                Err(_) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    let stderr = self.take_stderr();
                    panic!(
                        "python {} ended or timed out before printing {prefix:?}; stderr:\n{stderr}",
                        self.what
                    )
                }
            }
        }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write to python's stdin");
        stdin.flush().expect("flush python's stdin");
    }

    /// Whether it is still running.
    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn take_stderr(&mut self) -> String {
        let h = std::mem::replace(&mut self.stderr, std::thread::spawn(String::new));
        h.join().unwrap_or_default()
    }

    /// Waits (bounded) for it to exit and asserts success; returns stdout's remaining lines.
    fn finish(mut self) -> Vec<String> {
        self.stdin = None;
        let end = self.started + PY_LIMIT;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            if Instant::now() >= end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let stderr = self.take_stderr();
                panic!(
                    "python {} still running after {PY_LIMIT:?}; killed. stderr:\n{stderr}",
                    self.what
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let rest: Vec<String> = self.lines.try_iter().collect();
        let stderr = self.take_stderr();
        assert!(
            status.success(),
            "python {} failed ({status}); stdout:\n{}\nstderr:\n{stderr}",
            self.what,
            rest.join("\n")
        );
        eprintln!("python {}: ok in {:?}", self.what, self.started.elapsed());
        rest
    }
}

impl Drop for Py {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a Python program to success (bounded).
fn run_py(d: Option<&Daemon>, args: &[&str]) -> Vec<String> {
    Py::spawn(d, args).finish()
}

/// Runs one unittest module (or module.Class.test) of client/python/tests against `d`.
fn unittest(d: Option<&Daemon>, name: &str) {
    run_py(d, &["-m", "unittest", "-v", name]);
}

/// Waits until the daemon sees each CPU of `cpus` (not) live.
async fn wait_live(c: &Client, cpus: &[u32], live: bool) {
    wait_for(
        &format!("the daemon to see CPUs {cpus:?} live={live}"),
        LONG,
        || async {
            let t = c.topology().await.expect("GetTopology");
            let l = parse_cpulist(&t.live);
            cpus.iter().all(|c| l.contains(c) == live).then_some(())
        },
    )
    .await
}

/// Takes `cpus` offline and back `rounds` times, each state seen by the daemon and held for
/// `hold` (the load keeps running meanwhile), stopping early when `py` exits. Returns the
/// rounds completed.
async fn flip(
    d: &Daemon,
    c: &Client,
    py: &mut Py,
    cpus: &[u32],
    rounds: u32,
    hold: Duration,
) -> u32 {
    let mut done = 0;
    while done < rounds && py.running() {
        for &cpu in cpus {
            d.fixture().set_offline(cpu);
        }
        wait_live(c, cpus, false).await;
        tokio::time::sleep(hold).await;
        for &cpu in cpus {
            d.fixture().set_online(cpu);
        }
        wait_live(c, cpus, true).await;
        tokio::time::sleep(hold).await;
        done += 1;
    }
    done
}

// ---------------------------------------------------------------------------------------------
// Without a daemon

#[test]
fn unit_tests_against_a_fake_daemon() {
    unittest(None, "test_unit");
}

/// The checked-in `wqd/v1/*` equal what regen.sh makes from proto/ now: the Python code
/// cannot drift from the .proto files.
#[test]
fn generated_code_matches_the_proto_files() {
    let target = wqd_e2e::profile_dir()
        .parent()
        .expect("target folder")
        .to_path_buf();
    // One regen venv for all runs, created under a lock (regen.sh reuses a ready one).
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(target.join("pyenv-regen.lock"))
        .expect("lock file");
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own; released when `lock` is dropped.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let out = tempfile::tempdir().expect("tempdir");
    let ran = Command::new("bash")
        .arg(pkg().join("regen.sh"))
        .arg(out.path())
        .env("REGEN_VENV", target.join("pyenv-regen"))
        .output()
        .expect("run regen.sh");
    assert!(
        ran.status.success(),
        "regen.sh failed: {}{}",
        String::from_utf8_lossy(&ran.stdout),
        String::from_utf8_lossy(&ran.stderr)
    );
    let generated = |dir: &Path| -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap())
            .filter(|e| {
                let n = e.file_name().into_string().unwrap();
                n.ends_with("_pb2.py") || n.ends_with("_pb2_grpc.py") || n.ends_with("_pb2.pyi")
            })
            .map(|e| {
                (
                    e.file_name().into_string().unwrap(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let fresh = generated(&out.path().join("wqd/v1"));
    let checked_in = generated(&pkg().join("wqd/v1"));
    let names = |v: &[(String, Vec<u8>)]| v.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(&checked_in),
        names(&fresh),
        "client/python/wqd/v1 has other files than regen.sh makes: run client/python/regen.sh"
    );
    assert_eq!(fresh.len(), 18, "six .proto files, three outputs each");
    for ((name, a), (_, b)) in checked_in.iter().zip(&fresh) {
        assert!(
            a == b,
            "client/python/wqd/v1/{name} differs from what regen.sh makes from proto/: \
             run client/python/regen.sh and commit the result"
        );
    }
}

/// `pip install client/python` works and installs an importable, typed package.
#[test]
fn pip_install_then_import() {
    let py = python();
    let dir = tempfile::tempdir().expect("tempdir");
    let site = dir.path().join("site");
    // grpcio and protobuf are in the venv already (--no-deps). A setuptools that builds
    // wheels itself (70.1 and later) builds in place; with an older one pip fetches a newer
    // one from PyPI into an isolated build environment.
    let has_setuptools = Command::new(&py)
        .args(["-c", "import setuptools.command.bdist_wheel"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let mut pip = Command::new(&py);
    pip.args([
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "-q",
        "--no-deps",
    ]);
    if has_setuptools {
        pip.arg("--no-build-isolation");
    }
    // Build from a copy: pip may leave build/ and *.egg-info next to the sources.
    let src = dir.path().join("src");
    let cp = Command::new("cp")
        .arg("-r")
        .arg(pkg())
        .arg(&src)
        .status()
        .expect("cp");
    assert!(cp.success());
    let ran = pip
        .arg("--target")
        .arg(&site)
        .arg(&src)
        .output()
        .expect("pip");
    assert!(
        ran.status.success(),
        "pip install client/python failed: {}{}",
        String::from_utf8_lossy(&ran.stdout),
        String::from_utf8_lossy(&ran.stderr)
    );
    for f in [
        "wqd/py.typed",
        "wqd/v1/worker_pb2.pyi",
        "wqd/v1/worker_pb2_grpc.py",
    ] {
        assert!(site.join(f).is_file(), "{f} not installed");
    }
    let ran = Command::new(&py)
        .args([
            "-c",
            "import wqd, wqd.v1.worker_pb2_grpc as g; print(wqd.__file__); \
             assert hasattr(g, 'WorkerServiceStub'); assert wqd.Client and wqd.Worker",
        ])
        .current_dir(dir.path())
        .env("PYTHONPATH", &site)
        .output()
        .expect("python");
    let stdout = String::from_utf8_lossy(&ran.stdout);
    assert!(
        ran.status.success() && stdout.trim().starts_with(&site.display().to_string()),
        "import of the installed package: {stdout}{}",
        String::from_utf8_lossy(&ran.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// The client against the daemon (built-in handlers)

#[test]
fn client_round_trips() {
    let d = Daemon::start("two-socket");
    unittest(Some(&d), "e2e_client");
}

/// Workqueues with `results = summary` / `none`: waits answer with counts, flushes stream no
/// results, ended items are looked up as forgotten (needs the engine to honour the mode).
#[test]
fn client_results_modes() {
    let d = Daemon::start("two-socket");
    unittest(Some(&d), "e2e_results");
}

// ---------------------------------------------------------------------------------------------
// Attached Python workers (WorkerService)

/// `max_credits = 2` lets a slot hold a second item behind a running one, which the graceful
/// stop test hands back.
#[test]
fn workers_serve_their_handlers_in_the_items_groups() {
    let d = Daemon::builder("two-socket")
        .config("[workers]\nmax_credits = 2\n")
        .start();
    unittest(Some(&d), "e2e_worker");
}

/// CPUs 3 and 11 of `cache:1` leave and return three times while a Python worker with a slot
/// on each CPU of `cache:1` serves a stream of items; the program checks every result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_keeps_serving_through_hotplug() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;
    let mut py = Py::spawn(Some(&d), &["tests/e2e_hotplug.py"]);
    py.expect_line("ready");
    let rounds = flip(&d, &c, &mut py, &[3, 11], 3, Duration::from_millis(300)).await;
    assert_eq!(
        rounds, 3,
        "the program ended while CPUs were still changing"
    );
    py.send("stop");
    let report = py.expect_line("ok ");
    eprintln!("{report}");
    py.finish();
    let mut workers =
        wqd_client::proto::worker_service_client::WorkerServiceClient::new(d.channel().await);
    let listed = workers
        .list_workers(wqd_client::proto::ListWorkersRequest {})
        .await
        .expect("ListWorkers")
        .into_inner();
    assert!(listed.workers.is_empty(), "the worker detached: {listed:?}");
}

/// The daemon stops under an attached worker: no reconnect, `wait()` (and `run()`) raise.
#[test]
fn worker_sees_its_stream_lost() {
    let mut d = Daemon::start("two-socket");
    let mut py = Py::spawn(Some(&d), &["tests/e2e_lost.py"]);
    py.expect_line("ready");
    d.stop();
    let lost = py.expect_line("lost ");
    eprintln!("{lost}");
    py.finish();
}

// ---------------------------------------------------------------------------------------------
// The example

/// `examples/rcu_like.py` runs to success while `cache:3` loses its live CPUs (6 and 7; 14
/// and 15 are isolated) and gets them back: its items fall back and say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rcu_like_example_survives_cpus_going_away() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;
    let mut py = Py::spawn(
        Some(&d),
        &[
            "examples/rcu_like.py",
            "--rounds",
            "60",
            "--interval",
            "0.05",
        ],
    );
    py.expect_line("round 1:");
    for cpu in [6, 7] {
        d.fixture().set_offline(cpu);
    }
    wait_live(&c, &[6, 7], false).await;
    // Bounded by the program's own limit: expect_line fails once it ends or times out.
    while !py.expect_line("  cache:3").contains("fallback") {}
    for cpu in [6, 7] {
        d.fixture().set_online(cpu);
    }
    wait_live(&c, &[6, 7], true).await;
    py.finish();
}
