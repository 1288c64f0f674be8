//! Compiles `wqd/v1/*.proto` with protox (pure Rust, no protoc needed) and generates the
//! message types plus tonic client and server code with tonic-prost-build. Also writes the
//! encoded `FileDescriptorSet` (imports included) for server reflection.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "wqd/v1/item.proto",
    "wqd/v1/dispatch.proto",
    "wqd/v1/workqueue.proto",
    "wqd/v1/topology.proto",
    "wqd/v1/stats.proto",
    "wqd/v1/worker.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }

    // Source info keeps the .proto comments as rustdoc; imports make the set self-contained
    // (google/protobuf/*.proto included), which reflection needs.
    let fds = protox::compile(PROTOS, ["."])?;
    std::fs::write(out_dir.join("wqd_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // The generated `connect()` would force tonic's transport feature on every user;
        // clients build a Channel themselves (see wqd-client).
        .build_transport(false)
        // prost's codec, but a message that does not decode is INVALID_ARGUMENT (src/codec.rs).
        .codec_path("crate::codec::Codec")
        .compile_fds(fds)?;
    Ok(())
}
