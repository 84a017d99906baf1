package workload

import (
	"crypto/x509"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"meshid.dev/interop/internal/meshidproc"
)

// TestSpiffeCrateX509SourceGetsTheAgentsSVIDAndBundle: the `spiffe` crate's X509Source
// (tests/interop/rust-spiffe, built by tools/interop.sh), found through SPIFFE_ENDPOINT_SOCKET,
// gets the token's identity and a chain that verifies to the bundle it gets, which holds the
// CA's roots.
func TestSpiffeCrateX509SourceGetsTheAgentsSVIDAndBundle(t *testing.T) {
	bin := os.Getenv("MESHID_RUST_SPIFFE_BIN")
	if bin == "" {
		bin = filepath.Join(meshidproc.RepoRoot(), "target", "interop", "rust-spiffe", "release", "fetch-svid")
	}
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("the spiffe crate's driver %s: %v (tools/interop.sh builds tests/interop/rust-spiffe; or set MESHID_RUST_SPIFFE_BIN)", bin, err)
	}
	ca := meshidproc.NewCA(t, "mesh.test")
	srv := ca.Start(meshidproc.Config{})
	a := startAgent(t, ca, srv, "shop", "product", "")
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), "SPIFFE_ENDPOINT_SOCKET="+a.addr())
	out, err := cmd.Output()
	if err != nil {
		var stderr string
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = string(ee.Stderr)
		}
		t.Fatalf("the spiffe crate: %v\n%s", err, stderr)
	}
	var got struct {
		SpiffeID  string   `json:"spiffe_id"`
		ChainDER  [][]byte `json:"chain_der"`
		BundleDER [][]byte `json:"bundle_der"`
	}
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("the spiffe crate's output: %v\n%s", err, out)
	}
	if got.SpiffeID != a.id.String() || len(got.ChainDER) == 0 {
		t.Fatalf("the spiffe crate got %s with %d certificates", got.SpiffeID, len(got.ChainDER))
	}
	if len(got.BundleDER) != len(ca.Roots()) {
		t.Fatalf("its bundle holds %d roots, want %d", len(got.BundleDER), len(ca.Roots()))
	}
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	for _, d := range got.BundleDER {
		c, err := x509.ParseCertificate(d)
		if err != nil {
			t.Fatal(err)
		}
		roots.AddCert(c)
	}
	var chain []*x509.Certificate
	for _, d := range got.ChainDER {
		c, err := x509.ParseCertificate(d)
		if err != nil {
			t.Fatal(err)
		}
		chain = append(chain, c)
	}
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Fatalf("the spiffe crate's SVID does not verify to its bundle: %v", err)
	}
}
