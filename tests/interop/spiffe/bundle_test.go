package spiffe

import (
	"bytes"
	"context"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"meshid.dev/interop/internal/meshidproc"
	"meshid.dev/interop/internal/testca"
)

// meshidEndpointID is the SPIFFE ID of meshid's own SVID (server_identity defaults), which an
// https_spiffe bundle endpoint serves.
const meshidEndpointID = "spiffe://mesh.test/ns/istio-system/sa/meshid"

// webPKI is a Web PKI root and a server certificate for 127.0.0.1 (files for meshid's https_web
// bundle endpoint), standing in for an operator's certificate.
type webPKI struct {
	root              *testca.CA
	certFile, keyFile string
	pool              *x509.CertPool
	caFile            string
}

func newWebPKI(t *testing.T) webPKI {
	t.Helper()
	dir := t.TempDir()
	root := testca.NewRoot(t, "interop web root", "")
	w := webPKI{root: root, certFile: filepath.Join(dir, "tls.crt"), keyFile: filepath.Join(dir, "tls.key"), caFile: filepath.Join(dir, "ca.pem")}
	testca.WriteKeyPair(t, root.Leaf(t, "", []string{"localhost"}, []net.IP{net.IPv4(127, 0, 0, 1)}), w.certFile, w.keyFile)
	w.pool = x509.NewCertPool()
	w.pool.AddCert(root.Cert)
	writeFile(t, w.caFile, testca.PEM(root.Cert))
	return w
}

func endpointTOML(profile string, web webPKI, hint string) string {
	files := ""
	if profile == "https_web" {
		files = fmt.Sprintf("cert_file = %q\nkey_file = %q\n", web.certFile, web.keyFile)
	}
	return fmt.Sprintf("[federation]\nrefresh_hint = %q\n\n[federation.bundle_endpoint]\nlisten = \"127.0.0.1:0\"\nprofile = %q\n%s", hint, profile, files)
}

// TestSpiffebundleParseAndReadAcceptMeshidExportAndEndpointBody: go-spiffe's
// spiffebundle.Parse and spiffebundle.Read (bundle/spiffebundle/bundle.go) accept
// `meshid bundle export --format spiffe` and the body of meshid's bundle endpoint, and find in
// both the same roots (those of `bundle export --format pem`), the same spiffe_sequence and
// the configured spiffe_refresh_hint.
func TestSpiffebundleParseAndReadAcceptMeshidExportAndEndpointBody(t *testing.T) {
	t.Parallel()
	ca := meshidproc.NewCA(t, "mesh.test")
	web := newWebPKI(t)
	srv := ca.Start(meshidproc.Config{TOML: endpointTOML("https_web", web, "90s")})
	td := spiffeid.RequireTrustDomainFromString("mesh.test")
	wantRoots := ca.Roots()

	export := []byte(ca.Run("bundle", "export", "--state-dir", ca.StateDir, "--format", "spiffe", "--refresh-hint", "90s"))
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: tlsRoots(web.pool)}, Timeout: 30 * time.Second}
	resp, err := client.Get("https://" + srv.BundleAddr + "/")
	if err != nil {
		t.Fatalf("GET bundle endpoint: %v", err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET bundle endpoint: HTTP %d, %v", resp.StatusCode, err)
	}

	var seqs []uint64
	for _, src := range []struct {
		name string
		doc  []byte
	}{{"bundle export", export}, {"bundle endpoint", body}} {
		parsed, err := spiffebundle.Parse(td, src.doc)
		if err != nil {
			t.Fatalf("spiffebundle.Parse refused the %s document: %v\n%s", src.name, err, src.doc)
		}
		read, err := spiffebundle.Read(td, bytes.NewReader(src.doc))
		if err != nil {
			t.Fatalf("spiffebundle.Read refused the %s document: %v", src.name, err)
		}
		if !parsed.Equal(read) {
			t.Fatalf("%s: spiffebundle.Parse and Read disagree", src.name)
		}
		if !testca.SameCerts(parsed.X509Authorities(), wantRoots) {
			t.Fatalf("%s: x509 authorities %v, want meshid's roots %v", src.name, subjects(parsed.X509Authorities()), subjects(wantRoots))
		}
		if hint, ok := parsed.RefreshHint(); !ok || hint != 90*time.Second {
			t.Fatalf("%s: refresh hint %v (present %v), want 90s", src.name, hint, ok)
		}
		seq, ok := parsed.SequenceNumber()
		if !ok {
			t.Fatalf("%s: no spiffe_sequence", src.name)
		}
		seqs = append(seqs, seq)
	}
	if seqs[0] != seqs[1] {
		t.Fatalf("spiffe_sequence: export %d, endpoint %d; the same state must give the same sequence", seqs[0], seqs[1])
	}
}

// TestFederationFetchBundleFetchesMeshidEndpointInBothProfiles: go-spiffe's
// federation.FetchBundle (federation/fetch.go) fetches meshid's bundle endpoint with
// WithWebPKIRoots (https_web: an operator certificate) and with WithSPIFFEAuth (https_spiffe:
// meshid's own SVID, authenticated with meshid's exported bundle and the endpoint's SPIFFE ID).
func TestFederationFetchBundleFetchesMeshidEndpointInBothProfiles(t *testing.T) {
	t.Parallel()
	ca := meshidproc.NewCA(t, "mesh.test")
	web := newWebPKI(t)
	td := spiffeid.RequireTrustDomainFromString("mesh.test")
	wantRoots := ca.Roots()
	profiles := []struct {
		profile string
		opt     func() federation.FetchOption
	}{
		{"https_web", func() federation.FetchOption { return federation.WithWebPKIRoots(web.pool) }},
		{"https_spiffe", func() federation.FetchOption {
			return federation.WithSPIFFEAuth(x509bundle.FromX509Authorities(td, wantRoots), spiffeid.RequireFromString(meshidEndpointID))
		}},
	}
	for _, p := range profiles {
		t.Run(p.profile, func(t *testing.T) {
			srv := ca.Start(meshidproc.Config{TOML: endpointTOML(p.profile, web, "1m")})
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			b, err := federation.FetchBundle(ctx, td, "https://"+srv.BundleAddr+"/", p.opt())
			if err != nil {
				t.Fatalf("federation.FetchBundle (%s): %v", p.profile, err)
			}
			if !testca.SameCerts(b.X509Authorities(), wantRoots) {
				t.Fatalf("fetched authorities %v, want %v", subjects(b.X509Authorities()), subjects(wantRoots))
			}
			if hint, ok := b.RefreshHint(); !ok || hint != time.Minute {
				t.Fatalf("refresh hint %v (present %v), want 1m", hint, ok)
			}
		})
	}
	// The https_spiffe profile must fail closed: another endpoint ID is refused by go-spiffe.
	t.Run("https_spiffe with another endpoint ID is refused", func(t *testing.T) {
		srv := ca.Start(meshidproc.Config{TOML: endpointTOML("https_spiffe", web, "1m")})
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_, err := federation.FetchBundle(ctx, td, "https://"+srv.BundleAddr+"/",
			federation.WithSPIFFEAuth(x509bundle.FromX509Authorities(td, wantRoots), spiffeid.RequireFromString("spiffe://mesh.test/not/meshid")))
		if err == nil {
			t.Fatal("federation.FetchBundle accepted meshid's endpoint for another SPIFFE ID")
		}
	})
}

func subjects(cs []*x509.Certificate) []string {
	var out []string
	for _, c := range cs {
		out = append(out, fmt.Sprintf("%s (serial %x)", c.Subject, c.SerialNumber.Bytes()[:4]))
	}
	return out
}
