#!/usr/bin/env bash
# The whole benchmark harness, one command (see docs/benchmarks.md):
#   nice -n 10 bash bench/run.sh [OUT.md]
# 1. wqd-bench: every figure of the table, side by side with its peers, written to OUT.md
#    (default target/wqd-bench.md) and printed;
#    The gRPC part starts the real daemon and wqctl from target/release (built here, each in
#    its own cargo call so wqd links the same wqd-client features as in the bench build);
#    the service section runs the same job through NATS JetStream and Redis too, and needs the
#    Debian packages nats-server and redis-server: installed here when missing and running as
#    root (otherwise the section says which is missing and reports wqd alone); the fleet
#    section (--only fleet) runs wqd as a fleet member over nats-server, against direct
#    submission and a bare JetStream work queue (skipped without nats-server);
#    the workers section's Python row needs target/pyenv, made here when missing;
#    the busy section repeats the in-process, two-groups and service comparisons beside a
#    thread that never sleeps on each CPU (bench/src/busy.rs);
# 2. the criterion benches (dispatch, resolve/build, the authority rewriter, the result
#    encoder against prost) for closer looks, reports in
#    target/criterion/.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/wqd-bench.md}"
start=$(date +%s)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  for p in nats-server redis-server; do
    command -v "$p" >/dev/null || [ -x "/usr/sbin/$p" ] || need="${need:-} $p"
  done
  if [ -n "${need:-}" ]; then
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086
    { apt-get install -y -qq $need || { apt-get update -qq && apt-get install -y -qq $need; }; } \
      >/dev/null 2>&1 || echo "bench/run.sh: could not install$need; the service section skips it"
  fi
fi
cargo build --release -p wqd-bench --bins --benches
cargo build --release -p wqd --bin wqd
cargo build --release -p wqd-client --bins
# The workers section's Python row runs a stock-grpcio worker from target/pyenv, the venv the
# test suite makes (tests/support/python.rs, which pins its requirements): made here, by one
# quick Python test, when missing; without Python or PyPI the row says skipped.
if [ ! -x target/pyenv/bin/python3 ]; then
  cargo test --release -q -p wqd-e2e --test python unit_tests_against_a_fake_daemon >/dev/null 2>&1 \
    || echo "bench/run.sh: could not make target/pyenv; the Python worker row is skipped"
fi
./target/release/wqd-bench --out "$out"
cargo bench -p wqd-bench --benches -- --noplot 2>&1 | grep -vE "^(Benchmarking|Found [0-9]+ outliers|  [0-9]+ \\()"
echo "bench/run.sh: done in $(( $(date +%s) - start ))s; table in $out"
