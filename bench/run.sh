#!/usr/bin/env bash
# The whole benchmark harness, one command (see docs/benchmarks.md):
#   nice -n 10 bash bench/run.sh [OUT.md]
# 1. wqd-bench: every figure of the table, side by side with its peers, written to OUT.md
#    (default target/wqd-bench.md) and printed;
#    The gRPC part starts the real daemon and wqctl from target/release (built here, each in
#    its own cargo call so wqd links the same wqd-client features as in the bench build);
# 2. the criterion benches (dispatch, resolve/build) for closer looks, reports in
#    target/criterion/.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/wqd-bench.md}"
start=$(date +%s)
cargo build --release -p wqd-bench --bins --benches
cargo build --release -p wqd --bin wqd
cargo build --release -p wqd-client --bins
./target/release/wqd-bench --out "$out"
cargo bench -p wqd-bench --benches -- --noplot 2>&1 | grep -vE "^(Benchmarking|Found [0-9]+ outliers|  [0-9]+ \\()"
echo "bench/run.sh: done in $(( $(date +%s) - start ))s; table in $out"
