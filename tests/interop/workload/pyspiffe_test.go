// py-spiffe (the `spiffe` package on PyPI) against meshid agent's Workload API, unchanged. It
// uses grpc's C core, which sends the percent-encoded socket path as `:authority` on a Unix
// socket (grpc/grpc#33571); hyperium/h2 under tonic refused that (hyperium/h2#442) until
// meshid's Unix listeners learned to rewrite it (src/h2_authority.rs): this test is what found it.
// tools/interop.sh installs py-spiffe into target/interop/pyspiffe.

package workload

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"meshid.dev/interop/internal/meshidproc"
)

// TestPySpiffeFetchesTheAgentsSVIDAndBundle: py-spiffe's WorkloadApiClient (the `spiffe`
// package on PyPI, installed by tools/interop.sh into target/interop/pyspiffe), found through
// SPIFFE_ENDPOINT_SOCKET, gets the token's identity, a chain that verifies to the bundle it
// gets, and the CA's roots.
func TestPySpiffeFetchesTheAgentsSVIDAndBundle(t *testing.T) {
	python := os.Getenv("MESHID_PYSPIFFE_PYTHON")
	if python == "" {
		python = filepath.Join(meshidproc.RepoRoot(), "target", "interop", "pyspiffe", "bin", "python")
	}
	if _, err := os.Stat(python); err != nil {
		t.Fatalf("py-spiffe's Python %s: %v (tools/interop.sh installs it; or set MESHID_PYSPIFFE_PYTHON)", python, err)
	}
	ca := meshidproc.NewCA(t, "mesh.test")
	srv := ca.Start(meshidproc.Config{})
	a := startAgent(t, ca, srv, "shop", "product", "")
	out := runClient(t, "py-spiffe", a, python, filepath.Join("py", "fetch_svid.py"))
	var got struct {
		SpiffeID      string   `json:"spiffe_id"`
		ChainPEM      []string `json:"chain_pem"`
		BundlePEM     []string `json:"bundle_pem"`
		HasPrivateKey bool     `json:"has_private_key"`
	}
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("py-spiffe's output: %v\n%s", err, out)
	}
	if got.SpiffeID != a.id.String() || !got.HasPrivateKey || len(got.ChainPEM) == 0 {
		t.Fatalf("py-spiffe got %+v", got)
	}
	chain, err := meshidproc.ParsePEMCerts([]byte(strings.Join(got.ChainPEM, "")))
	if err != nil {
		t.Fatal(err)
	}
	bundle, err := meshidproc.ParsePEMCerts([]byte(strings.Join(got.BundlePEM, "")))
	if err != nil {
		t.Fatal(err)
	}
	verifiesToBundle(t, "py-spiffe", chain, bundle, len(ca.Roots()))
}
