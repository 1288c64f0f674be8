//! wqd-bench: the measurements behind `docs/benchmarks.md`.
//!
//! Each module measures one area and returns plain numbers; the `wqd-bench` binary runs them
//! all in one process and prints the markdown table, and the criterion benches under
//! `benches/` reuse the same rigs for closer looks. Every figure is taken in the same run as
//! its peer and reported as a ratio; every figure is repeated and given as min/median/max.
//!
//! - [`dispatch`]: in-process submit→start latency and batch throughput of the engine versus a
//!   crossbeam-channel handoff to a pinned thread (the floor), rayon and tokio.
//! - [`hotplug`]: the time from a CPU leaving to its pending items starting elsewhere, directly
//!   through `Engine::apply_snapshot` and through the `LiveView`/`Monitor` path on a sysfs tree.
//! - [`scale`]: `GroupMap::resolve`/`build`, `Reader::read`, memory per pending item and
//!   `Engine::apply_snapshot` on generated machines of up to 4096 CPUs.
//! - [`grpc`]: the real `wqd` binary over a Unix socket and TCP loopback against the
//!   transport floor ([`floor`], a decode-and-acknowledge server run by the `wqd-bench-floor`
//!   binary, and the empty unary RPC): batch throughput, single-item round trip, and
//!   `wqctl topology` on generated machines; [`wire`] is the client side.
//! - [`workers`]: attached workers against the same work done by a built-in handler.
//! - [`service`]: the same job (noop items from one client, one worker per CPU, completion
//!   awaited) through wqd, NATS JetStream and Redis, in one run.
//! - [`peers`]: NATS JetStream and Redis run as work queues (servers, workers, client), for
//!   the service section.
//! - [`contention`]: two groups busy at once on one engine against one engine per group
//!   (what the engine's one lock costs).
//! - [`alloc`]: the counting allocator the binary installs to measure memory.

pub mod alloc;
pub mod busy;
pub mod contention;
pub mod dispatch;
pub mod fleet;
pub mod floor;
pub mod grpc;
pub mod hotplug;
pub mod peers;
pub mod report;
pub mod scale;
pub mod service;
pub mod stats;
pub mod topo;
pub mod wire;
pub mod workers;
