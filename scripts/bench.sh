#!/usr/bin/env bash
# Runs the benchmark (a release build): its own nats-server, a fast sink
# gateway and listener processes; prints a table and JSON. Extra arguments go
# to mesh-bench (`--quick`, `--json PATH`). It reports figures; it asserts nothing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

"$ROOT/scripts/install.sh"
cd "$ROOT"
say "building mesh-bench (release)"
cargo build --quiet --release -p mesh-tests --bin mesh-bench --bin mesh-listener-under-test
exec "$ROOT/target/release/mesh-bench" "$@"
