// Package meshidproc runs meshid's release binary for the interop tests: a CA in a fresh state
// directory (`meshid ca init`), a dev token issuer (`meshid dev issuer init`, `meshid dev token`),
// `meshid server` on 127.0.0.1 ephemeral ports, and the rest of the CLI.
//
// The binary is $MESHID_BIN, or <repo>/target/release/meshid (tools/interop.sh builds it). A
// missing binary fails the test with the reason; nothing is skipped.
package meshidproc

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// StartTimeout bounds how long `meshid server` may take to print its addresses and be ready.
// It is a guard against a hung process, not a performance assertion.
const StartTimeout = 60 * time.Second

// RepoRoot is the meshid repository this package lives in.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	// <repo>/tests/interop/internal/meshidproc/meshidproc.go
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", "..", "..", ".."))
}

// Bin is the meshid binary under test: $MESHID_BIN, else <repo>/target/release/meshid.
func Bin(t testing.TB) string {
	t.Helper()
	bin := os.Getenv("MESHID_BIN")
	if bin == "" {
		bin = filepath.Join(RepoRoot(), "target", "release", "meshid")
	}
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("meshid binary %s: %v (build it with `cargo build --release`, or run tools/interop.sh, or set MESHID_BIN)", bin, err)
	}
	return bin
}

// CA is a meshid CA state directory and a dev token issuer, in a temp directory of the test.
type CA struct {
	t           testing.TB
	Bin         string
	Dir         string
	TrustDomain string
	StateDir    string
	IssuerDir   string
}

// NewCA runs `meshid ca init --trust-domain TD` and `meshid dev issuer init`.
func NewCA(t testing.TB, trustDomain string) *CA {
	t.Helper()
	dir := t.TempDir()
	c := &CA{
		t:           t,
		Bin:         Bin(t),
		Dir:         dir,
		TrustDomain: trustDomain,
		StateDir:    filepath.Join(dir, "state"),
		IssuerDir:   filepath.Join(dir, "issuer"),
	}
	c.Run("ca", "init", "--trust-domain", trustDomain, "--state-dir", c.StateDir)
	c.Run("dev", "issuer", "init", "--dir", c.IssuerDir)
	return c
}

// Run runs the meshid CLI and returns its stdout; a non-zero exit fails the test with stderr.
func (c *CA) Run(args ...string) string {
	c.t.Helper()
	out, errOut, err := c.RunErr(args...)
	if err != nil {
		c.t.Fatalf("meshid %s: %v\nstdout: %s\nstderr: %s", strings.Join(args, " "), err, out, errOut)
	}
	return out
}

// RunErr runs the meshid CLI and returns stdout, stderr and the exit error.
func (c *CA) RunErr(args ...string) (string, string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.Bin, args...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	cmd.Env = append(os.Environ(), "NO_COLOR=1")
	err := cmd.Run()
	return out.String(), errOut.String(), err
}

// Token is a projected-style service-account token for ns/sa (audience istio-ca, 1h).
func (c *CA) Token(ns, sa string) string {
	c.t.Helper()
	return strings.TrimSpace(c.Run("dev", "token", "--issuer-dir", c.IssuerDir, "--namespace", ns, "--service-account", sa))
}

// TokenFile writes Token(ns, sa) to a file and returns its path.
func (c *CA) TokenFile(ns, sa string) string {
	c.t.Helper()
	p := filepath.Join(c.t.TempDir(), "token")
	if err := os.WriteFile(p, []byte(c.Token(ns, sa)), 0o600); err != nil {
		c.t.Fatal(err)
	}
	return p
}

// RootsPEM is every root the CA trusts now (`meshid bundle export --format pem`).
func (c *CA) RootsPEM() []byte {
	c.t.Helper()
	return []byte(c.Run("bundle", "export", "--format", "pem", "--state-dir", c.StateDir))
}

// Roots parses RootsPEM.
func (c *CA) Roots() []*x509.Certificate {
	c.t.Helper()
	certs, err := ParsePEMCerts(c.RootsPEM())
	if err != nil {
		c.t.Fatalf("meshid bundle export --format pem: %v", err)
	}
	return certs
}

// RootStatus is `meshid root status --output json`, the parts the tests read.
type RootStatus struct {
	Roots []struct {
		ID    string `json:"id"`
		State string `json:"state"`
	} `json:"roots"`
}

// RootStatus runs `meshid root status --output json`.
func (c *CA) RootStatus() RootStatus {
	c.t.Helper()
	var s RootStatus
	out := c.Run("root", "status", "--state-dir", c.StateDir, "--output", "json")
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		c.t.Fatalf("root status --output json: %v\n%s", err, out)
	}
	return s
}

// RootID is the id of the one root in state `state` (the test fails if there is not exactly one).
func (c *CA) RootID(state string) string {
	c.t.Helper()
	var ids []string
	for _, r := range c.RootStatus().Roots {
		if r.State == state {
			ids = append(ids, r.ID)
		}
	}
	if len(ids) != 1 {
		c.t.Fatalf("roots in state %s: %v, want exactly one", state, ids)
	}
	return ids[0]
}

// Config describes one `meshid server` run.
type Config struct {
	// TOML appended to the generated file (state_dir, [listen] on 127.0.0.1:0, a 100ms state
	// poll), e.g. a [federation] section. A [federation.bundle_endpoint] makes Start wait for
	// the endpoint's address too.
	TOML string
	// Extra `meshid server` flags.
	Args []string
}

// Server is a running `meshid server`.
type Server struct {
	CA         *CA
	GRPCAddr   string
	HTTPAddr   string
	BundleAddr string
	UnixPath   string
	logPath    string
	cmd        *exec.Cmd
	exited     chan struct{}
	exitErr    error
	stopOnce   sync.Once
}

// Start runs `meshid server --config FILE --dev-issuer-dir DIR`, waits until it printed its
// addresses and /readyz answers 200, and stops it when the test ends.
func (c *CA) Start(cfg Config) *Server {
	c.t.Helper()
	dir := c.t.TempDir()
	conf := filepath.Join(dir, "meshid.toml")
	text := fmt.Sprintf("state_dir = %q\nstate_poll_interval = \"100ms\"\n\n[listen]\ngrpc = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n\n%s\n", c.StateDir, cfg.TOML)
	if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
		c.t.Fatal(err)
	}
	s := &Server{CA: c, logPath: filepath.Join(dir, "server.log"), exited: make(chan struct{})}
	logFile, err := os.Create(s.logPath)
	if err != nil {
		c.t.Fatal(err)
	}
	args := append([]string{"server", "--config", conf, "--dev-issuer-dir", c.IssuerDir}, cfg.Args...)
	s.cmd = exec.Command(c.Bin, args...)
	s.cmd.Env = append(os.Environ(), "NO_COLOR=1")
	s.cmd.Stderr = logFile
	stdout, err := s.cmd.StdoutPipe()
	if err != nil {
		c.t.Fatal(err)
	}
	if err := s.cmd.Start(); err != nil {
		c.t.Fatalf("starting %s: %v", c.Bin, err)
	}
	wantBundle := strings.Contains(cfg.TOML, "[federation.bundle_endpoint]")
	lines := make(chan string, 16)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			select {
			case lines <- sc.Text():
			default: // nobody listens after start-up; keep draining the pipe
			}
		}
		close(lines)
	}()
	go func() {
		s.exitErr = s.cmd.Wait()
		logFile.Close()
		close(s.exited)
	}()
	c.t.Cleanup(func() {
		s.Stop()
		if c.t.Failed() {
			c.t.Logf("meshid server log (%s):\n%s", s.logPath, tail(s.Log(), 60))
		}
	})
	deadline := time.NewTimer(StartTimeout)
	defer deadline.Stop()
	for s.GRPCAddr == "" || (wantBundle && s.BundleAddr == "") {
		select {
		case line, ok := <-lines:
			if !ok {
				<-s.exited
				c.t.Fatalf("meshid server exited before it was up (%v):\n%s", s.exitErr, tail(s.Log(), 40))
			}
			s.parseLine(line)
		case <-deadline.C:
			c.t.Fatalf("meshid server printed no address within %v:\n%s", StartTimeout, tail(s.Log(), 40))
		}
	}
	s.waitReady(deadline.C)
	return s
}

func (s *Server) parseLine(line string) {
	const grpc, http, bundle, unix = "meshid server: gRPC (TLS) on ", ", HTTP on ", "meshid server: SPIFFE bundle endpoint (HTTPS) on ", "meshid server: gRPC on unix:"
	switch {
	case strings.HasPrefix(line, grpc):
		rest := strings.TrimPrefix(line, grpc)
		g, h, ok := strings.Cut(rest, http)
		if ok {
			s.GRPCAddr, s.HTTPAddr = g, h
		}
	case strings.HasPrefix(line, bundle):
		s.BundleAddr = strings.TrimPrefix(line, bundle)
	case strings.HasPrefix(line, unix):
		s.UnixPath = strings.TrimPrefix(line, unix)
	}
}

// waitReady polls /readyz (no push signal exists for readiness) every 50ms.
func (s *Server) waitReady(deadline <-chan time.Time) {
	s.CA.t.Helper()
	var last string
	for {
		resp, err := http.Get("http://" + s.HTTPAddr + "/readyz")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
			last = fmt.Sprintf("HTTP %d: %s", resp.StatusCode, body)
		} else {
			last = err.Error()
		}
		select {
		case <-deadline:
			s.CA.t.Fatalf("meshid server not ready within %v: %s\n%s", StartTimeout, last, tail(s.Log(), 40))
		case <-s.exited:
			s.CA.t.Fatalf("meshid server exited (%v):\n%s", s.exitErr, tail(s.Log(), 40))
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Stop sends SIGTERM and waits for the drain (meshid exits 0 within 5 s); a non-zero exit or
// a server still running after 30 s fails the test.
func (s *Server) Stop() {
	s.stopOnce.Do(func() {
		select {
		case <-s.exited:
		default:
			_ = s.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-s.exited:
			case <-time.After(30 * time.Second):
				_ = s.cmd.Process.Kill()
				<-s.exited
				s.CA.t.Errorf("meshid server still running 30 s after SIGTERM; killed")
				return
			}
		}
		if s.exitErr != nil {
			s.CA.t.Errorf("meshid server exited with %v:\n%s", s.exitErr, tail(s.Log(), 40))
		}
	})
}

// Log is the server's log so far.
func (s *Server) Log() string {
	b, _ := os.ReadFile(s.logPath)
	return string(b)
}

// Metric is the sum of the samples of a Prometheus metric whose line starts with `prefix`
// (a name, optionally with a label selector's beginning).
func (s *Server) Metric(prefix string) (float64, bool) {
	resp, err := http.Get("http://" + s.HTTPAddr + "/metrics")
	if err != nil {
		return 0, false
	}
	defer resp.Body.Close()
	var sum float64
	found := false
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, prefix) {
			continue
		}
		var v float64
		if _, err := fmt.Sscan(line[strings.LastIndexByte(line, ' ')+1:], &v); err == nil {
			sum += v
			found = true
		}
	}
	return sum, found
}

// TLSConfig verifies meshid's gRPC serving certificate against the CA's roots, as a proxy
// does with the istio-ca-root-cert ConfigMap (server name localhost, one of its default names).
func (s *Server) TLSConfig() *tls.Config {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(s.CA.RootsPEM()) {
		s.CA.t.Fatal("no root in meshid bundle export --format pem")
	}
	return &tls.Config{RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS12}
}

// ParsePEMCerts parses every CERTIFICATE block.
func ParsePEMCerts(b []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("unexpected PEM block %q", blk.Type)
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, err
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("no CERTIFICATE block")
	}
	return certs, nil
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Fingerprint is a certificate's id as `meshid root status` prints it: the first 8 bytes of
// its SHA-256, hex.
func Fingerprint(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	return hex.EncodeToString(sum[:8])
}
