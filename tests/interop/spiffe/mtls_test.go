package spiffe

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"meshid.dev/interop/internal/meshidproc"
	"meshid.dev/interop/internal/testca"
	"meshid.dev/interop/internal/xdsclient"
)

// workload holds what a sidecar holds: the `default` SVID and the `ROOTCA` bundle of its SDS
// stream, applied as each response arrives (as Envoy does), exposed as go-spiffe sources.
type workload struct {
	t       *testing.T
	id      spiffeid.ID
	td      spiffeid.TrustDomain
	sds     *xdsclient.SDS
	mu      sync.Mutex
	svid    *x509svid.SVID
	bundle  *x509bundle.Bundle
	changed chan struct{}
	err     error
}

func newWorkload(t *testing.T, ca *meshidproc.CA, srv *meshidproc.Server, ns, sa string) *workload {
	td := spiffeid.RequireTrustDomainFromString(ca.TrustDomain)
	w := &workload{
		t: t, td: td, id: spiffeid.RequireFromPath(td, "/ns/"+ns+"/sa/"+sa),
		sds:     xdsclient.OpenSDS(t, xdsclient.Dial(t, srv, ca.Token(ns, sa)), "default", "ROOTCA"),
		changed: make(chan struct{}),
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go w.run(ctx)
	w.waitUntil("default and ROOTCA", func(s *x509svid.SVID, b *x509bundle.Bundle) bool { return s != nil && b != nil })
	return w
}

func (w *workload) run(ctx context.Context) {
	for {
		_, err := w.sds.Next(ctx)
		w.mu.Lock()
		if err != nil {
			if ctx.Err() == nil {
				w.err = err
			}
		} else {
			w.err = w.applyLocked()
		}
		close(w.changed)
		w.changed = make(chan struct{})
		failed := w.err != nil
		w.mu.Unlock()
		if err != nil || failed {
			return
		}
	}
}

func (w *workload) applyLocked() error {
	s := w.sds.Snapshot()
	if sec := s["default"]; sec != nil {
		chain, key, err := xdsclient.TLSCertificate(sec)
		if err != nil {
			return err
		}
		svid, err := x509svid.Parse(chain, key)
		if err != nil {
			return fmt.Errorf("x509svid.Parse refused SDS default: %w", err)
		}
		w.svid = svid
	}
	if sec := s["ROOTCA"]; sec != nil {
		roots, err := xdsclient.TrustedCA(sec)
		if err != nil {
			return err
		}
		w.bundle = x509bundle.FromX509Authorities(w.td, roots)
	}
	return nil
}

// waitUntil blocks until cond holds for what the workload holds (signalled by each SDS push).
func (w *workload) waitUntil(what string, cond func(*x509svid.SVID, *x509bundle.Bundle) bool) {
	w.t.Helper()
	deadline := time.After(xdsclient.Wait)
	for {
		w.mu.Lock()
		ok, err, changed := cond(w.svid, w.bundle), w.err, w.changed
		w.mu.Unlock()
		if ok {
			return
		}
		if err != nil {
			w.t.Fatalf("%s: SDS failed while waiting for %s: %v", w.id, what, err)
		}
		select {
		case <-changed:
		case <-deadline:
			w.t.Fatalf("%s: no %s within %v", w.id, what, xdsclient.Wait)
		}
	}
}

func (w *workload) GetX509SVID() (*x509svid.SVID, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.svid, nil
}

func (w *workload) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if td != w.td {
		return nil, fmt.Errorf("no bundle for %s", td)
	}
	return w.bundle, nil
}

// signedBy says whether the SVID's chain ends at root (the leaf's last issuer).
func signedBy(s *x509svid.SVID, root *x509.Certificate) bool {
	if s == nil {
		return false
	}
	last := s.Certificates[len(s.Certificates)-1]
	return last.CheckSignatureFrom(root) == nil
}

func holdsExactly(b *x509bundle.Bundle, roots ...*x509.Certificate) bool {
	return b != nil && testca.SameCerts(b.X509Authorities(), roots)
}

// echoServer accepts mTLS connections with go-spiffe's MTLSServerConfig, authorizing only
// clientID, and echoes one line.
func echoServer(t *testing.T, w *workload, clientID spiffeid.ID) string {
	ln, err := tls.Listen("tcp", "127.0.0.1:0", tlsconfig.MTLSServerConfig(w, w, tlsconfig.AuthorizeID(clientID)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				buf := make([]byte, 5)
				if _, err := io.ReadFull(c, buf); err == nil {
					_, _ = c.Write(buf)
				}
			}()
		}
	}()
	return ln.Addr().String()
}

// handshake dials with MTLSClientConfig authorizing only serverID and checks the echo.
func handshake(addr string, w *workload, serverID spiffeid.ID) error {
	d := &net.Dialer{Timeout: 10 * time.Second}
	c, err := tls.DialWithDialer(d, "tcp", addr, tlsconfig.MTLSClientConfig(w, w, tlsconfig.AuthorizeID(serverID)))
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("ping\n")); err != nil {
		return err
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != "ping\n" {
		return errors.New("echo mismatch")
	}
	return nil
}

// traffic runs handshakes back to back until stopped, counting per phase.
type traffic struct {
	mu       sync.Mutex
	phase    string
	ok       map[string]int
	failures []string
}

func (tr *traffic) setPhase(p string) {
	tr.mu.Lock()
	tr.phase = p
	tr.mu.Unlock()
}

func (tr *traffic) record(err error) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if err != nil {
		tr.failures = append(tr.failures, fmt.Sprintf("%s: %v", tr.phase, err))
		return
	}
	tr.ok[tr.phase]++
}

// TestGoSpiffeMTLSWorkloadsWithMeshidSVIDsSurviveARootRotation: two Go workloads configured
// with go-spiffe's tlsconfig.MTLSServerConfig / MTLSClientConfig and AuthorizeID
// (spiffetls/tlsconfig/config.go), each holding the `default` certificate and `ROOTCA` that
// meshid streams to it over SDS, complete mTLS; handshakes run back to back while the CLI
// rotates the root (prepare → activate (gated on the server's propagation) → taint → revoke),
// and not one fails. Each phase waits for what the phase must bring (the new root in both
// bundles, both leaves re-keyed to it, the old root gone) and handshakes explicitly in it.
func TestGoSpiffeMTLSWorkloadsWithMeshidSVIDsSurviveARootRotation(t *testing.T) {
	t.Parallel()
	ca := meshidproc.NewCA(t, "mesh.test")
	srv := ca.Start(meshidproc.Config{})
	client := newWorkload(t, ca, srv, "shop", "product")
	server := newWorkload(t, ca, srv, "shop", "inventory")
	addr := echoServer(t, server, client.id)
	if err := handshake(addr, client, server.id); err != nil {
		t.Fatalf("mTLS with meshid's SVIDs: %v", err)
	}
	// AuthorizeID must bite: a client that expects another server ID is refused.
	if err := handshake(addr, client, client.id); err == nil {
		t.Fatal("MTLSClientConfig accepted the server for another SPIFFE ID")
	}

	before, _ := client.GetX509SVID()
	tr := &traffic{ok: map[string]int{}}
	tr.setPhase("before")
	ctx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for ctx.Err() == nil {
			tr.record(handshake(addr, client, server.id))
			select {
			case <-ctx.Done():
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	step := func(phase string) {
		tr.setPhase(phase)
		tr.record(handshake(addr, client, server.id))
	}
	both := func(what string, cond func(*x509svid.SVID, *x509bundle.Bundle) bool) {
		client.waitUntil(what, cond)
		server.waitUntil(what, cond)
	}

	oldID := ca.RootID("active")
	oldRoot := rootByID(t, ca, oldID)
	tr.setPhase("prepare")
	ca.Run("root", "prepare", "--state-dir", ca.StateDir, "--reason", "interop")
	newID := ca.RootID("prepared")
	newRoot := rootByID(t, ca, newID)
	both("both roots in ROOTCA", func(_ *x509svid.SVID, b *x509bundle.Bundle) bool { return holdsExactly(b, oldRoot, newRoot) })
	step("prepare")

	tr.setPhase("activate")
	ca.Run("root", "activate", newID, "--state-dir", ca.StateDir, "--server", "http://"+srv.HTTPAddr)
	both("a leaf from the new root", func(s *x509svid.SVID, _ *x509bundle.Bundle) bool { return signedBy(s, newRoot) })
	step("activate")

	tr.setPhase("taint")
	ca.Run("root", "taint", oldID, "--state-dir", ca.StateDir)
	step("taint")
	tr.setPhase("revoke")

	// Leaves from the old root may still be valid on paper; both workloads were re-keyed above,
	// so the revoke is forced (as the walkthrough does).
	ca.Run("root", "revoke", oldID, "--state-dir", ca.StateDir, "--force")
	both("only the new root in ROOTCA", func(_ *x509svid.SVID, b *x509bundle.Bundle) bool { return holdsExactly(b, newRoot) })
	step("revoke")

	stop()
	wg.Wait()
	tr.mu.Lock()
	defer tr.mu.Unlock()
	t.Logf("handshakes per phase: %v", tr.ok)
	if len(tr.failures) > 0 {
		t.Fatalf("%d handshakes failed during the rotation: %v", len(tr.failures), tr.failures)
	}
	for _, p := range []string{"prepare", "activate", "taint", "revoke"} {
		if tr.ok[p] == 0 {
			t.Fatalf("no handshake completed in phase %s", p)
		}
	}
	// The client's first leaf (from the revoked root) no longer verifies against the bundle the
	// server workload holds: the revoke took the old root out of ROOTCA.
	if _, _, err := x509svid.Verify(before.Certificates, server); err == nil {
		t.Fatal("x509svid.Verify still accepts a leaf of the revoked root with the bundle meshid streams")
	}
}

// rootByID finds a trusted root by its `meshid root status` ID (the first 8 bytes of its
// certificate's SHA-256, hex).
func rootByID(t *testing.T, ca *meshidproc.CA, id string) *x509.Certificate {
	t.Helper()
	for _, r := range ca.Roots() {
		if fingerprint(r)[:len(id)] == id {
			return r
		}
	}
	t.Fatalf("no trusted root with id %s", id)
	return nil
}

func fingerprint(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	return hex.EncodeToString(sum[:8])
}
