package workload

import (
	"crypto/x509"
	"encoding/json"
	"os"
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
	out := runClient(t, "the spiffe crate", a, bin)
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
	parse := func(ders [][]byte) []*x509.Certificate {
		var out []*x509.Certificate
		for _, d := range ders {
			c, err := x509.ParseCertificate(d)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, c)
		}
		return out
	}
	verifiesToBundle(t, "the spiffe crate", parse(got.ChainDER), parse(got.BundleDER), len(ca.Roots()))
}
