//! The wqd wire contract: the `wqd.v1` protobuf package, generated at build time from
//! `proto/wqd/v1/*.proto` (the .proto files are the source of truth; their comments are
//! the field-by-field documentation).
//!
//! This crate owns the generated code, the descriptor set, the one codec both sides use
//! ([`codec::Codec`]), the default socket path both sides meet at ([`socket`]), the Unix stream
//! both sides read and write it through ([`stream`]) and the daemon's
//! build of `DispatchService`, which sends item results pre-encoded in the stock wire bytes
//! ([`out`]). Invariant: it adds no behaviour beyond that codec's error mapping, so
//! any other-language client compiled from the same .proto files sees exactly what Rust
//! clients and the daemon see.

pub mod codec;
pub mod fleet;
pub mod out;
pub mod socket;
pub mod stream;
pub mod submit_in;

/// Generated types live under their protobuf package path.
pub mod wqd {
    /// Package `wqd.v1`: messages, enums, and for each service a `*_client` and `*_server`
    /// module.
    #[allow(clippy::all, clippy::pedantic, missing_docs)]
    pub mod v1 {
        // The generated services name their codec by path: `crate::codec::Codec`.
        tonic::include_proto!("wqd.v1");
    }
    /// Package `wqd.fleet.v1`: the messages fleet members and clients exchange over NATS
    /// JetStream (no services; see [`crate::fleet`] and `docs/fleet.md`).
    pub mod fleet {
        #[allow(clippy::all, clippy::pedantic, missing_docs)]
        pub mod v1 {
            tonic::include_proto!("wqd.fleet.v1");
        }
    }
}

pub use wqd::v1;

/// The encoded `google.protobuf.FileDescriptorSet` of `wqd.v1` and its imports, for
/// `tonic_reflection::server::Builder::register_encoded_file_descriptor_set`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/wqd_descriptor.bin"));

#[cfg(test)]
mod tests {
    use prost::Message;

    #[test]
    fn descriptor_set_names_every_service() {
        let fds = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET)
            .expect("descriptor set decodes");
        let services: Vec<String> = fds
            .file
            .iter()
            .filter(|f| f.package() == "wqd.v1")
            .flat_map(|f| f.service.iter().map(|s| s.name().to_string()))
            .collect();
        for s in [
            "DispatchService",
            "WorkqueueService",
            "TopologyService",
            "StatsService",
        ] {
            assert!(services.iter().any(|x| x == s), "{s} missing: {services:?}");
        }
        assert!(fds
            .file
            .iter()
            .any(|f| f.name() == "google/protobuf/timestamp.proto"));
    }
}
