// Package prometheus checks deploy/prometheus and deploy/grafana with Prometheus's own code, as
// `promtool check rules` does: rulefmt.ParseFile (the rule file format, every expression and
// template) and the PromQL parser for each dashboard query. It also pins that every series
// selector names a `meshid_` metric, which is what tests/it/observability.rs then finds on a
// live /metrics.
package prometheus

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/promql/parser"
	"gopkg.in/yaml.v3"

	"meshid.dev/interop/internal/meshidproc"
)

var promql = parser.NewParser(parser.Options{})

func deployFile(name string) string {
	return filepath.Join(meshidproc.RepoRoot(), "deploy", name)
}

// selectors returns the metric names an expression selects, failing on a selector without one.
func selectors(t *testing.T, where, expr string) []string {
	t.Helper()
	e, err := promql.ParseExpr(expr)
	if err != nil {
		t.Fatalf("%s: %q does not parse: %v", where, expr, err)
	}
	var names []string
	parser.Inspect(e, func(n parser.Node, _ []parser.Node) error {
		if vs, ok := n.(*parser.VectorSelector); ok {
			if !strings.HasPrefix(vs.Name, "meshid_") {
				t.Errorf("%s: selector %q names no meshid_ metric", where, vs.String())
			}
			names = append(names, vs.Name)
		}
		return nil
	})
	if len(names) == 0 {
		t.Errorf("%s: %q selects no metric", where, expr)
	}
	return names
}

// TestRulesParseAsPromtoolChecksThem: rulefmt.ParseFile, promtool's own check.
func TestRulesParseAsPromtoolChecksThem(t *testing.T) {
	path := deployFile("prometheus/meshid-rules.yaml")
	groups, errs := rulefmt.ParseFile(path, false, model.UTF8Validation, promql)
	if len(errs) > 0 {
		t.Fatalf("%s: %v", path, errs)
	}
	alerts := map[string]bool{}
	for _, g := range groups.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" {
				t.Errorf("rule %q is not an alert", r.Record)
				continue
			}
			alerts[r.Alert] = true
			selectors(t, r.Alert, r.Expr)
			if r.Labels["severity"] == "" || r.Annotations["summary"] == "" || r.Annotations["description"] == "" {
				t.Errorf("%s: needs a severity label, a summary and a description", r.Alert)
			}
			if r.For == 0 {
				t.Errorf("%s: no `for:` (a single bad scrape would page)", r.Alert)
			}
		}
	}
	// What the issue asks the alerts to cover.
	for _, want := range []string{"MeshidRootExpiringWithoutSuccessor", "MeshidIssuanceErrors", "MeshidAuthenticationFailureSpike", "MeshidXdsNacks", "MeshidFederatedBundleStale", "MeshidMtlsCoverageDrop"} {
		if !alerts[want] {
			t.Errorf("alert %s missing", want)
		}
	}
}

// TestThePrometheusRuleHoldsTheSameGroups: the PrometheusRule's spec.groups are the plain
// file's groups, so the two cannot drift.
func TestThePrometheusRuleHoldsTheSameGroups(t *testing.T) {
	read := func(name string) []byte {
		b, err := os.ReadFile(deployFile(name))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	var plain rulefmt.RuleGroups
	if err := yaml.Unmarshal(read("prometheus/meshid-rules.yaml"), &plain); err != nil {
		t.Fatal(err)
	}
	var pr struct {
		APIVersion string `yaml:"apiVersion"`
		Kind       string `yaml:"kind"`
		Spec       rulefmt.RuleGroups
	}
	if err := yaml.Unmarshal(read("prometheus/prometheusrule.yaml"), &pr); err != nil {
		t.Fatal(err)
	}
	if pr.APIVersion != "monitoring.coreos.com/v1" || pr.Kind != "PrometheusRule" {
		t.Fatalf("prometheusrule.yaml is %s %s", pr.APIVersion, pr.Kind)
	}
	if !reflect.DeepEqual(plain.Groups, pr.Spec.Groups) {
		t.Fatal("prometheusrule.yaml's groups differ from meshid-rules.yaml's")
	}
	out, err := yaml.Marshal(pr.Spec)
	if err != nil {
		t.Fatal(err)
	}
	if _, errs := rulefmt.Parse(out, false, model.UTF8Validation, promql); len(errs) > 0 {
		t.Fatalf("the PrometheusRule's groups: %v", errs)
	}
}

// TestEveryDashboardQueryParses: each target of deploy/grafana/meshid.json, with Grafana's
// $__rate_interval as Grafana would expand it.
func TestEveryDashboardQueryParses(t *testing.T) {
	b, err := os.ReadFile(deployFile("grafana/meshid.json"))
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Panels []struct {
			Title   string `json:"title"`
			Type    string `json:"type"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, p := range d.Panels {
		for _, tg := range p.Targets {
			selectors(t, p.Title, strings.ReplaceAll(tg.Expr, "$__rate_interval", "1m"))
			n++
		}
	}
	if n < 20 {
		t.Fatalf("only %d queries in the dashboard", n)
	}
}
