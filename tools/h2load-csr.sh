#!/usr/bin/env bash
# CSR issuance measured by a load generator that is not ours: h2load (nghttp2) sends Istio's
# CreateCertificate, framed as gRPC by hand, to a release `meshid server` pinned to one core
# (taskset -c 0), h2load pinned to the other (taskset -c 1). h2load counts HTTP 200 even when
# the gRPC status in the trailers is an error, so the truth is the server's own counter
# meshid_certs_issued_total{api="csr"}: read before and after each round, it must grow by exactly
# the requests h2load saw succeed, or the script fails. Prints certificates/s per round and the
# median.
#
# Setup is done with meshid's CLI (`ca init`, `dev issuer init`, `dev token`), the CSR with
# `openssl req` (P-256, the workload's SPIFFE ID as URI SAN, as istio-agent sends), the gRPC frame
# with python3 (standard library only). One token for every request: the token cache answers
# after the first, so this measures TLS + HTTP/2 + CSR check + signing, as in issue 13.
#
# Environment: REQUESTS (per round, 20000), CONNECTIONS (16), STREAMS (concurrent per connection,
# 8), ROUNDS (3), SERVER_CPU (0), CLIENT_CPU (1), MESHID (the binary; default target/release/meshid,
# built with `cargo build --release` when missing).
set -euo pipefail

REQUESTS=${REQUESTS:-20000}
CONNECTIONS=${CONNECTIONS:-16}
STREAMS=${STREAMS:-8}
ROUNDS=${ROUNDS:-3}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
cd "$(dirname "$0")/.."
MESHID=${MESHID:-target/release/meshid}

need() {
    command -v "$1" >/dev/null 2>&1 || { echo "h2load-csr: '$1' not found; $2" >&2; exit 2; }
}
need h2load "install it with: sudo apt-get install nghttp2-client (Debian/Ubuntu; Fedora: dnf install nghttp2)"
need openssl "install it with: sudo apt-get install openssl"
need python3 "install it with: sudo apt-get install python3"
need curl "install it with: sudo apt-get install curl"
need taskset "install it with: sudo apt-get install util-linux"
if [ ! -x "$MESHID" ]; then
    echo "h2load-csr: building $MESHID (cargo build --release --bin meshid)" >&2
    cargo build --release --bin meshid
fi

tmp=$(mktemp -d)
server_pid=
cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT

"$MESHID" ca init --trust-domain cluster.local --state-dir "$tmp/state" >/dev/null
"$MESHID" dev issuer init --dir "$tmp/issuer" >/dev/null
token=$("$MESHID" dev token --issuer-dir "$tmp/issuer" --namespace bench --service-account h2load --ttl 2h)
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$tmp/csr.key" \
    -subj "/O=h2load" -addext "subjectAltName=URI:spiffe://cluster.local/ns/bench/sa/h2load" \
    -out "$tmp/csr.pem" 2>/dev/null

# IstioCertificateRequest { string csr = 1; int64 validity_duration = 3; } (istio.v1.auth), as a
# gRPC message: 0x00 (not compressed), 4-byte big-endian length, the protobuf bytes.
python3 - "$tmp/csr.pem" "$tmp/body.bin" <<'EOF'
import struct, sys
def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)
csr = open(sys.argv[1], "rb").read()
msg = b"\x0a" + varint(len(csr)) + csr + b"\x18" + varint(3600)
open(sys.argv[2], "wb").write(b"\x00" + struct.pack(">I", len(msg)) + msg)
EOF

taskset -c "$SERVER_CPU" "$MESHID" server --state-dir "$tmp/state" --dev-issuer-dir "$tmp/issuer" \
    --grpc-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --log-level warn >"$tmp/server.out" &
server_pid=$!
for _ in $(seq 100); do
    grep -q "HTTP on" "$tmp/server.out" 2>/dev/null && break
    kill -0 "$server_pid" 2>/dev/null || { echo "h2load-csr: meshid server exited" >&2; exit 1; }
    sleep 0.1
done
# "meshid server: gRPC (TLS) on 127.0.0.1:PORT, HTTP on 127.0.0.1:PORT"
line=$(head -n1 "$tmp/server.out")
grpc=$(sed -E 's/.*gRPC \(TLS\) on ([^,]+),.*/\1/' <<<"$line")
http=$(sed -E 's/.*HTTP on ([^ ]+).*/\1/' <<<"$line")

issued() {
    curl -fsS "http://$http/metrics" | awk '/^meshid_certs_issued_total\{api="csr"\} /{print $2; f=1} END{if(!f) print 0}'
}

echo "h2load-csr: meshid $("$MESHID" --version | awk '{print $2}') on CPU $SERVER_CPU, h2load on CPU $CLIENT_CPU;" \
    "$REQUESTS requests per round, $CONNECTIONS connections, $STREAMS streams each, $ROUNDS rounds"
rates=()
for round in $(seq "$ROUNDS"); do
    before=$(issued)
    out=$(taskset -c "$CLIENT_CPU" h2load -n "$REQUESTS" -c "$CONNECTIONS" -m "$STREAMS" -d "$tmp/body.bin" \
        -H 'content-type: application/grpc' -H 'te: trailers' -H "authorization: Bearer $token" \
        "https://$grpc/istio.v1.auth.IstioCertificateService/CreateCertificate")
    after=$(issued)
    secs=$(awk '/^finished in/{sub(/s,$/, "", $3); print $3}' <<<"$out")
    ok=$(awk '/^requests:/{for(i=1;i<=NF;i++) if($(i+1) ~ /^succeeded/) print $i}' <<<"$out")
    delta=$(python3 -c "print(int(float('$after') - float('$before')))")
    if [ "$delta" != "$ok" ] || [ "$delta" != "$REQUESTS" ]; then
        echo "$out" >&2
        echo "h2load-csr: round $round: the server issued $delta certificates, h2load saw $ok succeed of $REQUESTS" >&2
        exit 1
    fi
    rate=$(python3 -c "print(round($delta / $secs))")
    rates+=("$rate")
    echo "  round $round: $delta certificates in $secs s = $rate certificates/s (meshid_certs_issued_total +$delta, h2load $ok succeeded)"
done
median=$(printf '%s\n' "${rates[@]}" | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}')
echo "h2load-csr: median $median certificates/s (server pinned to one core)"
