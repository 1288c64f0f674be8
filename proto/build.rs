//! Compiles `wqd/v1/*.proto` with protox (pure Rust, no protoc needed) and generates the
//! message types plus tonic client and server code with tonic-prost-build. Also writes the
//! encoded `FileDescriptorSet` (imports included) for server reflection, and the daemon's own
//! `DispatchService` server (src/out.rs).

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "wqd/v1/item.proto",
    "wqd/v1/dispatch.proto",
    "wqd/v1/workqueue.proto",
    "wqd/v1/topology.proto",
    "wqd/v1/stats.proto",
    "wqd/v1/worker.proto",
    "wqd/fleet/v1/fleet.proto",
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

    // `DispatchService`'s server once more, into OUT_DIR/out, for the daemon: every message is
    // the stock one (`crate::v1`) except the two responses that carry item results, which the
    // server sends pre-encoded (src/out.rs; same wire bytes), and `SubmitRequest`, whose items
    // it decodes as runs of identical items (src/submit_in.rs); a session's messages wrap those
    // two. Clients keep the stock types.
    let out = out_dir.join("out");
    std::fs::create_dir_all(&out)?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .build_transport(false)
        .codec_path("crate::codec::Codec")
        .extern_path(".wqd.v1", "crate::v1")
        .extern_path(".wqd.v1.SubmitResponse", "crate::out::SubmitResponseOut")
        .extern_path(".wqd.v1.FlushResponse", "crate::out::FlushResponseOut")
        .extern_path(".wqd.v1.SubmitRequest", "crate::submit_in::SubmitRequestIn")
        .extern_path(
            ".wqd.v1.SessionRequest",
            "crate::submit_in::SessionRequestIn",
        )
        .extern_path(".wqd.v1.SessionResponse", "crate::out::SessionResponseOut")
        .out_dir(&out)
        .compile_fds(protox::compile(["wqd/v1/dispatch.proto"], ["."])?)?;
    Ok(())
}
