#!/usr/bin/env bash
# Regenerates the Python code of the wire contract (wqd/v1/*_pb2.py, *_pb2_grpc.py, *.pyi)
# from proto/wqd/v1/*.proto with grpcio-tools, which bundles the protobuf compiler as a Python
# module: no protoc binary is needed or used.
#
#   client/python/regen.sh            rewrite client/python/wqd/v1/ in place
#   client/python/regen.sh OUT_DIR    write OUT_DIR/wqd/v1/ instead (the freshness test does,
#                                     then compares with the checked-in files)
#
# grpcio-tools and protobuf are pinned: the generated files name the versions that made them
# (the protobuf gencode version is the oldest protobuf runtime they load on, and
# GRPC_GENERATED_VERSION the oldest grpcio), so other versions would produce other files.
# The tools live in a venv of their own, never in the package's dependencies: REGEN_VENV names
# one to create once and reuse (the tests keep theirs in target/); without it a throwaway venv
# is made in a temporary folder and removed.
set -euo pipefail

TOOLS=("grpcio-tools==1.81.1" "protobuf==6.33.5")

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${1:-$here}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

cleanup=()
trap 'rm -rf "${cleanup[@]}"' EXIT
venv="${REGEN_VENV:-}"
if [ -z "$venv" ]; then
  venv="$(mktemp -d)"
  cleanup+=("$venv")
fi
want="$(printf '%s\n' "${TOOLS[@]}")"
if [ "$(cat "$venv/.wqd-regen-ready" 2>/dev/null)" != "$want" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --disable-pip-version-check -q "${TOOLS[@]}"
  printf '%s\n' "$want" >"$venv/.wqd-regen-ready"
fi

gen="$(mktemp -d)"
cleanup+=("$gen")
# With -I proto, proto/wqd/v1/item.proto is wqd/v1/item.proto: the files land in wqd/v1/,
# which is this package's layout (import name wqd.v1).
(cd "$repo" && "$venv/bin/python" -m grpc_tools.protoc -I proto \
  --python_out="$gen" --pyi_out="$gen" --grpc_python_out="$gen" proto/wqd/v1/*.proto)
# The compiler imports sibling files absolutely (from wqd.v1 import item_pb2); make those
# imports package-relative so the package works under any name it is vendored as.
for f in "$gen"/wqd/v1/*.py "$gen"/wqd/v1/*.pyi; do
  sed -i -E 's/^from wqd\.v1 import ([A-Za-z0-9_]+_pb2) as /from . import \1 as /' "$f"
done
mkdir -p "$out/wqd/v1"
rm -f "$out"/wqd/v1/*_pb2.py "$out"/wqd/v1/*_pb2_grpc.py "$out"/wqd/v1/*_pb2.pyi
cp "$gen"/wqd/v1/* "$out/wqd/v1/"
