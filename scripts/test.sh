#!/usr/bin/env bash
# Runs the whole test suite: installs what is missing, then `cargo test` over
# the workspace against real servers started by the test harness.
# Extra arguments go to `cargo test`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

"$ROOT/scripts/install.sh"
cd "$ROOT"
say "running the test suite"
exec cargo test --workspace "$@"
