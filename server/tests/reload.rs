//! SIGHUP reload on the real binary: change the config file, send SIGHUP, and observe through
//! the client (ListWorkqueues, GetTopology's group listing, a limit refusal) that the change
//! took effect while items kept running; then a file that cannot apply live, and a broken
//! one, are refused with the old config kept and the daemon serving.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use support::fixture;

use tonic::Code;
use wqd_client::{Batch, Client, ClientError, Endpoint, Item};

/// The file around the part a step changes.
fn config(sock: &Path, body: &str) -> String {
    format!(
        r#"
[listen]
socket = "{}"
[topology]
sysfs_root = "{}"
netlink = false
rescan = "200ms"
[engine]
shutdown_grace = "100ms"
{body}
"#,
        sock.display(),
        fixture("vm8-offline").display()
    )
}

const FIRST: &str = r#"
[limits]
max_batch_items = 100
[[group]]
name = "io"
cpus = "0-1"
[[workqueue]]
name = "a"
group_max_active = 4
"#;

const SECOND: &str = r#"
[limits]
max_batch_items = 5
[[group]]
name = "io"
cpus = "0-1"
[[group]]
name = "io2"
cpus = "2-3"
[[workqueue]]
name = "a"
group_max_active = 12
[[workqueue]]
name = "b"
placement = "first"
"#;

struct Wqd {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Wqd {
    fn start(cfg: &Path) -> Wqd {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wqd"))
            .arg("--config")
            .arg(cfg)
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wqd");
        let (tx, lines) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[wqd] {l}");
                let _ = tx.send(l);
            }
        });
        let w = Wqd { child, lines };
        w.wait_line("wqd: listening on unix:");
        w
    }

    fn wait_line(&self, needle: &str) -> String {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(e) => panic!("no line with {needle:?}: {e}"),
            }
        }
    }

    fn hup(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
    }

    fn stop(mut self) -> Option<i32> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        self.child.wait().unwrap().code()
    }
}

async fn wq(c: &Client, name: &str) -> (u32, u64, u64) {
    let w = c.list_workqueues(Some(name.into())).await.unwrap();
    let a = w[0].attrs.as_ref().unwrap();
    let s = w[0].stats.as_ref().unwrap();
    (a.group_max_active, s.pending, s.running)
}

/// Polls workqueue `name` until it reads `want` (group_max_active, pending, running).
async fn until(c: &Client, name: &str, want: (u32, u64, u64)) {
    let end = Instant::now() + Duration::from_secs(5);
    while wq(c, name).await != want {
        assert!(
            Instant::now() < end,
            "{name}: {:?}, want {want:?}",
            wq(c, name).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn code(e: ClientError) -> (Code, String) {
    match e {
        ClientError::Status(s) => (s.code(), s.message().to_string()),
        other => panic!("not a status: {other}"),
    }
}

#[test]
fn sighup_applies_live_changes_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("wqd.sock");
    let file = dir.path().join("wqd.toml");
    std::fs::write(&file, config(&sock, FIRST)).unwrap();
    let d = Wqd::start(&file);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = rt.block_on(Client::connect(Endpoint::unix(&sock))).unwrap();

    // Work in flight: 4 run (group_max_active 4 over target `all`), 8 wait.
    rt.block_on(async {
        c.submit(
            Batch::new()
                .workqueue("a")
                .items((0..12).map(|_| Item::new("all", "sleep").arg("ms", "60000"))),
        )
        .await
        .unwrap();
        until(&c, "a", (4, 8, 4)).await;
        let t = c.topology().await.unwrap();
        assert!(t.groups.iter().any(|g| g.target == "io"));
        assert!(!t.groups.iter().any(|g| g.target == "io2"));
    });

    // Live changes: a workqueue updated, one created, a group added, a limit lowered.
    std::fs::write(&file, config(&sock, SECOND)).unwrap();
    d.hup();
    d.wait_line("config reloaded");
    rt.block_on(async {
        // group_max_active 12 lets the waiting items start; none was dropped.
        until(&c, "a", (12, 0, 12)).await;
        let b = c.list_workqueues(Some("b".into())).await.unwrap();
        assert_eq!(
            b[0].attrs.as_ref().unwrap().placement,
            wqd_client::proto::Placement::First as i32
        );
        let t = c.topology().await.unwrap();
        let io2 = t.groups.iter().find(|g| g.target == "io2").expect("io2");
        assert_eq!(io2.members, "2-3");
        let e = c
            .submit(Batch::new().items((0..6).map(|_| Item::new("io2", "noop"))))
            .await
            .unwrap_err();
        let (code, msg) = code(e);
        assert_eq!(code, Code::InvalidArgument);
        assert!(msg.contains("limits.max_batch_items = 5"), "{msg}");
        c.submit(Batch::new().item(Item::new("io2", "noop")).wait(true))
            .await
            .unwrap();
    });

    // A key that needs a restart: the whole reload is refused, nothing of it applies.
    let restart = SECOND.replace("group_max_active = 12", "group_max_active = 3")
        + "[metrics]\nlisten = \"127.0.0.1:9\"\n";
    std::fs::write(&file, config(&sock, &restart)).unwrap();
    d.hup();
    let l = d.wait_line("config reload refused");
    assert!(l.contains("metrics.listen") && l.contains("restart"), "{l}");
    // A broken file, and toggling `ordered` on the busy workqueue: refused too.
    std::fs::write(&file, config(&sock, "[limits]\nmax_batch_items = 0\n")).unwrap();
    d.hup();
    let l = d.wait_line("config reload refused");
    assert!(l.contains("limits.max_batch_items"), "{l}");
    let ordered = SECOND.replace(
        "group_max_active = 12",
        "group_max_active = 12\nordered = true",
    );
    std::fs::write(&file, config(&sock, &ordered)).unwrap();
    d.hup();
    let l = d.wait_line("config reload refused");
    assert!(l.contains("ordered"), "{l}");
    rt.block_on(async {
        assert_eq!(
            wq(&c, "a").await,
            (12, 0, 12),
            "old config kept, items untouched"
        );
        let e = c
            .submit(Batch::new().items((0..6).map(|_| Item::new("all", "noop"))))
            .await
            .unwrap_err();
        assert!(code(e).1.contains("limits.max_batch_items = 5"));
        assert!(c.topology().await.is_ok(), "still serving");
    });
    assert_eq!(d.stop(), Some(0));
}
