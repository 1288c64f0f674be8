//! Client library for wqd: connect to the daemon, build batches, submit, flush, cancel,
//! drain, manage workqueues, read and watch the topology.
//!
//! It stands on `wqd-proto` (the wire contract, shared with the daemon; the default socket
//! path both sides meet at is defined there) and nothing of the daemon. Layers: [`endpoint`]
//! (where the daemon listens, re-exporting [`default_socket_path`]), [`item`] (typed builders that turn into `wqd.v1`
//! messages), [`chunk`] (splitting huge batches into stream messages under a size budget),
//! [`client`] (the connected [`Client`], and [`unix_channel`], the one Unix-socket connector
//! every Rust client uses), [`worker`] (serving handlers of your own as an
//! attached worker, one pinned thread per CPU), `fleet` (feature `fleet`: submitting to a fleet
//! of daemons over NATS JetStream, see `docs/fleet.md`) and [`error`] (the one error enum of this crate,
//! [`ClientError`], which carries the gRPC status unchanged).
//!
//! The generated protocol types are re-exported as [`proto`]; responses are returned as
//! those types so nothing the daemon sends is lost in translation.
//!
//! ```no_run
//! # async fn demo() -> Result<(), wqd_client::ClientError> {
//! use wqd_client::{Batch, Client, Endpoint, Item, Target};
//! let client = Client::connect(Endpoint::default()).await?;
//! let batch = Batch::new()
//!     .items((0..8).map(|_| Item::new(Target::cache(0), "spin").arg("ms", "5")))
//!     .wait(true);
//! let receipt = client.submit(batch).await?;
//! println!("batch {} → {} results", receipt.batch_id, receipt.results.len());
//! # Ok(()) }
//! ```

pub mod chunk;
pub mod client;
mod coalesce;
pub mod endpoint;
pub mod error;
#[cfg(feature = "fleet")]
pub mod fleet;
pub mod item;
pub mod session;
pub mod worker;

pub use client::{
    unix_channel, CancelScope, Client, EventStream, FlushEvent, FlushScope, TlsOptions,
};
pub use endpoint::{default_socket_path, Endpoint};
pub use error::ClientError;
pub use item::{Batch, Item, Target};
pub use session::{Session, SessionAnswer, SessionReceiver, SessionSender};
/// The generated `wqd.v1` types and service clients/servers.
pub use wqd_proto::v1 as proto;
