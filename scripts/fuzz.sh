#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time (default 30 s
# each) and fails if any target finds a crash. Not part of CI (.ci/run).
#   scripts/fuzz.sh [seconds] [target...]
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`); works on the stable
# toolchain through RUSTC_BOOTSTRAP=1. Crashing inputs land in
# fuzz/artifacts/<target>/; keep each one as a unit test in the crate it concerns.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

seconds="${1:-30}"
shift || true
cd "$ROOT/fuzz"
mkdir -p target
command -v cargo-fuzz >/dev/null || die "cargo-fuzz is missing; run: cargo install cargo-fuzz --locked"
# The fuzz workspace builds into its own target dir (sanitizer flags differ from the main build).
unset CARGO_TARGET_DIR
export RUSTC_BOOTSTRAP=1
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
failed=()
for target in "${targets[@]}"; do
  say "fuzzing $target for ${seconds}s"
  mkdir -p "corpus/$target"
  if ! cargo fuzz run "$target" "corpus/$target" -- -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 \
      2> >(tee "target/fuzz-$target.log" | grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+==|SUMMARY|Done)' >&2); then
    failed+=("$target")
  fi
done
if [ "${#failed[@]}" -gt 0 ]; then
  die "crashes found in: ${failed[*]} (inputs in fuzz/artifacts/)"
fi
say "no crashes in: ${targets[*]}"
