//! The security model end to end, on the real daemon in-process over the `two-socket` fixture,
//! driven through `wqd-client`: every refusal — a uid not allowed on the Unix socket, TLS
//! without a client certificate when mTLS is required, a missing or wrong bearer token, an
//! `exec` command not on the allowlist, an argument outside its pattern — gives its precise
//! status, and nothing is queued or run (the daemon's own counters and marker files say so).
//! Each test also shows the allowed path works, so a refusal is not an accident of set-up.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use support::fixture;
use support::pki::Pki;
use tonic::Code;
use wqd::config::Config;
use wqd::daemon::Daemon;
use wqd::security::{IdSpec, Security, SecurityError};
use wqd_client::proto as v1;
use wqd_client::{Batch, CancelScope, Client, ClientError, Endpoint, FlushScope, Item, TlsOptions};
use wqd_core::handler::exec::{ExecCommand, ExecConfig};

const NOBODY: u32 = 65534;

fn config(dir: &Path) -> Config {
    support::config(dir, &fixture("two-socket"))
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

async fn connect(d: &Daemon) -> Client {
    Client::connect(Endpoint::unix(d.socket_path()))
        .await
        .expect("connect")
}

fn noop() -> Batch {
    Batch::new().item(Item::new("cache:0", "noop"))
}

/// Asserts the daemon accepted no batch and holds or ran no item.
async fn assert_nothing_happened(observer: &Client, refused: u64) {
    let s = observer.stats().await.expect("stats");
    assert_eq!(s.batches_accepted, 0, "no batch may be accepted");
    assert_eq!(s.batches_refused, refused, "batches refused by validation");
    assert_eq!(
        s.items.unwrap_or_default(),
        v1::StateCounts::default(),
        "no item may exist"
    );
    assert_eq!(s.workqueues, 1, "only the default workqueue exists");
}

fn expect_code(r: Result<impl std::fmt::Debug, ClientError>, code: Code) -> String {
    match r {
        Err(e) => {
            assert_eq!(e.code(), code, "{e}");
            e.message()
        }
        Ok(v) => panic!("expected {code:?}, got Ok({v:?})"),
    }
}

/// A client whose one connection was made by a thread running as `uid`/`gid`: the kernel
/// records the connecting thread's credentials (SO_PEERCRED), and raw `setres[ug]id`
/// syscalls change only the calling thread (glibc's wrappers would change every thread of
/// the test). Root only.
async fn connect_as(path: &Path, uid: u32, gid: u32) -> Client {
    let p = path.to_path_buf();
    let std_stream = std::thread::spawn(move || {
        // SAFETY: plain syscalls on this thread's own credentials; no memory is shared.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()),
                0
            );
            assert_eq!(libc::syscall(libc::SYS_setresgid, gid, gid, gid), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0);
        }
        std::os::unix::net::UnixStream::connect(&p)
    })
    .join()
    .expect("thread")
    .expect("connect as another uid");
    std_stream.set_nonblocking(true).unwrap();
    let slot = Arc::new(Mutex::new(Some(std_stream)));
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let s = slot.lock().unwrap().take();
            async move {
                let s = s.ok_or_else(|| std::io::Error::other("the one connection is used"))?;
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::from_std(s)?))
            }
        }))
        .await
        .expect("channel");
    Client::from_channel(Endpoint::unix(path), channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uid_not_allowed_gets_permission_denied_and_nothing_happens() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    let root = is_root();
    let denied_uid = if root {
        // The peer is `nobody`: let it reach the socket so the guard, not the file mode, is
        // what refuses it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        cfg.listen.socket_mode = 0o666;
        NOBODY
    } else {
        eprintln!(
            "not root: testing with this process's own uid as the refused peer; the \
             non-root-peer-of-a-root-daemon variant (setuid nobody) is skipped"
        );
        nix::unistd::geteuid().as_raw()
    };
    // Neither root (always allowed) nor the peer.
    cfg.security.allowed_uids = vec![IdSpec::Id(4242), IdSpec::Name("4243".into())];
    let d = Daemon::start(cfg).await.expect("start");
    let c = if root {
        connect_as(d.socket_path(), NOBODY, NOBODY).await
    } else {
        connect(&d).await
    };

    let m = expect_code(c.submit(noop().wait(true)).await, Code::PermissionDenied);
    assert!(
        m.starts_with(&format!(
            "uid {denied_uid} (gid {}) may not call /wqd.v1.DispatchService/Submit",
            if root {
                NOBODY
            } else {
                nix::unistd::getegid().as_raw()
            }
        )),
        "{m}"
    );
    assert!(m.contains("security.allowed_uids"), "{m}");
    let m = expect_code(
        c.submit_stream("default", (0..3).map(|_| Item::new("cache:0", "noop")))
            .await,
        Code::PermissionDenied,
    );
    assert!(m.contains("SubmitStream"), "{m}");
    expect_code(
        c.cancel(CancelScope::Batch(1)).await,
        Code::PermissionDenied,
    );
    expect_code(c.drain("default").await, Code::PermissionDenied);
    expect_code(
        c.create_workqueue(v1::WorkqueueAttrs {
            name: "sneaky".into(),
            ..Default::default()
        })
        .await,
        Code::PermissionDenied,
    );
    expect_code(
        c.update_workqueue(v1::UpdateWorkqueueRequest {
            name: "default".into(),
            max_active: Some(7),
            ..Default::default()
        })
        .await,
        Code::PermissionDenied,
    );
    expect_code(
        c.delete_workqueue("default", true).await,
        Code::PermissionDenied,
    );
    // Results may hold other users' outputs: gated too.
    expect_code(c.results([1]).await, Code::PermissionDenied);
    expect_code(
        c.flush_all(FlushScope::Workqueue("default".into())).await,
        Code::PermissionDenied,
    );
    // Observing calls stay open (read_open = true, the default).
    assert_eq!(c.topology().await.unwrap().epoch, 1);
    let wqs = c.list_workqueues(None).await.unwrap();
    assert_eq!(wqs.len(), 1);
    assert_eq!(
        wqs[0].attrs.as_ref().map(|a| a.max_active),
        Some(1),
        "the refused update changed nothing"
    );
    assert_nothing_happened(&c, 0).await;

    if root {
        // Root is always allowed, so the same daemon does work for it.
        let r = connect(&d).await;
        let resp = r.submit(noop().wait(true)).await.expect("root submits");
        assert_eq!(resp.results.len(), 1);
        assert_eq!(r.stats().await.unwrap().batches_accepted, 1);
    }
    d.shutdown().await;
}

/// The seams between security and the rest of the daemon: a socket passed by systemd (socket
/// activation) is guarded like a bound one, and the calls the guard refuses are counted by the
/// RPC metrics (the metrics layer sits outside the guard). Root only: the refused peer is
/// `nobody`, so the guard and not the file mode refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activated_socket_is_guarded_and_refusals_are_counted() {
    if !is_root() {
        eprintln!("skipped: needs root to connect as another uid");
        return;
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cfg = config(dir.path());
    cfg.security.allowed_uids = vec![IdSpec::Id(4242)];
    cfg.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    // What systemd does for wqd.socket: bind and listen, then hand the socket over (left
    // blocking here: start_with must cope).
    let path = dir.path().join("activated.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let d = Daemon::start_with(cfg, Some(listener))
        .await
        .expect("start");
    assert_eq!(d.socket_path(), path);

    let c = connect_as(&path, NOBODY, NOBODY).await;
    let m = expect_code(c.submit(noop().wait(true)).await, Code::PermissionDenied);
    assert!(m.contains("security.allowed_uids"), "{m}");
    expect_code(c.drain("default").await, Code::PermissionDenied);
    assert_nothing_happened(&c, 0).await;

    let addr = d.metrics_addr().expect("metrics served");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: wqd\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    for method in ["Submit", "Drain"] {
        let series = format!(
            "wqd_rpc_handled_total{{method=\"wqd.v1.DispatchService/{method}\",code=\"PERMISSION_DENIED\"}} 1"
        );
        assert!(body.contains(&series), "no {series} in:\n{body}");
    }
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_open_false_closes_observing_calls_and_groups_can_allow() {
    if !is_root() {
        eprintln!("skipped: needs root to connect as another uid (setuid nobody)");
        return;
    }
    let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") else {
        eprintln!("skipped: no user nobody");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cfg = config(dir.path());
    cfg.listen.socket_mode = 0o666;
    cfg.security.allowed_gids = vec![IdSpec::Id(4242)];
    cfg.security.read_open = false;
    let d = Daemon::start(cfg).await.expect("start");
    let (uid, gid) = (nobody.uid.as_raw(), nobody.gid.as_raw());
    let c = connect_as(d.socket_path(), uid, gid).await;
    let m = expect_code(c.topology().await, Code::PermissionDenied);
    assert!(m.contains(&format!("uid {uid}")), "{m}");
    expect_code(c.stats().await, Code::PermissionDenied);
    d.shutdown().await;

    // The peer's primary group allows it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cfg = config(dir.path());
    cfg.listen.socket_mode = 0o666;
    cfg.security.allowed_gids = vec![IdSpec::Id(gid)];
    let d = Daemon::start(cfg).await.expect("start");
    let c = connect_as(d.socket_path(), uid, gid).await;
    assert_eq!(c.submit(noop().wait(true)).await.unwrap().results.len(), 1);
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_group_is_applied_at_bind() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    // A group this process certainly may chown to: its own effective one (or, as root, any).
    let gid = if is_root() {
        NOBODY
    } else {
        nix::unistd::getegid().as_raw()
    };
    cfg.security.socket_group = Some(IdSpec::Id(gid));
    let d = Daemon::start(cfg).await.expect("start");
    let meta = std::fs::metadata(d.socket_path()).unwrap();
    assert_eq!(meta.gid(), gid);
    assert_eq!(meta.mode() & 0o777, 0o660);
    d.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// TCP: TLS, client certificates, bearer token.

/// Client TLS settings trusting the test CA, with the client certificate `client` (`client`,
/// `rogue`) if given.
fn tls(pki: &Pki, client: Option<&str>) -> TlsOptions {
    TlsOptions {
        ca_pem: Some(pki.read("ca.pem")),
        identity: client.map(|c| (pki.read(&format!("{c}.pem")), pki.read(&format!("{c}.key")))),
        domain: None,
    }
}

fn tls_config(dir: &Path, pki: &Pki) -> Config {
    let mut cfg = config(dir);
    cfg.listen.tcp = Some("127.0.0.1:0".parse().unwrap());
    cfg.security.tls_cert = Some(pki.path("server.pem"));
    cfg.security.tls_key = Some(pki.path("server.key"));
    cfg
}

async fn tcp_client(d: &Daemon, tls: TlsOptions) -> Result<Client, ClientError> {
    let url = format!("https://{}", d.tcp_addr().expect("tcp"));
    Client::connect_with(url.parse()?, Some(tls)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_refuses_a_client_without_a_valid_certificate() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tls_config(dir.path(), &pki);
    cfg.security.client_ca = Some(pki.path("ca.pem"));
    let d = Daemon::start(cfg).await.expect("start");
    let local = connect(&d).await;

    // TLS, but no client certificate: the handshake completes (so the refusal can be precise)
    // and every call is UNAUTHENTICATED.
    let c = tcp_client(&d, tls(&pki, None)).await.expect("tls connect");
    let m = expect_code(c.submit(noop().wait(true)).await, Code::Unauthenticated);
    assert!(
        m.contains("requires a client certificate signed by security.client_ca"),
        "{m}"
    );
    expect_code(c.topology().await, Code::Unauthenticated);
    // A certificate from another CA fails the handshake. With TLS 1.3 the client learns it
    // only when it next reads (the server verifies after the client's Finished), so the first
    // call fails with the transport's error rather than `connect`; which code the client
    // library makes of the closed connection depends on timing.
    let e = match tcp_client(&d, tls(&pki, Some("rogue"))).await {
        Err(e) => e,
        Ok(c) => c.submit(noop()).await.expect_err("rogue certificate"),
    };
    assert!(
        matches!(
            e.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled
        ),
        "a transport failure, not a status from the daemon: {e}"
    );
    // Plaintext to the TLS port fails too.
    let plain = format!("http://{}", d.tcp_addr().unwrap());
    if let Ok(c) = Client::connect(plain.parse().unwrap()).await {
        assert!(c.submit(noop()).await.is_err());
    }
    assert_nothing_happened(&local, 0).await;

    // The CA's client certificate is let in.
    let ok = tcp_client(&d, tls(&pki, Some("client")))
        .await
        .expect("mtls");
    assert_eq!(ok.submit(noop().wait(true)).await.unwrap().results.len(), 1);
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_wrong_token_is_unauthenticated() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "wqd-test-token-0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut cfg = tls_config(dir.path(), &pki);
    cfg.security.token_file = Some(token.clone());
    let d = Daemon::start(cfg).await.expect("start");
    let local = connect(&d).await;

    let none = tcp_client(&d, tls(&pki, None)).await.expect("tls connect");
    let m = expect_code(none.submit(noop().wait(true)).await, Code::Unauthenticated);
    assert!(m.contains("missing `authorization: Bearer <token>`"), "{m}");
    let wrong = none
        .clone()
        .with_token("wqd-test-token-0123456789abcdeF")
        .unwrap();
    let m = expect_code(wrong.submit(noop().wait(true)).await, Code::Unauthenticated);
    assert!(m.ends_with("wrong bearer token"), "{m}");
    assert!(
        !m.contains("wqd-test-token"),
        "the token is never echoed: {m}"
    );
    expect_code(
        wrong
            .create_workqueue(v1::WorkqueueAttrs {
                name: "x".into(),
                ..Default::default()
            })
            .await,
        Code::Unauthenticated,
    );
    assert_nothing_happened(&local, 0).await;

    let right = none.with_token("wqd-test-token-0123456789abcdef").unwrap();
    assert_eq!(
        right.submit(noop().wait(true)).await.unwrap().results.len(),
        1
    );
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_settings_that_would_weaken_the_policy_are_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let key = |cfg: Config| match cfg.validate() {
        Err(wqd::config::ConfigError::Invalid { key, .. }) => key,
        other => panic!("expected an invalid key, got {other:?}"),
    };
    // Plain TCP needs the explicit loopback opt-in.
    let mut cfg = config(dir.path());
    cfg.listen.tcp = Some("127.0.0.1:0".parse().unwrap());
    assert_eq!(key(cfg.clone()), "security.tcp_plaintext_loopback");
    let e = Daemon::start(cfg.clone()).await.unwrap_err();
    assert_eq!(e.exit_code(), 64);
    cfg.security.tcp_plaintext_loopback = true;
    assert!(cfg.validate().is_ok());
    // ... and never off loopback.
    cfg.listen.tcp = Some("0.0.0.0:0".parse().unwrap());
    cfg.listen.allow_remote = true;
    assert_eq!(key(cfg), "security.tcp_plaintext_loopback");
}

// ---------------------------------------------------------------------------------------------
// exec through the daemon.

fn exec_config(dir: &Path) -> (Config, PathBuf) {
    let out = dir.join("out");
    std::fs::create_dir(&out).unwrap();
    // The command runs as nobody when the daemon is root: it must be able to write here.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut cfg = config(dir);
    let mut exec = ExecConfig::default();
    let cmd = |path: &str, args: &[&str], patterns: Vec<String>| ExecCommand {
        path: path.into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        arg_patterns: patterns,
        ..Default::default()
    };
    exec.commands.insert(
        "touch".into(),
        cmd(
            "/usr/bin/touch",
            &["--"],
            vec![format!(
                "{}/ok-[a-z]{{1,16}}",
                regex::escape(out.to_str().unwrap())
            )],
        ),
    );
    exec.commands
        .insert("env".into(), cmd("/usr/bin/env", &[], vec![]));
    exec.commands
        .insert("id".into(), cmd("/usr/bin/id", &["-u"], vec![]));
    exec.commands.insert(
        "yes".into(),
        ExecCommand {
            max_output_bytes: 1000,
            ..cmd("/usr/bin/yes", &[], vec![])
        },
    );
    exec.commands.insert(
        "hang".into(),
        ExecCommand {
            timeout_ms: 300,
            ..cmd("/bin/sleep", &["30"], vec![])
        },
    );
    if is_root() {
        exec.run_as_user = Some("nobody".into());
    }
    cfg.exec = Some(exec);
    (cfg, out)
}

fn exec_item(cmd: &str) -> Item {
    Item::new("cache:0", "exec").arg("cmd", cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_refuses_what_is_not_allowlisted_and_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, out) = exec_config(dir.path());
    let d = Daemon::start(cfg).await.expect("start");
    let c = connect(&d).await;
    let evil = out.join("evil");
    let ok = out.join("ok-good");

    // Not on the list.
    let m = expect_code(
        c.submit(
            Batch::new()
                .item(exec_item("rm").arg("arg1", evil.to_str().unwrap()))
                .wait(true),
        )
        .await,
        Code::InvalidArgument,
    );
    assert!(
        m.contains("items[0].handler") || m.contains("items[0].args"),
        "{m}"
    );
    assert!(m.contains("unknown command \"rm\""), "{m}");
    // By path instead of name: still just a name that is not on the list.
    let m = expect_code(
        c.submit(Batch::new().item(exec_item("/usr/bin/touch")).wait(true))
            .await,
        Code::InvalidArgument,
    );
    assert!(m.contains("unknown command"), "{m}");
    // An argument outside its pattern, a shell-looking one, an extra one, an env override.
    for (k, v) in [
        ("arg1", evil.to_str().unwrap().to_string()),
        (
            "arg1",
            format!("{}; touch {}", ok.display(), evil.display()),
        ),
        ("arg1", format!("{}/ok-a/../evil", out.display())),
        ("arg2", ok.to_str().unwrap().to_string()),
        ("env", "PATH=/tmp".to_string()),
    ] {
        let m = expect_code(
            c.submit(
                Batch::new()
                    .item(exec_item("touch").arg(k, v.clone()))
                    .wait(true),
            )
            .await,
            Code::InvalidArgument,
        );
        assert!(
            m.starts_with("items[0].args/payload: invalid argument: exec:"),
            "{k}={v}: {m}"
        );
    }
    // One bad item refuses the whole batch: the good one does not run either.
    let m = expect_code(
        c.submit(
            Batch::new()
                .item(exec_item("touch").arg("arg1", ok.to_str().unwrap()))
                .item(exec_item("touch").arg("arg1", evil.to_str().unwrap()))
                .wait(true),
        )
        .await,
        Code::InvalidArgument,
    );
    assert!(m.contains("items[1]") && m.contains("must match"), "{m}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!evil.exists() && !ok.exists(), "nothing ran");
    assert_nothing_happened(&c, 8).await;

    // The allowlisted form runs.
    let r = c
        .submit(
            Batch::new()
                .item(exec_item("touch").arg("arg1", ok.to_str().unwrap()))
                .wait(true),
        )
        .await
        .unwrap();
    assert_eq!(
        r.results[0].state,
        v1::ItemState::Ok as i32,
        "{:?}",
        r.results[0]
    );
    assert!(ok.exists());
    if is_root() {
        assert_eq!(
            std::fs::metadata(&ok).unwrap().uid(),
            NOBODY,
            "ran as run_as_user"
        );
    }
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_with_no_environment_as_its_user_bounded_and_timed() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, _) = exec_config(dir.path());
    let d = Daemon::start(cfg).await.expect("start");
    let c = connect(&d).await;
    let r = c
        .submit(
            Batch::new()
                .items([
                    exec_item("env"),
                    exec_item("id"),
                    exec_item("yes"),
                    exec_item("hang"),
                ])
                .wait(true),
        )
        .await
        .unwrap();
    let res = &r.results;
    assert_eq!(res[0].state, v1::ItemState::Ok as i32, "{:?}", res[0]);
    assert!(
        res[0].output.is_empty(),
        "cleared environment: {:?}",
        String::from_utf8_lossy(&res[0].output)
    );
    let uid = if is_root() {
        NOBODY
    } else {
        nix::unistd::geteuid().as_raw()
    };
    assert_eq!(res[1].output, format!("{uid}\n").into_bytes());
    assert_eq!(res[2].state, v1::ItemState::Failed as i32);
    assert_eq!(res[2].error, "stdout exceeded 1000 bytes");
    assert!(
        res[3].error.starts_with("timed out after 300ms"),
        "{:?}",
        res[3]
    );
    d.shutdown().await;
}

#[test]
fn exec_as_root_without_a_user_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cfg, _) = exec_config(dir.path());
    cfg.exec.as_mut().unwrap().run_as_user = Some("root".into());
    // Who "root" is and who the daemon runs as are looked up at start, not by the pure
    // `Config::validate`.
    assert!(cfg.validate().is_ok());
    let resolve =
        |cfg: &Config| Security::resolve(&cfg.security, cfg.listen.tcp, cfg.exec.as_ref());
    match resolve(&cfg) {
        Err(SecurityError::Invalid { key, problem }) => {
            assert_eq!(key, "exec.run_as_user");
            assert!(problem.contains("security.exec_as_root"), "{problem}");
        }
        other => panic!("expected exec.run_as_user, got {other:?}"),
    }
    cfg.security.exec_as_root = true;
    assert!(resolve(&cfg).is_ok());
}

#[test]
fn the_binary_exits_64_naming_the_key_for_plaintext_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wqd"))
        .arg("--socket")
        .arg(dir.path().join("wqd.sock"))
        .args(["--tcp-listen", "127.0.0.1:0", "--no-netlink"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config key security.tcp_plaintext_loopback"),
        "{err}"
    );
    assert!(!dir.path().join("wqd.sock").exists());
}
