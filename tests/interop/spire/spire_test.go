// Package spire runs SPIRE's own server (github.com/spiffe/spire v1.13.3, built by
// tools/interop.sh from tests/interop/peers/spire) against meshid: the two trust domains
// federate both ways over https_spiffe bundle endpoints, SVIDs of each verify against what the
// other holds, and a root rotated on either side reaches the other.
package spire

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
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

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"meshid.dev/interop/internal/meshidproc"
	"meshid.dev/interop/internal/testca"
	"meshid.dev/interop/internal/xdsclient"
)

// Version is the SPIRE release the suite builds (tools/interop.sh keys its cache by it).
const Version = "v1.13.3"

const (
	spireTD          = "spire.test"
	meshTD           = "mesh.test"
	spireEndpointID  = "spiffe://spire.test/spire/server"
	meshidEndpointID = "spiffe://mesh.test/ns/istio-system/sa/meshid"
)

// spireBin is $SPIRE_SERVER_BIN or <repo>/target/interop/spire-<Version>/spire-server.
func spireBin(t *testing.T) string {
	bin := os.Getenv("SPIRE_SERVER_BIN")
	if bin == "" {
		bin = filepath.Join(meshidproc.RepoRoot(), "target", "interop", "spire-"+Version, "spire-server")
	}
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("spire-server %s: %v (tools/interop.sh builds it from tests/interop/peers/spire; or set SPIRE_SERVER_BIN)", bin, err)
	}
	return bin
}

func freePort(t *testing.T) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// spireServer is a running spire-server with a JSON log that tests can wait on.
type spireServer struct {
	t          *testing.T
	bin, dir   string
	socket     string
	bundlePort int
	cmd        *exec.Cmd
	exited     chan struct{}
	mu         sync.Mutex
	logs       []map[string]any
	logged     chan struct{}
	raw        bytes.Buffer
}

func startSpire(t *testing.T, meshidBundleAddr string) *spireServer {
	t.Helper()
	dir := t.TempDir()
	s := &spireServer{t: t, bin: spireBin(t), dir: dir, socket: filepath.Join(dir, "api.sock"), bundlePort: freePort(t), exited: make(chan struct{}), logged: make(chan struct{})}
	conf := fmt.Sprintf(`server {
  bind_address = "127.0.0.1"
  bind_port = "%d"
  socket_path = %q
  trust_domain = %q
  data_dir = %q
  log_level = "DEBUG"
  log_format = "json"
  ca_ttl = "24h"
  default_x509_svid_ttl = "1h"
  federation {
    bundle_endpoint {
      address = "127.0.0.1"
      port = %d
      refresh_hint = "1m"
      profile "https_spiffe" {}
    }
    federates_with %q {
      bundle_endpoint_url = "https://%s/"
      bundle_endpoint_profile "https_spiffe" {
        endpoint_spiffe_id = %q
      }
    }
  }
}

plugins {
  DataStore "sql" {
    plugin_data {
      database_type = "sqlite3"
      connection_string = %q
    }
  }
  KeyManager "memory" {
    plugin_data {}
  }
  NodeAttestor "join_token" {
    plugin_data {}
  }
}
`, freePort(t), s.socket, spireTD, filepath.Join(dir, "data"), s.bundlePort, meshTD, meshidBundleAddr, meshidEndpointID, filepath.Join(dir, "data", "datastore.sqlite3"))
	confPath := filepath.Join(dir, "server.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	s.cmd = exec.Command(s.bin, "run", "-config", confPath)
	// spire-server logs to stdout; both streams go to the log reader.
	pr, pw := io.Pipe()
	s.cmd.Stdout, s.cmd.Stderr = pw, pw
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("starting spire-server: %v", err)
	}
	go s.readLog(pr)
	go func() { _ = s.cmd.Wait(); pw.Close(); close(s.exited) }()
	t.Cleanup(func() {
		_ = s.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-s.exited:
		case <-time.After(30 * time.Second):
			_ = s.cmd.Process.Kill()
			<-s.exited
		}
		if t.Failed() {
			s.mu.Lock()
			t.Logf("spire-server log:\n%s", tail(s.raw.String(), 60))
			s.mu.Unlock()
		}
	})
	s.waitLog("the bundle endpoint serving", func(e map[string]any) bool { return e["msg"] == "Serving bundle endpoint" })
	s.waitLog("the server APIs", func(e map[string]any) bool { return e["msg"] == "Starting Server APIs" })
	return s
}

func (s *spireServer) readLog(r io.Reader) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var e map[string]any
		_ = json.Unmarshal(sc.Bytes(), &e)
		s.mu.Lock()
		s.raw.Write(sc.Bytes())
		s.raw.WriteByte('\n')
		if e != nil {
			s.logs = append(s.logs, e)
		}
		close(s.logged)
		s.logged = make(chan struct{})
		s.mu.Unlock()
	}
}

// waitLog waits for a log entry (from the start) matching pred: SPIRE says what it did in its
// log, which is the signal awaited here instead of polling its API.
func (s *spireServer) waitLog(what string, pred func(map[string]any) bool) int {
	s.t.Helper()
	return s.waitLogAfter(0, what, pred)
}

// waitLogAfter is waitLog considering entries from index `from` on; it returns the index
// after the match.
func (s *spireServer) waitLogAfter(from int, what string, pred func(map[string]any) bool) int {
	s.t.Helper()
	deadline := time.After(xdsclient.Wait)
	for {
		s.mu.Lock()
		for i := from; i < len(s.logs); i++ {
			if pred(s.logs[i]) {
				s.mu.Unlock()
				return i + 1
			}
		}
		from = len(s.logs)
		ch := s.logged
		s.mu.Unlock()
		select {
		case <-ch:
		case <-s.exited:
			s.t.Fatalf("spire-server exited while waiting for %s", what)
		case <-deadline:
			s.t.Fatalf("spire-server: no log of %s within %v", what, xdsclient.Wait)
		}
	}
}

func (s *spireServer) logCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.logs)
}

// cli runs a spire-server subcommand against this server's API socket.
func (s *spireServer) cli(args ...string) string {
	s.t.Helper()
	full := append([]string{args[0], args[1]}, append([]string{"-socketPath", s.socket}, args[2:]...)...)
	if len(args) > 2 && (args[0] == "localauthority") {
		full = append([]string{args[0], args[1], args[2]}, append([]string{"-socketPath", s.socket}, args[3:]...)...)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, s.bin, full...).CombinedOutput()
	if err != nil {
		s.t.Fatalf("spire-server %s: %v\n%s", strings.Join(full, " "), err, out)
	}
	return string(out)
}

// meshBundleInSpire is what SPIRE holds for mesh.test (`spire-server bundle list -id`).
func (s *spireServer) meshBundleInSpire() *spiffebundle.Bundle {
	s.t.Helper()
	out := s.cli("bundle", "list", "-id", "spiffe://"+meshTD, "-format", "spiffe")
	b, err := spiffebundle.Parse(spiffeid.RequireTrustDomainFromString(meshTD), []byte(out))
	if err != nil {
		s.t.Fatalf("spire-server bundle list -format spiffe for mesh.test: %v\n%s", err, out)
	}
	return b
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// minted is an X509-SVID minted by SPIRE (`spire-server x509 mint -write DIR`).
func (s *spireServer) mint(id string) *x509svid.SVID {
	s.t.Helper()
	dir := s.t.TempDir()
	s.cli("x509", "mint", "-spiffeID", id, "-write", dir)
	svid, err := x509svid.Load(filepath.Join(dir, "svid.pem"), filepath.Join(dir, "key.pem"))
	if err != nil {
		s.t.Fatalf("SPIRE's minted SVID: %v", err)
	}
	return svid
}

func isMeshRefresh(e map[string]any) bool {
	if e["msg"] != "Bundle refreshed" {
		return false
	}
	for _, k := range []string{"trust_domain_id", "trust_domain"} {
		if v, ok := e[k].(string); ok && strings.TrimPrefix(v, "spiffe://") == meshTD {
			return true
		}
	}
	return false
}

// TestSpireAndMeshidFederateBothWaysAndFollowEachOthersRotations: a SPIRE server (trust domain
// spire.test, SQLite datastore, bundle endpoint https_spiffe, `federates_with "mesh.test"`
// pointing at meshid's endpoint) and meshid (mesh.test, a federation peer pointing at SPIRE's
// endpoint), each bootstrapped with the other's bundle (`spire-server bundle show -format
// spiffe` → `meshid bundle set`; `meshid bundle export` → `spire-server bundle set -format
// spiffe`). Then:
//   - an SVID minted by SPIRE (`spire-server x509 mint`) verifies (x509svid.Verify) against
//     the spiffe://spire.test bundle meshid serves over SDS (and inside ALL);
//   - a meshid SVID (SDS default) verifies against what `spire-server bundle list` holds for
//     mesh.test, and the two complete mTLS with go-spiffe's tlsconfig across trust domains;
//   - a root prepared in meshid reaches SPIRE's datastore at SPIRE's next refresh (SPIRE polls
//     at a quarter of the hint, pkg/server/bundle/client/manager.go), within meshid's hint;
//   - an X.509 authority prepared in SPIRE (`spire-server localauthority x509 prepare`) reaches
//     meshid's SDS, and once activated, SPIRE's new SVIDs verify against it.
func TestSpireAndMeshidFederateBothWaysAndFollowEachOthersRotations(t *testing.T) {
	ca := meshidproc.NewCA(t, meshTD)
	meshidBundleAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	spire := startSpire(t, meshidBundleAddr)

	// Bootstrap both ways (the https_spiffe profile needs a first bundle from a trusted channel).
	spireBundleFile := filepath.Join(t.TempDir(), "spire.json")
	writeFile(t, spireBundleFile, []byte(spire.cli("bundle", "show", "-format", "spiffe")))
	ca.Run("bundle", "set", spireTD, spireBundleFile, "--state-dir", ca.StateDir)
	meshBundleFile := filepath.Join(t.TempDir(), "mesh.json")
	writeFile(t, meshBundleFile, []byte(ca.Run("bundle", "export", "--state-dir", ca.StateDir, "--format", "spiffe")))
	spire.cli("bundle", "set", "-id", "spiffe://"+meshTD, "-format", "spiffe", "-path", meshBundleFile)

	srv := ca.Start(meshidproc.Config{TOML: fmt.Sprintf(`[federation]
refresh_hint = "1m"

[federation.bundle_endpoint]
listen = %q
profile = "https_spiffe"

[[federation.peers]]
trust_domain = %q
url = "https://127.0.0.1:%d/"
profile = "https_spiffe"
endpoint_spiffe_id = %q
`, meshidBundleAddr, spireTD, spire.bundlePort, spireEndpointID)})

	// SPIRE's updater for mesh.test found no local bundle at start-up and retries after
	// bundleutil.MinimumRefreshHint (1m); from then on it polls at a quarter of meshid's hint.
	// Its first successful fetch is awaited after the meshid-side checks below.

	sds := xdsclient.OpenSDS(t, xdsclient.Dial(t, srv, ca.Token("shop", "product")), "default", "spiffe://"+spireTD, "ALL")
	spireRoots := func() []*x509.Certificate {
		out := spire.cli("bundle", "show", "-format", "spiffe")
		b, err := spiffebundle.Parse(spiffeid.RequireTrustDomainFromString(spireTD), []byte(out))
		if err != nil {
			t.Fatalf("spire-server bundle show: %v", err)
		}
		return b.X509Authorities()
	}
	holdsSpire := func(want []*x509.Certificate) func(map[string]*tlsv3.Secret) bool {
		return func(s map[string]*tlsv3.Secret) bool {
			if s["default"] == nil || s["spiffe://"+spireTD] == nil || s["ALL"] == nil {
				return false
			}
			got, err := xdsclient.TrustedCA(s["spiffe://"+spireTD])
			if err != nil {
				t.Fatal(err)
			}
			all, err := xdsclient.SpiffeValidator(s["ALL"])
			if err != nil {
				t.Fatal(err)
			}
			return testca.SameCerts(got, want) && testca.SameCerts(all[spireTD], want)
		}
	}
	sds.WaitFor("SPIRE's bundle", holdsSpire(spireRoots()))

	// SPIRE's SVID against the bundle meshid serves.
	spireSVID := spire.mint("spiffe://spire.test/workload")
	meshidSpireBundle := func() *x509bundle.Bundle {
		roots, err := xdsclient.TrustedCA(sds.Snapshot()["spiffe://"+spireTD])
		if err != nil {
			t.Fatal(err)
		}
		return x509bundle.FromX509Authorities(spiffeid.RequireTrustDomainFromString(spireTD), roots)
	}
	if id, _, err := x509svid.Verify(spireSVID.Certificates, meshidSpireBundle()); err != nil || id.String() != "spiffe://spire.test/workload" {
		t.Fatalf("SPIRE's minted SVID against meshid's SDS spiffe://spire.test: %v (id %s)", err, id)
	}

	// meshid's SVID against what SPIRE holds for mesh.test.
	meshSVID := func() *x509svid.SVID {
		chain, key, err := xdsclient.TLSCertificate(sds.Snapshot()["default"])
		if err != nil {
			t.Fatal(err)
		}
		svid, err := x509svid.Parse(chain, key)
		if err != nil {
			t.Fatal(err)
		}
		return svid
	}
	mark := spire.waitLog("SPIRE's own fetch of mesh.test from meshid's endpoint", isMeshRefresh)
	if !testca.SameCerts(spire.meshBundleInSpire().X509Authorities(), ca.Roots()) {
		t.Fatal("SPIRE's bundle for mesh.test differs from meshid's roots")
	}
	if hint, ok := spire.meshBundleInSpire().RefreshHint(); !ok || hint != time.Minute {
		t.Fatalf("SPIRE stored mesh.test's bundle with refresh hint %v (%v), want meshid's published 1m: the bundle came from the endpoint, not the bootstrap", hint, ok)
	}
	if _, _, err := x509svid.Verify(meshSVID().Certificates, spire.meshBundleInSpire()); err != nil {
		t.Fatalf("meshid's SDS default against spire-server bundle list for mesh.test: %v", err)
	}
	crossDomainMTLS(t, spireSVID, x509bundle.NewSet(
		x509bundle.FromX509Authorities(spiffeid.RequireTrustDomainFromString(spireTD), spireRoots()),
		spire.meshBundleInSpire().X509Bundle(),
	), meshSVID(), x509bundle.NewSet(meshidSpireBundle()))

	// A root prepared in meshid reaches SPIRE at its next refresh (every 15 s now: SPIRE polls at
	// a quarter of the hint, manager.go calculateNextUpdate).
	start := time.Now()
	ca.Run("root", "prepare", "--state-dir", ca.StateDir, "--reason", "interop")
	meshRoots := ca.Roots()
	for !testca.SameCerts(spire.meshBundleInSpire().X509Authorities(), meshRoots) {
		mark = spire.waitLogAfter(mark, "a refresh of mesh.test carrying the prepared root", isMeshRefresh)
	}
	if took := time.Since(start); took > time.Minute {
		t.Fatalf("meshid's prepared root reached SPIRE after %v, beyond meshid's refresh hint (1m)", took)
	} else {
		t.Logf("meshid's prepared root reached SPIRE in %v", took.Round(time.Second))
	}

	// An X.509 authority prepared in SPIRE reaches meshid's SDS; once active, its SVIDs verify.
	start = time.Now()
	origSpireRoots := spireRoots()
	prepared := authorityID(t, spire.cli("localauthority", "x509", "prepare", "-output", "json"))
	newSpireRoots := spireRoots()
	if len(newSpireRoots) != 2 {
		t.Fatalf("SPIRE's bundle after localauthority x509 prepare holds %d roots, want 2", len(newSpireRoots))
	}
	sds.WaitFor("SPIRE's prepared authority", holdsSpire(newSpireRoots))
	// meshid polls SPIRE every minute (SPIRE's hint 1m / 4, clamped to meshid's 1m minimum).
	t.Logf("SPIRE's prepared authority reached meshid's SDS in %v", time.Since(start).Round(time.Second))
	spire.cli("localauthority", "x509", "activate", "-authorityID", prepared, "-output", "json")
	rotated := spire.mint("spiffe://spire.test/workload")
	if rotated.Certificates[0].CheckSignatureFrom(newAuthority(t, newSpireRoots, origSpireRoots)) != nil {
		t.Fatal("SPIRE's SVID after activate is not signed by the prepared authority")
	}
	if _, _, err := x509svid.Verify(rotated.Certificates, meshidSpireBundle()); err != nil {
		t.Fatalf("an SVID from SPIRE's activated authority against meshid's SDS: %v", err)
	}
}

// crossDomainMTLS: a SPIRE workload (server) and a meshid workload (client) complete mTLS with
// go-spiffe's tlsconfig, each trusting the other's trust domain through the federated bundle
// its own side holds, and each authorizing the other's exact ID.
func crossDomainMTLS(t *testing.T, spireSVID *x509svid.SVID, spireTrust *x509bundle.Set, meshSVID *x509svid.SVID, meshTrust *x509bundle.Set) {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", tlsconfig.MTLSServerConfig(spireSVID, spireTrust, tlsconfig.AuthorizeID(meshSVID.ID)))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer c.Close()
		buf := make([]byte, 4)
		_, err = io.ReadFull(c, buf)
		if err == nil {
			_, err = c.Write(buf)
		}
		done <- err
	}()
	c, err := tls.Dial("tcp", ln.Addr().String(), tlsconfig.MTLSClientConfig(meshSVID, meshTrust, tlsconfig.AuthorizeID(spireSVID.ID)))
	if err != nil {
		t.Fatalf("mTLS meshid workload → SPIRE workload: %v", err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatalf("mTLS meshid workload → SPIRE workload: %v", err)
	}
	if err := <-done; err != nil {
		t.Fatalf("SPIRE workload side: %v", err)
	}
}

// newAuthority is the one root of `after` that `before` does not hold.
func newAuthority(t *testing.T, after, before []*x509.Certificate) *x509.Certificate {
	t.Helper()
	var added []*x509.Certificate
	for _, a := range after {
		found := false
		for _, b := range before {
			found = found || bytes.Equal(a.Raw, b.Raw)
		}
		if !found {
			added = append(added, a)
		}
	}
	if len(added) != 1 {
		t.Fatalf("%d roots added to SPIRE's bundle, want 1", len(added))
	}
	return added[0]
}

func authorityID(t *testing.T, out string) string {
	t.Helper()
	var doc map[string]map[string]any
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("localauthority x509 prepare -output json: %v\n%s", err, out)
	}
	for _, k := range []string{"prepared_authority", "preparedAuthority"} {
		for _, f := range []string{"authority_id", "authorityId"} {
			if id, ok := doc[k][f].(string); ok && id != "" {
				return id
			}
		}
	}
	t.Fatalf("no prepared authority id in %s", out)
	return ""
}

func writeFile(t *testing.T, p string, b []byte) {
	t.Helper()
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
}
