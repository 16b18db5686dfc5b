#!/usr/bin/env bash
# Builds the mesh's container images from local files only (nothing can be
# pulled): mesh:local, mesh-nats:local, mesh-redis:local (see deploy/Dockerfile).
# Binaries: $MESH_BIN and $MESH_LISTENER_BIN, else target/${MESH_PROFILE:-debug}/
# (built first when missing); nats-server from .mesh/tools/bin; redis-server
# from Debian. Each image gets its binaries stripped plus the libraries `ldd` lists.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PROFILE="${MESH_PROFILE:-debug}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
MESH_BIN="${MESH_BIN:-$TARGET_DIR/$PROFILE/mesh}"
MESH_LISTENER_BIN="${MESH_LISTENER_BIN:-$TARGET_DIR/$PROFILE/mesh-listener}"
TAG="${MESH_IMAGE_TAG:-local}"

if [[ ! -x "$MESH_BIN" || ! -x "$MESH_LISTENER_BIN" ]]; then
    say "building mesh and mesh-listener ($PROFILE)"
    flag=(); [[ "$PROFILE" == release ]] && flag=(--release)
    (cd "$ROOT" && cargo build "${flag[@]}" -p mesh-bot -p mesh-listener --bins)
fi
NATS_BIN="$(readlink -f "$(command -v nats-server)")" || die "nats-server missing; run scripts/install.sh"
REDIS_BIN="$(command -v redis-server)" || die "redis-server missing; run scripts/install.sh"
command -v docker >/dev/null || die "docker is not installed"

CONTEXT="$(mktemp -d)"
trap 'rm -rf "$CONTEXT"' EXIT

# add <rootfs> <binary> <name>: the binary (stripped) as /usr/local/bin/<name>, and its libraries.
add() {
    local root="$CONTEXT/rootfs-$1" bin="$2" name="$3"
    mkdir -p "$root/usr/local/bin"
    strip -o "$root/usr/local/bin/$name" "$bin" 2>/dev/null || cp "$bin" "$root/usr/local/bin/$name"
    chmod 0755 "$root/usr/local/bin/$name"
    # `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or `/lib64/ld-linux-x86-64.so.2 (0x...)`;
    # a static binary has none.
    { ldd "$bin" 2>/dev/null || true; } | { grep -o '/[^ ]*' || true; } | while read -r lib; do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
}

add mesh "$MESH_BIN" mesh
add mesh "$MESH_LISTENER_BIN" mesh-listener
add nats "$NATS_BIN" nats-server
add nats "$MESH_BIN" mesh
add redis "$REDIS_BIN" redis-server
add redis "$MESH_BIN" mesh
# CA certificates, for listeners that reach gateways over https.
CA_BUNDLE="${MESH_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
[[ -f "$CA_BUNDLE" ]] || die "$CA_BUNDLE missing; apt-get install ca-certificates (or set MESH_CA_BUNDLE)"
mkdir -p "$CONTEXT/rootfs-mesh/etc/ssl/certs"
cp -L "$CA_BUNDLE" "$CONTEXT/rootfs-mesh/etc/ssl/certs/ca-certificates.crt"
mkdir -p "$CONTEXT/data" && touch "$CONTEXT/data/.keep"
cp "$ROOT/deploy/Dockerfile" "$CONTEXT/Dockerfile"

for target in mesh nats redis; do
    image="mesh-$target:$TAG"; [[ "$target" == mesh ]] && image="mesh:$TAG"
    say "building $image"
    docker build --quiet --target "$target" -t "$image" "$CONTEXT" >/dev/null
done
say "images: mesh:$TAG mesh-nats:$TAG mesh-redis:$TAG"
