// Package workload runs go-spiffe v2's Workload API client, unchanged, against `meshid agent`'s
// SPIFFE Workload API socket (issue 22): workloadapi.NewX509Source (by address and by
// SPIFFE_ENDPOINT_SOCKET), workloadapi.WatchX509Context through a renewal and a root change,
// two Go workloads doing mTLS with tlsconfig.MTLSServerConfig / MTLSClientConfig through a full
// root rotation done with meshid's CLI, and the security header rule (a call without
// `workload.spiffe.io: true` is InvalidArgument, as go-spiffe's own client always sends it).
package workload

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"meshid.dev/interop/internal/meshidproc"
)

// agent is a running `meshid agent` with its Workload API socket.
type agent struct {
	socket string
	id     spiffeid.ID
}

// startAgent runs `meshid agent` for ns/sa against srv (certificates of lifetime ttl, "" for
// the server's default), waits for its Workload API socket line, and stops it with the test.
func startAgent(t *testing.T, ca *meshidproc.CA, srv *meshidproc.Server, ns, sa, ttl string) *agent {
	t.Helper()
	dir := t.TempDir()
	rootFile := filepath.Join(dir, "root-cert.pem")
	if err := os.WriteFile(rootFile, ca.RootsPEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	args := []string{"agent", "--server", "https://" + srv.GRPCAddr, "--server-name", "localhost",
		"--root-cert", rootFile, "--token-file", ca.TokenFile(ns, sa),
		"--sds-socket", filepath.Join(dir, "sds.sock"),
		"--workload-api-socket", filepath.Join(dir, "workload.sock")}
	if ttl != "" {
		args = append(args, "--ttl", ttl)
	}
	cmd := exec.Command(ca.Bin, args...)
	logPath := filepath.Join(dir, "agent.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = logFile
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting meshid agent: %v", err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); logFile.Close(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			t.Errorf("meshid agent still running 20 s after SIGTERM")
		}
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("meshid agent log:\n%s", b)
		}
	})
	const prefix = "meshid agent: SPIFFE Workload API on unix:"
	found := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if s, ok := strings.CutPrefix(sc.Text(), prefix); ok {
				found <- s
			}
		}
		_, _ = io.Copy(io.Discard, stdout)
	}()
	select {
	case s := <-found:
		td := spiffeid.RequireTrustDomainFromString(ca.TrustDomain)
		return &agent{socket: s, id: spiffeid.RequireFromPath(td, "/ns/"+ns+"/sa/"+sa)}
	case <-exited:
		b, _ := os.ReadFile(logPath)
		t.Fatalf("meshid agent exited before serving:\n%s", b)
	case <-time.After(60 * time.Second):
		t.Fatal("meshid agent printed no Workload API socket within 60 s")
	}
	return nil
}

func (a *agent) addr() string { return "unix://" + a.socket }

// source is workloadapi.NewX509Source on the agent's socket.
func source(t *testing.T, a *agent) *workloadapi.X509Source {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr(a.addr())))
	if err != nil {
		t.Fatalf("workloadapi.NewX509Source(%s): %v", a.addr(), err)
	}
	t.Cleanup(func() { _ = src.Close() })
	return src
}

// waitFor polls cond (go-spiffe's sources update in the background) for up to `within`.
func waitFor(t *testing.T, what string, within time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, within)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func holds(b *x509bundle.Bundle, roots ...*x509.Certificate) bool {
	if b == nil || len(b.X509Authorities()) != len(roots) {
		return false
	}
	for _, r := range roots {
		if !b.HasX509Authority(r) {
			return false
		}
	}
	return true
}

func rootByID(t *testing.T, ca *meshidproc.CA, state string) *x509.Certificate {
	t.Helper()
	id := ca.RootID(state)
	for _, r := range ca.Roots() {
		if meshidproc.Fingerprint(r)[:len(id)] == id {
			return r
		}
	}
	t.Fatalf("no trusted root with id %s", id)
	return nil
}

func signedBy(s *x509svid.SVID, root *x509.Certificate) bool {
	pool := x509.NewCertPool()
	pool.AddCert(root)
	inter := x509.NewCertPool()
	for _, c := range s.Certificates[1:] {
		inter.AddCert(c)
	}
	_, err := s.Certificates[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	return err == nil
}

// TestGoSpiffeX509SourceGetsTheAgentsSVIDAndBundle: workloadapi.NewX509Source (by address, and
// by SPIFFE_ENDPOINT_SOCKET as deployed workloads find it) gets the token's identity, a chain
// that verifies to the bundle it also gets, and the trust domain's roots.
func TestGoSpiffeX509SourceGetsTheAgentsSVIDAndBundle(t *testing.T) {
	ca := meshidproc.NewCA(t, "mesh.test")
	srv := ca.Start(meshidproc.Config{})
	a := startAgent(t, ca, srv, "shop", "product", "")
	src := source(t, a)
	svid, err := src.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	if svid.ID != a.id {
		t.Fatalf("SVID for %s, want %s", svid.ID, a.id)
	}
	b, err := src.GetX509BundleForTrustDomain(a.id.TrustDomain())
	if err != nil {
		t.Fatal(err)
	}
	if !holds(b, ca.Roots()...) {
		t.Fatalf("bundle holds %d authorities, want the CA's %d roots", len(b.X509Authorities()), len(ca.Roots()))
	}
	if _, _, err := x509svid.Verify(svid.Certificates, src); err != nil {
		t.Fatalf("x509svid.Verify of the agent's SVID with its own bundle: %v", err)
	}
	// As a workload finds the socket: SPIFFE_ENDPOINT_SOCKET=unix:///path.
	t.Setenv("SPIFFE_ENDPOINT_SOCKET", a.addr())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	envSVID, err := workloadapi.FetchX509SVID(ctx)
	if err != nil {
		t.Fatalf("workloadapi.FetchX509SVID via SPIFFE_ENDPOINT_SOCKET: %v", err)
	}
	if envSVID.ID != a.id {
		t.Fatalf("SVID via SPIFFE_ENDPOINT_SOCKET for %s", envSVID.ID)
	}
	bundles, err := workloadapi.FetchX509Bundles(ctx)
	if err != nil {
		t.Fatalf("workloadapi.FetchX509Bundles: %v", err)
	}
	if _, ok := bundles.Get(a.id.TrustDomain()); !ok {
		t.Fatal("FetchX509Bundles has no bundle for the own trust domain")
	}
}

// TestTheSecurityHeaderIsRequired: the Workload API specification's rule, checked with
// go-spiffe's generated client and no `workload.spiffe.io` metadata.
func TestTheSecurityHeaderIsRequired(t *testing.T) {
	ca := meshidproc.NewCA(t, "mesh.test")
	srv := ca.Start(meshidproc.Config{})
	a := startAgent(t, ca, srv, "shop", "product", "")
	conn, err := grpc.NewClient("unix://"+a.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	stream, err := workloadpb.NewSpiffeWorkloadAPIClient(conn).FetchX509SVID(ctx, &workloadpb.X509SVIDRequest{})
	if err == nil {
		_, err = stream.Recv()
	}
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("FetchX509SVID without the security header: %v, want InvalidArgument", err)
	}
}

// recorder is a workloadapi.X509ContextWatcher that keeps every update.
type recorder struct {
	mu      sync.Mutex
	updates []*workloadapi.X509Context
}

func (r *recorder) OnX509ContextUpdate(c *workloadapi.X509Context) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.updates = append(r.updates, c)
}

func (r *recorder) OnX509ContextWatchError(error) {}

func (r *recorder) snapshot() []*workloadapi.X509Context {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]*workloadapi.X509Context(nil), r.updates...)
}

// TestWatchX509ContextSeesARenewalAndARootChange: workloadapi.WatchX509Context gets a new
// X509-SVID when the agent renews (a short lifetime: renewed at half of it) and a new bundle
// when a root is prepared on the server (pushed to the agent over SDS, then to the watcher).
func TestWatchX509ContextSeesARenewalAndARootChange(t *testing.T) {
	ca := meshidproc.NewCA(t, "mesh.test")
	srv := ca.Start(meshidproc.Config{})
	a := startAgent(t, ca, srv, "shop", "product", "20s")
	rec := &recorder{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- workloadapi.WatchX509Context(ctx, rec, workloadapi.WithAddr(a.addr())) }()
	defer func() { cancel(); <-done }()
	serial := func(c *workloadapi.X509Context) string {
		return c.DefaultSVID().Certificates[0].SerialNumber.String()
	}
	waitFor(t, "a first X509 context", 30*time.Second, func() bool { return len(rec.snapshot()) > 0 })
	first := serial(rec.snapshot()[0])
	waitFor(t, "an update with a renewed SVID", 40*time.Second, func() bool {
		u := rec.snapshot()
		return serial(u[len(u)-1]) != first
	})
	ca.Run("root", "prepare", "--state-dir", ca.StateDir, "--reason", "interop")
	prepared := rootByID(t, ca, "prepared")
	waitFor(t, "an update whose bundle holds the prepared root", 10*time.Second, func() bool {
		u := rec.snapshot()
		b, ok := u[len(u)-1].Bundles.Get(a.id.TrustDomain())
		return ok && b.HasX509Authority(prepared)
	})
}

// TestGoSpiffeMTLSThroughAgentsSurvivesARootRotation: two Go workloads, each fed by its own
// agent's Workload API, do mTLS with tlsconfig.MTLSServerConfig / MTLSClientConfig
// (authorizing each other's ID) back to back while the CLI rotates the root: prepare → both
// bundles hold both roots → activate → both SVIDs renewed from the new root → taint → revoke →
// only the new root. Not one handshake fails.
func TestGoSpiffeMTLSThroughAgentsSurvivesARootRotation(t *testing.T) {
	ca := meshidproc.NewCA(t, "mesh.test")
	srv := ca.Start(meshidproc.Config{})
	ca2 := startAgent(t, ca, srv, "shop", "product", "20s")
	sa := startAgent(t, ca, srv, "shop", "inventory", "20s")
	client, server := source(t, ca2), source(t, sa)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", tlsconfig.MTLSServerConfig(server, server, tlsconfig.AuthorizeID(ca2.id)))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn) {
				defer c.Close()
				buf := make([]byte, 4)
				if _, err := io.ReadFull(c, buf); err == nil {
					_, _ = c.Write(buf)
				}
			}(c)
		}
	}()
	handshake := func() error {
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", ln.Addr().String(),
			tlsconfig.MTLSClientConfig(client, client, tlsconfig.AuthorizeID(sa.id)))
		if err != nil {
			return err
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := conn.Write([]byte("ping")); err != nil {
			return err
		}
		buf := make([]byte, 4)
		if _, err := io.ReadFull(conn, buf); err != nil {
			return fmt.Errorf("echo: %w", err)
		}
		return nil
	}
	if err := handshake(); err != nil {
		t.Fatalf("mTLS between the two agent-fed workloads: %v", err)
	}
	var mu sync.Mutex
	phase, ok, failures := "before", map[string]int{}, []string{}
	setPhase := func(p string) { mu.Lock(); phase = p; mu.Unlock() }
	record := func(err error) {
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			failures = append(failures, phase+": "+err.Error())
		} else {
			ok[phase]++
		}
	}
	ctx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for ctx.Err() == nil {
			record(handshake())
			time.Sleep(20 * time.Millisecond)
		}
	}()
	both := func(what string, cond func(*workloadapi.X509Source) bool) {
		waitFor(t, what, 60*time.Second, func() bool { return cond(client) && cond(server) })
		record(handshake())
	}
	bundle := func(s *workloadapi.X509Source) *x509bundle.Bundle {
		b, _ := s.GetX509BundleForTrustDomain(ca2.id.TrustDomain())
		return b
	}
	svid := func(s *workloadapi.X509Source) *x509svid.SVID { v, _ := s.GetX509SVID(); return v }

	oldRoot := rootByID(t, ca, "active")
	oldID := ca.RootID("active")
	setPhase("prepare")
	ca.Run("root", "prepare", "--state-dir", ca.StateDir, "--reason", "interop")
	newRoot := rootByID(t, ca, "prepared")
	newID := ca.RootID("prepared")
	both("both roots in both bundles", func(s *workloadapi.X509Source) bool { return holds(bundle(s), oldRoot, newRoot) })
	setPhase("activate")
	ca.Run("root", "activate", newID, "--state-dir", ca.StateDir, "--server", "http://"+srv.HTTPAddr)
	both("both SVIDs renewed from the new root", func(s *workloadapi.X509Source) bool { return signedBy(svid(s), newRoot) })
	setPhase("taint")
	ca.Run("root", "taint", oldID, "--state-dir", ca.StateDir)
	record(handshake())
	setPhase("revoke")
	ca.Run("root", "revoke", oldID, "--state-dir", ca.StateDir, "--force")
	both("only the new root in both bundles", func(s *workloadapi.X509Source) bool { return holds(bundle(s), newRoot) })
	stop()
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	t.Logf("handshakes per phase: %v", ok)
	if len(failures) > 0 {
		t.Fatalf("%d handshakes failed during the rotation: %v", len(failures), failures)
	}
	for _, p := range []string{"prepare", "activate", "taint", "revoke"} {
		if ok[p] == 0 {
			t.Fatalf("no handshake completed in phase %s", p)
		}
	}
}
