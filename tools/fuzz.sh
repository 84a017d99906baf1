#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/, the functions of src/fuzzing.rs) under libFuzzer
# for a bounded time each, starting from fuzz/seeds/<target>/ and the corpus kept under
# target/fuzz-corpus/<target>/ by earlier runs. Prints per target: executions, exec/s, coverage
# (libFuzzer's cov: edges and ft: features), corpus size, peak RSS. A crash is copied to
# fuzz/regressions/<target>/ (which `cargo test` replays: tests/it/fuzz_regressions.rs) and the
# run fails: fix it, keep the input.
#
# Usage: tools/fuzz.sh [TARGET...]   FUZZ_SECONDS=60 per target (CI: 20), FUZZ_RSS_MB=2048.
# Needs the nightly toolchain (libFuzzer's sanitizer coverage; without it, stable with
# RUSTC_BOOTSTRAP=1) and cargo-fuzz, which this script installs into target/tools/ once.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-60}
rss=${FUZZ_RSS_MB:-2048}
export PATH="$PWD/target/tools/bin:$PATH"
# libFuzzer's coverage flags want nightly; a machine without it (and unable to fetch it) builds
# with the stable compiler told to accept them, and says so.
toolchain=+nightly
if ! rustup toolchain list | grep -q '^nightly' && ! rustup toolchain install nightly --profile minimal; then
  echo "fuzz: no nightly toolchain; building with stable and RUSTC_BOOTSTRAP=1" >&2
  export RUSTC_BOOTSTRAP=1
  toolchain=
fi
if ! command -v cargo-fuzz >/dev/null; then
  echo "==> installing cargo-fuzz into target/tools (once)"
  cargo install cargo-fuzz --locked --root target/tools >/dev/null
fi
if [ $# -gt 0 ]; then targets=("$@"); else
  mapfile -t targets < <(ls fuzz/fuzz_targets | sed 's/\.rs$//' | sort)
fi
echo "==> building ${#targets[@]} fuzz targets (nightly, sanitizer coverage; cached in target/fuzz)"
cargo $toolchain fuzz build --target-dir target/fuzz -s none >/dev/null 2>target/fuzz-build.log || {
  cat target/fuzz-build.log >&2; exit 1; }
printf '%-14s %12s %10s %8s %8s %8s %8s  %s\n' target executions exec/s cov ft corpus rss_mb result
failed=0
for t in "${targets[@]}"; do
  corpus=target/fuzz-corpus/$t; artifacts=target/fuzz-artifacts/$t/
  mkdir -p "$corpus" "$artifacts"
  log=target/fuzz-logs/$t.log; mkdir -p target/fuzz-logs
  set +e
  cargo $toolchain fuzz run --target-dir target/fuzz -s none "$t" "$corpus" "fuzz/seeds/$t" -- \
    -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb="$rss" -timeout=10 \
    -max_len=65536 -artifact_prefix="$artifacts" >"$log" 2>&1
  rc=$?
  set -e
  stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
  last=$(grep -E '(DONE|pulse|NEW|REDUCE|INITED).* cov: ' "$log" | tail -1)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last"); ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(ls "$corpus" | wc -l)
  if [ $rc -eq 0 ]; then result=ok; else
    result="CRASH (exit $rc, log $log)"; failed=1
    mkdir -p "fuzz/regressions/$t"
    for a in "$artifacts"*; do [ -f "$a" ] && cp "$a" "fuzz/regressions/$t/" && result="$result; kept $(basename "$a")"; done
  fi
  printf '%-14s %12s %10s %8s %8s %8s %8s  %s\n' "$t" "$(stat number_of_executed_units)" \
    "$(stat average_exec_per_sec)" "${cov:-?}" "${ft:-?}" "$corp" "$(stat peak_rss_mb)" "$result"
done
if [ $failed -ne 0 ]; then
  echo "fuzz: a target crashed; the input is in fuzz/regressions/<target>/ (cargo test replays it): fix it" >&2
  exit 1
fi
