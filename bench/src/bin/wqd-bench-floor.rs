//! `wqd-bench-floor`: the benchmark-only decode-and-acknowledge gRPC server (see
//! `wqd_bench::floor`), run by `wqd-bench` as a separate process beside the real `wqd`.
//!
//! Usage: `wqd-bench-floor --socket PATH [--tcp-listen ADDR] [--nodelay]`. Prints
//! `floor: listening on tcp:ADDR` on stderr once both listeners are bound; stops on
//! SIGTERM/SIGINT and removes the socket file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let Some(socket) = value("--socket").map(PathBuf::from) else {
        eprintln!("usage: wqd-bench-floor --socket PATH [--tcp-listen ADDR] [--nodelay]");
        return ExitCode::from(64);
    };
    let tcp: SocketAddr = match value("--tcp-listen")
        .unwrap_or_else(|| "127.0.0.1:0".into())
        .parse()
    {
        Ok(a) => a,
        Err(e) => {
            eprintln!("floor: --tcp-listen: {e}");
            return ExitCode::from(64);
        }
    };
    let nodelay = args.iter().any(|a| a == "--nodelay");
    // The same runtime shape as wqd's (src/bin/wqd.rs): multi-thread, 2 workers.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("floor-rpc")
        .enable_all()
        .build()
        .expect("tokio runtime");
    let r = rt.block_on(wqd_bench::floor::serve(&socket, tcp, nodelay, |a| {
        eprintln!("floor: listening on tcp:{a}");
    }));
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("floor: {e}");
            ExitCode::from(1)
        }
    }
}
