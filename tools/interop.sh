#!/usr/bin/env bash
# The interop suite: the reference implementations (go-spiffe, SPIRE, Istio's CSR client and
# agent, go-control-plane's Envoy protos) run against meshid's release binary.
#
# Builds what it needs (cached): meshid (cargo build --release --locked), then each reference
# program from its own small module under tests/interop/peers/<name>/, installed into
# target/interop/<name>-<version>/ and rebuilt only when its go.mod/go.sum change. Then runs
# `go vet ./...` and `go test ./...` in tests/interop and prints a summary table (peer, version,
# what was exercised, result): the README's "Interoperability" table.
#
# A missing toolchain or a peer that cannot be built fails the run with the reason.
# Environment: INTEROP_TIMEOUT (go test -timeout, default 15m), INTEROP_RUN (go test -run).
# `tools/interop.sh --prebuild` only builds the peers and compiles the suite's dependencies
# (go vet), without meshid or any test: .ci/run starts it in the background at low priority.
# Peer builds hold a lock, so a second caller waits and then finds them cached.
set -euo pipefail
prebuild=false
[ "${1:-}" = --prebuild ] && prebuild=true
cd "$(dirname "$0")/.."
repo=$(pwd)
out="$repo/target/interop"
mkdir -p "$out"

die() { echo "interop: $*" >&2; exit 1; }
now() { date +%s; }
t_start=$(now)

# --- toolchains ---------------------------------------------------------------------------
command -v cargo >/dev/null || die "cargo not found: install a Rust toolchain (rustup) to build meshid"
command -v go >/dev/null || die "go not found: install Go >= 1.26 (the suite's go.mod says go 1.26)"
gov=$(go env GOVERSION)
case "$gov" in
  go1.2[6-9]* | go1.[3-9][0-9]* | go[2-9]*) ;;
  *) die "Go $gov is too old: tests/interop needs go >= 1.26" ;;
esac
# SPIRE's SQLite datastore (github.com/mattn/go-sqlite3) is cgo: it needs a C compiler.
command -v "${CC:-gcc}" >/dev/null || die "${CC:-gcc} not found: SPIRE's SQLite datastore needs cgo (apt-get install gcc)"
[ "$(CGO_ENABLED=${CGO_ENABLED:-1} go env CGO_ENABLED)" = 1 ] || die "CGO_ENABLED=0: SPIRE's SQLite datastore needs cgo"

# --- meshid --------------------------------------------------------------------------------
if ! $prebuild; then
  echo "==> meshid: cargo build --release --locked"
  t0=$(now)
  cargo build --release --locked --quiet || die "cargo build --release failed"
  export MESHID_BIN="$repo/target/release/meshid"
  echo "    $MESHID_BIN ($(( $(now) - t0 ))s)"
fi

# --- peers ---------------------------------------------------------------------------------
# build_peer NAME PACKAGE BINARY: go install PACKAGE from tests/interop/peers/NAME into
# target/interop/NAME-<version>/, where <version> is the module version of PACKAGE's module in
# that go.mod; skipped when the stamp (sha256 of go.mod + go.sum) matches.
build_peer() {
  local name=$1 pkg=$2 binary=$3 dir mod version stamp
  dir="$repo/tests/interop/peers/$name"
  [ -f "$dir/go.mod" ] || die "peer $name: $dir/go.mod is missing"
  mod=$(cd "$dir" && go list -f '{{.Module.Path}}' "$pkg") || die "peer $name: cannot resolve $pkg in $dir/go.mod"
  version=$(cd "$dir" && go list -m -f '{{.Version}}' "$mod") || die "peer $name: no version of $mod"
  local dest="$out/$name-$version"
  stamp=$(cat "$dir/go.mod" "$dir/go.sum" | sha256sum | cut -c1-16)
  if [ -x "$dest/$binary" ] && [ "$(cat "$dest/.stamp" 2>/dev/null)" = "$stamp" ]; then
    echo "==> $name $version: cached in $dest"
  else
    echo "==> $name $version: go install $pkg (first build takes minutes)"
    local t0; t0=$(now)
    mkdir -p "$dest"
    # -gcflags=all=-l (no inlining): a fifth less compile time for peers that run no hot loop.
    (cd "$dir" && CGO_ENABLED=1 GOBIN="$dest" go install -trimpath -gcflags=all=-l "$pkg") ||
      die "peer $name: building $pkg@$version failed (see above)"
    echo "$stamp" > "$dest/.stamp"
    echo "    built in $(( $(now) - t0 ))s: $dest/$binary"
  fi
  printf '%s\n' "$version" > "$out/$name.version"
}
command -v flock >/dev/null || die "flock (util-linux) is needed to serialize peer builds"
exec 9>"$out/.peers.lock"
flock 9 || die "cannot lock $out/.peers.lock"
build_peer spire github.com/spiffe/spire/cmd/spire-server spire-server
build_peer pilot-agent istio.io/istio/pilot/cmd/pilot-agent pilot-agent
# The agent renders Envoy's bootstrap from the template Istio's proxy image ships as
# /var/lib/istio/envoy/envoy_bootstrap_tmpl.json (pilot/docker/Dockerfile.proxyv2); it comes
# from the same module version.
agent_dir="$out/pilot-agent-$(cat "$out/pilot-agent.version")"
istio_src=$(cd tests/interop/peers/pilot-agent && go list -m -f '{{.Dir}}' istio.io/istio) ||
  die "peer pilot-agent: istio.io/istio is not in the module cache"
cp "$istio_src/tools/packaging/common/envoy_bootstrap.json" "$agent_dir/envoy_bootstrap_tmpl.json" ||
  die "peer pilot-agent: no tools/packaging/common/envoy_bootstrap.json in $istio_src"
# py-spiffe (the `spiffe` package on PyPI) and its dependencies, pinned in
# tests/interop/workload/py/requirements.txt, in a venv re-made whenever that file changes.
PYSPIFFE_VERSION=$(sed -n 's/^spiffe==//p' tests/interop/workload/py/requirements.txt)
pyenv="$out/pyspiffe"
pystamp=$(sha256sum tests/interop/workload/py/requirements.txt | cut -c1-16)
if [ "$(cat "$pyenv/stamp" 2>/dev/null)" != "$pystamp" ]; then
  command -v python3 >/dev/null || die "python3 not found: py-spiffe's driver needs Python >= 3.9 (apt-get install python3 python3-venv)"
  rm -rf "$pyenv"
  t0=$(now)
  python3 -m venv "$pyenv" || die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
  "$pyenv/bin/pip" install --quiet --disable-pip-version-check -r tests/interop/workload/py/requirements.txt ||
    die "pip install -r tests/interop/workload/py/requirements.txt failed (above)"
  echo "$pystamp" > "$pyenv/stamp"
  echo "    py-spiffe $PYSPIFFE_VERSION installed ($(( $(now) - t0 ))s)"
fi
export MESHID_PYSPIFFE_PYTHON="$pyenv/bin/python"
# The `spiffe` crate's driver: a project of its own (tests/interop/rust-spiffe, its own
# Cargo.lock), built by cargo into target/ (incremental, so cached).
if ! $prebuild; then
  t0=$(now)
  (cd tests/interop/rust-spiffe && cargo build --release --locked --quiet --target-dir "$out/rust-spiffe") ||
    die "building tests/interop/rust-spiffe (the spiffe crate's driver) failed"
  export MESHID_RUST_SPIFFE_BIN="$out/rust-spiffe/release/fetch-svid"
  echo "    spiffe crate driver ready ($(( $(now) - t0 ))s)"
fi
export SPIRE_SERVER_BIN="$out/spire-$(cat "$out/spire.version")/spire-server"
export PILOT_AGENT_BIN="$out/pilot-agent-$(cat "$out/pilot-agent.version")/pilot-agent"
flock -u 9

# --- the suite -----------------------------------------------------------------------------
cd "$repo/tests/interop"
echo "==> go vet ./..."
go vet ./... || die "go vet failed"
if $prebuild; then
  echo "interop: prebuilt (peers and the suite's compiled dependencies) in $(( $(now) - t_start ))s"
  exit 0
fi
echo "==> go test ./... (timeout ${INTEROP_TIMEOUT:-15m})"
log="$out/go-test.log"
t0=$(now)
set +e
go test -count=1 -p 4 -v -timeout "${INTEROP_TIMEOUT:-15m}" ${INTEROP_RUN:+-run "$INTEROP_RUN"} ./... 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
suite_secs=$(( $(now) - t0 ))

# --- summary -------------------------------------------------------------------------------
modv() { go list -m -f '{{.Version}}' "$1"; }
result() { # the top-level result of test $1 in the log
  local line
  line=$(grep -E "^--- (PASS|FAIL|SKIP): $1 " "$log" | tail -1 || true)
  if [ -z "$line" ]; then echo "not run"; else
    echo "$line" | sed -E 's/^--- ([A-Z]+): [^ ]+ \(([0-9.]+)s\)/\1 (\2 s)/'
  fi
}
row() { printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$(result "$4")"; }
gospiffe=$(modv github.com/spiffe/go-spiffe/v2)
istioapi=$(modv istio.io/api)
gcp=$(modv github.com/envoyproxy/go-control-plane/envoy)
grpcv=$(modv google.golang.org/grpc)
{
  echo
  echo "Interoperability (tests/interop, $(go env GOVERSION), grpc-go $grpcv; suite ${suite_secs}s)"
  echo
  echo "| peer | version | what was exercised | result |"
  echo "| --- | --- | --- | --- |"
  row go-spiffe "$gospiffe" "x509svid.Verify + ParseRaw accept SVIDs from SDS default, the CSR API and meshid cert issue" TestX509SVIDVerifyAndParseRawAcceptEverySVIDMeshidIssues
  row go-spiffe "$gospiffe" "spiffebundle.Parse + Read accept bundle export and the endpoint body (same roots, sequence, hint)" TestSpiffebundleParseAndReadAcceptMeshidExportAndEndpointBody
  row go-spiffe "$gospiffe" "federation.FetchBundle from meshid's endpoint, WithWebPKIRoots and WithSPIFFEAuth" TestFederationFetchBundleFetchesMeshidEndpointInBothProfiles
  row go-spiffe "$gospiffe" "meshid fetches federation.NewHandler (https_web, https_spiffe) and follows its root rotation within the hint" TestMeshidFetchesGoSpiffeHandlerInBothProfilesAndFollowsItsRotation
  row go-spiffe "$gospiffe" "tlsconfig.MTLSServerConfig/MTLSClientConfig + AuthorizeID with SDS certificates through prepare/activate/taint/revoke" TestGoSpiffeMTLSWorkloadsWithMeshidSVIDsSurviveARootRotation
  row "go-spiffe workloadapi" "$gospiffe" "NewX509Source (address and SPIFFE_ENDPOINT_SOCKET), FetchX509SVID/FetchX509Bundles from meshid agent's Workload API" TestGoSpiffeX509SourceGetsTheAgentsSVIDAndBundle
  row "go-spiffe workloadapi" "$gospiffe" "WatchX509Context: an update on renewal and on a root prepared on the server" TestWatchX509ContextSeesARenewalAndARootChange
  row "go-spiffe workloadapi" "$gospiffe" "two agent-fed workloads, MTLSServerConfig/MTLSClientConfig through prepare/activate/taint/revoke" TestGoSpiffeMTLSThroughAgentsSurvivesARootRotation
  row py-spiffe "$PYSPIFFE_VERSION" "WorkloadApiClient via SPIFFE_ENDPOINT_SOCKET: fetch_x509_svid + fetch_x509_bundles from meshid agent" TestPySpiffeFetchesTheAgentsSVIDAndBundle
  row "spiffe (crate)" "$(sed -n 's/^spiffe = { version = "=\([0-9.]*\)".*/\1/p' "$repo/tests/interop/rust-spiffe/Cargo.toml")" "X509Source via SPIFFE_ENDPOINT_SOCKET: svid() + bundle_for_trust_domain() from meshid agent" TestSpiffeCrateX509SourceGetsTheAgentsSVIDAndBundle
  row "go-spiffe proto" "$gospiffe" "a Workload API call without workload.spiffe.io: InvalidArgument" TestTheSecurityHeaderIsRequired
  row "prometheus (rulefmt, promql)" "$(modv github.com/prometheus/prometheus)" "deploy/prometheus rules as promtool checks them; PrometheusRule = plain groups; every dashboard query parses" TestRulesParseAsPromtoolChecksThem
  row SPIRE "$(cat "$out/spire.version")" "spire-server federates both ways (https_spiffe); x509 mint SVIDs verify via meshid SDS; meshid SVIDs via bundle list; rotations both ways" TestSpireAndMeshidFederateBothWaysAndFollowEachOthersRotations
  row istio.io/api "$istioapi" "IstioCertificateService client, CreateCertificate as istio-agent sends it; leaf-first, root-last chain" TestCreateCertificateAsIstioAgentSendsItReturnsLeafFirstRootLast
  row "pilot-agent (istio.io/istio)" "$(cat "$out/pilot-agent.version")" "Istio's agent with CA_ADDR=meshid, no Envoy: default + ROOTCA on its SDS socket" TestPilotAgentGetsItsWorkloadCertificateFromMeshid
  row go-control-plane/envoy "$gcp" "SDS StreamSecrets (ACK/NACK), strict decode + ValidateAll" TestSDSStateOfTheWorldDecodesWithEnvoyProtosAndFollowsACKNACK
  row go-control-plane/envoy "$gcp" "SDS DeltaSecrets (subscribe, removed_resources, push)" TestSDSDeltaSubscribesRemovesAndPushesWithEnvoyProtos
  row go-control-plane/envoy "$gcp" "SDS FetchSecrets" TestFetchSecretsUnaryReturnsROOTCA
  row go-control-plane/envoy "$gcp" "EDS StreamEndpoints: tlsMode metadata picks the cluster's transport socket match" TestEDSMetadataPicksEnvoysTransportSocketMatchPerEndpoint
  row go-control-plane/envoy "$gcp" "EDS DeltaEndpoints (known cluster, removed unknown one)" TestDeltaEDSAnswersKnownClustersAndRemovesUnknownOnes
  row "istiod (istio.io/istio pilot)" "$(modv istio.io/istio)" "auto mTLS differential: istiod's fake discovery server vs describe/EDS on ${AUTOMTLS_CASES:-300} generated snapshots ($(grep -o 'compared [0-9]* snapshots, [0-9]* client views, [0-9]* clusters, [0-9]* endpoints' "$log" | head -1 || true))" TestGeneratedSnapshotsAgreeWithIstiod
  row "istiod (istio.io/istio pilot)" "$(modv istio.io/istio)" "auto mTLS differential on the mission's mixed-traffic example" TestMissionExampleAgreesWithIstiod
} | tee "$out/summary.md"
echo
echo "interop: go test exit $status; total $(( $(now) - t_start ))s (log: $log)"
exit "$status"
