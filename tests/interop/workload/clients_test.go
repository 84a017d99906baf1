package workload

import (
	"crypto/x509"
	"os"
	"os/exec"
	"testing"
)

// runClient runs a Workload API client of another language (`what`, for messages) with
// SPIFFE_ENDPOINT_SOCKET pointing at the agent's socket, and returns what it printed.
func runClient(t *testing.T, what string, a *agent, name string, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), "SPIFFE_ENDPOINT_SOCKET="+a.addr())
	out, err := cmd.Output()
	if err != nil {
		var stderr string
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = string(ee.Stderr)
		}
		t.Fatalf("%s: %v\n%s", what, err, stderr)
	}
	return out
}

// verifiesToBundle: the client's chain (leaf first) verifies to the bundle it got, which holds
// `wantRoots` roots.
func verifiesToBundle(t *testing.T, what string, chain, bundle []*x509.Certificate, wantRoots int) {
	t.Helper()
	if len(bundle) != wantRoots {
		t.Fatalf("%s's bundle holds %d roots, want %d", what, len(bundle), wantRoots)
	}
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	for _, c := range bundle {
		roots.AddCert(c)
	}
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Fatalf("%s's SVID does not verify to its bundle: %v", what, err)
	}
}
