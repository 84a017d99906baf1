#!/usr/bin/env bash
# The tests on a real kube-apiserver and etcd (tests/it/kube_real/): builds the binaries (cached,
# tools/kube-bins.sh), then runs those tests, which a plain `cargo test` lists as ignored.
# Extra arguments go to the test binary (e.g. a test name filter is already set: kube_real).
# Fails with the reason when the binaries cannot be built or a test fails.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v setpriv >/dev/null 2>&1 ||
  { echo "kube-tests: setpriv (util-linux) is needed to tie etcd and kube-apiserver to the test process" >&2; exit 1; }
command -v kubectl >/dev/null 2>&1 ||
  { echo "kube-tests: kubectl is needed to render deploy/kubernetes (kubectl kustomize); .ci/run installs it" >&2; exit 1; }

assignments="$(tools/kube-bins.sh)" || { echo "kube-tests: tools/kube-bins.sh failed (above)" >&2; exit 1; }
while IFS='=' read -r name value; do
  case "$name" in
    MESHID_KUBE_APISERVER | MESHID_ETCD | MESHID_ISTIO_CRDS) export "$name=$value" ;;
    *) echo "kube-tests: unexpected line from tools/kube-bins.sh: $name=$value" >&2; exit 1 ;;
  esac
done <<<"$assignments"
echo "kube-tests: kube-apiserver $MESHID_KUBE_APISERVER, etcd $MESHID_ETCD, Istio CRDs $MESHID_ISTIO_CRDS" >&2

# --nocapture: the tests print start-up time and the measured latencies.
cargo test --test it kube_real -- --include-ignored --nocapture "$@"
