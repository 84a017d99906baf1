#!/usr/bin/env bash
# Builds a real kube-apiserver and etcd from the Go module proxy for the tests on a real API server
# (tests/it/kube_real/), caches them under target/interop/<name>-<version>/, and prints their paths
# as shell assignments:
#
#   MESHID_KUBE_APISERVER=/abs/target/interop/kube-apiserver-v1.37.2/kube-apiserver
#   MESHID_ETCD=/abs/target/interop/etcd-v3.6.16/etcd
#   MESHID_ISTIO_CRDS=/abs/target/interop/istio-api-crds-v1.32.0/customresourcedefinitions.gen.yaml
#
# (`eval "$(tools/kube-bins.sh)"` sets them; tools/kube-tests.sh does that and runs the tests.)
# The versions are the ones the nested modules pin: tests/interop/peers/kube/go.mod (k8s.io/kubernetes,
# every k8s.io/* staging module replaced by its matching v0.x release) and tests/interop/peers/etcd/go.mod
# (go.etcd.io/etcd/server/v3, whose root package is etcd's main). A cached binary is reused while its
# module graph is unchanged. Anything that cannot be built exits non-zero with the reason.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
peers="$root/tests/interop/peers"
out_root="${MESHID_INTEROP_DIR:-$root/target/interop}"

die() {
  echo "kube-bins: $*" >&2
  exit 1
}

command -v go >/dev/null 2>&1 ||
  die "the go command is not on PATH; Go 1.26 or newer is needed to build kube-apiserver and etcd"

# version_of MODULE_DIR MODULE: the version of MODULE that the nested module pins.
version_of() {
  (cd "$1" && go list -m -f '{{.Version}}' "$2") ||
    die "cannot read the version of $2 from $1/go.mod (is the Go module proxy reachable?)"
}

# module_graph MODULE_DIR: a digest of every module (and replacement) the build selects, so a
# cached binary is reused while they are unchanged (comments or go.sum additions do not count).
module_graph() {
  (cd "$1" && go list -m -f '{{.Path}} {{.Version}}{{with .Replace}} => {{.Path}} {{.Version}}{{end}}' all) |
    sha256sum | cut -d' ' -f1
}

# build NAME VERSION MODULE_DIR PACKAGE [LDFLAGS]: builds PACKAGE in MODULE_DIR into
# $out_root/NAME-VERSION/NAME unless a build of the same module graph is there; prints the path.
build() {
  local name="$1" version="$2" dir="$3" pkg="$4" ldflags="${5:-}"
  local out="$out_root/$name-$version"
  local bin="$out/$name"
  local stamp
  stamp="$(module_graph "$dir")"
  if [[ -x "$bin" && -f "$out/.stamp" && "$(cat "$out/.stamp")" == "$stamp" ]]; then
    echo "$bin"
    return
  fi
  mkdir -p "$out"
  echo "kube-bins: building $name $version ($pkg) into $out; a clean build takes minutes" >&2
  local started=$SECONDS
  # -gcflags=all=-l (no inlining): a fifth less compile time for a test server that runs no
  # hot loop.
  if ! (cd "$dir" && CGO_ENABLED=0 go build -mod=readonly -trimpath -gcflags=all=-l -ldflags "-s -w $ldflags" \
    -o "$bin.tmp" "$pkg") >"$out/build.log" 2>&1; then
    tail -n 40 "$out/build.log" >&2
    rm -f "$bin.tmp"
    die "building $name $version ($pkg in $dir) failed; the full log is $out/build.log"
  fi
  mv "$bin.tmp" "$bin"
  echo "$stamp" >"$out/.stamp"
  echo "kube-bins: built $name $version in $((SECONDS - started)) s" >&2
  echo "$bin"
}

# One builder at a time: .ci/run starts one in the background while the Rust builds run, and
# tools/kube-tests.sh then waits here until it is done and finds the binaries cached.
command -v flock >/dev/null 2>&1 || die "flock (util-linux) is needed to serialize builds"
mkdir -p "$out_root"
exec 9>"$out_root/.kube-bins.lock"
flock 9 || die "cannot lock $out_root/.kube-bins.lock"

kube_version="$(version_of "$peers/kube" k8s.io/kubernetes)"
etcd_version="$(version_of "$peers/etcd" go.etcd.io/etcd/server/v3)"

# The version the binary reports (/version, the emulation version's binary version), as
# kubernetes' hack/lib/version.sh stamps it.
minor="${kube_version#v1.}"
minor="${minor%%.*}"
kube_ldflags="-X k8s.io/component-base/version.gitVersion=$kube_version"
kube_ldflags+=" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
kube_ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
kube_ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=$kube_version"

apiserver="$(build kube-apiserver "$kube_version" "$peers/kube" k8s.io/kubernetes/cmd/kube-apiserver "$kube_ldflags")"
etcd="$(build etcd "$etcd_version" "$peers/etcd" go.etcd.io/etcd/server/v3)"

# Istio's CRDs as istio.io/api publishes them (the module's kubernetes/ directory), for discovery's
# tests of PeerAuthentication, DestinationRule, ServiceEntry and WorkloadEntry.
istio_api_version="v1.32.0"
crds_dir="$out_root/istio-api-crds-$istio_api_version"
crds="$crds_dir/customresourcedefinitions.gen.yaml"
if [[ ! -s "$crds" ]]; then
  mod_dir="$(cd "$peers/kube" && go mod download -json "istio.io/api@$istio_api_version" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')" ||
    die "cannot download istio.io/api@$istio_api_version from the Go module proxy"
  [[ -f "$mod_dir/kubernetes/customresourcedefinitions.gen.yaml" ]] ||
    die "istio.io/api@$istio_api_version has no kubernetes/customresourcedefinitions.gen.yaml (in ${mod_dir:-nowhere})"
  mkdir -p "$crds_dir"
  cp "$mod_dir/kubernetes/customresourcedefinitions.gen.yaml" "$crds.tmp"
  mv "$crds.tmp" "$crds"
fi

"$apiserver" --version >/dev/null 2>&1 || die "$apiserver was built but does not run (--version failed)"
"$etcd" --version >/dev/null 2>&1 || die "$etcd was built but does not run (--version failed)"

echo "MESHID_KUBE_APISERVER=$apiserver"
echo "MESHID_ETCD=$etcd"
echo "MESHID_ISTIO_CRDS=$crds"
