package istio

import (
	"bytes"
	"crypto/rsa"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"meshid.dev/interop/internal/meshidproc"
	"meshid.dev/interop/internal/testca"
	"meshid.dev/interop/internal/xdsclient"
)

// IstioVersion is the istio.io/istio module version pilot-agent is built from.
const IstioVersion = "v0.0.0-20260827124520-eed52ebb66ad"

// agentBin is $PILOT_AGENT_BIN or <repo>/target/interop/pilot-agent-<IstioVersion>/pilot-agent.
func agentBin(t *testing.T) string {
	bin := os.Getenv("PILOT_AGENT_BIN")
	if bin == "" {
		bin = filepath.Join(meshidproc.RepoRoot(), "target", "interop", "pilot-agent-"+IstioVersion, "pilot-agent")
	}
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("pilot-agent %s: %v (tools/interop.sh builds it from tests/interop/peers/pilot-agent; or set PILOT_AGENT_BIN)", bin, err)
	}
	return bin
}

// envoyStandIn is what pilot-agent starts in Envoy's place: it keeps the agent's proxy
// lifecycle running and does nothing else. No Envoy binary exists on these machines; the
// agent's SDS server, CA client and secret cache, which this test is about, run for real.
const envoyStandIn = "#!/bin/sh\n# Stands in for Envoy: pilot-agent runs it with the bootstrap it wrote; it only waits.\nexec sleep 3600\n"

// syncBuffer is an io.Writer safe for the agent's two output streams; each write wakes the
// waiters (the agent's log is the signal awaited).
type syncBuffer struct {
	mu      sync.Mutex
	b       bytes.Buffer
	changed chan struct{}
}

func newSyncBuffer() *syncBuffer { return &syncBuffer{changed: make(chan struct{})} }

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	close(s.changed)
	s.changed = make(chan struct{})
	return s.b.Write(p)
}

// contains says whether the output holds sub, and returns the channel of the next write.
func (s *syncBuffer) contains(sub string) (bool, <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.Contains(s.b.String(), sub), s.changed
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestPilotAgentGetsItsWorkloadCertificateFromMeshid: Istio's own agent (pilot-agent proxy
// sidecar, istio.io/istio pkg/istio-agent) runs with CA_ADDR pointing at meshid and
// CA_PROVIDER at its default (Citadel: the Istio CSR API), its projected token in
// ./var/run/secrets/tokens/istio-token and meshid's root as the istio-ca-root-cert mount
// (./var/run/secrets/istio/root-cert.pem). A client on the agent's SDS socket
// (./var/run/secrets/workload-spiffe-uds/socket, where Envoy would connect) asks for
// `default` and `ROOTCA` with Envoy's protos and gets a certificate that meshid signed for
// the agent's own key (RSA-2048, the agent's default), chained leaf-first to meshid's root,
// and meshid's roots as ROOTCA.
//
// CA_ADDR is localhost:<port>: pilot-agent's TLS then expects the name istiod.istio-system.svc
// (pilot/pkg/grpc/tls.go getTLSDialOption maps "localhost" to it), so meshid serves that DNS
// name too, as it would under Istio's default CA_ADDR.
func TestPilotAgentGetsItsWorkloadCertificateFromMeshid(t *testing.T) {
	t.Parallel()
	bin := agentBin(t)
	ca := meshidproc.NewCA(t, "cluster.local")
	srv := ca.Start(meshidproc.Config{Args: []string{"--dns-name", "istiod.istio-system.svc", "--dns-name", "localhost"}})
	_, port, _ := strings.Cut(srv.GRPCAddr, ":")

	// The pod's file system, relative to the agent's working directory (Istio's paths start
	// "./"). A short directory: the SDS socket's path must fit sockaddr_un (108 bytes).
	root, err := os.MkdirTemp("", "agent")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	mk := func(rel string, content []byte, mode os.FileMode) {
		p := filepath.Join(root, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, content, mode); err != nil {
			t.Fatal(err)
		}
	}
	token := strings.TrimSpace(ca.Run("dev", "token", "--issuer-dir", ca.IssuerDir, "--namespace", "shop", "--service-account", "product",
		"--pod-name", "product-7d4b9-x2x7q", "--pod-uid", "6f1c2a30-0000-4000-8000-000000000001"))
	mk("var/run/secrets/tokens/istio-token", []byte(token), 0o600)
	mk("var/run/secrets/istio/root-cert.pem", ca.RootsPEM(), 0o644)
	mk("usr/local/bin/envoy", []byte(envoyStandIn), 0o755)
	// Istio's bootstrap template, where the proxy image has it (tools/interop.sh puts the
	// module's tools/packaging/common/envoy_bootstrap.json next to the binary).
	tmpl, err := os.ReadFile(filepath.Join(filepath.Dir(bin), "envoy_bootstrap_tmpl.json"))
	if err != nil {
		t.Fatalf("Istio's Envoy bootstrap template: %v (tools/interop.sh copies it next to pilot-agent)", err)
	}
	mk("var/lib/istio/envoy/envoy_bootstrap_tmpl.json", tmpl, 0o644)
	if err := os.MkdirAll(filepath.Join(root, "var/run/secrets/workload-spiffe-uds"), 0o755); err != nil {
		t.Fatal(err)
	}

	// pilot-agent's status server listens on the wildcard address (status/server.go: ":<port>",
	// and ProxyConfig validation refuses statusPort 0), so the agent runs in a network namespace
	// of its own with only loopback; meshid's port is forwarded into it (forwardIntoNetns).
	if os.Geteuid() != 0 {
		t.Fatalf("pilot-agent runs in its own network namespace (unshare --net), which needs root; running as uid %d", os.Geteuid())
	}
	proxyConfig := fmt.Sprintf(`{"binaryPath": %q, "discoveryAddress": %q, "configPath": "./etc/istio/proxy"}`,
		filepath.Join(root, "usr/local/bin/envoy"), srv.GRPCAddr)
	cmd := exec.Command("unshare", "--net", "--", "sh", "-c", `ip link set lo up && exec "$0" "$@"`, bin, "proxy", "sidecar")
	cmd.Dir = root
	cmd.Env = append(os.Environ(),
		"CA_ADDR=localhost:"+port,
		"PROXY_CONFIG="+proxyConfig,
		"POD_NAME=product-7d4b9-x2x7q", "POD_NAMESPACE=shop", "SERVICE_ACCOUNT=product",
		"INSTANCE_IP=127.0.0.1", "ISTIO_META_CLUSTER_ID=Kubernetes", "TRUST_DOMAIN=cluster.local",
	)
	out := newSyncBuffer()
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting pilot-agent: %v", err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-exited
		}
		if t.Failed() {
			t.Logf("pilot-agent output:\n%s", out.String())
		}
	})

	// The agent creates its SDS socket when its SDS server starts; its log says so. It signs
	// nothing before a client asks for `default` (below), after the forwarder is up.
	socket := filepath.Join(root, "var/run/secrets/workload-spiffe-uds/socket")
	waitOutput(t, out, exited, "Starting SDS grpc server")
	forwardIntoNetns(t, cmd.Process.Pid, srv.GRPCAddr)

	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	sds := xdsclient.OpenSDS(t, conn, "default", "ROOTCA")
	sds.WaitFor("default and ROOTCA from the agent", func(s map[string]*tlsv3.Secret) bool {
		return s["default"] != nil && s["ROOTCA"] != nil
	})
	secrets := sds.Snapshot()
	chainPEM, _, err := xdsclient.TLSCertificate(secrets["default"])
	if err != nil {
		t.Fatal(err)
	}
	chain, err := meshidproc.ParsePEMCerts(chainPEM)
	if err != nil {
		t.Fatal(err)
	}
	leaf := chain[0]
	const id = "spiffe://cluster.local/ns/shop/sa/product"
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != id {
		t.Fatalf("the agent's certificate names %v, want %s", leaf.URIs, id)
	}
	if k, ok := leaf.PublicKey.(*rsa.PublicKey); !ok || k.N.BitLen() != 2048 {
		t.Fatalf("leaf key %T: want the agent's own RSA-2048 key (the CSR path, not a server-made key)", leaf.PublicKey)
	}
	roots := ca.Roots()
	pool, inter := x509.NewCertPool(), x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Fatalf("the agent's certificate does not verify against meshid's root: %v", err)
	}
	got, err := xdsclient.TrustedCA(secrets["ROOTCA"])
	if err != nil || !testca.SameCerts(got, roots) {
		t.Fatalf("the agent's ROOTCA (%d certs, %v) is not meshid's roots", len(got), err)
	}
	// meshid counted the agent's CSR.
	if n, ok := srv.Metric(`meshid_certs_issued_total{api="csr"}`); !ok || n < 1 {
		t.Fatalf("meshid_certs_issued_total{api=\"csr\"} = %v (present %v); the agent's certificate must come from the CSR API", n, ok)
	}
}

// waitOutput waits for the agent's output to contain sub.
func waitOutput(t *testing.T, out *syncBuffer, exited <-chan struct{}, sub string) {
	t.Helper()
	deadline := time.After(xdsclient.Wait)
	for {
		found, next := out.contains(sub)
		if found {
			return
		}
		select {
		case <-next:
		case <-exited:
			t.Fatalf("pilot-agent exited before %q:\n%s", sub, out.String())
		case <-deadline:
			t.Fatalf("pilot-agent did not log %q within %v:\n%s", sub, xdsclient.Wait, out.String())
		}
	}
}

// forwardIntoNetns listens on addr (127.0.0.1:<meshid's port>) inside the network namespace of
// process pid and forwards each connection to the same address in the test's namespace, where
// meshid listens: the agent reaches its CA at the address it would use on the host.
func forwardIntoNetns(t *testing.T, pid int, addr string) {
	t.Helper()
	type result struct {
		ln  net.Listener
		err error
	}
	ready := make(chan result, 1)
	go func() {
		// This goroutine's thread enters the agent's namespace and is never unlocked: the thread
		// ends with the goroutine, and the Go runtime starts other threads from a clean template.
		runtime.LockOSThread()
		f, err := os.Open(fmt.Sprintf("/proc/%d/ns/net", pid))
		if err != nil {
			ready <- result{nil, err}
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			ready <- result{nil, fmt.Errorf("setns: %w", err)}
			return
		}
		ln, err := net.Listen("tcp", addr)
		ready <- result{ln, err}
		if err != nil {
			return
		}
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go pipe(c, addr)
		}
	}()
	r := <-ready
	if r.err != nil {
		t.Fatalf("forwarding %s into pilot-agent's network namespace: %v", addr, r.err)
	}
	t.Cleanup(func() { r.ln.Close() })
}

// pipe connects an accepted connection to addr (dialled from a thread of the test's namespace).
func pipe(in net.Conn, addr string) {
	defer in.Close()
	out, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return
	}
	defer out.Close()
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(out, in); done <- struct{}{} }()
	go func() { _, _ = io.Copy(in, out); done <- struct{}{} }()
	<-done
}
