//! The client against a stub server on a temporary Unix socket: proves the Unix connector,
//! the chunked client stream and server streams work end to end without the real daemon.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use wqd_client::proto::{self as v1, dispatch_service_server as ds, topology_service_server as ts};
use wqd_client::{Client, Endpoint, FlushEvent, FlushScope, Item};

#[derive(Default)]
struct Stub {
    messages: Arc<AtomicUsize>,
}

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl ds::DispatchService for Stub {
    async fn submit(
        &self,
        r: Request<v1::SubmitRequest>,
    ) -> Result<Response<v1::SubmitResponse>, Status> {
        let n = r.into_inner().items.len() as u64;
        Ok(Response::new(v1::SubmitResponse {
            batch_id: 1,
            items: (0..n)
                .map(|i| v1::ItemReceipt {
                    item_id: 100 + i,
                    queued: true,
                    duplicate_of: 0,
                    ..Default::default()
                })
                .collect(),
            results: vec![],
            counts: None,
            first_item_id: 100,
            item_count: n,
            queued_count: n,
            duplicates: Vec::new(),
        }))
    }
    async fn submit_stream(
        &self,
        r: Request<Streaming<v1::SubmitStreamRequest>>,
    ) -> Result<Response<v1::SubmitStreamResponse>, Status> {
        let mut s = r.into_inner();
        let mut count = 0u64;
        let mut first = true;
        while let Some(m) = s.next().await {
            let m = m?;
            if m.options.is_some() != first {
                return Err(Status::invalid_argument(
                    "options only on the first message",
                ));
            }
            first = false;
            self.messages.fetch_add(1, Ordering::Relaxed);
            count += m.items.len() as u64;
        }
        Ok(Response::new(v1::SubmitStreamResponse {
            batch_id: 2,
            first_item_id: 1000,
            item_count: count,
            queued_count: count,
            duplicates: vec![],
        }))
    }
    type SessionStream = Out<v1::SessionResponse>;
    async fn session(
        &self,
        _r: Request<Streaming<v1::SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        Err(Status::unimplemented("stub"))
    }
    type FlushStream = Out<v1::FlushResponse>;
    async fn flush(
        &self,
        _r: Request<v1::FlushRequest>,
    ) -> Result<Response<Self::FlushStream>, Status> {
        use v1::flush_response::Event;
        let done = |id| v1::ItemResult {
            item_id: id,
            state: v1::ItemState::Ok as i32,
            ..Default::default()
        };
        let msgs = vec![
            Ok(v1::FlushResponse {
                event: Some(Event::Results(v1::ItemResults {
                    results: vec![done(1), done(2)],
                })),
            }),
            Ok(v1::FlushResponse {
                event: Some(Event::Summary(v1::FlushSummary {
                    items_covered: 2,
                    ..Default::default()
                })),
            }),
        ];
        Ok(Response::new(Box::pin(tokio_stream::iter(msgs))))
    }
    async fn cancel(
        &self,
        _r: Request<v1::CancelRequest>,
    ) -> Result<Response<v1::CancelResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }
    async fn drain(
        &self,
        _r: Request<v1::DrainRequest>,
    ) -> Result<Response<v1::DrainResponse>, Status> {
        Err(Status::not_found("workqueue \"nope\" does not exist"))
    }
    async fn get_results(
        &self,
        _r: Request<v1::GetResultsRequest>,
    ) -> Result<Response<v1::GetResultsResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }
}

#[tonic::async_trait]
impl ts::TopologyService for Stub {
    async fn get_topology(
        &self,
        _r: Request<v1::GetTopologyRequest>,
    ) -> Result<Response<v1::GetTopologyResponse>, Status> {
        Ok(Response::new(v1::GetTopologyResponse {
            snapshot: Some(v1::TopologySnapshot {
                epoch: 7,
                ..Default::default()
            }),
        }))
    }
    type WatchTopologyStream = Out<v1::WatchTopologyResponse>;
    async fn watch_topology(
        &self,
        _r: Request<v1::WatchTopologyRequest>,
    ) -> Result<Response<Self::WatchTopologyStream>, Status> {
        let msgs = (7..10).map(|e| {
            Ok(v1::WatchTopologyResponse {
                snapshot: Some(v1::TopologySnapshot {
                    epoch: e,
                    ..Default::default()
                }),
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(
            msgs.collect::<Vec<_>>(),
        ))))
    }
}

#[tokio::test]
async fn client_round_trips_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wqd.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let messages = Arc::new(AtomicUsize::new(0));
    let stub = Stub {
        messages: Arc::clone(&messages),
    };
    let topo = Stub::default();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(ds::DispatchServiceServer::new(stub))
            .add_service(ts::TopologyServiceServer::new(topo))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await
            .unwrap();
    });

    let endpoint: Endpoint = format!("unix:{}", path.display()).parse().unwrap();
    let client = Client::connect(endpoint)
        .await
        .unwrap()
        .with_chunk_bytes(64 * 1024);

    assert_eq!(client.topology().await.unwrap().epoch, 7);
    let epochs: Vec<u64> = client
        .watch_topology()
        .await
        .unwrap()
        .map(|s| s.unwrap().epoch)
        .collect()
        .await;
    assert_eq!(epochs, vec![7, 8, 9]);

    let r = client
        .submit(wqd_client::Batch::new().items((0..3).map(|_| Item::new("all", "noop"))))
        .await
        .unwrap();
    assert_eq!(r.items.len(), 3);

    let n = 50_000u64;
    let r = client
        .submit_stream(
            "default",
            (0..n).map(|i| Item::new("cache:0", "noop").arg("i", i.to_string())),
        )
        .await
        .unwrap();
    assert_eq!(r.item_count, n);
    assert!(
        messages.load(Ordering::Relaxed) > 1,
        "the batch was split into several messages"
    );

    let mut events = client.flush(FlushScope::Batch(2), false).await.unwrap();
    let mut got = 0;
    while let Some(ev) = events.next().await {
        match ev.unwrap() {
            FlushEvent::Results(r) => got += r.len(),
            FlushEvent::Summary(s) => assert_eq!(s.items_covered, 2),
        }
    }
    assert_eq!(got, 2);

    let err = client.drain("nope").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert_eq!(
        err.to_string(),
        "NOT_FOUND: workqueue \"nope\" does not exist"
    );
}
