#!/usr/bin/env bash
# The README's test command: every test meshid has, in four parts.
#
#   1. cargo test                 the Rust unit and integration tests (in-process servers, the fake
#                                 API server, real gRPC clients and TLS handshakes, openssl as verifier)
#   2. tools/kube-tests.sh        the tests on a real kube-apiserver and etcd (tests/it/kube_real/),
#                                 built from the Go module proxy on first use and cached under target/
#   3. tools/ui-tests.sh          the status page in headless Chromium (WebDriver) with axe-core
#   4. tools/interop.sh           the reference implementations against meshid's release binary:
#                                 go-spiffe, SPIRE, Istio's CSR client and pilot-agent, go-control-plane's
#                                 Envoy protos, and istiod's own auto-mTLS decisions (tests/interop/)
#
# Needs: a Rust toolchain, Go >= 1.26 with the module proxy, gcc (SPIRE's SQLite is cgo), openssl,
# kubectl, setpriv and unshare (util-linux), chromium, chromium-driver and npm (the ui part), and
# root for the interop part. What is missing is
# listed before anything runs, and the run fails; nothing is skipped.
# Run one part with `tools/test.sh rust|kube|ui|interop`.
set -euo pipefail
cd "$(dirname "$0")/.."

parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(rust kube ui interop)

# Everything the parts need, checked before any of them runs (a fresh machine learns it all at
# once, not after the first part's build). .ci/run installs the Debian packages.
declare -a missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$1 ($2)"); }
for part in "${parts[@]}"; do
  case "$part" in
    rust) need cargo "a Rust toolchain: rustup"; need openssl "apt-get install openssl"
      # the README's shell blocks (tests/it/readme.rs) call these
      need kubectl "apt-get install kubectl"; need jq "apt-get install jq"; need curl "apt-get install curl"
      # tests/it/faults.rs fills and remounts a tmpfs in a mount namespace of its own
      need unshare "apt-get install util-linux"
      [ "$(id -u)" = 0 ] || missing+=("root (tests/it/faults.rs mounts a tmpfs in a mount namespace: unshare --mount)") ;;
    kube)
      need go "Go >= 1.26: https://go.dev/dl"; need kubectl "apt-get install kubectl"
      need setpriv "apt-get install util-linux"; need flock "apt-get install util-linux" ;;
    ui)
      need chromium "apt-get install chromium"; need chromedriver "apt-get install chromium-driver"
      need npm "apt-get install npm (it installs axe-core)" ;;
    interop)
      need go "Go >= 1.26: https://go.dev/dl"; need gcc "apt-get install gcc (SPIRE's SQLite is cgo)"
      need unshare "apt-get install util-linux"; need flock "apt-get install util-linux"
      [ "$(id -u)" = 0 ] || missing+=("root (pilot-agent runs in a network namespace of its own: unshare --net)") ;;
  esac
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "test.sh: missing before any test runs:" >&2
  printf '  - %s\n' "${missing[@]}" | sort -u >&2
  exit 1
fi

declare -a summary=()
status=0
for part in "${parts[@]}"; do
  start=$(date +%s)
  case "$part" in
    rust) cmd=(cargo test) ;;
    kube) cmd=(bash tools/kube-tests.sh) ;;
    ui) cmd=(bash tools/ui-tests.sh) ;;
    interop) cmd=(bash tools/interop.sh) ;;
    *) echo "test.sh: unknown part '$part' (rust, kube, ui or interop)" >&2; exit 2 ;;
  esac
  echo "==> test.sh: $part: ${cmd[*]}"
  if "${cmd[@]}"; then result=ok; else result=FAILED; status=1; fi
  summary+=("$part: $result ($(( $(date +%s) - start ))s)")
done
echo "==> test.sh summary"
printf '    %s\n' "${summary[@]}"
exit "$status"
