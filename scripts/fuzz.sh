#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time (default 30 s
# each) and fails if any target finds a crash. Not part of CI (.ci/run).
#   scripts/fuzz.sh [seconds] [target...]
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`); works on the stable
# toolchain through RUSTC_BOOTSTRAP=1. Crashing inputs land in
# fuzz/artifacts/<target>/; keep each one as a unit test in the crate it concerns.
# fuzz/seeds/<target>/ holds committed starting inputs; fuzz/corpus/ grows locally.
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
  mkdir -p "corpus/$target" "seeds/$target"
  log="target/fuzz-$target.log"
  status=0
  cargo fuzz run "$target" "corpus/$target" "seeds/$target" -- -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 \
    2>"$log" || status=$?
  grep -E '^(stat::number_of_executed_units|stat::new_units_added|stat::peak_rss_mb|SUMMARY|Done)|panicked' "$log" >&2 || true
  if [ "$status" -ne 0 ]; then
    failed+=("$target")
    say "$target failed (exit $status); full log: fuzz/$log"
  fi
done
if [ "${#failed[@]}" -gt 0 ]; then
  die "crashes found in: ${failed[*]} (inputs in fuzz/artifacts/)"
fi
say "no crashes in: ${targets[*]}"
