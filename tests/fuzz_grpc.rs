//! A protocol-level fuzz test of the whole gRPC surface against the real daemon, over raw
//! HTTP/2 (the `h2` crate on the Unix socket, so the test owns every frame and reset): valid
//! `wqd.v1` messages built with the generated types are mutated (bit flips, truncation,
//! garbage, wrong wire types, bad UTF-8, huge varints and length prefixes), durations are set to
//! extremes, strings made enormous, gRPC frame headers claim gigabytes, requests claim millions
//! of items, sessions carry good and mutated requests, and streams (SubmitStream, Flush,
//! Submit with wait, WatchTopology) are reset with
//! CANCEL / NO_ERROR / PROTOCOL_ERROR, cut by dropping the connection, or ended by a GOAWAY.
//!
//! The invariant, checked after every case: the daemon answers a normal client within 2 s; a
//! fuzzed call never ends INTERNAL, UNKNOWN or OUT_OF_RANGE (malformed input is
//! INVALID_ARGUMENT, oversize is RESOURCE_EXHAUSTED or INVALID_ARGUMENT naming a `limits.` key)
//! and its status message is under 1 KiB; the daemon's accepted batches and items (GetStats)
//! equal exactly what the fuzzer was told was accepted, so a SubmitStream that was reset, cut
//! or ended without its `commit = true` message queued nothing; no flush wait is left
//! registered; and the daemon's peak RSS stays within its baseline + 256 MiB. At the end every
//! accepted item is terminal. Violations are collected, not fatal one by one, so one run lists
//! every broken rule; the run panics at the end if there was any (a dead or silent daemon
//! stops it at once).
//!
//! The daemon runs on the `two-socket` fixture with its default limits (64 MiB messages,
//! 4 194 304 items per batch, 1 MiB payloads). Statuses the contract fixes per case: a message
//! prost cannot decode is INVALID_ARGUMENT; a delay or deadline that is negative, has nanos
//! outside 0..1e9, or lies beyond `google.protobuf.Duration`'s ±315 576 000 000 s is
//! INVALID_ARGUMENT naming `items[i].delay` / `items[i].deadline` with nothing queued; a
//! committed SubmitStream is OK, one without commit or with a message after it is
//! INVALID_ARGUMENT; a Submit(wait) whose client leaves is accepted whole or not at all.
//!
//! Reproduce with the seed the run prints: `WQD_FUZZ_SEED=<seed>`. Run longer with
//! `WQD_FUZZ_CASES=<n>` (random cases after the seven fixed oversize ones; default 800 within
//! 40 s, or no time limit but an hour when the count is given) or `WQD_FUZZ_SECS=<s>`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use h2::client::{ResponseFuture, SendRequest};
use h2::{Reason, SendStream};
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tonic::codegen::http;
use tonic::Code;
use wqd_client::proto::{self as v1, flush_request, flush_response};
use wqd_client::{Batch, Client, FlushScope, Item};
use wqd_e2e::{total, Daemon};

/// The daemon's peak RSS may grow at most this much over its baseline during one case.
const RSS_BOUND: u64 = 256 << 20;
/// A status message must be shorter than this.
const MAX_MESSAGE: usize = 1024;
/// How long a normal GetStats may take after a case.
const PROMPT: Duration = Duration::from_secs(2);
/// How long a fuzzed call may take to end (the daemon answers or resets).
const CALL_LIMIT: Duration = Duration::from_secs(15);
/// The daemon's defaults (docs/daemon.md), which this test runs with.
const MAX_BATCH_ITEMS: usize = 4_194_304;
const MAX_MESSAGE_BYTES: u64 = 64 << 20;
/// The largest `google.protobuf.Duration` (±10 000 years, as `duration.proto` defines it).
const MAX_PROTO_SECONDS: i64 = 315_576_000_000;

const SUBMIT: &str = "/wqd.v1.DispatchService/Submit";
const SESSION: &str = "/wqd.v1.DispatchService/Session";
const SUBMIT_STREAM: &str = "/wqd.v1.DispatchService/SubmitStream";
const FLUSH: &str = "/wqd.v1.DispatchService/Flush";
const CANCEL: &str = "/wqd.v1.DispatchService/Cancel";
const DRAIN: &str = "/wqd.v1.DispatchService/Drain";
const GET_RESULTS: &str = "/wqd.v1.DispatchService/GetResults";
const CREATE_WQ: &str = "/wqd.v1.WorkqueueService/CreateWorkqueue";
const LIST_WQ: &str = "/wqd.v1.WorkqueueService/ListWorkqueues";
const UPDATE_WQ: &str = "/wqd.v1.WorkqueueService/UpdateWorkqueue";
const DELETE_WQ: &str = "/wqd.v1.WorkqueueService/DeleteWorkqueue";
const GET_TOPOLOGY: &str = "/wqd.v1.TopologyService/GetTopology";
const WATCH: &str = "/wqd.v1.TopologyService/WatchTopology";
const GET_STATS: &str = "/wqd.v1.StatsService/GetStats";

/// A workqueue of the fuzzer's own that batches are submitted to besides `default`.
const OWN_WQ: &str = "fz-own";
/// The workqueue mutated UpdateWorkqueue and Drain requests aim at; nothing is submitted to
/// it, so an update (fallback `wait`, `max_queued` 1) cannot starve the other cases.
const UPD_WQ: &str = "fz-upd";
/// The workqueue of the duration cases, so an item a bug leaves pending forever (a huge delay)
/// stalls only flushes of this workqueue.
const DUR_WQ: &str = "fz-dur";

/// The codes for a gRPC message whose compressed flag is `flag` (not 0) on a call without
/// `grpc-encoding`: INVALID_ARGUMENT, except that the gRPC compression spec requires
/// INTERNAL for flag 1 ("MUST fail with INTERNAL status"), so both are accepted there.
fn compressed_flag_codes(flag: u8) -> &'static [Code] {
    if flag == 1 {
        &[Code::InvalidArgument, Code::Internal]
    } else {
        &[Code::InvalidArgument]
    }
}

/// Codes a fuzzed call may end with (`docs/status-codes.md`); never INTERNAL, UNKNOWN or
/// OUT_OF_RANGE.
const DOCUMENTED: &[Code] = &[
    Code::Ok,
    Code::InvalidArgument,
    Code::NotFound,
    Code::AlreadyExists,
    Code::FailedPrecondition,
    Code::ResourceExhausted,
    Code::DeadlineExceeded,
];

// ---------------------------------------------------------------------------------------------
// Raw gRPC over h2

/// One HTTP/2 connection to the daemon; dropping the driver task drops the socket.
struct Conn {
    send: SendRequest<Bytes>,
    driver: tokio::task::JoinHandle<()>,
}

impl Conn {
    async fn open(sock: &Path) -> Conn {
        let io = UnixStream::connect(sock)
            .await
            .expect("connect to the daemon socket");
        let (send, conn) = h2::client::Builder::new()
            .max_header_list_size(16 << 20)
            .handshake::<_, Bytes>(io)
            .await
            .expect("HTTP/2 handshake with the daemon");
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Conn { send, driver }
    }

    /// Starts a gRPC call on `path` (request headers only).
    async fn call(
        &mut self,
        path: &str,
        timeout: Option<&str>,
    ) -> Result<(ResponseFuture, SendStream<Bytes>), h2::Error> {
        let mut req = http::Request::builder()
            .method("POST")
            .uri(format!("http://localhost{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(t) = timeout {
            req = req.header("grpc-timeout", t);
        }
        let mut send = self.send.clone().ready().await?;
        send.send_request(req.body(()).expect("request"), false)
    }

    /// Drops the TCP-like connection under every stream at once.
    fn cut(self) {
        self.driver.abort();
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// How a call ended, as the client saw it.
#[derive(Debug)]
enum End {
    /// A gRPC status (and the response messages before it).
    Status {
        code: Code,
        message: String,
        messages: Vec<Bytes>,
    },
    /// The stream or connection broke without a status.
    Broken(String),
    /// No end within the limit.
    TimedOut,
}

impl End {
    fn code(&self) -> Option<Code> {
        match self {
            End::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
    fn messages(&self) -> &[Bytes] {
        match self {
            End::Status { messages, .. } => messages,
            _ => &[],
        }
    }
}

/// `msg` as one gRPC message frame (uncompressed).
fn frame(msg: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(5 + msg.len());
    v.push(0);
    v.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

/// Splits a response body into its gRPC messages (a malformed tail is returned as one more).
fn unframe(mut b: Bytes) -> Vec<Bytes> {
    let mut out = Vec::new();
    while b.len() >= 5 {
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        if b.len() < 5 + len {
            break;
        }
        let _ = b.split_to(5);
        out.push(b.split_to(len));
    }
    if !b.is_empty() {
        out.push(b);
    }
    out
}

fn percent_decode(s: &[u8]) -> String {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            if let Ok(v) = u8::from_str_radix(&String::from_utf8_lossy(&s[i + 1..i + 3]), 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(h: &http::HeaderMap) -> Option<(Code, String)> {
    let code = h.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    let message = h
        .get("grpc-message")
        .map(|m| percent_decode(m.as_bytes()))
        .unwrap_or_default();
    Some((Code::from(code), message))
}

fn broken(e: h2::Error) -> End {
    End::Broken(match e.reason() {
        Some(r) if e.is_go_away() => format!("GOAWAY {r:?}"),
        Some(r) => format!("RST_STREAM {r:?}"),
        None => e.to_string(),
    })
}

async fn read_response(resp: ResponseFuture) -> End {
    let resp = match resp.await {
        Ok(r) => r,
        Err(e) => return broken(e),
    };
    if let Some((code, message)) = status_of(resp.headers()) {
        return End::Status {
            code,
            message,
            messages: Vec::new(),
        };
    }
    let mut body = resp.into_body();
    let mut data = BytesMut::new();
    while let Some(chunk) = body.data().await {
        match chunk {
            Ok(b) => {
                let _ = body.flow_control().release_capacity(b.len());
                data.extend_from_slice(&b);
            }
            Err(e) => return broken(e),
        }
    }
    match body.trailers().await {
        Ok(Some(t)) => match status_of(&t) {
            Some((code, message)) => End::Status {
                code,
                message,
                messages: unframe(data.freeze()),
            },
            None => End::Broken("trailers without grpc-status".into()),
        },
        Ok(None) => End::Broken("a response without trailers".into()),
        Err(e) => broken(e),
    }
}

async fn finish(resp: ResponseFuture, limit: Duration) -> End {
    tokio::time::timeout(limit, read_response(resp))
        .await
        .unwrap_or(End::TimedOut)
}

/// One whole call: `body` (already framed, possibly malformed) as the request, half-close,
/// read the answer.
async fn unary(sock: &Path, path: &str, body: Vec<u8>, timeout: Option<&str>) -> End {
    let mut c = Conn::open(sock).await;
    let (resp, mut tx) = match c.call(path, timeout).await {
        Ok(x) => x,
        Err(e) => return broken(e),
    };
    if let Err(e) = tx.send_data(Bytes::from(body), true) {
        return broken(e);
    }
    let end = finish(resp, CALL_LIMIT * 4).await;
    drop(tx);
    end
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP/2 frames, for what h2's client cannot send (GOAWAY, bad frames)

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn h2_frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + payload.len());
    let len = payload.len() as u32;
    v.extend_from_slice(&len.to_be_bytes()[1..]);
    v.push(ty);
    v.push(flags);
    v.extend_from_slice(&stream.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// A HEADERS block of literal fields without indexing (HPACK, no Huffman).
fn h2_headers(path: &str) -> Vec<u8> {
    let mut block = Vec::new();
    for (n, v) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        assert!(n.len() < 127 && v.len() < 127);
        block.push(0);
        block.push(n.len() as u8);
        block.extend_from_slice(n.as_bytes());
        block.push(v.len() as u8);
        block.extend_from_slice(v.as_bytes());
    }
    h2_frame(0x1, 0x4, 1, &block)
}

fn h2_goaway(reason: u32) -> Vec<u8> {
    let mut p = 0u32.to_be_bytes().to_vec();
    p.extend_from_slice(&reason.to_be_bytes());
    h2_frame(0x7, 0, 0, &p)
}

/// Writes `bytes` on a fresh connection, drains what the daemon answers for `linger`, then
/// closes. Returns how many bytes the daemon sent.
async fn raw_session(sock: &Path, bytes: &[u8], linger: Duration) -> usize {
    let s = UnixStream::connect(sock).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0;
        while let Ok(k) = rd.read(&mut buf).await {
            if k == 0 {
                break;
            }
            n += k;
        }
        n
    });
    let _ = wr.write_all(PREFACE).await;
    let _ = wr.write_all(&h2_frame(0x4, 0, 0, &[])).await;
    let _ = wr.write_all(bytes).await;
    tokio::time::sleep(linger).await;
    let _ = wr.shutdown().await;
    drop(wr);
    match tokio::time::timeout(Duration::from_secs(2), reader).await {
        Ok(Ok(n)) => n,
        _ => 0,
    }
}

// ---------------------------------------------------------------------------------------------
// Messages and mutations

const TARGETS: &[&str] = &[
    "cpu:0",
    "cpu:3",
    "cpu:13",
    "cpu:14",
    "core:2",
    "shard:1",
    "cache:1",
    "node:0",
    "node:1",
    "package:1",
    "all",
    "cpus:0-3,8",
];

fn good_item(rng: &mut StdRng) -> v1::WorkItem {
    let mut it = v1::WorkItem {
        target: TARGETS[rng.gen_range(0..TARGETS.len())].to_string(),
        handler: "noop".into(),
        ..Default::default()
    };
    match rng.gen_range(0..10) {
        0 | 1 => {
            it.handler = "digest".into();
            it.payload = (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect();
        }
        2 => {
            it.args.insert("fail".into(), "fuzz says no".into());
        }
        _ => {}
    }
    if rng.gen_bool(0.2) {
        it.key = format!("k{}", rng.gen_range(0..8));
    }
    if rng.gen_bool(0.2) {
        it.delay = Some(prost_types::Duration {
            seconds: 0,
            nanos: rng.gen_range(0..20_000_000),
        });
    }
    if rng.gen_bool(0.2) {
        it.deadline = Some(prost_types::Duration {
            seconds: rng.gen_range(1..30),
            nanos: rng.gen_range(0..1_000_000_000),
        });
    }
    it
}

fn good_items(rng: &mut StdRng, max: usize) -> Vec<v1::WorkItem> {
    (0..rng.gen_range(1..=max))
        .map(|_| good_item(rng))
        .collect()
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Byte strings that break the protobuf wire format in one specific way.
fn poison(rng: &mut StdRng) -> (Vec<u8>, &'static str) {
    let mut v = Vec::new();
    let field = rng.gen_range(1..8u64);
    let name = match rng.gen_range(0..9) {
        0 => {
            // An 11-byte varint (over the 10-byte maximum).
            varint(field << 3, &mut v);
            v.extend_from_slice(&[0xff; 10]);
            v.push(0x01);
            "a varint over ten bytes"
        }
        1 => {
            // A length prefix claiming far more than follows.
            varint((field << 3) | 2, &mut v);
            varint(rng.gen_range(1 << 30..u64::MAX >> 1), &mut v);
            v.extend_from_slice(b"short");
            "a length prefix claiming gigabytes"
        }
        2 => {
            varint(field << 3 | 7, &mut v);
            v.push(0);
            "wire type 7"
        }
        3 => {
            varint(field << 3 | 6, &mut v);
            v.push(0);
            "wire type 6"
        }
        4 => {
            // A group start that never ends.
            varint(field << 3 | 3, &mut v);
            "an unterminated group"
        }
        5 => {
            v.push(0x00);
            v.push(0x01);
            "field number 0"
        }
        6 => {
            // A string/bytes field sent as a 64-bit fixed.
            varint(field << 3 | 1, &mut v);
            v.extend_from_slice(&[1, 2, 3]);
            "a truncated fixed64"
        }
        7 => {
            // A length-delimited field whose length varint is cut.
            varint(field << 3 | 2, &mut v);
            v.push(0x80);
            "a cut length varint"
        }
        _ => {
            // A varint field (a string field number) where a string is expected.
            varint(1 << 3 | 5, &mut v);
            v.extend_from_slice(&[1]);
            "a truncated fixed32"
        }
    };
    (v, name)
}

/// One to three random mutations of `b`.
fn mutate(rng: &mut StdRng, b: &mut Vec<u8>) {
    for _ in 0..rng.gen_range(1..=3) {
        let n = b.len();
        match rng.gen_range(0..8) {
            0 if n > 0 => {
                let i = rng.gen_range(0..n);
                b[i] ^= 1 << rng.gen_range(0..8);
            }
            1 if n > 0 => {
                let i = rng.gen_range(0..n);
                b[i] = rng.gen();
            }
            2 if n > 0 => b.truncate(rng.gen_range(0..n)),
            3 if n > 1 => {
                let i = rng.gen_range(0..n);
                let j = rng.gen_range(i..n.min(i + 16) + 1).min(n);
                b.drain(i..j);
            }
            4 => {
                let i = rng.gen_range(0..=n);
                let g: Vec<u8> = (0..rng.gen_range(1..16)).map(|_| rng.gen()).collect();
                b.splice(i..i, g);
            }
            5 if n > 1 => {
                let i = rng.gen_range(0..n);
                let j = rng.gen_range(i..n) + 1;
                let part = b[i..j].to_vec();
                b.splice(j..j, part);
            }
            6 => {
                let i = rng.gen_range(0..=n);
                let (p, _) = poison(rng);
                b.splice(i..i, p);
            }
            _ if n > 0 => {
                // A length byte claiming the maximum one byte can.
                let i = rng.gen_range(0..n);
                b[i] = 0x7f;
            }
            _ => b.push(rng.gen()),
        }
    }
}

fn stream_msg(options: Option<&str>, items: Vec<v1::WorkItem>, commit: bool) -> Vec<u8> {
    v1::SubmitStreamRequest {
        options: options.map(|w| v1::SubmitOptions {
            workqueue: w.to_string(),
        }),
        items,
        commit,
    }
    .encode_to_vec()
}

fn random_reason(rng: &mut StdRng) -> Reason {
    [Reason::CANCEL, Reason::NO_ERROR, Reason::PROTOCOL_ERROR][rng.gen_range(0..3)]
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Resets the process's peak RSS to its current RSS (`clear_refs` 5), so the next read of
/// VmHWM is the peak of one case.
fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

fn short(s: &str) -> String {
    if s.len() <= 160 {
        s.to_string()
    } else {
        let mut end = 160;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}… ({} bytes)", &s[..end], s.len())
    }
}

fn env_num(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

// ---------------------------------------------------------------------------------------------
// The fuzzer

struct Violation {
    case: usize,
    kind: &'static str,
    rule: &'static str,
    what: String,
}

struct Fuzz {
    sock: PathBuf,
    pid: u32,
    client: Client,
    rng: StdRng,
    seed: u64,
    /// Batches and queued items the daemon told this client it accepted.
    batches: u64,
    items: u64,
    /// Recent accepted batches and item ids (for flush, cancel and look-up cases).
    batch_ids: Vec<u64>,
    item_ids: Vec<u64>,
    /// Accepted batches whose items may wait long (a big delay); cancelled after the case.
    long: Vec<u64>,
    rss_base: u64,
    /// The peak RSS over which a case is a violation: baseline + bound, raised to the RSS
    /// left after a violating case + bound, so retained memory is reported once.
    rss_limit: u64,
    peak_resets: bool,
    /// What the current case did, for violation messages (reset reason, how it ended).
    note: String,
    counts: BTreeMap<&'static str, u64>,
    violations: Vec<Violation>,
    case: usize,
    kind: &'static str,
}

impl Fuzz {
    /// Records a broken `rule`; `what` says how, with what this case did.
    fn violation(&mut self, rule: &'static str, what: String) {
        let what = if self.note.is_empty() {
            what
        } else {
            format!("{what} [{}]", self.note)
        };
        eprintln!("fuzz: case {} ({}): {rule}: {what}", self.case, self.kind);
        self.violations.push(Violation {
            case: self.case,
            kind: self.kind,
            rule,
            what,
        });
    }

    /// Checks the status rules every fuzzed call obeys, then that the code is one of
    /// `allowed` (empty: any documented code; an undocumented code is accepted only when
    /// `allowed` names it) and, unless OK, that the message names every one of `needles`.
    /// Returns the code.
    fn judge(&mut self, what: &str, end: &End, allowed: &[Code], needles: &[&str]) -> Option<Code> {
        let (code, message) = match end {
            End::Status { code, message, .. } => (*code, message.as_str()),
            End::Broken(why) => {
                self.violation(
                    "no status",
                    format!("{what}: no status, the call broke: {why}"),
                );
                return None;
            }
            End::TimedOut => {
                self.violation(
                    "no status",
                    format!("{what}: no status within {:?}", CALL_LIMIT * 4),
                );
                return None;
            }
        };
        if !DOCUMENTED.contains(&code) && !allowed.contains(&code) {
            self.violation(
                "status code",
                format!(
                    "{what}: status {code:?} (never INTERNAL/UNKNOWN/undocumented): {}",
                    short(message)
                ),
            );
        } else if !allowed.is_empty() && !allowed.contains(&code) {
            self.violation(
                "status code",
                format!(
                    "{what}: status {code:?}, expected one of {allowed:?}: {}",
                    short(message)
                ),
            );
        }
        if message.len() >= MAX_MESSAGE {
            self.violation(
                "message size",
                format!(
                    "{what}: a {} byte status message (must be under {MAX_MESSAGE}): {}",
                    message.len(),
                    short(message)
                ),
            );
        }
        if code == Code::ResourceExhausted
            && !message.contains("limits.")
            && !message.contains("max_queued")
        {
            self.violation(
                "limit named",
                format!(
                    "{what}: RESOURCE_EXHAUSTED names no limit: {}",
                    short(message)
                ),
            );
        }
        if code != Code::Ok {
            for n in needles {
                if !message.contains(n) {
                    self.violation(
                        "message names the field or limit",
                        format!(
                            "{what}: the {code:?} message should name {n:?}: {}",
                            short(message)
                        ),
                    );
                }
            }
        }
        Some(code)
    }

    /// Records what an OK Submit / SubmitStream answer says was accepted. `long` marks a batch
    /// to cancel after the case (items with long delays).
    fn account(&mut self, path: &str, end: &End, long: bool) {
        if end.code() != Some(Code::Ok) {
            return;
        }
        let Some(msg) = end.messages().first().cloned() else {
            self.violation(
                "behaviour",
                format!("{path}: OK without a response message"),
            );
            return;
        };
        match path {
            SUBMIT => match v1::SubmitResponse::decode(msg) {
                Ok(r) => self.accepted(&r, long),
                Err(e) => self.violation("behaviour", format!("Submit: undecodable response: {e}")),
            },
            SUBMIT_STREAM => match v1::SubmitStreamResponse::decode(msg) {
                Ok(r) => {
                    self.batches += 1;
                    self.items += r.queued_count;
                    let ids = shape_ids(r.first_item_id, r.item_count, &r.duplicates);
                    self.remember(r.batch_id, ids, long);
                }
                Err(e) => self.violation(
                    "behaviour",
                    format!("SubmitStream: undecodable response: {e}"),
                ),
            },
            _ => {}
        }
    }

    /// Counts a batch a `SubmitResponse` says was accepted: by its receipts, or by its shape
    /// when it was asked for none; with receipts, the shape must say the same.
    fn accepted(&mut self, r: &v1::SubmitResponse, long: bool) {
        self.batches += 1;
        let shape = shape_ids(r.first_item_id, r.item_count, &r.duplicates);
        let ids: Vec<u64> = match r.items.is_empty() {
            true => shape,
            false => {
                let ids: Vec<u64> = r
                    .items
                    .iter()
                    .filter(|x| x.queued)
                    .map(|x| x.item_id)
                    .collect();
                let n = r.items.len() as u64;
                if (r.item_count, r.queued_count) != (n, ids.len() as u64) {
                    self.violation(
                        "behaviour",
                        format!(
                            "Submit: {n} receipts, {} queued, but the shape says {} / {}",
                            ids.len(),
                            r.item_count,
                            r.queued_count
                        ),
                    );
                }
                ids
            }
        };
        self.items += ids.len() as u64;
        self.remember(r.batch_id, ids, long);
    }

    fn remember(&mut self, batch: u64, ids: Vec<u64>, long: bool) {
        if long {
            self.long.push(batch);
        }
        self.batch_ids.push(batch);
        if self.batch_ids.len() > 64 {
            self.batch_ids.remove(0);
        }
        self.item_ids.extend(ids);
        if self.item_ids.len() > 4096 {
            let cut = self.item_ids.len() - 4096;
            self.item_ids.drain(..cut);
        }
    }

    fn some_item(&mut self) -> u64 {
        if self.item_ids.is_empty() {
            1
        } else {
            self.item_ids[self.rng.gen_range(0..self.item_ids.len())]
        }
    }

    async fn stats(&mut self) -> v1::GetStatsResponse {
        match tokio::time::timeout(PROMPT, self.client.stats()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => panic!(
                "seed {}: case {} ({}): GetStats failed: {e}",
                self.seed, self.case, self.kind
            ),
            Err(_) => panic!(
                "seed {}: case {} ({}): the daemon did not answer GetStats within {PROMPT:?}",
                self.seed, self.case, self.kind
            ),
        }
    }

    /// The checks after every case (see the module docs).
    async fn after_case(&mut self) {
        // Long-delayed items are cancelled at once, so later flushes do not wait on them.
        for b in std::mem::take(&mut self.long) {
            if let Err(e) = self.client.cancel(wqd_client::CancelScope::Batch(b)).await {
                self.violation("cleanup", format!("Cancel of long-delayed batch {b}: {e}"));
            }
        }
        let mut s = self.stats().await;
        let end = Instant::now() + PROMPT;
        while s.flushes_active != 0 && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(10)).await;
            s = self.stats().await;
        }
        if s.flushes_active != 0 {
            self.violation(
                "flush wait left",
                format!(
                    "{} flush waits still registered 2 s after the case",
                    s.flushes_active
                ),
            );
        }
        let items = total(&s.items.unwrap_or_default());
        if (s.batches_accepted, items) != (self.batches, self.items) {
            self.violation(
                "counters",
                format!(
                    "the daemon has {} batches / {items} items accepted, the fuzzer was \
                 told {} / {}",
                    s.batches_accepted, self.batches, self.items
                ),
            );
            // Measure later cases from here.
            self.batches = s.batches_accepted;
            self.items = items;
        }
        let field = if self.peak_resets { "VmHWM:" } else { "VmRSS:" };
        let peak = rss_kib(self.pid, field) << 10;
        if peak > self.rss_limit {
            self.violation(
                "memory",
                format!(
                    "peak RSS {} MiB, over {} MiB (baseline {} MiB, or what the last \
                     spike left, + {} MiB)",
                    peak >> 20,
                    self.rss_limit >> 20,
                    self.rss_base >> 20,
                    RSS_BOUND >> 20
                ),
            );
            // What the allocator kept after the spike is the new baseline, so the next
            // spike of the same size is reported again, and a lasting level only once.
            let now = rss_kib(self.pid, "VmRSS:") << 10;
            self.rss_limit = now.max(self.rss_base) + RSS_BOUND;
        }
        if self.peak_resets {
            reset_peak(self.pid);
        }
    }

    // ----- cases -------------------------------------------------------------------------

    /// A valid SubmitRequest, mutated; if prost cannot decode it the daemon must say
    /// INVALID_ARGUMENT.
    async fn submit_mutated(&mut self) {
        let (bytes, decoded) = loop {
            let items = good_items(&mut self.rng, 20);
            let mut b = v1::SubmitRequest {
                workqueue: if self.rng.gen_bool(0.3) {
                    OWN_WQ.into()
                } else {
                    String::new()
                },
                items,
                wait: false,
                // Every mode, and one the daemon does not know.
                receipts: self.rng.gen_range(0..4),
            }
            .encode_to_vec();
            mutate(&mut self.rng, &mut b);
            let d = v1::SubmitRequest::decode(&b[..]);
            // A mutated request that would wait on a long delay would only test patience.
            if let Ok(r) = &d {
                let slow = r.items.iter().any(|i| {
                    i.delay.as_ref().is_some_and(|d| d.seconds > 1)
                        || i.handler == "sleep"
                        || i.handler == "spin"
                        || i.handler == "exec"
                });
                if slow || r.items.len() > 1000 {
                    continue;
                }
            }
            break (b, d);
        };
        let end = unary(&self.sock, SUBMIT, frame(&bytes), Some("5S")).await;
        let long = matches!(&decoded, Ok(r) if r.items.iter().any(|i| i.delay.is_some_and(|d| d.seconds > 0)));
        match &decoded {
            Err(e) => {
                let what = format!("Submit of undecodable bytes ({e})");
                self.judge(&what, &end, &[Code::InvalidArgument], &[]);
            }
            Ok(_) => {
                self.judge("Submit of mutated bytes", &end, &[], &[]);
            }
        }
        self.account(SUBMIT, &end, long);
    }

    /// A request of any other RPC, mutated.
    async fn other_mutated(&mut self) {
        let pick = self.rng.gen_range(0..9);
        let item = self.some_item();
        let batch = self.batch_ids.last().copied().unwrap_or(1);
        let (path, mut b) = match pick {
            0 => (
                GET_RESULTS,
                v1::GetResultsRequest {
                    item_ids: (0..self.rng.gen_range(1..50))
                        .map(|i| if i % 3 == 0 { item } else { item + i })
                        .collect(),
                }
                .encode_to_vec(),
            ),
            1 => (
                FLUSH,
                v1::FlushRequest {
                    scope: Some(match self.rng.gen_range(0..3) {
                        0 => flush_request::Scope::BatchId(batch),
                        1 => flush_request::Scope::Items(v1::ItemIds {
                            ids: vec![item, item + 1, 999_999_999],
                        }),
                        _ => flush_request::Scope::Workqueue(String::new()),
                    }),
                    summary_only: self.rng.gen(),
                    include_delayed: false,
                }
                .encode_to_vec(),
            ),
            2 => (
                CANCEL,
                v1::CancelRequest {
                    scope: Some(v1::cancel_request::Scope::Items(v1::ItemIds {
                        ids: vec![item, 999_999_999],
                    })),
                }
                .encode_to_vec(),
            ),
            3 => (
                CREATE_WQ,
                v1::CreateWorkqueueRequest {
                    attrs: Some(v1::WorkqueueAttrs {
                        name: format!("fzm-{}", self.rng.gen_range(0..1000)),
                        max_active: self.rng.gen_range(0..600),
                        group_max_active: self.rng.gen_range(0..4),
                        ordered: self.rng.gen(),
                        nice: self.rng.gen_range(-25..25),
                        placement: self.rng.gen_range(0..6),
                        fallback: self.rng.gen_range(0..5),
                        max_queued: self.rng.gen_range(0..100),
                        on_worker_lost: self.rng.gen_range(0..4),
                        unserved: self.rng.gen_range(0..4),
                        results: self.rng.gen_range(0..5),
                    }),
                }
                .encode_to_vec(),
            ),
            4 => (
                UPDATE_WQ,
                v1::UpdateWorkqueueRequest {
                    name: UPD_WQ.into(),
                    max_active: self.rng.gen_bool(0.5).then(|| self.rng.gen_range(0..600)),
                    nice: self.rng.gen_bool(0.3).then(|| self.rng.gen_range(-25..25)),
                    placement: self.rng.gen_bool(0.3).then(|| self.rng.gen_range(0..6)),
                    fallback: self.rng.gen_bool(0.3).then(|| self.rng.gen_range(0..5)),
                    max_queued: self
                        .rng
                        .gen_bool(0.3)
                        .then(|| self.rng.gen_range(1..1 << 20)),
                    results: self.rng.gen_bool(0.3).then(|| self.rng.gen_range(0..5)),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            5 => (
                LIST_WQ,
                v1::ListWorkqueuesRequest {
                    name: ["", "default", OWN_WQ, "nope"][self.rng.gen_range(0..4)].into(),
                }
                .encode_to_vec(),
            ),
            6 => (
                DELETE_WQ,
                v1::DeleteWorkqueueRequest {
                    name: format!("fzm-{}", self.rng.gen_range(0..1000)),
                    cancel_pending: self.rng.gen(),
                }
                .encode_to_vec(),
            ),
            7 => (
                DRAIN,
                v1::DrainRequest {
                    workqueue: UPD_WQ.into(),
                }
                .encode_to_vec(),
            ),
            _ => (
                [GET_TOPOLOGY, GET_STATS][self.rng.gen_range(0..2)],
                Vec::new(),
            ),
        };
        mutate(&mut self.rng, &mut b);
        let decodes = match path {
            GET_RESULTS => v1::GetResultsRequest::decode(&b[..]).is_ok(),
            FLUSH => v1::FlushRequest::decode(&b[..]).is_ok(),
            CANCEL => v1::CancelRequest::decode(&b[..]).is_ok(),
            CREATE_WQ => v1::CreateWorkqueueRequest::decode(&b[..]).is_ok(),
            UPDATE_WQ => v1::UpdateWorkqueueRequest::decode(&b[..]).is_ok(),
            LIST_WQ => v1::ListWorkqueuesRequest::decode(&b[..]).is_ok(),
            DELETE_WQ => v1::DeleteWorkqueueRequest::decode(&b[..]).is_ok(),
            DRAIN => v1::DrainRequest::decode(&b[..]).is_ok(),
            GET_TOPOLOGY => v1::GetTopologyRequest::decode(&b[..]).is_ok(),
            _ => v1::GetStatsRequest::decode(&b[..]).is_ok(),
        };
        let end = unary(&self.sock, path, frame(&b), Some("3S")).await;
        let what = format!("{path} of mutated bytes");
        if decodes {
            self.judge(&what, &end, &[], &[]);
        } else {
            self.judge(
                &format!("{what} (undecodable)"),
                &end,
                &[Code::InvalidArgument],
                &[],
            );
        }
    }

    /// Hand-made wire-format breakage inside a valid request: wrong wire types, huge varints and
    /// length prefixes, bad UTF-8 in a string field. Always INVALID_ARGUMENT.
    async fn structural(&mut self) {
        let items = good_items(&mut self.rng, 5);
        let kind = self.rng.gen_range(0..4);
        let (path, b, what) = if kind == 0 {
            // Bad UTF-8 in one string field of one item.
            let i = self.rng.gen_range(0..items.len());
            let field = [
                "target",
                "handler",
                "key",
                "args key",
                "args value",
                "workqueue",
            ][self.rng.gen_range(0..6)];
            // Eight bytes, as long as the marker they replace, so every length prefix stays right.
            let bad: &[u8; 8] = [
                b"\xff\xfeaaaaaa",
                b"cpu:\xc3\x28aa",
                b"\xed\xa0\x80aaaaa",
                b"noop\x80aaa",
            ][self.rng.gen_range(0..4)];
            let mut req = v1::SubmitRequest {
                workqueue: String::new(),
                items,
                wait: false,
                receipts: 0,
            };
            // Build with a placeholder, then swap its bytes for the bad ones.
            let marker = "\u{1}MARKER\u{1}";
            assert_eq!(marker.len(), 8);
            match field {
                "target" => req.items[i].target = marker.into(),
                "handler" => req.items[i].handler = marker.into(),
                "key" => req.items[i].key = marker.into(),
                "args key" => {
                    req.items[i].args.insert(marker.into(), "1".into());
                }
                "args value" => {
                    req.items[i].args.insert("ms".into(), marker.into());
                }
                _ => req.workqueue = marker.into(),
            }
            let enc = req.encode_to_vec();
            let pos = enc
                .windows(marker.len())
                .position(|w| w == marker.as_bytes())
                .expect("marker");
            let mut out = enc[..pos].to_vec();
            out.extend_from_slice(bad);
            out.extend_from_slice(&enc[pos + marker.len()..]);
            (SUBMIT, out, format!("Submit with bad UTF-8 in {field}"))
        } else {
            let (p, name) = poison(&mut self.rng);
            let paths = [SUBMIT, GET_RESULTS, FLUSH, CANCEL, CREATE_WQ, SUBMIT_STREAM];
            let path = paths[self.rng.gen_range(0..paths.len())];
            let mut b = match path {
                SUBMIT => v1::SubmitRequest {
                    workqueue: String::new(),
                    items,
                    wait: false,
                    receipts: 0,
                }
                .encode_to_vec(),
                SUBMIT_STREAM => stream_msg(Some(""), items, false),
                GET_RESULTS => v1::GetResultsRequest {
                    item_ids: vec![1, 2, 3],
                }
                .encode_to_vec(),
                _ => Vec::new(),
            };
            // Poison at the end: everything before it is valid, so it is the poison that breaks.
            b.extend_from_slice(&p);
            if kind == 3 && path == SUBMIT {
                // ... or nested inside the first item, with the item's length covering it.
                let mut item = good_item(&mut self.rng).encode_to_vec();
                item.extend_from_slice(&p);
                let mut nb = vec![0x12];
                varint(item.len() as u64, &mut nb);
                nb.extend_from_slice(&item);
                b = nb;
            }
            (path, b, format!("{path} with {name}"))
        };
        let decodes = match path {
            SUBMIT => v1::SubmitRequest::decode(&b[..]).is_ok(),
            SUBMIT_STREAM => v1::SubmitStreamRequest::decode(&b[..]).is_ok(),
            GET_RESULTS => v1::GetResultsRequest::decode(&b[..]).is_ok(),
            FLUSH => v1::FlushRequest::decode(&b[..]).is_ok(),
            CANCEL => v1::CancelRequest::decode(&b[..]).is_ok(),
            _ => v1::CreateWorkqueueRequest::decode(&b[..]).is_ok(),
        };
        if decodes {
            // Some poison is valid for some messages (e.g. an unknown field); not this case.
            return;
        }
        let mut body = frame(&b);
        if path == SUBMIT_STREAM {
            // A well-formed committed message after the bad one: the bad one must still refuse.
            body.extend(frame(&stream_msg(
                None,
                vec![good_item(&mut self.rng)],
                true,
            )));
        }
        let end = unary(&self.sock, path, body, Some("3S")).await;
        self.judge(&what, &end, &[Code::InvalidArgument], &[]);
        self.account(path, &end, false);
    }

    /// Delays and deadlines at the extremes, at item `i` of a batch of good items.
    async fn durations(&mut self) {
        const SECS: &[i64] = &[
            i64::MAX,
            i64::MAX - 1,
            i64::MIN,
            -1,
            0,
            1,
            u32::MAX as i64,
            MAX_PROTO_SECONDS,
            MAX_PROTO_SECONDS + 1,
            1 << 40,
            i64::MAX / 1_000_000_000,
            18_446_744_073,
        ];
        const NANOS: &[i32] = &[0, 1, -1, 999_999_999, 1_000_000_000, i32::MAX, i32::MIN];
        let mut items = good_items(&mut self.rng, 6);
        for it in &mut items {
            it.delay = None;
            it.deadline = None;
            it.key.clear();
        }
        let i = self.rng.gen_range(0..items.len());
        let d = prost_types::Duration {
            seconds: SECS[self.rng.gen_range(0..SECS.len())],
            nanos: NANOS[self.rng.gen_range(0..NANOS.len())],
        };
        let is_delay = self.rng.gen_bool(0.6);
        let field = if is_delay { "delay" } else { "deadline" };
        if is_delay {
            items[i].delay = Some(d);
        } else {
            items[i].deadline = Some(d);
        }
        let invalid = d.seconds < 0
            || d.nanos < 0
            || d.nanos >= 1_000_000_000
            || d.seconds > MAX_PROTO_SECONDS;
        let needle = format!("items[{i}].{field}");
        let allowed: &[Code] = if invalid {
            &[Code::InvalidArgument]
        } else {
            &[Code::Ok, Code::InvalidArgument]
        };
        let streamed = self.rng.gen_bool(0.3);
        let (path, body) = if streamed {
            (SUBMIT_STREAM, frame(&stream_msg(Some(DUR_WQ), items, true)))
        } else {
            (
                SUBMIT,
                frame(
                    &v1::SubmitRequest {
                        workqueue: DUR_WQ.into(),
                        items,
                        wait: false,
                        receipts: 0,
                    }
                    .encode_to_vec(),
                ),
            )
        };
        let end = unary(&self.sock, path, body, Some("5S")).await;
        let what = format!("{path}: items[{i}].{field} = {}s {}ns", d.seconds, d.nanos);
        self.judge(&what, &end, allowed, &[&needle]);
        self.account(path, &end, is_delay && d.seconds > 0);
    }

    /// Enormous strings in every string field the daemon may quote back.
    async fn huge_strings(&mut self) {
        let len = 1usize << self.rng.gen_range(12..=21);
        let fill = [b'x', b'9', b':', b'-'][self.rng.gen_range(0..4)];
        let huge = String::from_utf8(vec![fill; len]).expect("ascii");
        let mut items = good_items(&mut self.rng, 4);
        for it in &mut items {
            it.delay = None;
        }
        let i = self.rng.gen_range(0..items.len());
        let pick = self.rng.gen_range(0..12);
        let mut label = "";
        let (path, msg, allowed): (&str, Vec<u8>, &[Code]) = match pick {
            0..=4 => {
                label = match pick {
                    0 => {
                        items[i].target = huge.clone();
                        "target"
                    }
                    1 => {
                        items[i].target = format!("cpus:{huge}");
                        "target"
                    }
                    2 => {
                        items[i].handler = huge.clone();
                        "handler"
                    }
                    3 => {
                        items[i].key = huge.clone();
                        "key"
                    }
                    _ => {
                        items[i].args.insert(huge.clone(), "1".into());
                        "args"
                    }
                };
                let r = v1::SubmitRequest {
                    workqueue: String::new(),
                    items,
                    wait: false,
                    receipts: 0,
                };
                (SUBMIT, r.encode_to_vec(), &[Code::InvalidArgument])
            }
            5 => (
                SUBMIT,
                v1::SubmitRequest {
                    workqueue: huge.clone(),
                    items,
                    wait: false,
                    receipts: 0,
                }
                .encode_to_vec(),
                &[Code::NotFound, Code::InvalidArgument],
            ),
            6 => (
                SUBMIT_STREAM,
                stream_msg(Some(&huge), items, true),
                &[Code::NotFound, Code::InvalidArgument],
            ),
            7 => (
                FLUSH,
                v1::FlushRequest {
                    scope: Some(flush_request::Scope::Workqueue(huge.clone())),
                    summary_only: false,
                    include_delayed: false,
                }
                .encode_to_vec(),
                &[Code::NotFound, Code::InvalidArgument],
            ),
            8 => (
                CREATE_WQ,
                v1::CreateWorkqueueRequest {
                    attrs: Some(v1::WorkqueueAttrs {
                        name: huge.clone(),
                        ..Default::default()
                    }),
                }
                .encode_to_vec(),
                &[Code::InvalidArgument],
            ),
            9 => (
                [LIST_WQ, DELETE_WQ, UPDATE_WQ][self.rng.gen_range(0..3)],
                // The three requests share field 1 = name.
                v1::ListWorkqueuesRequest { name: huge.clone() }.encode_to_vec(),
                &[Code::NotFound, Code::InvalidArgument],
            ),
            10 => (
                DRAIN,
                v1::DrainRequest {
                    workqueue: huge.clone(),
                }
                .encode_to_vec(),
                &[Code::NotFound, Code::InvalidArgument],
            ),
            _ => {
                // A payload one byte over the limit (1 MiB by default).
                items[i].handler = "digest".into();
                items[i].args.clear();
                items[i].payload = vec![7; (1 << 20) + 1];
                (
                    SUBMIT,
                    v1::SubmitRequest {
                        workqueue: String::new(),
                        items,
                        wait: false,
                        receipts: 0,
                    }
                    .encode_to_vec(),
                    &[Code::InvalidArgument],
                )
            }
        };
        let end = unary(&self.sock, path, frame(&msg), Some("5S")).await;
        let what = format!("{path} with a {len} byte string ({label}, case {pick})");
        self.judge(&what, &end, allowed, &[]);
        self.account(path, &end, false);
    }

    /// gRPC frame headers that lie: a length over the limit (up to 4 GiB), a length under it
    /// with the body cut short, a cut header, a compressed flag without an encoding, garbage.
    async fn bad_frames(&mut self) {
        let paths = [SUBMIT, SUBMIT_STREAM, GET_RESULTS, FLUSH, CREATE_WQ, WATCH];
        let path = paths[self.rng.gen_range(0..paths.len())];
        let pick = self.rng.gen_range(0..6);
        let tail: Vec<u8> = (0..self.rng.gen_range(0..64))
            .map(|_| self.rng.gen())
            .collect();
        let (body, allowed, needle, what): (Vec<u8>, &[Code], Option<&str>, String) = match pick {
            0 | 1 => {
                let claim: u32 = if pick == 0 {
                    [u32::MAX, 1 << 31, (MAX_MESSAGE_BYTES + 1) as u32][self.rng.gen_range(0..3)]
                } else {
                    self.rng
                        .gen_range((MAX_MESSAGE_BYTES + 1) as u32..=u32::MAX)
                };
                let mut b = vec![0];
                b.extend_from_slice(&claim.to_be_bytes());
                b.extend_from_slice(&tail);
                (
                    b,
                    &[Code::ResourceExhausted, Code::InvalidArgument],
                    Some("limits.max_message_bytes"),
                    format!("{path}: a frame header claiming {claim} bytes"),
                )
            }
            2 => {
                let claim = self
                    .rng
                    .gen_range(tail.len() as u32 + 1..(MAX_MESSAGE_BYTES as u32));
                let mut b = vec![0];
                b.extend_from_slice(&claim.to_be_bytes());
                b.extend_from_slice(&tail);
                (
                    b,
                    &[Code::InvalidArgument],
                    None,
                    format!(
                        "{path}: a frame claiming {claim} bytes, {} sent, then end of stream",
                        tail.len()
                    ),
                )
            }
            3 => {
                let b = vec![0, 0, 0][..self.rng.gen_range(1..=3)].to_vec();
                (
                    b,
                    &[Code::InvalidArgument],
                    None,
                    format!("{path}: a cut frame header"),
                )
            }
            4 => {
                let flag = self.rng.gen_range(1..=255u8);
                let mut b = vec![flag];
                b.extend_from_slice(&(tail.len() as u32).to_be_bytes());
                b.extend_from_slice(&tail);
                (
                    b,
                    compressed_flag_codes(flag),
                    None,
                    format!("{path}: compressed flag {flag} without grpc-encoding"),
                )
            }
            _ => {
                let mut b = tail.clone();
                b.insert(0, self.rng.gen());
                let what = format!("{path}: {} garbage bytes", b.len());
                let claim = b
                    .get(1..5)
                    .map(|x| u32::from_be_bytes([x[0], x[1], x[2], x[3]]) as u64);
                let over = b[0] == 0 && claim.is_some_and(|c| c > MAX_MESSAGE_BYTES);
                if b[0] != 0 {
                    let codes = compressed_flag_codes(b[0]);
                    (b, codes, None, what)
                } else if over {
                    (
                        b,
                        &[Code::ResourceExhausted, Code::InvalidArgument],
                        None,
                        what,
                    )
                } else {
                    (b, &[Code::InvalidArgument], None, what)
                }
            }
        };
        // A quarter of the time the client resets or cuts instead of ending the stream.
        if self.rng.gen_bool(0.25) {
            let mut c = Conn::open(&self.sock).await;
            if let Ok((resp, mut tx)) = c.call(path, None).await {
                let _ = tx.send_data(Bytes::from(body), false);
                tokio::time::sleep(Duration::from_millis(self.rng.gen_range(0..20))).await;
                if self.rng.gen_bool(0.5) {
                    tx.send_reset(random_reason(&mut self.rng));
                    drop(resp);
                } else {
                    c.cut();
                }
            }
            return;
        }
        let end = unary(&self.sock, path, body, Some("3S")).await;
        let needles: Vec<&str> = needle.into_iter().collect();
        self.judge(&what, &end, allowed, &needles);
        self.account(path, &end, false);
    }

    /// A well-formed SubmitStream: options first, items in chunks, commit on the last message.
    async fn stream_committed(&mut self) {
        let chunks = self.rng.gen_range(1..=5);
        let mut body = Vec::new();
        let mut n = 0;
        for c in 0..chunks {
            let items = good_items(&mut self.rng, 10);
            n += items.len() as u64;
            let opts = (c == 0).then_some(if self.rng.gen_bool(0.3) { OWN_WQ } else { "" });
            body.extend(frame(&stream_msg(opts, items, c + 1 == chunks)));
        }
        let end = unary(&self.sock, SUBMIT_STREAM, body, Some("5S")).await;
        self.judge("a committed SubmitStream", &end, &[Code::Ok], &[]);
        if end.code() == Some(Code::Ok) {
            if let Some(m) = end.messages().first() {
                if let Ok(r) = v1::SubmitStreamResponse::decode(m.clone()) {
                    if r.item_count != n {
                        self.violation(
                            "behaviour",
                            format!("SubmitStream of {n} items says {}", r.item_count),
                        );
                    }
                }
            }
        }
        self.account(SUBMIT_STREAM, &end, false);
    }

    /// A `Session` of good and mutated requests, half-closed: each answer is Submit's (an
    /// accepted batch counted, a refusal a documented code with a short message), at most one
    /// answer per request, and the stream ends OK, or at the first message that does not
    /// decode or is over the limits with INVALID_ARGUMENT / RESOURCE_EXHAUSTED (the requests
    /// before it answered, the ones after it never read).
    async fn session(&mut self) {
        let n = self.rng.gen_range(1..=8u64);
        let mut body = Vec::new();
        let mut mutated = 0;
        // Unmutated requests whose wait limit must be refused.
        let mut bad_limit = Vec::new();
        for tag in 1..=n {
            let wait = self.rng.gen_bool(0.5);
            // A wait limit now and then: one that never ends a wait here, or one that must be
            // refused (negative, nanos out of range, or on a request that does not wait).
            let wait_timeout = match self.rng.gen_range(0..8) {
                0 if wait => Some((30, 0)),
                1 => Some((-1, 0)),
                2 => Some((0, 1_000_000_000)),
                3 if !wait => Some((1, 0)),
                _ => None,
            }
            .map(|(seconds, nanos)| prost_types::Duration { seconds, nanos });
            let req = v1::SessionRequest {
                tag,
                submit: Some(v1::SubmitRequest {
                    workqueue: if self.rng.gen_bool(0.2) { OWN_WQ } else { "" }.into(),
                    items: good_items(&mut self.rng, 10),
                    wait,
                    receipts: 0,
                }),
                wait_timeout,
            };
            let mut b = req.encode_to_vec();
            if self.rng.gen_bool(0.25) {
                mutate(&mut self.rng, &mut b);
                mutated += 1;
            } else if req.wait_timeout.is_some_and(|d| d.seconds != 30) {
                bad_limit.push(tag);
            }
            body.extend(frame(&b));
        }
        let what = format!("a session of {n} requests, {mutated} mutated");
        let end = unary(&self.sock, SESSION, body, Some("10S")).await;
        self.judge(
            &what,
            &end,
            &[Code::Ok, Code::InvalidArgument, Code::ResourceExhausted],
            &[],
        );
        if mutated == 0 && end.code().is_some_and(|c| c != Code::Ok) {
            self.violation(
                "behaviour",
                format!("{what}: ended {:?} without a mutated request", end.code()),
            );
        }
        let answers = end.messages().len() as u64;
        if answers > n || (end.code() == Some(Code::Ok) && answers != n) {
            self.violation(
                "behaviour",
                format!("{what}: {answers} answers, ended {:?}", end.code()),
            );
        }
        for m in end.messages().to_vec() {
            let answer = v1::SessionResponse::decode(m);
            if let Ok(a) = &answer {
                let refused = matches!(&a.outcome,
                    Some(v1::session_response::Outcome::Error(e))
                        if Code::from(e.code) == Code::InvalidArgument
                            && e.message.starts_with("wait_timeout: ")
                            && e.batch_id == 0);
                // (With a mutated request in the session, its tag may have changed too.)
                if mutated == 0 && bad_limit.contains(&a.tag) && !refused {
                    self.violation(
                        "behaviour",
                        format!(
                            "{what}: request {} has a wait limit to refuse, answered {:?}",
                            a.tag, a.outcome
                        ),
                    );
                }
            }
            match answer {
                Ok(v1::SessionResponse {
                    outcome: Some(v1::session_response::Outcome::Submitted(r)),
                    ..
                }) => self.accepted(&r, false),
                Ok(v1::SessionResponse {
                    outcome: Some(v1::session_response::Outcome::Error(e)),
                    tag,
                }) if e.batch_id != 0 => {
                    // Queued, then its answer failed (a mutated wait limit that ran out): the
                    // batch must exist and be flushable, and its items count as accepted.
                    let code = Code::from(e.code);
                    if !matches!(code, Code::DeadlineExceeded | Code::ResourceExhausted) {
                        self.violation(
                            "behaviour",
                            format!(
                                "{what}: request {tag} answered {code:?} naming batch {}: {}",
                                e.batch_id, e.message
                            ),
                        );
                    }
                    match self.client.flush_all(FlushScope::Batch(e.batch_id)).await {
                        Ok((_, summary)) if summary.items_covered > 0 => {
                            self.batches += 1;
                            self.items += summary.items_covered;
                        }
                        other => self.violation(
                            "behaviour",
                            format!(
                                "{what}: request {tag} named batch {}, whose flush gave {other:?}",
                                e.batch_id
                            ),
                        ),
                    }
                }
                Ok(v1::SessionResponse {
                    outcome: Some(v1::session_response::Outcome::Error(e)),
                    tag,
                }) => {
                    let refused = End::Status {
                        code: Code::from(e.code),
                        message: e.message,
                        messages: Vec::new(),
                    };
                    self.judge(&format!("{what}: request {tag}"), &refused, &[], &[]);
                }
                other => self.violation(
                    "behaviour",
                    format!("{what}: an answer without an outcome: {other:?}"),
                ),
            }
        }
    }

    /// A SubmitStream that half-closes cleanly without a commit message, or sends a message
    /// after its commit: INVALID_ARGUMENT, nothing queued.
    async fn stream_uncommitted(&mut self) {
        let after = self.rng.gen_bool(0.4);
        let chunks = self.rng.gen_range(1..=4);
        let mut body = Vec::new();
        for c in 0..chunks {
            let items = good_items(&mut self.rng, 10);
            let commit = after && c + 1 == chunks;
            body.extend(frame(&stream_msg((c == 0).then_some(""), items, commit)));
        }
        if after {
            body.extend(frame(&stream_msg(
                None,
                good_items(&mut self.rng, 3),
                false,
            )));
        }
        let what = if after {
            "a SubmitStream with a message after its commit"
        } else {
            "a SubmitStream that ended without commit"
        };
        let end = unary(&self.sock, SUBMIT_STREAM, body, Some("5S")).await;
        self.judge(what, &end, &[Code::InvalidArgument], &[]);
        self.account(SUBMIT_STREAM, &end, false);
    }

    /// A SubmitStream that never commits and is reset, cut, or left by GOAWAY part-way
    /// (sometimes mid-message): nothing may be queued.
    async fn stream_reset(&mut self) {
        let chunks = self.rng.gen_range(1..=4);
        let mut msgs = Vec::new();
        for c in 0..chunks {
            let items = good_items(&mut self.rng, 20);
            msgs.push(frame(&stream_msg((c == 0).then_some(""), items, false)));
        }
        if self.rng.gen_bool(0.3) {
            // Half of a last message: its commit never arrives.
            let last = frame(&stream_msg(None, good_items(&mut self.rng, 5), true));
            let cut = self.rng.gen_range(1..last.len());
            msgs.push(last[..cut].to_vec());
        }
        let how = self.rng.gen_range(0..5);
        let sent = msgs.len();
        if how == 4 {
            // Raw frames: HEADERS, DATA, then GOAWAY; sometimes END_STREAM after it.
            let mut raw = h2_headers(SUBMIT_STREAM);
            let data: Vec<u8> = msgs.concat();
            for part in data.chunks(16_000).take(3) {
                raw.extend(h2_frame(0x0, 0, 1, part));
            }
            let reason = [0u32, 1, 2, 8][self.rng.gen_range(0..4)];
            raw.extend(h2_goaway(reason));
            let eos = self.rng.gen_bool(0.5);
            if eos {
                raw.extend(h2_frame(0x0, 0x1, 1, &[]));
            }
            self.note = format!(
                "raw frames: {sent} messages, GOAWAY({reason}){}, close",
                if eos { ", END_STREAM" } else { "" }
            );
            raw_session(&self.sock, &raw, Duration::from_millis(30)).await;
            tokio::time::sleep(Duration::from_millis(30)).await;
            return;
        }
        let mut c = Conn::open(&self.sock).await;
        let (resp, mut tx) = match c.call(SUBMIT_STREAM, None).await {
            Ok(x) => x,
            Err(e) => {
                self.violation("behaviour", format!("SubmitStream could not start: {e}"));
                return;
            }
        };
        for m in msgs {
            let _ = tx.send_data(Bytes::from(m), false);
            if self.rng.gen_bool(0.5) {
                tokio::time::sleep(Duration::from_millis(self.rng.gen_range(0..5))).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(self.rng.gen_range(0..30))).await;
        match how {
            0..=2 => {
                let reason = random_reason(&mut self.rng);
                self.note = format!("{sent} messages, then RST_STREAM({reason:?})");
                tx.send_reset(reason);
                // Whatever the daemon answers now, it must not be an acceptance.
                let end = finish(resp, Duration::from_millis(500)).await;
                if end.code() == Some(Code::Ok) {
                    self.violation("counters", "a reset SubmitStream was answered OK".into());
                    self.account(SUBMIT_STREAM, &end, false);
                }
            }
            _ => {
                self.note = format!("{sent} messages, then the connection dropped");
                drop(resp);
                c.cut();
            }
        }
        // Give a wrongly-accepting daemon time to queue, so the check sees it in this case.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }

    /// Flush of accepted work, read whole or abandoned part-way (reset with a random reason,
    /// or the connection dropped). Abandoned flushes must leave no wait registered.
    async fn flush_reset(&mut self) {
        let items: Vec<Item> = (0..self.rng.gen_range(1..30))
            .map(|_| {
                Item::new("all", "noop").delay(Duration::from_millis(self.rng.gen_range(0..200)))
            })
            .collect();
        let r = match self.client.submit(Batch::new().items(items)).await {
            Ok(r) => r,
            Err(e) => {
                self.violation("behaviour", format!("a normal Submit failed: {e}"));
                return;
            }
        };
        let ids: Vec<u64> = r.items.iter().map(|x| x.item_id).collect();
        self.batches += 1;
        self.items += ids.len() as u64;
        self.remember(r.batch_id, ids.clone(), false);
        let (scope, covered) = match self.rng.gen_range(0..3) {
            0 => (flush_request::Scope::BatchId(r.batch_id), Some(ids.len())),
            1 => {
                let mut x = ids.clone();
                x.push(u64::MAX);
                (
                    flush_request::Scope::Items(v1::ItemIds { ids: x }),
                    Some(ids.len()),
                )
            }
            _ => (flush_request::Scope::Workqueue(String::new()), None),
        };
        let req = v1::FlushRequest {
            scope: Some(scope),
            summary_only: self.rng.gen(),
            include_delayed: false,
        };
        let mut c = Conn::open(&self.sock).await;
        let (resp, mut tx) = match c.call(FLUSH, Some("5S")).await {
            Ok(x) => x,
            Err(e) => {
                self.violation("behaviour", format!("Flush could not start: {e}"));
                return;
            }
        };
        let _ = tx.send_data(Bytes::from(frame(&req.encode_to_vec())), true);
        let how = self.rng.gen_range(0..5);
        if how == 0 {
            let end = finish(resp, CALL_LIMIT).await;
            if self.judge("a whole Flush", &end, &[Code::Ok], &[]) == Some(Code::Ok) {
                let msgs: Vec<v1::FlushResponse> = end
                    .messages()
                    .iter()
                    .filter_map(|m| v1::FlushResponse::decode(m.clone()).ok())
                    .collect();
                let summaries = msgs
                    .iter()
                    .filter(|m| matches!(m.event, Some(flush_response::Event::Summary(_))))
                    .count();
                let last = msgs.last().and_then(|m| match &m.event {
                    Some(flush_response::Event::Summary(s)) => Some(s.clone()),
                    _ => None,
                });
                match last {
                    Some(s) if summaries == 1 => {
                        if let Some(n) = covered {
                            if s.items_covered != n as u64 {
                                self.violation(
                                    "behaviour",
                                    format!("Flush covered {} of {n} items", s.items_covered),
                                );
                            }
                        }
                    }
                    _ => self.violation(
                        "behaviour",
                        format!(
                            "a Flush stream ended without exactly one final summary ({summaries})"
                        ),
                    ),
                }
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(self.rng.gen_range(0..100))).await;
        match how {
            1 | 2 => {
                let reason = random_reason(&mut self.rng);
                self.note = format!("Flush reset with RST_STREAM({reason:?})");
                tx.send_reset(reason);
                drop(resp);
            }
            3 => {
                self.note = "Flush handles dropped".into();
                drop(resp);
                drop(tx);
            }
            _ => {
                self.note = "Flush connection dropped".into();
                drop(resp);
                c.cut();
            }
        }
    }

    /// Submit with wait, abandoned while it waits: reset or cut once the batch is accepted
    /// (the fuzzer learns the acceptance from GetStats), or at once (then the batch was
    /// accepted whole or not at all, and the counters agree with each other).
    async fn submit_wait_reset(&mut self) {
        let n = self.rng.gen_range(1..=200usize);
        let items: Vec<v1::WorkItem> = (0..n)
            .map(|_| v1::WorkItem {
                target: "all".into(),
                handler: "sleep".into(),
                args: [("ms".to_string(), self.rng.gen_range(1..40).to_string())].into(),
                ..Default::default()
            })
            .collect();
        let body = frame(
            &v1::SubmitRequest {
                workqueue: String::new(),
                items,
                wait: true,
                receipts: 0,
            }
            .encode_to_vec(),
        );
        let before = self.stats().await;
        let mut c = Conn::open(&self.sock).await;
        let (resp, mut tx) = match c.call(SUBMIT, Some("20S")).await {
            Ok(x) => x,
            Err(e) => {
                self.violation("behaviour", format!("Submit could not start: {e}"));
                return;
            }
        };
        let _ = tx.send_data(Bytes::from(body), true);
        let patient = self.rng.gen_bool(0.6);
        if patient {
            let end = Instant::now() + PROMPT;
            loop {
                let s = self.stats().await;
                if s.batches_accepted > before.batches_accepted || Instant::now() > end {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        } else {
            tokio::time::sleep(Duration::from_millis(self.rng.gen_range(0..3))).await;
        }
        if self.rng.gen_bool(0.5) {
            let reason = random_reason(&mut self.rng);
            self.note = format!("RST_STREAM({reason:?})");
            tx.send_reset(reason);
            drop(resp);
        } else {
            self.note = "connection dropped".into();
            drop(resp);
            c.cut();
        }
        // The batch (if accepted) was accepted whole; count what the daemon now says.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let after = self.stats().await;
        let db = after.batches_accepted - before.batches_accepted;
        let di = total(&after.items.unwrap_or_default()) - total(&before.items.unwrap_or_default());
        match (db, di) {
            (1, d) if d == n as u64 => {
                self.batches += 1;
                self.items += d;
            }
            (0, 0) if !patient => {}
            (b, i) => self.violation(
                "counters",
                format!(
                    "a Submit(wait) of {n} items abandoned {} acceptance left {b} batches and {i} \
                 items accepted",
                    if patient { "after" } else { "before" }
                ),
            ),
        }
    }

    /// WatchTopology read a little, then reset, cut or simply dropped; sometimes its request
    /// is mutated first.
    async fn watch_reset(&mut self) {
        let mut req = Vec::new();
        let mutated = self.rng.gen_bool(0.3);
        if mutated {
            mutate(&mut self.rng, &mut req);
        }
        let decodes = v1::WatchTopologyRequest::decode(&req[..]).is_ok();
        let mut c = Conn::open(&self.sock).await;
        let (resp, mut tx) = match c.call(WATCH, None).await {
            Ok(x) => x,
            Err(e) => {
                self.violation("behaviour", format!("WatchTopology could not start: {e}"));
                return;
            }
        };
        // Unary-request calls answer only after the request's end of stream.
        let _ = tx.send_data(Bytes::from(frame(&req)), true);
        let r = tokio::time::timeout(CALL_LIMIT, resp).await;
        match r {
            Ok(Ok(resp)) => {
                if let Some((code, message)) = status_of(resp.headers()) {
                    let end = End::Status {
                        code,
                        message,
                        messages: Vec::new(),
                    };
                    let allowed: &[Code] = if decodes {
                        &[Code::Ok]
                    } else {
                        &[Code::InvalidArgument]
                    };
                    self.judge("WatchTopology", &end, allowed, &[]);
                    return;
                }
                let mut body = resp.into_body();
                if self.rng.gen_bool(0.7) {
                    match tokio::time::timeout(CALL_LIMIT, body.data()).await {
                        Ok(Some(Ok(b))) => {
                            let _ = body.flow_control().release_capacity(b.len());
                            let msg = unframe(b).into_iter().next().unwrap_or_default();
                            match v1::WatchTopologyResponse::decode(msg) {
                                Ok(w) if w.snapshot.as_ref().is_some_and(|s| s.epoch >= 1) => {}
                                other => self.violation(
                                    "behaviour",
                                    format!(
                                    "WatchTopology's first message is not a snapshot: {other:?}"
                                ),
                                ),
                            }
                        }
                        other => {
                            if !mutated {
                                self.violation(
                                    "behaviour",
                                    format!("WatchTopology sent no first snapshot: {other:?}"),
                                );
                            }
                        }
                    }
                }
                match self.rng.gen_range(0..3) {
                    0 => tx.send_reset(random_reason(&mut self.rng)),
                    1 => c.cut(),
                    _ => {
                        drop(body);
                        drop(tx);
                    }
                }
            }
            Ok(Err(e)) => self.violation("behaviour", format!("WatchTopology broke: {e}")),
            Err(_) => self.violation(
                "behaviour",
                "WatchTopology sent no headers within 15 s".into(),
            ),
        }
    }

    /// Raw HTTP/2 misbehaviour around a call: GOAWAY mid-request, a frame larger than the
    /// negotiated maximum, an unknown frame type, a RST_STREAM on an idle stream.
    async fn raw_frames(&mut self) {
        if self.rng.gen_bool(0.5) {
            return self.raw_goaway_call().await;
        }
        let path = [SUBMIT, SUBMIT_STREAM, FLUSH, GET_STATS][self.rng.gen_range(0..4)];
        let mut raw = h2_headers(path);
        match self.rng.gen_range(0..4) {
            0 => raw.extend(h2_goaway(self.rng.gen_range(0..14))),
            1 => {
                // A DATA frame header claiming 16 MiB (over the default 16 KiB frame size).
                let mut f = h2_frame(0x0, 0, 1, &[]);
                f[0..3].copy_from_slice(&[0xff, 0xff, 0xff]);
                raw.extend(f);
                raw.extend((0..200).map(|_| self.rng.gen::<u8>()));
            }
            2 => raw.extend(h2_frame(0xee, 0xff, 1, b"unknown frame type")),
            _ => raw.extend(h2_frame(0x3, 0, 7, &8u32.to_be_bytes())),
        }
        raw_session(&self.sock, &raw, Duration::from_millis(20)).await;
    }

    /// A whole Flush, WatchTopology or Submit(wait) request, then GOAWAY while the daemon
    /// waits or streams, then the connection closes: no wait may stay registered, and a
    /// Submit(wait) is accepted whole or not at all.
    async fn raw_goaway_call(&mut self) {
        let which = self.rng.gen_range(0..3);
        let n = self.rng.gen_range(1..=100usize);
        let (path, req) = match which {
            0 => {
                let scope = match self.batch_ids.last() {
                    Some(b) if self.rng.gen_bool(0.5) => flush_request::Scope::BatchId(*b),
                    _ => flush_request::Scope::Workqueue(String::new()),
                };
                let r = v1::FlushRequest {
                    scope: Some(scope),
                    summary_only: false,
                    include_delayed: false,
                };
                (FLUSH, r.encode_to_vec())
            }
            1 => (WATCH, Vec::new()),
            _ => {
                let items = (0..n)
                    .map(|_| v1::WorkItem {
                        target: "all".into(),
                        handler: "sleep".into(),
                        args: [("ms".to_string(), "20".to_string())].into(),
                        ..Default::default()
                    })
                    .collect();
                let r = v1::SubmitRequest {
                    workqueue: String::new(),
                    items,
                    wait: true,
                    receipts: 0,
                };
                (SUBMIT, r.encode_to_vec())
            }
        };
        let reason = [0u32, 1, 2, 8][self.rng.gen_range(0..4)];
        let linger = Duration::from_millis(self.rng.gen_range(0..50));
        self.note = format!("raw {path}, GOAWAY({reason}), close after {linger:?}");
        let mut raw = h2_headers(path);
        raw.extend(h2_frame(0x0, 0x1, 1, &frame(&req)));
        raw.extend(h2_goaway(reason));
        let before = self.stats().await;
        raw_session(&self.sock, &raw, linger).await;
        if path == SUBMIT {
            tokio::time::sleep(Duration::from_millis(150)).await;
            let after = self.stats().await;
            let db = after.batches_accepted - before.batches_accepted;
            let di =
                total(&after.items.unwrap_or_default()) - total(&before.items.unwrap_or_default());
            match (db, di) {
                (1, d) if d == n as u64 => {
                    self.batches += 1;
                    self.items += d;
                }
                (0, 0) => {}
                (b, i) => self.violation(
                    "counters",
                    format!(
                        "a Submit(wait) of {n} items left by GOAWAY left {b} batches and {i} \
                         items accepted"
                    ),
                ),
            }
        }
    }

    /// A workqueue created, used and deleted: the daemon-wide terminal totals must not drop.
    async fn workqueue_churn(&mut self) {
        let name = format!("fzc-{}", self.case);
        if let Err(e) = self.client.create_workqueue(wqd_e2e::wq_attrs(&name)).await {
            self.violation("behaviour", format!("CreateWorkqueue {name}: {e}"));
            return;
        }
        let items = good_items(&mut self.rng, 10);
        let body = frame(
            &v1::SubmitRequest {
                workqueue: name.clone(),
                items,
                wait: true,
                receipts: 0,
            }
            .encode_to_vec(),
        );
        let end = unary(&self.sock, SUBMIT, body, Some("10S")).await;
        self.judge("Submit(wait) to a fresh workqueue", &end, &[Code::Ok], &[]);
        self.account(SUBMIT, &end, false);
        if let Err(e) = self.client.delete_workqueue(&name, false).await {
            self.violation("behaviour", format!("DeleteWorkqueue {name}: {e}"));
        }
    }

    // ----- the fixed cases -----------------------------------------------------------------

    /// Requests claiming millions of items or ids: refused early, naming the limit, without
    /// the daemon's memory growing with the claim.
    async fn oversize(&mut self, which: usize) {
        match which {
            0 | 1 => {
                // 4 194 305 items: empty ones (8 MiB), or `all`/`noop` ones (52 MiB).
                let one: &[u8] = if which == 0 {
                    &[0x12, 0x00]
                } else {
                    &[
                        0x12, 0x0b, 0x0a, 0x03, b'a', b'l', b'l', 0x12, 0x04, b'n', b'o', b'o',
                        b'p',
                    ]
                };
                let n = MAX_BATCH_ITEMS + 1;
                let mut m = Vec::with_capacity(one.len() * n);
                for _ in 0..n {
                    m.extend_from_slice(one);
                }
                let what = format!("Submit of {n} items in {} MiB", m.len() >> 20);
                let end = unary(&self.sock, SUBMIT, frame(&m), Some("60S")).await;
                self.judge(
                    &what,
                    &end,
                    &[Code::InvalidArgument, Code::ResourceExhausted],
                    &["limits.max_batch_items"],
                );
                self.account(SUBMIT, &end, false);
            }
            2 => {
                // The same claim as one SubmitStream message.
                let n = MAX_BATCH_ITEMS + 1;
                let mut m = vec![0x0a, 0x00];
                for _ in 0..n {
                    m.extend_from_slice(&[0x12, 0x00]);
                }
                m.extend_from_slice(&[0x18, 0x01]);
                let end = unary(&self.sock, SUBMIT_STREAM, frame(&m), Some("60S")).await;
                self.judge(
                    &format!("SubmitStream of one message of {n} items"),
                    &end,
                    &[Code::InvalidArgument, Code::ResourceExhausted],
                    &["limits.max_batch_items"],
                );
                self.account(SUBMIT_STREAM, &end, false);
            }
            3 => {
                // GetResults of a million copies of one known id: the answer would be ≈ 90 MB.
                let id = self.some_item();
                let req = v1::GetResultsRequest {
                    item_ids: vec![id; 1_000_000],
                };
                let end = unary(&self.sock, GET_RESULTS, frame(&req.encode_to_vec()), None).await;
                self.judge(
                    "GetResults of 1 000 000 copies of one id",
                    &end,
                    &[Code::InvalidArgument, Code::ResourceExhausted],
                    &["limits."],
                );
            }
            4 | 5 => {
                // Flush and Cancel of a million copies: duplicates are ignored, so one item.
                let id = self.some_item();
                let ids = v1::ItemIds {
                    ids: vec![id; 1_000_000],
                };
                let (path, m) = if which == 4 {
                    let r = v1::FlushRequest {
                        scope: Some(flush_request::Scope::Items(ids)),
                        summary_only: true,
                        include_delayed: false,
                    };
                    (FLUSH, r.encode_to_vec())
                } else {
                    let r = v1::CancelRequest {
                        scope: Some(v1::cancel_request::Scope::Items(ids)),
                    };
                    (CANCEL, r.encode_to_vec())
                };
                let end = unary(&self.sock, path, frame(&m), Some("10S")).await;
                let what = format!("{path} of 1 000 000 copies of one id");
                if self.judge(&what, &end, &[Code::Ok], &[]) == Some(Code::Ok) {
                    let n = match path {
                        FLUSH => end
                            .messages()
                            .iter()
                            .filter_map(|m| v1::FlushResponse::decode(m.clone()).ok())
                            .find_map(|m| match m.event {
                                Some(flush_response::Event::Summary(s)) => Some(s.items_covered),
                                _ => None,
                            }),
                        _ => end
                            .messages()
                            .first()
                            .and_then(|m| v1::CancelResponse::decode(m.clone()).ok())
                            .map(|r| r.items.len() as u64),
                    };
                    if n != Some(1) {
                        self.violation(
                            "behaviour",
                            format!("{what}: covered {n:?} items, expected 1"),
                        );
                    }
                }
            }
            _ => {
                // A packed id list whose length prefix claims 4 million ids more than it holds.
                let mut m = vec![0x0a];
                varint(8 * (MAX_BATCH_ITEMS as u64 + 1), &mut m);
                m.extend_from_slice(&[1, 2, 3]);
                let end = unary(&self.sock, GET_RESULTS, frame(&m), None).await;
                self.judge(
                    "GetResults whose packed ids claim 4 million entries",
                    &end,
                    &[Code::InvalidArgument, Code::ResourceExhausted],
                    &[],
                );
            }
        }
    }

    /// Every accepted item terminal at the end: flush each workqueue, then the totals.
    async fn finish_all(&mut self) {
        self.kind = "final";
        self.note.clear();
        let wqs = match self.client.list_workqueues(None).await {
            Ok(w) => w,
            Err(e) => panic!("seed {}: ListWorkqueues at the end: {e}", self.seed),
        };
        for w in wqs {
            let name = w.attrs.map(|a| a.name).unwrap_or_default();
            let flushed = tokio::time::timeout(
                Duration::from_secs(15),
                // Delayed items too: a plain workqueue flush leaves them out.
                self.client
                    .flush_all(FlushScope::WorkqueueAll(name.clone())),
            )
            .await;
            match flushed {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => self.violation("final", format!("flush of workqueue {name}: {e}")),
                Err(_) => {
                    self.violation("final", format!("flush of workqueue {name} took over 15 s"))
                }
            }
        }
        let s = self.stats().await;
        let c = s.items.unwrap_or_default();
        if c.delayed + c.pending + c.running != 0 {
            self.violation(
                "final",
                format!(
                    "after flushing every workqueue {} items are delayed, {} pending and {} \
                     running",
                    c.delayed, c.pending, c.running
                ),
            );
        }
        let terminal = c.ok + c.failed + c.cancelled + c.expired + c.rejected;
        if terminal != self.items || s.batches_accepted != self.batches {
            self.violation(
                "final",
                format!(
                "at the end the daemon has {} batches and {terminal} terminal items; the fuzzer \
                 was told {} batches and {} items",
                s.batches_accepted, self.batches, self.items
            ),
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzz_grpc_surface() {
    let seed = env_num("WQD_FUZZ_SEED").unwrap_or_else(|| rand::thread_rng().gen());
    let cases = env_num("WQD_FUZZ_CASES").unwrap_or(800) as usize;
    let default_secs = if env_num("WQD_FUZZ_CASES").is_some() {
        3600
    } else {
        40
    };
    let budget = Duration::from_secs(env_num("WQD_FUZZ_SECS").unwrap_or(default_secs));
    eprintln!("fuzz_grpc: seed {seed} (WQD_FUZZ_SEED={seed} reproduces), {cases} random cases");
    let began = Instant::now();

    let mut d = Daemon::start("two-socket");
    let client = d.client().await;
    for name in [OWN_WQ, UPD_WQ, DUR_WQ] {
        client
            .create_workqueue(wqd_e2e::wq_attrs(name))
            .await
            .expect("create the fuzzer's workqueues");
    }
    // Warm up every path once, then take the baseline.
    client
        .submit(Batch::new().item(Item::new("all", "noop")).wait(true))
        .await
        .expect("a normal Submit");
    let pid = d.pid();
    let rss_base = rss_kib(pid, "VmRSS:") << 10;
    assert!(rss_base > 0, "cannot read /proc/{pid}/status");
    let peak_resets = reset_peak(pid);
    let mut f = Fuzz {
        sock: d.socket().to_path_buf(),
        pid,
        client,
        rng: StdRng::seed_from_u64(seed),
        seed,
        batches: 1,
        items: 1,
        batch_ids: Vec::new(),
        item_ids: Vec::new(),
        long: Vec::new(),
        rss_base,
        rss_limit: rss_base + RSS_BOUND,
        peak_resets,
        note: String::new(),
        counts: BTreeMap::new(),
        violations: Vec::new(),
        case: 0,
        kind: "",
    };
    f.after_case().await;

    // The fixed cases first: each claim of millions once.
    for which in 0..7 {
        f.case += 1;
        f.kind = "oversize";
        *f.counts.entry(f.kind).or_default() += 1;
        f.oversize(which).await;
        f.after_case().await;
    }

    eprintln!("fuzz_grpc: the oversize cases took {:.1?}", began.elapsed());
    let random_began = Instant::now();
    while f.case < cases + 7 && random_began.elapsed() < budget {
        f.case += 1;
        f.note.clear();
        let roll = f.rng.gen_range(0..100);
        f.kind = match roll {
            0..=15 => "submit_mutated",
            16..=19 => "session",
            20..=29 => "other_mutated",
            30..=37 => "structural",
            38..=45 => "durations",
            46..=50 => "huge_strings",
            51..=57 => "bad_frames",
            58..=63 => "stream_committed",
            64..=68 => "stream_uncommitted",
            69..=78 => "stream_reset",
            79..=85 => "flush_reset",
            86..=89 => "submit_wait_reset",
            90..=94 => "watch_reset",
            95..=97 => "raw_frames",
            _ => "workqueue_churn",
        };
        *f.counts.entry(f.kind).or_default() += 1;
        match f.kind {
            "submit_mutated" => f.submit_mutated().await,
            "session" => f.session().await,
            "other_mutated" => f.other_mutated().await,
            "structural" => f.structural().await,
            "durations" => f.durations().await,
            "huge_strings" => f.huge_strings().await,
            "bad_frames" => f.bad_frames().await,
            "stream_committed" => f.stream_committed().await,
            "stream_uncommitted" => f.stream_uncommitted().await,
            "stream_reset" => f.stream_reset().await,
            "flush_reset" => f.flush_reset().await,
            "submit_wait_reset" => f.submit_wait_reset().await,
            "watch_reset" => f.watch_reset().await,
            "raw_frames" => f.raw_frames().await,
            _ => f.workqueue_churn().await,
        }
        f.after_case().await;
    }
    f.finish_all().await;

    let ran: Vec<String> = f.counts.iter().map(|(k, n)| format!("{k} {n}")).collect();
    eprintln!(
        "fuzz_grpc: seed {seed}: {} cases in {:.1?}: {}",
        f.case,
        began.elapsed(),
        ran.join(", ")
    );
    if !f.violations.is_empty() {
        // Grouped by the rule broken and the kind of case, a few examples each.
        let mut groups: BTreeMap<(&str, &str), Vec<&Violation>> = BTreeMap::new();
        for v in &f.violations {
            groups.entry((v.rule, v.kind)).or_default().push(v);
        }
        let mut text = String::new();
        for ((rule, kind), vs) in &groups {
            text.push_str(&format!(
                "\n[{rule}] in {kind}: {} times, e.g.:\n",
                vs.len()
            ));
            for v in vs.iter().take(3) {
                text.push_str(&format!("  case {}: {}\n", v.case, v.what));
            }
        }
        panic!(
            "fuzz_grpc: seed {seed} (WQD_FUZZ_SEED={seed} reproduces): {} violations:{text}",
            f.violations.len()
        );
    }
    assert!(d.is_running(), "the daemon kept running");
}

/// The ids a batch's shape gives its queued items: `first + i`, but for the duplicates (the
/// client library's expansion, the one `wqctl` relies on).
fn shape_ids(first: u64, count: u64, duplicates: &[v1::DuplicateItem]) -> Vec<u64> {
    wqd_client::chunk::shape_receipts(first, count, duplicates)
        .into_iter()
        .filter(|r| r.queued)
        .map(|r| r.item_id)
        .collect()
}
