#!/usr/bin/env bash
# Quick start: installs what is missing, builds `mesh`, and runs the mesh
# locally (`mesh up --demo`): a local nats-server, three demo agents behind
# demo gateways, and their listeners. Extra arguments go to `mesh up`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

"$ROOT/scripts/install.sh"
cd "$ROOT"
say "building mesh"
cargo build --quiet --bin mesh --bin mesh-listener
exec "$ROOT/target/debug/mesh" up --demo "$@"
