#!/usr/bin/env bash
# Runs the whole test suite: installs what is missing, then every test of the
# workspace under cargo-nextest (one process per test, a time limit per test:
# .config/nextest.toml) against real servers started by the test harness,
# then the doc tests. Extra arguments go to `cargo nextest run`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

"$ROOT/scripts/install.sh"
cd "$ROOT"
say "running the doc tests"
cargo test --workspace --doc --quiet
say "running the test suite"
exec cargo nextest run --workspace "$@"
