package automtls

import (
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// cases is how many generated snapshots the test compares: $AUTOMTLS_CASES, default 300 (CI);
// tools/automtls-diff.sh runs thousands.
func cases(t *testing.T) (uint64, int) {
	n := 300
	if v := os.Getenv("AUTOMTLS_CASES"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 1 {
			t.Fatalf("AUTOMTLS_CASES=%q is not a positive number", v)
		}
	}
	first := uint64(1)
	if v := os.Getenv("AUTOMTLS_FIRST_SEED"); v != "" {
		s, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("AUTOMTLS_FIRST_SEED=%q is not a number", v)
		}
		first = s
	}
	return first, n
}

// TestGeneratedSnapshotsAgreeWithIstiod: for every generated snapshot, every client and every
// Service/ServiceEntry, meshid's Istio prediction (`describe --mesh istio`) and its EDS
// metadata equal what istiod's own code gives that client's sidecar, endpoint by endpoint.
func TestGeneratedSnapshotsAgreeWithIstiod(t *testing.T) {
	t.Logf("oracle: %s %s", IstioModule, IstioVersion())
	if strings.HasPrefix(IstioVersion(), "unknown") {
		t.Fatalf("the oracle's Istio version is %s", IstioVersion())
	}
	bin, err := MeshidBin()
	if err != nil {
		t.Fatal(err)
	}
	first, n := cases(t)
	start := time.Now()
	var total Counts
	failures := 0
	for seed := first; seed < first+uint64(n); seed++ {
		g := Generate(seed)
		ds, c, err := Compare(t, bin, g)
		if err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		total.Add(c)
		if len(ds) == 0 {
			continue
		}
		failures++
		for _, d := range ds {
			t.Errorf("seed %d: %s", seed, d)
		}
		if failures <= 3 {
			m := Minimize(t, bin, g)
			t.Errorf("seed %d minimised (%d of %d objects):\n%s", seed, len(m.Objects), len(g.Objects), m.JSON())
		}
		if failures >= 10 {
			t.Fatalf("stopping after %d failing snapshots", failures)
		}
	}
	t.Logf("compared %d snapshots, %d client views, %d clusters, %d endpoints in %s",
		total.Snapshots, total.Clients, total.Clusters, total.Endpoints, time.Since(start).Round(time.Millisecond))
}

// TestMissionExampleAgreesWithIstiod: the mission's example, every pod as a client.
func TestMissionExampleAgreesWithIstiod(t *testing.T) {
	bin, err := MeshidBin()
	if err != nil {
		t.Fatal(err)
	}
	g, err := FromFile("../../../deploy/examples/mixed-traffic.yaml")
	if err != nil {
		t.Fatal(err)
	}
	ds, c, err := Compare(t, bin, g)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range ds {
		t.Error(d)
	}
	if c.Endpoints == 0 {
		t.Fatalf("compared no endpoint: %+v", c)
	}
	t.Logf("mission example: %d client views, %d clusters, %d endpoints", c.Clients, c.Clusters, c.Endpoints)
}
