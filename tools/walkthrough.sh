#!/usr/bin/env bash
# The quick-start walkthrough: create a CA, issue an X.509-SVID, inspect it, and verify the
# chain with two independent stacks (meshid's webpki check and the openssl binary).
# Usage: bash tools/walkthrough.sh [WORKDIR]   (default: a fresh temp directory)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
meshid() { cargo run --quiet --release -- "$@"; }

echo "==> building meshid (release)"
cargo build --quiet --release

echo "==> meshid ca init: a self-signed ECDSA P-256 root for trust domain cluster.local"
meshid ca init --trust-domain cluster.local --state-dir "$work/state"

echo "==> meshid dev issuer + dev token: a local stand-in for the cluster's service-account issuer"
meshid dev issuer init --dir "$work/issuer"
token=$(meshid dev token --issuer-dir "$work/issuer" --namespace shop --service-account product-service \
  --pod-name product-service-7d4b9 --pod-uid 6f1c2a30-0000-4000-8000-000000000001)

echo "==> meshid token verify: the token proves the identity spiffe://cluster.local/ns/shop/sa/product-service"
meshid token verify --jwks "$work/issuer/jwks.json" --issuer https://kubernetes.default.svc.cluster.local "$token"

echo "==> meshid cert issue: an SVID for product-service (server-generated key)"
meshid cert issue --state-dir "$work/state" \
  --spiffe-id spiffe://cluster.local/ns/shop/sa/product-service --ttl 1h --out-dir "$work/product"

echo "==> meshid cert issue --csr: inventory-service brings its own key and CSR"
mkdir -p "$work/inventory"
if command -v openssl >/dev/null; then
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/" \
    -keyout "$work/inventory/key.pem" -out "$work/inventory/request.csr" 2>/dev/null
  meshid cert issue --state-dir "$work/state" \
    --spiffe-id spiffe://cluster.local/ns/shop/sa/inventory-service --csr "$work/inventory/request.csr" \
    --out-dir "$work/inventory"
fi

echo "==> meshid cert inspect --root"
meshid cert inspect "$work/product/cert-chain.pem" --root "$work/product/root-cert.pem"

if command -v openssl >/dev/null; then
  echo "==> openssl verify -x509_strict (independent verifier)"
  for purpose in sslclient sslserver; do
    openssl verify -x509_strict -purpose "$purpose" -CAfile "$work/product/root-cert.pem" "$work/product/cert-chain.pem"
  done
  [ -f "$work/inventory/cert-chain.pem" ] &&
    openssl verify -x509_strict -purpose sslserver -CAfile "$work/inventory/root-cert.pem" "$work/inventory/cert-chain.pem"
else
  echo "(openssl not installed: skipping the independent check)"
fi
echo "==> meshid describe: auto mTLS on the mixed-traffic example (legacy-db has no sidecar)"
meshid describe service inventory-service.shop --snapshot deploy/examples/mixed-traffic.yaml
meshid describe service legacy-db.legacy --snapshot deploy/examples/mixed-traffic.yaml

echo "==> meshid server: SDS and the Istio CSR API over gRPC+TLS, tokens from the dev issuer"
bin=target/release/meshid
"$bin" server --state-dir "$work/state" --dev-issuer-dir "$work/issuer" \
  --discovery-snapshot deploy/examples/mixed-traffic.yaml \
  --grpc-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 > "$work/server.out" 2> "$work/server.log" &
server_pid=$!
trap 'kill $server_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do grep -q "gRPC (TLS) on" "$work/server.out" 2>/dev/null && break; sleep 0.1; done
grpc=$(sed -n 's/.*gRPC (TLS) on \([^,]*\),.*/\1/p' "$work/server.out")
http=$(sed -n 's/.*HTTP on \(.*\)$/\1/p' "$work/server.out")
echo "$token" > "$work/token"

echo "==> meshid cert request: a CSR to the server; the key never leaves this directory"
"$bin" cert request --server "https://$grpc" --ca-file "$work/product/root-cert.pem" \
  --token-file "$work/token" --out-dir "$work/via-csr-api"

echo "==> meshid sds get: default + ROOTCA as an Envoy would fetch them (ClusterID: Kubernetes, as stock sidecars send)"
"$bin" sds get --server "https://$grpc" --ca-file "$work/product/root-cert.pem" \
  --token-file "$work/token" --cluster-id Kubernetes --name default --name ROOTCA --out-dir "$work/via-sds"
if command -v openssl >/dev/null; then
  openssl verify -x509_strict -purpose sslclient -CAfile "$work/via-sds/ROOTCA.pem" "$work/via-sds/cert-chain.pem"
  openssl verify -x509_strict -purpose sslserver -CAfile "$work/via-csr-api/root-cert.pem" "$work/via-csr-api/cert-chain.pem"
fi
if command -v curl >/dev/null; then
  curl -fsS "http://$http/readyz"
  curl -fsS "http://$http/metrics" | grep -E '^meshid_(certs_issued_total|discovery_endpoints)'
fi

echo "==> meshid agent: the key made on the node, SDS and the SPIFFE Workload API on Unix sockets (README: Deployment modes)"
mkdir -p "$work/agent"
"$bin" agent --server "https://$grpc" --root-cert "$work/product/root-cert.pem" --server-name localhost \
  --token-file "$work/token" --sds-socket "$work/agent/sds.sock" \
  --workload-api-socket "$work/agent/workload.sock" --http-addr 127.0.0.1:0 > "$work/agent.out" 2> "$work/agent.log" &
agent_pid=$!
trap 'kill $server_pid $agent_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do grep -q "HTTP on" "$work/agent.out" 2>/dev/null && break; sleep 0.1; done
agent_http=$(sed -n 's/^meshid agent: HTTP on \(.*\)$/\1/p' "$work/agent.out")
# Until the agent holds its certificate, FetchSecrets refuses `default`: retry for up to 10 s.
# The agent's socket asks for no token (its file mode is the boundary); sds get sends one anyway.
for i in $(seq 1 100); do
  "$bin" sds get --server "unix:$work/agent/sds.sock" --token-file "$work/token" \
    --name default --name ROOTCA --out-dir "$work/via-agent" && break
  [ "$i" = 100 ] && { cat "$work/agent.log"; exit 1; }
  sleep 0.1
done
if command -v openssl >/dev/null; then
  openssl verify -x509_strict -purpose sslclient -CAfile "$work/via-agent/ROOTCA.pem" "$work/via-agent/cert-chain.pem"
fi
if command -v curl >/dev/null; then curl -fsS "http://$agent_http/readyz"; fi
kill "$agent_pid"; wait "$agent_pid" 2>/dev/null || true

kill "$server_pid"; wait "$server_pid" 2>/dev/null || true

echo "==> meshid root: a rotation on the walkthrough's CA (README: Rotating a root)"
"$bin" root status --state-dir "$work/state"
old_root=$("$bin" root status --state-dir "$work/state" | awk '$2 == "active" {print $1}')
new_root=$("$bin" root prepare --state-dir "$work/state" --reason "walkthrough" | sed -n 's/^prepare: root \([0-9a-f]*\).*/\1/p')
"$bin" root activate "$new_root" --state-dir "$work/state"
"$bin" root taint "$old_root" --state-dir "$work/state"
# Leaves from the old root may still be valid: the walkthrough forces it (the README explains when not to).
"$bin" root revoke "$old_root" --state-dir "$work/state" --force
"$bin" root status --state-dir "$work/state" --output json > "$work/root-status.json"

echo "==> cargo run --release -- demo: the README's first command, as written (in a work dir of the walkthrough's)"
cargo run --quiet --release -- demo --work-dir "$work/demo"

if command -v kubectl >/dev/null; then
  echo "==> kubectl kustomize: the manifests the README shows"
  kubectl kustomize deploy/kubernetes/base > "$work/meshid-base.yaml"
  kubectl kustomize deploy/kubernetes/overlays/production > "$work/meshid-production.yaml"
  kubectl kustomize deploy/kubernetes/examples/workload > "$work/workload.yaml"
  kubectl kustomize deploy/kubernetes/examples/agent > "$work/workload-agent.yaml"
  kubectl -n shop create configmap istio-ca-root-cert --from-file=root-cert.pem="$work/product/root-cert.pem" \
    --dry-run=client -o yaml > "$work/istio-ca-root-cert.yaml"
  grep -c '^kind:' "$work/meshid-production.yaml"
else
  echo "(kubectl not installed: skipping the kustomize renders; .ci/run installs it)"
fi
echo "==> done; files are in $work"
