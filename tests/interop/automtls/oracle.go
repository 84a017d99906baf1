// Package automtls is the differential test of meshid's auto mTLS against istiod's own code:
// the oracle (this file) builds istiod's discovery state from a snapshot with Istio's in-process
// fake discovery server and reads what a sidecar would be sent; the generator makes seeded
// snapshots; the test compares meshid's `describe --mesh istio` with the oracle per endpoint
// and client namespace.
package automtls

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"reflect"
	"runtime"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kruntime "k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"

	"istio.io/istio/pilot/pkg/config/kube/crd"
	"istio.io/istio/pilot/pkg/model"
	"istio.io/istio/pilot/pkg/security/authn"
	"istio.io/istio/pilot/pkg/xds/endpoints"
	"istio.io/istio/pilot/test/xds"
	"istio.io/istio/pkg/config"
	"istio.io/istio/pkg/config/host"
	"istio.io/istio/pkg/config/mesh"
	"istio.io/istio/pkg/config/schema/collections"
	"istio.io/istio/pkg/config/schema/resource"
	istiolog "istio.io/istio/pkg/log"
	"istio.io/istio/pkg/test"
	"istio.io/istio/pkg/test/util/retry"
)

var quiet sync.Once

// IstioModule is the module the oracle is built from.
const IstioModule = "istio.io/istio"

// IstioVersion is the version of istio.io/istio linked into this binary (from its build info).
func IstioVersion() string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown (no build info)"
	}
	for _, d := range info.Deps {
		if d.Path == IstioModule {
			if d.Replace != nil {
				return d.Version + " => " + d.Replace.Path + " " + d.Replace.Version
			}
			return d.Version
		}
	}
	// Test binaries carry no dependency list: the source file of the linked fake discovery
	// server names the module version it was compiled from.
	file, _ := runtime.FuncForPC(reflect.ValueOf(xds.NewFakeDiscoveryServer).Pointer()).FileLine(0)
	if _, rest, ok := strings.Cut(file, IstioModule+"@"); ok {
		if v, _, ok := strings.Cut(rest, "/"); ok {
			return v
		}
	}
	return "unknown (istio.io/istio not in the build info, and " + file + " names no version)"
}

// Client is the workload a decision is made for.
type Client struct {
	// Pod is `name.namespace`, as meshid's `--from` takes it.
	Pod       string
	Namespace string
	Labels    map[string]string
	IP        string
	Sidecar   bool
}

// Endpoint is one endpoint of one outbound cluster as istiod would configure the client's
// sidecar, reduced to what the connection does.
type Endpoint struct {
	Cluster string `json:"cluster"`
	Address string `json:"address"`
	Port    uint32 `json:"port"`
	// EDSTLSMode is the endpoint's envoy.transport_socket_match tlsMode metadata ("istio" or "").
	EDSTLSMode string `json:"eds_tls_mode"`
	// ClusterTLS: "auto" (socket matches), "istio-mutual", "simple", "mutual" or "plain".
	ClusterTLS string   `json:"cluster_tls"`
	SANs       []string `json:"sans,omitempty"`
	// Proxy: the endpoint's workload runs a sidecar (pods: the istio-proxy container; other
	// workloads: istiod's tlsMode for them).
	Proxy    bool   `json:"proxy"`
	Inbound  string `json:"inbound"`
	Identity string `json:"identity"`
	Outcome  string `json:"outcome"`
	Why      string `json:"why"`
}

// Oracle is istiod's discovery state for one snapshot.
type Oracle struct {
	f    *xds.FakeDiscoveryServer
	snap *Snapshot
}

// NewOracle starts Istio's fake discovery server on the snapshot. Mesh settings: Istio's
// defaults (root namespace istio-system, auto mTLS on unless autoMtls is false).
func NewOracle(t test.Failer, snap *Snapshot, autoMtls bool) *Oracle {
	quiet.Do(func() {
		// istiod logs every push at info level: keep errors only, so a failure stays readable.
		for _, s := range istiolog.Scopes() {
			s.SetOutputLevel(istiolog.ErrorLevel)
		}
	})
	m := mesh.DefaultMeshConfig()
	m.RootNamespace = "istio-system"
	m.EnableAutoMtls = wrapperspb.Bool(autoMtls)
	configs, err := parseConfigs(snap.Config)
	if err != nil {
		t.Fatalf("oracle: the snapshot's Istio configs: %v", err)
	}
	// EndpointSlices are created once the pods are known, as in a running cluster (the
	// EndpointSlice controller writes them after the pods have IPs): an endpoint without a
	// targetRef is matched to its pod by IP only if the pod is already in istiod's pod cache
	// (`endpointslice.go` `getPod`), and at start-up the informers race.
	var slices []*discoveryv1.EndpointSlice
	var others []kruntime.Object
	for _, o := range snap.Kube {
		if s, ok := o.(*discoveryv1.EndpointSlice); ok {
			slices = append(slices, s)
		} else {
			others = append(others, o)
		}
	}
	f := xds.NewFakeDiscoveryServer(t, xds.FakeOptions{
		KubernetesObjects: others,
		Configs:           configs,
		MeshConfig:        m,
	})
	for _, s := range slices {
		if _, err := f.KubeClient().Kube().DiscoveryV1().EndpointSlices(s.Namespace).Create(context.Background(), s, metav1.CreateOptions{}); err != nil {
			t.Fatalf("oracle: creating EndpointSlice %s/%s: %v", s.Namespace, s.Name, err)
		}
	}
	retry.UntilOrFail(t, func() bool { return sliceEndpointsIndexed(f, slices) }, retry.Timeout(30*time.Second), retry.Delay(5*time.Millisecond))
	// A full push, so the push context (service accounts, instances by port) reflects them.
	f.Discovery.ConfigUpdate(&model.PushRequest{Forced: true})
	f.EnsureSynced(t)
	return &Oracle{f: f, snap: snap}
}

// sliceEndpointsIndexed reports whether every address of every slice is in istiod's endpoint
// index (or the slice's service is unknown to it).
func sliceEndpointsIndexed(f *xds.FakeDiscoveryServer, slices []*discoveryv1.EndpointSlice) bool {
	for _, s := range slices {
		svc := s.Labels["kubernetes.io/service-name"]
		h := svc + "." + s.Namespace + ".svc.cluster.local"
		want := 0
		for _, e := range s.Endpoints {
			want += len(e.Addresses)
		}
		if want == 0 {
			continue
		}
		shards, ok := f.Discovery.Env.EndpointIndex.ShardsForService(h, s.Namespace)
		if !ok {
			return false
		}
		shards.RLock()
		seen := map[string]bool{}
		for _, eps := range shards.Shards {
			for _, ep := range eps {
				if len(ep.Addresses) > 0 {
					seen[ep.Addresses[0]] = true
				}
			}
		}
		shards.RUnlock()
		for _, e := range s.Endpoints {
			for _, a := range e.Addresses {
				if !seen[a] && !(e.TargetRef != nil && e.TargetRef.Kind == "Pod" && !podKnown(f, e.TargetRef.Namespace, e.TargetRef.Name)) {
					return false
				}
			}
		}
	}
	return true
}

func podKnown(f *xds.FakeDiscoveryServer, ns, name string) bool {
	_, err := f.KubeClient().Kube().CoreV1().Pods(ns).Get(context.Background(), name, metav1.GetOptions{})
	return err == nil
}

// Outcomes returns, for client c, every endpoint of every outbound cluster istiod gives it,
// and the names of those clusters (some have no endpoints).
func (o *Oracle) Outcomes(c Client) ([]Endpoint, map[string]bool, error) {
	push := o.f.PushContext()
	labels := map[string]string{}
	for k, v := range c.Labels {
		labels[k] = v
	}
	p := o.f.SetupProxy(&model.Proxy{
		ID:              c.Pod,
		ConfigNamespace: c.Namespace,
		Labels:          labels,
		IPAddresses:     []string{c.IP},
		Metadata:        &model.NodeMetadata{Namespace: c.Namespace, Labels: labels},
	})
	var out []Endpoint
	names := map[string]bool{}
	for _, cl := range o.f.Clusters(p) {
		if !strings.HasPrefix(cl.Name, "outbound|") {
			continue
		}
		names[cl.Name] = true
		tlsKind, sans, err := clusterTLS(cl)
		if err != nil {
			return nil, nil, fmt.Errorf("cluster %s: %w", cl.Name, err)
		}
		_, _, hostname, _ := model.ParseSubsetKey(cl.Name)
		svc := push.ServiceForHostname(p, hostname)
		if svc == nil {
			continue
		}
		cla := cl.GetLoadAssignment()
		if cl.GetType() == clusterv3.Cluster_EDS || cl.GetType() == clusterv3.Cluster_ORIGINAL_DST {
			b := endpoints.NewEndpointBuilder(cl.Name, p, push)
			cla = b.BuildClusterLoadAssignment(o.f.Discovery.Env.EndpointIndex)
		}
		istioEps := o.istioEndpoints(hostname, svc.Attributes.Namespace)
		for _, loc := range cla.GetEndpoints() {
			for _, lb := range loc.GetLbEndpoints() {
				e, ok := o.endpoint(push, c, cl.Name, tlsKind, sans, lb, istioEps)
				if ok {
					out = append(out, e)
				}
			}
		}
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if a.Cluster != b.Cluster {
			return a.Cluster < b.Cluster
		}
		if a.Address != b.Address {
			return a.Address < b.Address
		}
		return a.Port < b.Port
	})
	return out, names, nil
}

func (o *Oracle) istioEndpoints(h host.Name, ns string) map[string]*model.IstioEndpoint {
	out := map[string]*model.IstioEndpoint{}
	shards, ok := o.f.Discovery.Env.EndpointIndex.ShardsForService(string(h), ns)
	if !ok {
		return out
	}
	shards.RLock()
	defer shards.RUnlock()
	for _, eps := range shards.Shards {
		for _, ep := range eps {
			if len(ep.Addresses) > 0 {
				out[net.JoinHostPort(ep.Addresses[0], strconv.Itoa(int(ep.EndpointPort)))] = ep
			}
		}
	}
	return out
}

func (o *Oracle) endpoint(push *model.PushContext, c Client, cluster, tlsKind string, sans []*matcherv3.StringMatcher,
	lb *endpointv3.LbEndpoint, istioEps map[string]*model.IstioEndpoint,
) (Endpoint, bool) {
	sa := lb.GetEndpoint().GetAddress().GetSocketAddress()
	if sa == nil {
		return Endpoint{}, false
	}
	e := Endpoint{
		Cluster:    cluster,
		Address:    sa.GetAddress(),
		Port:       sa.GetPortValue(),
		ClusterTLS: tlsKind,
		EDSTLSMode: lb.GetMetadata().GetFilterMetadata()["envoy.transport_socket_match"].GetFields()["tlsMode"].GetStringValue(),
	}
	for _, m := range sans {
		e.SANs = append(e.SANs, matcherString(m))
	}
	ep := istioEps[net.JoinHostPort(e.Address, strconv.Itoa(int(e.Port)))]
	if ep == nil {
		// A DNS cluster's inline endpoint: no workload behind it that istiod knows.
		e.Inbound = "none"
		e.Outcome, e.Why = decide(c.Sidecar, tlsKind, e.EDSTLSMode, false, model.MTLSUnknown, true)
		return e, true
	}
	mode := authn.NewMtlsPolicy(push, push.AuthnPolicies, ep.Namespace, ep.Labels, false).GetMutualTLSModeForPort(ep.EndpointPort)
	if pod, ok := o.snap.Pods[e.Address]; ok && pod.Namespace == ep.Namespace {
		e.Proxy = pod.RunsProxy
	} else {
		e.Proxy = ep.TLSMode == model.IstioMutualTLSModeLabel
	}
	e.Inbound = mode.String()
	e.Identity = ep.ServiceAccount
	if e.Identity == "" {
		e.Identity = "spiffe://cluster.local/ns/" + ep.Namespace + "/sa/default"
	} else if !strings.HasPrefix(e.Identity, "spiffe://") {
		e.Identity = "spiffe://cluster.local/ns/" + ep.Namespace + "/sa/" + e.Identity
	}
	sanOK := len(sans) == 0
	for _, m := range sans {
		if matches(m, e.Identity) {
			sanOK = true
		}
	}
	e.Outcome, e.Why = decide(c.Sidecar, tlsKind, e.EDSTLSMode, e.Proxy, mode, sanOK)
	return e, true
}

// decide is the data plane: what the client's sidecar sends (cluster transport socket, or the
// socket match its EDS metadata picks) and whether the endpoint's side accepts it.
func decide(clientSidecar bool, tlsKind, edsMode string, proxy bool, inbound model.MutualTLSMode, sanOK bool) (string, string) {
	strict := proxy && inbound == model.MTLSStrict
	sent := "plaintext"
	if clientSidecar {
		switch tlsKind {
		case "auto":
			if edsMode == model.IstioMutualTLSModeLabel {
				sent = "mtls"
			}
		case "istio-mutual":
			sent = "mtls"
		case "simple":
			sent = "tls"
		case "mutual":
			sent = "mutual"
		}
	}
	switch sent {
	case "mtls":
		switch {
		case !proxy:
			return "will-fail", "mTLS to an endpoint without a sidecar"
		case inbound == model.MTLSDisable:
			return "will-fail", "mTLS to a sidecar whose inbound is DISABLE"
		case !sanOK:
			return "will-fail", "the endpoint's identity is not among the cluster's SANs"
		}
		return "mtls", "mTLS"
	case "plaintext":
		if strict {
			return "will-fail", "plaintext to a STRICT sidecar"
		}
		return "plaintext", "plaintext"
	default:
		if strict {
			return "will-fail", sent + " without a mesh certificate to a STRICT sidecar"
		}
		return sent, sent
	}
}

// clusterTLS classifies a cluster's transport: socket matches, one TLS socket, or none.
func clusterTLS(c *clusterv3.Cluster) (string, []*matcherv3.StringMatcher, error) {
	if ms := c.GetTransportSocketMatches(); len(ms) > 0 {
		for _, m := range ms {
			if m.GetName() == "tlsMode-istio" {
				_, sans, err := socketTLS(m.GetTransportSocket())
				return "auto", sans, err
			}
		}
		return "", nil, fmt.Errorf("socket matches without tlsMode-istio: %v", ms)
	}
	return socketTLS(c.GetTransportSocket())
}

func socketTLS(ts *corev3.TransportSocket) (string, []*matcherv3.StringMatcher, error) {
	if ts == nil || ts.GetName() != "envoy.transport_sockets.tls" {
		return "plain", nil, nil
	}
	ctx := &tlsv3.UpstreamTlsContext{}
	if err := ts.GetTypedConfig().UnmarshalTo(ctx); err != nil {
		return "", nil, err
	}
	common := ctx.GetCommonTlsContext()
	vc := common.GetCombinedValidationContext().GetDefaultValidationContext()
	sans := vc.GetMatchSubjectAltNames()
	for _, t := range vc.GetMatchTypedSubjectAltNames() {
		sans = append(sans, t.GetMatcher())
	}
	certs := common.GetTlsCertificateSdsSecretConfigs()
	switch {
	case len(certs) == 1 && certs[0].GetName() == "default":
		return "istio-mutual", sans, nil
	case len(certs) > 0 || len(common.GetTlsCertificates()) > 0:
		return "mutual", sans, nil
	default:
		return "simple", sans, nil
	}
}

func matcherString(m *matcherv3.StringMatcher) string {
	switch p := m.GetMatchPattern().(type) {
	case *matcherv3.StringMatcher_Exact:
		return p.Exact
	case *matcherv3.StringMatcher_Prefix:
		return p.Prefix + "*"
	default:
		return m.String()
	}
}

func matches(m *matcherv3.StringMatcher, s string) bool {
	switch p := m.GetMatchPattern().(type) {
	case *matcherv3.StringMatcher_Exact:
		return p.Exact == s
	case *matcherv3.StringMatcher_Prefix:
		return strings.HasPrefix(s, p.Prefix)
	case *matcherv3.StringMatcher_Suffix:
		return strings.HasSuffix(s, p.Suffix)
	case *matcherv3.StringMatcher_Contains:
		return strings.Contains(s, p.Contains)
	}
	return false
}

// parseConfigs reads Istio configs as istiod's Kubernetes config store holds them. It follows
// crd.ParseInputs (what FakeOptions.ConfigString uses) with two differences that make it what a
// running istiod sees: no validation (that is the admission webhook's job; istiod itself takes
// what the API server stores, e.g. a MUTUAL rule without certificates), and the cluster's domain
// suffix on each config (ParseInputs leaves it empty, so a short DestinationRule host would
// resolve to `name.namespace`).
func parseConfigs(inputs string) ([]config.Config, error) {
	var out []config.Config
	dec := utilyaml.NewYAMLOrJSONDecoder(strings.NewReader(inputs), 512*1024)
	for {
		obj := crd.IstioKind{}
		if err := dec.Decode(&obj); err != nil {
			if errors.Is(err, io.EOF) {
				return out, nil
			}
			return nil, err
		}
		if obj.Kind == "" {
			continue
		}
		gvk := obj.GroupVersionKind()
		s, ok := collections.PilotGatewayAPI().FindByGroupVersionAliasesKind(resource.FromKubernetesGVK(&gvk))
		if !ok {
			return nil, fmt.Errorf("kind %s is not one istiod reads", obj.Kind)
		}
		cfg, err := crd.ConvertObject(s, &obj, "cluster.local")
		if err != nil {
			return nil, fmt.Errorf("%s %s/%s: %w", obj.Kind, obj.Namespace, obj.Name, err)
		}
		out = append(out, *cfg)
	}
}
