//! The client side of the gRPC benchmarks: connections, and calls that keep the client's
//! own CPU cost small and the same for every server (the client shares the machine's two
//! cores with the server it measures).
//!
//! - A batch is encoded once ([`Pre`]) and every call sends the same bytes (a refcount
//!   bump, no re-encoding of 10k items per call).
//! - A `SubmitResponse` is decoded as [`Ack`]: receipts and results are counted as they are
//!   skipped ([`Counted`]), not parsed field by field or kept. The count is checked, so a
//!   call that did less than asked fails the run.
//! - One [`Conn`] is one HTTP/2 connection (its own tonic `Channel`), used by one task at a
//!   time: one call in flight per connection (a closed loop).

use std::path::PathBuf;

use bytes::{BufMut, Bytes};
use prost::Message;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic_prost::ProstCodec;
use wqd_proto::v1;

/// Largest message either side sends (as the daemon's default limit).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Requests a [`Session`] buffers before the stream takes them (one is in flight at a time).
const SESSION_QUEUE: usize = 4;

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Unix(PathBuf),
    /// `http://127.0.0.1:PORT`
    Tcp(String),
}

impl Addr {
    /// `unix` or `tcp`.
    pub fn transport(&self) -> &'static str {
        match self {
            Addr::Unix(_) => "unix",
            Addr::Tcp(_) => "tcp",
        }
    }
}

/// An already-encoded protobuf message: encoding it copies its bytes (decoding skips).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pre(pub Bytes);

impl Message for Pre {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        // Never decoded in practice; skipping keeps the type a valid message.
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }
    fn encoded_len(&self) -> usize {
        self.0.len()
    }
    fn clear(&mut self) {
        self.0 = Bytes::new();
    }
}

/// The entries of a `repeated` message field, counted as they are skipped. Decoding one is a
/// length read and a skip, no allocation or reference count per entry (keeping each entry as
/// a `Bytes` slice, as this harness did until session 39, cost the client about 55 µs a call
/// at batches of 1 000 results: two fifths of its CPU).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counted(usize);

impl Counted {
    /// How many entries.
    pub fn len(&self) -> usize {
        self.0
    }

    /// No entry.
    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }

    /// Counts one entry (field `tag`, length-delimited) at the front of `buf` and skips it.
    fn merge(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::check_wire_type(prost::encoding::WireType::LengthDelimited, wire_type)?;
        prost::encoding::skip_field(wire_type, tag, buf, ctx)?;
        self.0 += 1;
        Ok(())
    }
}

/// `SubmitResponse` read lazily: the batch id, the counts and the batch's shape decoded, each
/// receipt and result [`Counted`]. Decode-only: encoding one writes its decoded fields and
/// leaves the counted entries out.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ack {
    pub batch_id: u64,
    /// `items` (field 2), the receipts.
    pub items: Counted,
    /// `results` (field 3).
    pub results: Counted,
    /// Set by `Submit(wait)`: the items by end state (all a `results = summary` workqueue
    /// returns).
    pub counts: Option<v1::StateCounts>,
    /// The batch's shape, whatever the receipts mode.
    pub first_item_id: u64,
    pub item_count: u64,
    pub queued_count: u64,
}

impl Message for Ack {
    /// The whole message taken as one slice first (tonic's buffer gives it without a copy),
    /// then read field by field from the slice: each skip a pointer bump, where through
    /// tonic's buffer it was a `BytesMut::advance` (about a third of the client's decoding).
    fn merge(&mut self, mut buf: impl bytes::Buf) -> Result<(), prost::DecodeError> {
        let all = buf.copy_to_bytes(buf.remaining());
        let mut s: &[u8] = &all;
        let ctx = prost::encoding::DecodeContext::default();
        while !s.is_empty() {
            let (tag, wire_type) = prost::encoding::decode_key(&mut s)?;
            self.merge_field(tag, wire_type, &mut s, ctx.clone())?;
        }
        Ok(())
    }

    fn encode_raw(&self, buf: &mut impl BufMut) {
        use prost::encoding::{message, uint64};
        if self.batch_id != 0 {
            uint64::encode(1, &self.batch_id, buf);
        }
        if let Some(c) = &self.counts {
            message::encode(4, c, buf);
        }
        for (tag, v) in [
            (5, self.first_item_id),
            (6, self.item_count),
            (7, self.queued_count),
        ] {
            if v != 0 {
                uint64::encode(tag, &v, buf);
            }
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        use prost::encoding::{message, skip_field, uint64};
        match tag {
            1 => uint64::merge(wire_type, &mut self.batch_id, buf, ctx),
            2 => self.items.merge(tag, wire_type, buf, ctx),
            3 => self.results.merge(tag, wire_type, buf, ctx),
            4 => message::merge(
                wire_type,
                self.counts.get_or_insert_with(Default::default),
                buf,
                ctx,
            ),
            5 => uint64::merge(wire_type, &mut self.first_item_id, buf, ctx),
            6 => uint64::merge(wire_type, &mut self.item_count, buf, ctx),
            7 => uint64::merge(wire_type, &mut self.queued_count, buf, ctx),
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        use prost::encoding::{message, uint64};
        let scalars: usize = [
            (1, self.batch_id),
            (5, self.first_item_id),
            (6, self.item_count),
            (7, self.queued_count),
        ]
        .into_iter()
        .filter(|&(_, v)| v != 0)
        .map(|(tag, v)| uint64::encoded_len(tag, &v))
        .sum();
        scalars
            + self
                .counts
                .as_ref()
                .map_or(0, |c| message::encoded_len(4, c))
    }

    fn clear(&mut self) {
        *self = Ack::default();
    }
}

/// A `SubmitRequest` of `n` `noop` items targeting `all` on the default workqueue, encoded.
pub fn noop_batch(n: usize, wait: bool) -> Pre {
    noop_batch_in("", n, wait)
}

/// [`noop_batch`] on workqueue `wq` (`""`: the default one).
pub fn noop_batch_in(wq: &str, n: usize, wait: bool) -> Pre {
    noop_batch_to(wq, &["all"], false, n, wait)
}

/// `n` `noop` items on workqueue `wq`, their targets taken from `targets` in turn (item `i`
/// gets `targets[i % len]`), or with `runs` in as many runs of equal length, one per target.
pub fn noop_batch_to(wq: &str, targets: &[&str], runs: bool, n: usize, wait: bool) -> Pre {
    let per_run = n.div_ceil(targets.len().max(1)).max(1);
    let req = v1::SubmitRequest {
        workqueue: wq.to_string(),
        items: (0..n)
            .map(|i| v1::WorkItem {
                target: if runs {
                    targets[(i / per_run).min(targets.len() - 1)]
                } else {
                    targets[i % targets.len()]
                }
                .into(),
                handler: "noop".into(),
                ..Default::default()
            })
            .collect(),
        wait,
        receipts: v1::ReceiptsMode::Unspecified as i32,
    };
    Pre(req.encode_to_vec().into())
}

/// `req` (a [`noop_batch`]-style `SubmitRequest`) asking for no receipt per item
/// (`receipts = RECEIPTS_MODE_NONE`, field 4 appended: a field that comes last is read as if
/// it were in place).
pub fn without_receipts(req: &Pre) -> Pre {
    let mut b = Vec::with_capacity(req.0.len() + 2);
    b.extend_from_slice(&req.0);
    prost::encoding::int32::encode(4, &(v1::ReceiptsMode::None as i32), &mut b);
    Pre(b.into())
}

/// `SessionResponse` read lazily: the answer as an [`Ack`], or the refusal.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionAck {
    #[prost(uint64, tag = "1")]
    pub tag: u64,
    #[prost(message, optional, tag = "2")]
    pub submitted: Option<Ack>,
    #[prost(message, optional, tag = "3")]
    pub error: Option<v1::SessionError>,
}

/// The `SessionRequest` carrying `submit` (a pre-encoded `SubmitRequest`) under `tag`.
pub fn session_request(tag: u64, submit: &Pre) -> Pre {
    let mut b = Vec::with_capacity(submit.0.len() + 16);
    prost::encoding::uint64::encode(1, &tag, &mut b);
    prost::encoding::encode_key(2, prost::encoding::WireType::LengthDelimited, &mut b);
    prost::encoding::encode_varint(submit.0.len() as u64, &mut b);
    b.extend_from_slice(&submit.0);
    Pre(b.into())
}

/// One open `DispatchService/Session`: one request in flight at a time.
#[derive(Debug)]
pub struct Session {
    tx: tokio::sync::mpsc::Sender<Pre>,
    rx: tonic::Streaming<SessionAck>,
}

impl Session {
    /// Sends `req` (a [`session_request`]) and reads its answer.
    pub async fn call(&mut self, req: &Pre) -> Result<Ack, tonic::Status> {
        self.tx
            .send(req.clone())
            .await
            .map_err(|_| tonic::Status::unavailable("the session's request stream is closed"))?;
        match self.rx.message().await? {
            Some(SessionAck {
                submitted: Some(a), ..
            }) => Ok(a),
            Some(SessionAck { error: Some(e), .. }) => {
                Err(tonic::Status::new(e.code.into(), e.message))
            }
            Some(_) => Err(tonic::Status::internal("a session answer with no outcome")),
            None => Err(tonic::Status::unavailable("the session ended")),
        }
    }
}

/// One HTTP/2 connection.
#[derive(Clone, Debug)]
pub struct Conn {
    ch: Channel,
}

/// Connects one new HTTP/2 connection to `addr` (eagerly).
///
/// # Panics
/// When the server cannot be reached (the harness started it; that is a bug).
pub async fn connect(addr: &Addr) -> Conn {
    let ch = match addr {
        Addr::Unix(path) => wqd_client::unix_channel(path).await,
        // tonic's client sets TCP_NODELAY by default.
        Addr::Tcp(url) => {
            tonic::transport::Endpoint::from_shared(url.clone())
                .expect("url")
                .connect()
                .await
        }
    }
    .unwrap_or_else(|e| panic!("connecting to {addr:?}: {e}"));
    Conn { ch }
}

impl Conn {
    /// `DispatchService/Submit` with pre-encoded `req`; the response's receipts and results
    /// counted.
    pub async fn submit(&self, req: &Pre) -> Result<Ack, tonic::Status> {
        let mut g = tonic::client::Grpc::new(self.ch.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        g.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let codec: ProstCodec<Pre, Ack> = ProstCodec::default();
        g.unary(
            tonic::Request::new(req.clone()),
            PathAndQuery::from_static("/wqd.v1.DispatchService/Submit"),
            codec,
        )
        .await
        .map(|r| r.into_inner())
    }

    /// Opens a `DispatchService/Session` on this connection.
    pub async fn session(&self) -> Result<Session, tonic::Status> {
        let mut g = tonic::client::Grpc::new(self.ch.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        g.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let (tx, out) = tokio::sync::mpsc::channel(SESSION_QUEUE);
        let codec: ProstCodec<Pre, SessionAck> = ProstCodec::default();
        let rx = g
            .streaming(
                tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(out)),
                PathAndQuery::from_static("/wqd.v1.DispatchService/Session"),
                codec,
            )
            .await?
            .into_inner();
        Ok(Session { tx, rx })
    }

    /// `grpc.health.v1.Health/Check` of the server as a whole: the empty unary RPC.
    pub async fn empty(&self) -> Result<(), tonic::Status> {
        use tonic_health::pb::health_client::HealthClient;
        HealthClient::new(self.ch.clone())
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|_| ())
    }

    /// `DispatchService/Flush` of `batch`, summary only; the summary.
    pub async fn flush_summary(&self, batch: u64) -> Result<v1::FlushSummary, tonic::Status> {
        use v1::dispatch_service_client::DispatchServiceClient;
        use v1::flush_response::Event;
        let mut s = DispatchServiceClient::new(self.ch.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .flush(v1::FlushRequest {
                scope: Some(v1::flush_request::Scope::BatchId(batch)),
                summary_only: true,
                include_delayed: false,
            })
            .await?
            .into_inner();
        let mut summary = None;
        while let Some(m) = s.message().await? {
            if let Some(Event::Summary(x)) = m.event {
                summary = Some(x);
            }
        }
        summary.ok_or_else(|| tonic::Status::internal("flush stream ended without a summary"))
    }

    /// `WorkqueueService/CreateWorkqueue` of `name`, defaults but `results`.
    pub async fn create_workqueue(
        &self,
        name: &str,
        results: v1::ResultsMode,
    ) -> Result<(), tonic::Status> {
        use v1::workqueue_service_client::WorkqueueServiceClient;
        WorkqueueServiceClient::new(self.ch.clone())
            .create_workqueue(v1::CreateWorkqueueRequest {
                attrs: Some(v1::WorkqueueAttrs {
                    name: name.to_string(),
                    results: results as i32,
                    ..Default::default()
                }),
            })
            .await
            .map(|_| ())
    }

    /// `TopologyService/GetTopology`: the snapshot's encoded size.
    pub async fn topology_bytes(&self) -> Result<usize, tonic::Status> {
        use v1::topology_service_client::TopologyServiceClient;
        let r = TopologyServiceClient::new(self.ch.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .get_topology(v1::GetTopologyRequest::default())
            .await?
            .into_inner();
        Ok(r.encoded_len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stock `SubmitResponse` read as an [`Ack`]: every scalar and the counts as decoded by
    /// prost, every receipt and result counted; a `SessionResponse` around it the same.
    #[test]
    fn an_ack_counts_what_prost_decodes() {
        let resp = v1::SubmitResponse {
            batch_id: 7,
            items: (0..3)
                .map(|i| v1::ItemReceipt {
                    item_id: 100 + i,
                    queued: true,
                    ..Default::default()
                })
                .collect(),
            results: (0..5)
                .map(|i| v1::ItemResult {
                    item_id: 100 + i,
                    output: vec![0; 200 * i as usize],
                    ..Default::default()
                })
                .collect(),
            counts: Some(v1::StateCounts {
                ok: 5,
                ..Default::default()
            }),
            first_item_id: 100,
            item_count: 3,
            queued_count: 3,
            duplicates: vec![v1::DuplicateItem {
                index: 1,
                duplicate_of: 9,
            }],
        };
        let a = Ack::decode(resp.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!((a.batch_id, a.items.len(), a.results.len()), (7, 3, 5));
        assert_eq!(a.counts.map(|c| c.ok), Some(5));
        assert_eq!((a.first_item_id, a.item_count, a.queued_count), (100, 3, 3));
        // What it decoded, it encodes (the counted entries left out).
        let back = v1::SubmitResponse::decode(a.encode_to_vec().as_slice()).expect("re-decodes");
        assert_eq!(
            (back.batch_id, back.counts, back.results.len()),
            (7, resp.counts, 0)
        );

        let s = v1::SessionResponse {
            tag: 4,
            outcome: Some(v1::session_response::Outcome::Submitted(resp)),
        };
        let sa = SessionAck::decode(s.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(
            sa.submitted.map(|a| (a.items.len(), a.results.len())),
            Some((3, 5))
        );

        // A result that is not length-delimited, or runs past the end, is an error.
        assert!(Ack::decode(&[3 << 3, 1][..]).is_err());
        assert!(Ack::decode(&[3 << 3 | 2, 5, 0][..]).is_err());
        assert_eq!(Ack::decode(&[][..]).map(|a| a.results.len()), Ok(0));
    }
}
