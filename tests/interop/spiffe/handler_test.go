package spiffe

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"meshid.dev/interop/internal/meshidproc"
	"meshid.dev/interop/internal/testca"
	"meshid.dev/interop/internal/xdsclient"
)

// peerHint is the spiffe_refresh_hint the go-spiffe side publishes. meshid polls a peer every
// hint/4, clamped to [1m, 5m] (trust/federation_config.rs poll_interval), so with 2m it polls
// every minute and a rotation must reach its SDS streams within one hint.
const peerHint = 2 * time.Minute

// goSpiffePeer is a trust domain served by go-spiffe's federation.NewHandler over HTTPS: its
// bundle can be rotated, and for https_spiffe the endpoint's SVID too.
type goSpiffePeer struct {
	td      spiffeid.TrustDomain
	mu      sync.Mutex
	bundle  *spiffebundle.Bundle
	svid    *x509svid.SVID
	fetches atomic.Int64
	addr    string
}

func (p *goSpiffePeer) GetBundleForTrustDomain(td spiffeid.TrustDomain) (*spiffebundle.Bundle, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if td != p.td {
		return nil, fmt.Errorf("no bundle for %s", td)
	}
	return p.bundle.Clone(), nil
}

func (p *goSpiffePeer) GetX509SVID() (*x509svid.SVID, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.svid, nil
}

// setBundle publishes roots with the next sequence number.
func (p *goSpiffePeer) setBundle(roots ...*x509.Certificate) {
	p.mu.Lock()
	defer p.mu.Unlock()
	seq, _ := p.bundle.SequenceNumber()
	b := spiffebundle.FromX509Authorities(p.td, roots)
	b.SetRefreshHint(peerHint)
	b.SetSequenceNumber(seq + 1)
	p.bundle = b
}

func (p *goSpiffePeer) setSVID(s *x509svid.SVID) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.svid = s
}

// serve starts federation.NewHandler for the peer on 127.0.0.1 with tlsCfg.
func (p *goSpiffePeer) serve(t *testing.T, tlsCfg *tls.Config) {
	t.Helper()
	h, err := federation.NewHandler(p.td, p)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p.addr = ln.Addr().String()
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			p.fetches.Add(1)
			h.ServeHTTP(w, r)
		}),
		TLSConfig:         tlsCfg,
		ReadHeaderTimeout: 10 * time.Second,
	}
	go func() { _ = srv.ServeTLS(ln, "", "") }()
	t.Cleanup(func() { _ = srv.Close() })
}

func newPeer(t *testing.T, td string, root *x509.Certificate) *goSpiffePeer {
	p := &goSpiffePeer{td: spiffeid.RequireTrustDomainFromString(td), bundle: spiffebundle.New(spiffeid.RequireTrustDomainFromString(td))}
	p.setBundle(root)
	return p
}

func svidOf(t *testing.T, c tls.Certificate) *x509svid.SVID {
	t.Helper()
	s, err := x509svid.ParseRaw(c.Certificate[0], mustPKCS8(t, c))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestMeshidFetchesGoSpiffeHandlerInBothProfilesAndFollowsItsRotation: meshid's federation
// client fetches bundle endpoints served by go-spiffe's federation.NewHandler
// (federation/handler.go) with the https_web profile (a Web PKI server certificate) and the
// https_spiffe profile (tlsconfig.TLSServerConfig with the endpoint's SVID, bootstrapped by
// `meshid bundle set` with the go-spiffe bundle's Marshal output), and serves each over SDS
// (`spiffe://<td>` and inside `ALL`). Then the go-spiffe side rotates: a new root is added
// (sequence + 1) and must reach meshid's SDS within the published refresh hint; then the old
// root is retired and the https_spiffe endpoint switches to an SVID of the new root, which
// meshid must authenticate with the bundle it fetched (SPIFFE federation spec 4.2, 5.2).
func TestMeshidFetchesGoSpiffeHandlerInBothProfilesAndFollowsItsRotation(t *testing.T) {
	t.Parallel()
	web := newWebPKI(t)
	webRoot1, webRoot2 := testca.NewRoot(t, "web.test root 1", "web.test"), testca.NewRoot(t, "web.test root 2", "web.test")
	webPeer := newPeer(t, "web.test", webRoot1.Cert)
	webPeer.serve(t, &tls.Config{Certificates: []tls.Certificate{web.root.Leaf(t, "", []string{"localhost"}, []net.IP{net.IPv4(127, 0, 0, 1)})}, MinVersion: tls.VersionTLS12})

	spRoot1, spRoot2 := testca.NewRoot(t, "gospiffe.test root 1", "gospiffe.test"), testca.NewRoot(t, "gospiffe.test root 2", "gospiffe.test")
	endpointID := "spiffe://gospiffe.test/bundle-endpoint"
	spPeer := newPeer(t, "gospiffe.test", spRoot1.Cert)
	spPeer.setSVID(svidOf(t, spRoot1.Leaf(t, endpointID, nil, nil)))
	spPeer.serve(t, tlsconfig.TLSServerConfig(spPeer))

	ca := meshidproc.NewCA(t, "mesh.test")
	// https_spiffe bootstrap: the peer's bundle as go-spiffe marshals it, stored by meshid.
	doc, err := spPeer.bundle.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	bootstrap := filepath.Join(t.TempDir(), "gospiffe.bundle.json")
	writeFile(t, bootstrap, doc)
	ca.Run("bundle", "set", "gospiffe.test", bootstrap, "--state-dir", ca.StateDir)

	srv := ca.Start(meshidproc.Config{TOML: fmt.Sprintf(`[federation]
refresh_hint = "1m"

[[federation.peers]]
trust_domain = "web.test"
url = "https://%s/"
profile = "https_web"
ca_file = %q

[[federation.peers]]
trust_domain = "gospiffe.test"
url = "https://%s/"
profile = "https_spiffe"
endpoint_spiffe_id = %q
`, webPeer.addr, web.caFile, spPeer.addr, endpointID)})

	sds := xdsclient.OpenSDS(t, xdsclient.Dial(t, srv, ca.Token("shop", "product")), "spiffe://web.test", "spiffe://gospiffe.test", "ALL")
	holds := func(want map[string][]*x509.Certificate) func(map[string]*tlsv3.Secret) bool {
		return func(s map[string]*tlsv3.Secret) bool {
			if s["ALL"] == nil {
				return false
			}
			all, err := xdsclient.SpiffeValidator(s["ALL"])
			if err != nil {
				t.Fatalf("ALL: %v", err)
			}
			for td, roots := range want {
				sec := s["spiffe://"+td]
				if sec == nil {
					return false
				}
				got, err := xdsclient.TrustedCA(sec)
				if err != nil {
					t.Fatalf("spiffe://%s: %v", td, err)
				}
				if !testca.SameCerts(got, roots) || !testca.SameCerts(all[td], roots) {
					return false
				}
			}
			return true
		}
	}
	sds.WaitFor("both go-spiffe bundles", holds(map[string][]*x509.Certificate{
		"web.test": {webRoot1.Cert}, "gospiffe.test": {spRoot1.Cert},
	}))

	// Rotation, step 1: each go-spiffe side adds its next root.
	start := time.Now()
	webPeer.setBundle(webRoot1.Cert, webRoot2.Cert)
	spPeer.setBundle(spRoot1.Cert, spRoot2.Cert)
	sds.WaitFor("the added roots", holds(map[string][]*x509.Certificate{
		"web.test": {webRoot1.Cert, webRoot2.Cert}, "gospiffe.test": {spRoot1.Cert, spRoot2.Cert},
	}))
	if took := time.Since(start); took > peerHint {
		t.Fatalf("the added roots reached meshid's SDS after %v, beyond the peer's refresh hint %v", took, peerHint)
	} else {
		t.Logf("added roots reached SDS in %v (refresh hint %v)", took.Round(time.Second), peerHint)
	}

	// Step 2: the old roots are retired; the https_spiffe endpoint now serves an SVID of root 2.
	start = time.Now()
	spPeer.setSVID(svidOf(t, spRoot2.Leaf(t, endpointID, nil, nil)))
	webPeer.setBundle(webRoot2.Cert)
	spPeer.setBundle(spRoot2.Cert)
	sds.WaitFor("only the new roots", holds(map[string][]*x509.Certificate{
		"web.test": {webRoot2.Cert}, "gospiffe.test": {spRoot2.Cert},
	}))
	if took := time.Since(start); took > peerHint {
		t.Fatalf("the retirement reached meshid's SDS after %v, beyond the peer's refresh hint %v", took, peerHint)
	} else {
		t.Logf("retirement reached SDS in %v (refresh hint %v)", took.Round(time.Second), peerHint)
	}
	if webPeer.fetches.Load() < 3 || spPeer.fetches.Load() < 3 {
		t.Fatalf("fetches: web %d, spiffe %d; each step needs its own fetch", webPeer.fetches.Load(), spPeer.fetches.Load())
	}
}

func writeFile(t *testing.T, p string, b []byte) {
	t.Helper()
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func tlsRoots(pool *x509.CertPool) *tls.Config {
	return &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
}

func mustPKCS8(t *testing.T, c tls.Certificate) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(c.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	return der
}
