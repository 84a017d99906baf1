package automtls

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"

	"istio.io/istio/pkg/test"
)

// MeshidBin is the meshid binary the comparison runs: $MESHID_BIN, else
// target/release/meshid of the repository.
func MeshidBin() (string, error) {
	if b := os.Getenv("MESHID_BIN"); b != "" {
		return b, nil
	}
	wd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for dir := wd; dir != "/"; dir = filepath.Dir(dir) {
		if _, err := os.Stat(filepath.Join(dir, "Cargo.toml")); err == nil {
			b := filepath.Join(dir, "target", "release", "meshid")
			if _, err := os.Stat(b); err != nil {
				return "", fmt.Errorf("no meshid binary at %s (cargo build --release, or set MESHID_BIN): %w", b, err)
			}
			return b, nil
		}
	}
	return "", fmt.Errorf("no Cargo.toml above %s; set MESHID_BIN", wd)
}

// meshidReport is the part of `meshid describe service --output json` compared.
type meshidReport struct {
	Clusters []struct {
		Name      string   `json:"name"`
		Endpoints []string `json:"endpoints"`
	} `json:"clusters"`
	Endpoints []struct {
		Address     string `json:"address"`
		Port        uint32 `json:"port"`
		ServicePort uint32 `json:"service_port"`
		EDSTLSMode  string `json:"eds_tls_mode"`
		Istio       struct {
			Decision string `json:"decision"`
			Why      string `json:"why"`
		} `json:"istio"`
	} `json:"endpoints"`
	FQDN     string   `json:"fqdn"`
	Warnings []string `json:"warnings"`
}

// Meshid asks meshid about target for client.
func Meshid(bin, snapshot, target string, c Client) (*meshidReport, error) {
	cmd := exec.Command(bin, "describe", "service", target, "--snapshot", snapshot, "--from", c.Pod, "--mesh", "istio", "--output", "json")
	out, err := cmd.Output()
	if err != nil {
		stderr := ""
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = string(ee.Stderr)
		}
		return nil, fmt.Errorf("meshid describe service %s --from %s: %v: %s", target, c.Pod, err, stderr)
	}
	var r meshidReport
	if err := json.Unmarshal(out, &r); err != nil {
		return nil, fmt.Errorf("meshid describe output: %w", err)
	}
	return &r, nil
}

// Disagreement is one difference between meshid and the oracle.
type Disagreement struct {
	Client, Target, Cluster, Endpoint string
	What, Meshid, Istio               string
}

func (d Disagreement) String() string {
	return fmt.Sprintf("client %s, %s, cluster %s, endpoint %s: %s: meshid %q, istiod %q",
		d.Client, d.Target, d.Cluster, d.Endpoint, d.What, d.Meshid, d.Istio)
}

// Counts is what one comparison covered.
type Counts struct {
	Snapshots, Clients, Clusters, Endpoints int
}

func (c *Counts) Add(o Counts) {
	c.Snapshots += o.Snapshots
	c.Clients += o.Clients
	c.Clusters += o.Clusters
	c.Endpoints += o.Endpoints
}

func decisionName(meshid string) string {
	if meshid == "mutual-user" {
		return "mutual"
	}
	return meshid
}

// Compare runs the oracle and meshid on snapshot g and lists every difference.
func Compare(t test.Failer, bin string, g *Generated) ([]Disagreement, Counts, error) {
	dir := t.TempDir()
	path := filepath.Join(dir, fmt.Sprintf("snapshot-%d.json", g.Seed))
	if err := os.WriteFile(path, g.JSON(), 0o600); err != nil {
		return nil, Counts{}, err
	}
	snap, err := ParseSnapshot(g.JSON())
	if err != nil {
		return nil, Counts{}, err
	}
	o := NewOracle(t, snap, true)
	var out []Disagreement
	counts := Counts{Snapshots: 1}
	for _, c := range g.Clients {
		counts.Clients++
		eps, names, err := o.Outcomes(c)
		if err != nil {
			return nil, counts, err
		}
		byCluster := map[string][]Endpoint{}
		for _, e := range eps {
			byCluster[e.Cluster] = append(byCluster[e.Cluster], e)
		}
		for _, target := range g.Targets {
			r, err := Meshid(bin, path, target, c)
			if err != nil {
				return nil, counts, err
			}
			out = append(out, compareTarget(c, target, r, names, byCluster, &counts)...)
		}
	}
	return out, counts, nil
}

func compareTarget(c Client, target string, r *meshidReport, names map[string]bool, byCluster map[string][]Endpoint, counts *Counts) []Disagreement {
	var out []Disagreement
	d := func(cluster, ep, what, m, i string) {
		out = append(out, Disagreement{c.Pod, target, cluster, ep, what, m, i})
	}
	hidden := false
	for _, w := range r.Warnings {
		if strings.Contains(w, "not exported to namespace") {
			hidden = true
		}
	}
	meshidClusters := map[string][]string{}
	for _, cl := range r.Clusters {
		meshidClusters[cl.Name] = cl.Endpoints
	}
	suffix := "|" + r.FQDN
	for name := range names {
		if strings.HasSuffix(name, suffix) {
			if _, ok := meshidClusters[name]; !ok {
				d(name, "", "cluster", "absent", "present")
			}
		}
	}
	for name, addrs := range meshidClusters {
		oracle := byCluster[name]
		if !names[name] {
			if !hidden {
				d(name, "", "cluster", "present", "absent")
			}
			continue
		}
		counts.Clusters++
		want := map[string]bool{}
		for _, e := range oracle {
			want[e.Address] = true
		}
		got := map[string]bool{}
		for _, a := range addrs {
			got[a] = true
		}
		if fmt.Sprint(keys(want)) != fmt.Sprint(keys(got)) {
			d(name, "", "endpoint addresses", fmt.Sprint(keys(got)), fmt.Sprint(keys(want)))
		}
	}
	for _, e := range r.Endpoints {
		counts.Endpoints++
		cluster := fmt.Sprintf("outbound|%d||%s", e.ServicePort, r.FQDN)
		var match *Endpoint
		for i, oe := range byCluster[cluster] {
			if oe.Address == e.Address && oe.Port == e.Port {
				match = &byCluster[cluster][i]
			}
		}
		ep := fmt.Sprintf("%s:%d", e.Address, e.Port)
		if match == nil {
			if !hidden {
				d(cluster, ep, "endpoint", "present", "absent")
			}
			continue
		}
		if decisionName(e.Istio.Decision) != match.Outcome {
			d(cluster, ep, "decision", e.Istio.Decision+" ("+e.Istio.Why+")",
				fmt.Sprintf("%s (%s; cluster %s, eds %q, proxy %v, inbound %s, sans %v)", match.Outcome, match.Why, match.ClusterTLS, match.EDSTLSMode, match.Proxy, match.Inbound, match.SANs))
		}
		meshidEDS := ""
		if e.EDSTLSMode == "istio" {
			meshidEDS = "istio"
		}
		if meshidEDS != match.EDSTLSMode {
			d(cluster, ep, "EDS tlsMode", meshidEDS, match.EDSTLSMode)
		}
	}
	return out
}

func keys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// Minimize drops objects from g one at a time while meshid and the oracle still disagree,
// and returns the smallest snapshot found (what a failing test prints).
func Minimize(t test.Failer, bin string, g *Generated) *Generated {
	cur := g
	for changed := true; changed; {
		changed = false
		for i := 0; i < len(cur.Objects); i++ {
			kind, _ := cur.Objects[i]["kind"].(string)
			if kind == "Namespace" {
				continue
			}
			next := *cur
			next.Objects = append(append([]Obj{}, cur.Objects[:i]...), cur.Objects[i+1:]...)
			var ds []Disagreement
			err := test.Wrap(func(t test.Failer) {
				var err error
				ds, _, err = Compare(t, bin, &next)
				if err != nil {
					t.Fatal(err)
				}
			})
			if err == nil && len(ds) > 0 {
				cur = &next
				changed = true
				i--
			}
		}
	}
	return cur
}
