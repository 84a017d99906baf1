// Package spiffe runs go-spiffe v2 (github.com/spiffe/go-spiffe/v2, the SPIFFE project's Go
// library) against meshid: its SVID verifier, bundle parser, federation client and handler, and
// its mTLS configurations, each named after the function that judges meshid.
package spiffe

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"net/url"
	"path/filepath"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"

	"meshid.dev/interop/internal/meshidproc"
	"meshid.dev/interop/internal/xdsclient"
)

// svidCase is one way meshid hands out an X.509-SVID: the certificates (leaf first, then
// intermediates, without the root) and the PKCS#8 DER key.
type svidCase struct {
	name  string
	certs []*x509.Certificate
	key   []byte
}

// TestX509SVIDVerifyAndParseRawAcceptEverySVIDMeshidIssues: go-spiffe's
// x509svid.Verify (svid/x509svid/verify.go) accepts every SVID meshid issues — SDS `default`,
// the Istio CSR API and `meshid cert issue` — against meshid's bundle, and x509svid.ParseRaw
// (svid/x509svid/svid.go, which applies the X509-SVID spec's leaf and signing-certificate
// rules and checks the key matches) agrees on the SPIFFE ID.
func TestX509SVIDVerifyAndParseRawAcceptEverySVIDMeshidIssues(t *testing.T) {
	t.Parallel()
	ca := meshidproc.NewCA(t, "mesh.test")
	srv := ca.Start(meshidproc.Config{})
	td := spiffeid.RequireTrustDomainFromString("mesh.test")
	bundle := x509bundle.FromX509Authorities(td, ca.Roots())
	want := spiffeid.RequireFromPath(td, "/ns/shop/sa/product")

	cases := []svidCase{sdsDefault(t, ca, srv), csrAPI(t, ca, srv, want), certIssue(t, ca, want)}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			id, chains, err := x509svid.Verify(c.certs, bundle)
			if err != nil {
				t.Fatalf("x509svid.Verify refused meshid's SVID: %v", err)
			}
			if id != want {
				t.Fatalf("x509svid.Verify: ID %s, want %s", id, want)
			}
			root := chains[0][len(chains[0])-1]
			if !bundle.HasX509Authority(root) {
				t.Fatalf("verified chain ends at %s, not at a root of meshid's bundle", root.Subject)
			}
			var raw []byte
			for _, cert := range c.certs {
				raw = append(raw, cert.Raw...)
			}
			svid, err := x509svid.ParseRaw(raw, c.key)
			if err != nil {
				t.Fatalf("x509svid.ParseRaw refused meshid's SVID: %v", err)
			}
			if svid.ID != want {
				t.Fatalf("x509svid.ParseRaw: ID %s, want %s", svid.ID, want)
			}
		})
	}
}

// sdsDefault is the `default` secret of an SDS stream, as a sidecar receives it.
func sdsDefault(t *testing.T, ca *meshidproc.CA, srv *meshidproc.Server) svidCase {
	conn := xdsclient.Dial(t, srv, ca.Token("shop", "product"))
	sds := xdsclient.OpenSDS(t, conn, "default")
	sds.WaitFor("default", func(s map[string]*tlsv3.Secret) bool { return s["default"] != nil })
	chain, key, err := xdsclient.TLSCertificate(sds.Snapshot()["default"])
	if err != nil {
		t.Fatal(err)
	}
	return svidCase{"SDS default", mustCerts(t, chain), pkcs8(t, key)}
}

// csrAPI is CreateCertificate with a key of our own, as istio-agent sends it (PEM CSR asking
// for the SPIFFE ID, ClusterID metadata and the bearer token from xdsclient).
func csrAPI(t *testing.T, ca *meshidproc.CA, srv *meshidproc.Server, id spiffeid.ID) svidCase {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(id.String())
	csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{u}}, key)
	if err != nil {
		t.Fatal(err)
	}
	conn := xdsclient.Dial(t, srv, ca.Token("shop", "product"))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := pb.NewIstioCertificateServiceClient(conn).CreateCertificate(ctx, &pb.IstioCertificateRequest{
		Csr:              string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csrDER})),
		ValidityDuration: 3600,
		Metadata:         &structpb.Struct{Fields: map[string]*structpb.Value{"CertSigner": structpb.NewStringValue("")}},
	})
	if err != nil {
		t.Fatalf("CreateCertificate: %v", err)
	}
	var certs []*x509.Certificate
	for _, p := range resp.GetCertChain() {
		certs = append(certs, mustCerts(t, []byte(p))...)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	// Leaf first, root last: the SVID is everything but the root.
	return svidCase{"CSR API", certs[:len(certs)-1], der}
}

// certIssue is `meshid cert issue` (server-generated key), read with x509svid.Load's files.
func certIssue(t *testing.T, ca *meshidproc.CA, id spiffeid.ID) svidCase {
	dir := t.TempDir()
	ca.Run("cert", "issue", "--state-dir", ca.StateDir, "--spiffe-id", id.String(), "--out-dir", dir)
	svid, err := x509svid.Load(filepath.Join(dir, "cert-chain.pem"), filepath.Join(dir, "key.pem"))
	if err != nil {
		t.Fatalf("x509svid.Load refused meshid cert issue's files: %v", err)
	}
	_, key, err := svid.MarshalRaw()
	if err != nil {
		t.Fatal(err)
	}
	return svidCase{"meshid cert issue", svid.Certificates, key}
}

func mustCerts(t *testing.T, p []byte) []*x509.Certificate {
	t.Helper()
	certs, err := meshidproc.ParsePEMCerts(p)
	if err != nil {
		t.Fatal(err)
	}
	return certs
}

// pkcs8 is the DER of a PEM "PRIVATE KEY" block (what Envoy reads from inline_bytes).
func pkcs8(t *testing.T, p []byte) []byte {
	t.Helper()
	blk, rest := pem.Decode(p)
	if blk == nil || blk.Type != "PRIVATE KEY" || len(bytes.TrimSpace(rest)) != 0 {
		t.Fatalf("private_key is not one PEM PRIVATE KEY (PKCS#8) block")
	}
	return blk.Bytes
}
