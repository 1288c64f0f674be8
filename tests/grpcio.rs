//! Stock gRPC clients on the daemon's Unix socket with their default options (issue #11 part
//! 4). grpcio 1.57 and later send the socket path as the HTTP/2 `:authority`, which hyper's h2
//! refuses (RST_STREAM PROTOCOL_ERROR, `INTERNAL: Stream removed` in Python); the daemon
//! rewrites such values below hyper on the Unix listener (`wqd::authority`).
//!
//! * Real grpcio 1.85.3 from PyPI (the venv of `wqd_e2e::python`), `grpc.insecure_channel`
//!   with no options: health checks and GetTopology, 50 calls per channel on three channels
//!   (which share one connection), so later calls reach the authority through the HPACK
//!   dynamic table; two such processes; and the same script
//!   failing with `listen.rewrite_authority = false`, which is what every stock grpcio client
//!   saw before.
//! * A hand-framed HTTP/2 client sending the bytes of the other clients we know do this,
//!   which are not installed here: grpc-java (the raw path, `/tmp/.../s.sock`) and grpc-swift
//!   v2 (`%2Ftmp%2F...`), each as a raw and a Huffman literal with incremental indexing on the
//!   first request and an indexed reference on the next ones. (`@grpc/grpc-js` sends
//!   `localhost` on `unix:` targets, as grpcurl and Go do: nothing to rewrite.)
//!
//! The metrics endpoint shows `wqd_connections_authority_rewritten_total` counting the literals.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use wqd_e2e::{metric, python, Daemon};

const SCRIPT: &str = r#"
import sys
import grpc

sock, channels, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ident = lambda b: b
done = 0
for _ in range(channels):
    # Stock defaults: no options, so grpcio sends the socket path as :authority.
    ch = grpc.insecure_channel("unix:" + sock)
    health = ch.unary_unary("/grpc.health.v1.Health/Check",
                            request_serializer=ident, response_deserializer=ident)
    topology = ch.unary_unary("/wqd.v1.TopologyService/GetTopology",
                              request_serializer=ident, response_deserializer=ident)
    for _ in range(calls):
        try:
            # HealthCheckRequest{service: ""} is empty; SERVING is field 1 = 1.
            r = health(b"", timeout=10)
            assert r == b"\x08\x01", r
            t = topology(b"", timeout=10)
            assert len(t) > 20, t
        except grpc.RpcError as e:
            print("rpc failed:", e.code().name, e.details())
            sys.exit(3)
        done += 1
    ch.close()
print("grpcio", grpc.__version__, "calls", done)
"#;

/// Runs [`SCRIPT`] against `sock`; its exit status and output.
fn grpcio(dir: &Path, sock: &Path, channels: u32, calls: u32) -> (bool, String) {
    let py = python::python().unwrap_or_else(|e| panic!("the Python venv: {e}"));
    let script = dir.join("client.py");
    std::fs::write(&script, SCRIPT).unwrap();
    let out = Command::new(py)
        .arg(&script)
        .arg(sock)
        .arg(channels.to_string())
        .arg(calls.to_string())
        .output()
        .expect("run python");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `wqd_connections_authority_rewritten_total{listener="unix"}` now.
fn rewritten(d: &Daemon) -> f64 {
    let series = "wqd_connections_authority_rewritten_total{listener=\"unix\"}";
    let text = d.scrape_metrics();
    metric(&text, series).unwrap_or_else(|| panic!("no {series} in {text}"))
}

#[test]
fn stock_grpcio_works_with_its_defaults() {
    let d = Daemon::builder("two-socket")
        .arg("--metrics-listen")
        .arg("127.0.0.1:0")
        .start();
    // Two processes, so two connections; in each, three channels to the same target share one
    // connection (grpcio's global subchannel pool) and 150 calls one HPACK context.
    for run in 1..=2 {
        let (ok, out) = grpcio(d.dir(), d.socket(), 3, 50);
        assert!(ok, "stock grpcio failed:\n{out}\ndaemon:\n{}", d.stderr());
        assert!(out.contains("grpcio 1.85.3 calls 150"), "{out}");
        // grpcio sends the literal with incremental indexing once per connection; the other
        // calls refer to the table entry, which holds the rewritten value.
        let n = rewritten(&d);
        assert!(n >= f64::from(run), "rewritten {n} after {run} runs");
    }
}

#[test]
fn without_the_rewrite_stock_grpcio_fails() {
    let d = Daemon::builder("two-socket")
        .config("[listen]\nrewrite_authority = false\n")
        .start();
    let (ok, out) = grpcio(d.dir(), d.socket(), 1, 1);
    assert!(!ok, "grpcio succeeded without the rewrite:\n{out}");
    assert!(out.contains("rpc failed: INTERNAL"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// grpc-java and grpc-swift, by their bytes

/// The `:authority` literal as a client encodes it.
#[derive(Debug, Clone, Copy)]
enum Form {
    Raw,
    Huffman,
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK string literal (length < 127).
fn string(s: &[u8], form: Form) -> Vec<u8> {
    let coded = match form {
        Form::Raw => s.to_vec(),
        Form::Huffman => {
            let mut v = Vec::new();
            httlib_huffman::encode(s, &mut v).unwrap();
            v
        }
    };
    assert!(coded.len() < 127);
    let h = if matches!(form, Form::Huffman) {
        0x80
    } else {
        0
    };
    let mut out = vec![h | coded.len() as u8];
    out.extend(coded);
    out
}

/// One GetTopology request's header block. The first one adds `:authority` to the dynamic
/// table (literal with incremental indexing, name = static index 1); later ones refer to it
/// (index 62, the newest entry: nothing else is indexed).
fn request_block(authority: &[u8], form: Form, first: bool) -> Vec<u8> {
    let mut b = vec![0x83, 0x86]; // :method POST, :scheme http
    b.push(0x04); // :path, without indexing
    b.extend(string(b"/wqd.v1.TopologyService/GetTopology", Form::Raw));
    if first {
        b.push(0x41);
        b.extend(string(authority, form));
    } else {
        b.push(0x80 | 62);
    }
    b.extend([0x0f, 0x10]); // content-type (static 31), without indexing
    b.extend(string(b"application/grpc", Form::Raw));
    b.push(0x00); // te: trailers, new name, without indexing
    b.extend(string(b"te", Form::Raw));
    b.extend(string(b"trailers", Form::Raw));
    b
}

/// What came back on one stream.
#[derive(Debug, Default)]
struct Answer {
    grpc_status: Option<String>,
    body: usize,
    reset: Option<u32>,
    ended: bool,
}

/// `calls` GetTopology calls on one connection with `authority` as `form`; each stream's answer.
fn h2_calls(sock: &Path, authority: &[u8], form: Form, calls: u32) -> Vec<Answer> {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    for k in 0..calls {
        let id = 1 + 2 * k;
        out.extend(frame(0x1, 0x4, id, &request_block(authority, form, k == 0)));
        out.extend(frame(0x0, 0x1, id, &[0, 0, 0, 0, 0]));
    }
    s.write_all(&out).unwrap();

    let mut answers: Vec<Answer> = (0..calls).map(|_| Answer::default()).collect();
    let mut dec = loona_hpack::Decoder::new();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    while !answers.iter().all(|a| a.ended) {
        while buf.len() >= 9 {
            let len =
                (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let id = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            let p = buf[9..9 + len].to_vec();
            buf.drain(..9 + len);
            let a = (id % 2 == 1).then(|| &mut answers[(id as usize - 1) / 2]);
            match (kind, a) {
                (0x4, _) if flags & 1 == 0 => s.write_all(&frame(0x4, 1, 0, &[])).unwrap(),
                (0x6, _) if flags & 1 == 0 => s.write_all(&frame(0x6, 1, 0, &p)).unwrap(),
                (0x7, _) => panic!("GOAWAY: {p:?}"),
                (0x1, Some(a)) => {
                    assert_eq!(flags & 0x4, 0x4, "no CONTINUATION expected");
                    for (n, v) in dec.decode(&p).expect("the daemon's HPACK decodes") {
                        if n == b"grpc-status" {
                            a.grpc_status = Some(String::from_utf8(v).unwrap());
                        }
                    }
                    a.ended |= flags & 1 == 1;
                }
                (0x0, Some(a)) => {
                    a.body += p.len();
                    a.ended |= flags & 1 == 1;
                }
                (0x3, Some(a)) => {
                    a.reset = Some(u32::from_be_bytes([p[0], p[1], p[2], p[3]]));
                    a.ended = true;
                }
                _ => {}
            }
        }
        if answers.iter().all(|a| a.ended) {
            break;
        }
        let n = s.read(&mut chunk).expect("the daemon answers within 10 s");
        assert!(n > 0, "the daemon closed the connection: {answers:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
    answers
}

#[test]
fn grpc_java_and_grpc_swift_authorities_work() {
    let d = Daemon::builder("two-socket")
        .arg("--metrics-listen")
        .arg("127.0.0.1:0")
        .start();
    let path = d.socket().to_str().unwrap().to_string();
    // grpc-java: the raw path; grpc-swift v2: `/` percent-encoded.
    let swift = path.replace('/', "%2F");
    let mut literals = 0.0;
    for authority in [&path, &swift] {
        for form in [Form::Raw, Form::Huffman] {
            let answers = h2_calls(d.socket(), authority.as_bytes(), form, 5);
            for (k, a) in answers.iter().enumerate() {
                assert_eq!(a.reset, None, "{authority} {form:?} call {k}: reset");
                assert_eq!(
                    a.grpc_status.as_deref(),
                    Some("0"),
                    "{authority} {form:?} {k}: {a:?}"
                );
                assert!(a.body > 20, "{authority} {form:?} call {k}: {a:?}");
            }
            literals += 1.0;
        }
    }
    // One literal per connection; the indexed references are not rewritten again.
    assert_eq!(rewritten(&d), literals);
}

#[test]
fn without_the_rewrite_h2_resets_path_authorities() {
    let d = Daemon::builder("two-socket")
        .config("[listen]\nrewrite_authority = false\n")
        .start();
    let path = d.socket().to_str().unwrap().to_string();
    let answers = h2_calls(d.socket(), path.as_bytes(), Form::Raw, 2);
    for a in &answers {
        // RST_STREAM PROTOCOL_ERROR (1).
        assert_eq!(a.reset, Some(1), "{a:?}");
    }
    // A valid authority is served either way.
    let answers = h2_calls(d.socket(), b"localhost", Form::Raw, 2);
    assert!(
        answers
            .iter()
            .all(|a| a.grpc_status.as_deref() == Some("0")),
        "{answers:?}"
    );
}
