#!/usr/bin/env bash
# Differential test of meshid's auto mTLS against istiod's own code (tests/interop/automtls):
# builds the release binary if needed, then compares CASES generated snapshots (default 2000)
# starting at seed FIRST_SEED (default 1). A disagreement prints the seed, every differing
# endpoint and a minimised snapshot; rerun one seed with CASES=1 FIRST_SEED=<seed>.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cases="${CASES:-2000}"
first="${FIRST_SEED:-1}"
command -v go >/dev/null || { echo "automtls-diff: no Go toolchain (go 1.26 needed)" >&2; exit 1; }
bin="${MESHID_BIN:-$root/target/release/meshid}"
if [ -z "${MESHID_BIN:-}" ]; then
  (cd "$root" && cargo build --release --bin meshid)
fi
cd "$root/tests/interop"
MESHID_BIN="$bin" AUTOMTLS_CASES="$cases" AUTOMTLS_FIRST_SEED="$first" \
  go test ./automtls/ -run 'TestGeneratedSnapshotsAgreeWithIstiod|TestMissionExampleAgreesWithIstiod' \
  -count=1 -v -timeout "${TIMEOUT:-6h}"
