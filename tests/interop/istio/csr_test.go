// Package istio runs Istio's own code against meshid: the generated grpc-go client of
// istio.io/api's IstioCertificateService, called exactly as istio-agent calls it, and Istio's
// agent itself (pilot-agent, built by tools/interop.sh from tests/interop/peers/pilot-agent).
package istio

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"

	"meshid.dev/interop/internal/meshidproc"
	"meshid.dev/interop/internal/testca"
	"meshid.dev/interop/internal/xdsclient"
)

// istioCSR builds a CSR the way istio-agent does (istio.io/istio security/pkg/pki/util
// GenCSR + GenCSRTemplate, called from security/pkg/nodeagent/cache/secretcache.go
// generateNewSecret): Subject O="" (CertOptions.Org is unset), one critical SAN extension
// with the URI spiffe://<td>/ns/<ns>/sa/<sa> (BuildSubjectAltNameExtension), an RSA-2048 key
// by default (WORKLOAD_RSA_KEY_SIZE) or P-256 with ECC_SIGNATURE_ALGORITHM=ECDSA.
func istioCSR(t *testing.T, host string, ec bool) []byte {
	t.Helper()
	var key crypto.Signer
	var err error
	if ec {
		key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	} else {
		key, err = rsa.GenerateKey(rand.Reader, 2048)
	}
	if err != nil {
		t.Fatal(err)
	}
	// SAN: a SEQUENCE of GeneralName, the URI as [6] IA5String, marked critical (the subject is
	// empty), as istio's BuildSANExtension writes it.
	san, err := asn1.Marshal([]asn1.RawValue{{Class: asn1.ClassContextSpecific, Tag: 6, Bytes: []byte(host)}})
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.CertificateRequest{
		Subject:         pkix.Name{Organization: []string{""}},
		ExtraExtensions: []pkix.Extension{{Id: asn1.ObjectIdentifier{2, 5, 29, 17}, Critical: true, Value: san}},
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

// createCertificate calls CreateCertificate as citadel.CitadelClient.CSRSign does
// (security/pkg/nodeagent/caclient/providers/citadel/client.go): metadata Struct with
// CertSigner (empty unless ISTIO_META_CERT_SIGNER), outgoing metadata ClusterID, the bearer
// token as per-RPC credentials (xdsclient.Dial, like caclient.NewDefaultTokenProvider).
func createCertificate(t *testing.T, srv *meshidproc.Server, token string, csrPEM []byte, ttl int64) *pb.IstioCertificateResponse {
	t.Helper()
	conn := xdsclient.DialToken(t, srv, token)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ctx = metadata.NewOutgoingContext(ctx, metadata.Pairs("ClusterID", "Kubernetes"))
	resp, err := pb.NewIstioCertificateServiceClient(conn).CreateCertificate(ctx, &pb.IstioCertificateRequest{
		Csr:              string(csrPEM),
		ValidityDuration: ttl,
		Metadata:         &structpb.Struct{Fields: map[string]*structpb.Value{"CertSigner": structpb.NewStringValue("")}},
	})
	if err != nil {
		t.Fatalf("CreateCertificate: %v", err)
	}
	// CSRSign's own check.
	if len(resp.GetCertChain()) <= 1 {
		t.Fatalf("cert_chain has %d elements; citadel's CSRSign refuses <= 1 (\"invalid empty CertChain\")", len(resp.GetCertChain()))
	}
	return resp
}

// checkIstioChain applies the convention istio-agent relies on (secretcache.go
// generateNewSecret): every element is PEM; concatCerts(cert_chain) is the workload's chain,
// whose first certificate gives the expiry (nodeagentutil.ParseCertAndGetExpiryTimestamp);
// the last element is the root bundle (ROOTCA). Each certificate is signed by the next, and
// the chain verifies against the last element.
func checkIstioChain(t *testing.T, chain []string, wantID string, wantRoots []*x509.Certificate) *x509.Certificate {
	t.Helper()
	var certs []*x509.Certificate
	for i, p := range chain {
		cs, err := meshidproc.ParsePEMCerts([]byte(p))
		if err != nil {
			t.Fatalf("cert_chain[%d] is not PEM certificates: %v", i, err)
		}
		if i < len(chain)-1 && len(cs) != 1 {
			t.Fatalf("cert_chain[%d] holds %d certificates; only the last element (the root bundle) may hold several", i, len(cs))
		}
		certs = append(certs, cs...)
	}
	leaf := certs[0]
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != wantID {
		t.Fatalf("first certificate's URI SANs %v, want exactly %s (leaf first)", leaf.URIs, wantID)
	}
	if leaf.IsCA {
		t.Fatal("first certificate is a CA; istio-agent takes the first as the leaf")
	}
	roots, err := meshidproc.ParsePEMCerts([]byte(chain[len(chain)-1]))
	if err != nil {
		t.Fatal(err)
	}
	if !testca.SameCerts(roots, wantRoots) {
		t.Fatalf("last element holds %d certificates; want meshid's %d trusted roots (istio-agent's root-cert.pem)", len(roots), len(wantRoots))
	}
	nonRoot := len(chain) - 1
	for i := 0; i < nonRoot-1; i++ {
		if err := certs[i].CheckSignatureFrom(certs[i+1]); err != nil {
			t.Fatalf("cert_chain[%d] is not signed by cert_chain[%d]: %v", i, i+1, err)
		}
	}
	pool, inter := x509.NewCertPool(), x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	for _, c := range certs[1:nonRoot] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}}); err != nil {
		t.Fatalf("the chain does not verify against its last element: %v", err)
	}
	return leaf
}

// TestCreateCertificateAsIstioAgentSendsItReturnsLeafFirstRootLast: istio.io/api v1.32.0's
// generated IstioCertificateServiceClient sends CreateCertificate with istio-agent's request
// (CSR per GenCSR with the default RSA-2048 key and with ECDSA, SECRET_TTL's default 24h,
// CertSigner metadata, ClusterID, bearer token); meshid's chain follows the leaf-first,
// root-last convention, and during a root rotation the last element carries every trusted
// root (what istio-agent writes as root-cert.pem).
func TestCreateCertificateAsIstioAgentSendsItReturnsLeafFirstRootLast(t *testing.T) {
	t.Parallel()
	ca := meshidproc.NewCA(t, "cluster.local")
	srv := ca.Start(meshidproc.Config{})
	const id = "spiffe://cluster.local/ns/shop/sa/product"
	token := ca.Token("shop", "product")
	for _, c := range []struct {
		name string
		ec   bool
	}{{"RSA-2048 (istio-agent's default)", false}, {"ECDSA P-256 (ECC_SIGNATURE_ALGORITHM=ECDSA)", true}} {
		t.Run(c.name, func(t *testing.T) {
			start := time.Now()
			resp := createCertificate(t, srv, token, istioCSR(t, id, c.ec), int64((24 * time.Hour).Seconds()))
			leaf := checkIstioChain(t, resp.GetCertChain(), id, ca.Roots())
			// SECRET_TTL is honoured: 24h is meshid's default max_ttl.
			if got := leaf.NotAfter.Sub(start); got < 24*time.Hour-5*time.Minute || got > 24*time.Hour+5*time.Minute {
				t.Fatalf("leaf lives %v from the request, want the requested 24h", got)
			}
		})
	}
	t.Run("during a root rotation the last element holds both roots", func(t *testing.T) {
		ca.Run("root", "prepare", "--state-dir", ca.StateDir)
		want := ca.Roots()
		if len(want) != 2 {
			t.Fatalf("%d roots after prepare", len(want))
		}
		// The server applies the state change from its file watch; an SDS push of ROOTCA with
		// both roots is the signal that it has.
		sds := xdsclient.OpenSDS(t, xdsclient.Dial(t, srv, token), "ROOTCA")
		sds.WaitFor("both roots", func(s map[string]*tlsv3.Secret) bool {
			roots, err := xdsclient.TrustedCA(s["ROOTCA"])
			return err == nil && testca.SameCerts(roots, want)
		})
		resp := createCertificate(t, srv, token, istioCSR(t, id, true), 3600)
		checkIstioChain(t, resp.GetCertChain(), id, want)
	})
	t.Run("a token of another cluster's ClusterID is refused", func(t *testing.T) {
		conn := xdsclient.DialToken(t, srv, token)
		ctx, cancel := context.WithTimeout(metadata.NewOutgoingContext(context.Background(), metadata.Pairs("ClusterID", "elsewhere")), 30*time.Second)
		defer cancel()
		_, err := pb.NewIstioCertificateServiceClient(conn).CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: string(istioCSR(t, id, true)), ValidityDuration: 3600})
		if status.Code(err) != codes.Unauthenticated {
			t.Fatalf("ClusterID elsewhere: %v, want UNAUTHENTICATED (fail closed)", err)
		}
	})
}
