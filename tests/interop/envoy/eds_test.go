package envoy

import (
	"context"
	"path/filepath"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	// The projected token reaches meshid through Envoy's file_based_metadata call credentials,
	// as in deploy/kubernetes/examples/workload/envoy-bootstrap.yaml.
	_ "github.com/envoyproxy/go-control-plane/envoy/config/grpc_credential/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/raw_buffer/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	edsv3 "github.com/envoyproxy/go-control-plane/envoy/service/endpoint/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/structpb"

	"meshid.dev/interop/internal/meshidproc"
	"meshid.dev/interop/internal/xdsclient"
)

const (
	inventory = "outbound|8080||inventory-service.shop.svc.cluster.local"
	legacyDB  = "outbound|5432||legacy-db.legacy.svc.cluster.local"
)

func snapshot() string {
	return filepath.Join(meshidproc.RepoRoot(), "deploy", "examples", "mixed-traffic.yaml")
}

func decodeCLA(t *testing.T, b []byte) *endpointv3.ClusterLoadAssignment {
	t.Helper()
	cla := &endpointv3.ClusterLoadAssignment{}
	if err := xdsclient.Strict(b, cla); err != nil {
		t.Fatalf("ClusterLoadAssignment: %v", err)
	}
	return cla
}

// envoyCluster decodes `meshid describe service NAME --envoy-cluster PORT` as an Envoy
// Cluster, strictly (protojson refuses unknown fields; every Any must resolve) and validated.
func envoyCluster(t *testing.T, ca *meshidproc.CA, service, port string) *clusterv3.Cluster {
	t.Helper()
	out := ca.Run("describe", "service", service, "--snapshot", snapshot(), "--envoy-cluster", port)
	c := &clusterv3.Cluster{}
	if err := protojson.Unmarshal([]byte(out), c); err != nil {
		t.Fatalf("--envoy-cluster output is not an Envoy Cluster: %v\n%s", err, out)
	}
	if err := c.ValidateAll(); err != nil {
		t.Fatalf("Cluster.ValidateAll: %v", err)
	}
	// meshid serves EDS as its own gRPC service (no ADS): the cluster's endpoints must come
	// from an api_config_source naming meshid's gRPC address, or Envoy waits for them forever.
	if eds := c.GetEdsClusterConfig().GetEdsConfig(); eds != nil {
		if eds.GetAds() != nil {
			t.Fatalf("eds_config is ADS, which meshid does not serve: %v", eds)
		}
		g := eds.GetApiConfigSource().GetGrpcServices()
		if len(g) != 1 || g[0].GetGoogleGrpc().GetTargetUri() == "" {
			t.Fatalf("eds_config does not name meshid's gRPC service: %v", eds)
		}
	}
	return c
}

// socketMatch is the transport socket Envoy picks for an endpoint: the first
// transport_socket_matches entry whose `match` is a subset of the endpoint's
// `envoy.transport_socket_match` metadata (cluster.proto TransportSocketMatch.match), else
// the cluster's transport_socket ("" when there is none).
func socketMatch(c *clusterv3.Cluster, ep *endpointv3.LbEndpoint) string {
	md := ep.GetMetadata().GetFilterMetadata()["envoy.transport_socket_match"].GetFields()
	for _, m := range c.GetTransportSocketMatches() {
		ok := true
		for k, v := range m.GetMatch().GetFields() {
			got, present := md[k]
			if !present || !structValueEqual(got, v) {
				ok = false
				break
			}
		}
		if ok {
			return m.GetName()
		}
	}
	return c.GetTransportSocket().GetName()
}

func structValueEqual(a, b *structpb.Value) bool {
	return a.GetStringValue() == b.GetStringValue() && a.GetBoolValue() == b.GetBoolValue() && a.GetNumberValue() == b.GetNumberValue()
}

// TestEDSMetadataPicksEnvoysTransportSocketMatchPerEndpoint: StreamEndpoints (SotW) for the
// mixed-traffic example's inventory-service (sidecar) and legacy-db (none): each
// ClusterLoadAssignment decodes strictly with Envoy's endpoint protos and passes ValidateAll;
// applying Envoy's transport_socket_matches rule to the cluster meshid's `--envoy-cluster`
// prints (itself a valid envoy.config.cluster.v3.Cluster) picks `tlsMode-istio` for every
// inventory-service endpoint and `tlsMode-disabled` for legacy-db's (Istio's auto mTLS,
// pilot cluster_tls.go buildAutoMtlsSettings).
func TestEDSMetadataPicksEnvoysTransportSocketMatchPerEndpoint(t *testing.T) {
	t.Parallel()
	ca := meshidproc.NewCA(t, "cluster.local")
	srv := ca.Start(meshidproc.Config{Args: []string{"--discovery-snapshot", snapshot()}})
	conn := xdsclient.Dial(t, srv, ca.Token("shop", "product"))
	ctx, cancel := context.WithTimeout(context.Background(), xdsclient.Wait)
	defer cancel()
	stream, err := edsv3.NewEndpointDiscoveryServiceClient(conn).StreamEndpoints(ctx)
	if err != nil {
		t.Fatal(err)
	}
	names := []string{inventory, legacyDB}
	if err := stream.Send(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: resourcev3.EndpointType, ResourceNames: names}); err != nil {
		t.Fatal(err)
	}
	got := map[string]*endpointv3.ClusterLoadAssignment{}
	for len(got) < len(names) {
		resp, err := stream.Recv()
		if err != nil {
			t.Fatalf("StreamEndpoints: %v", err)
		}
		if resp.GetTypeUrl() != resourcev3.EndpointType || resp.GetNonce() == "" || resp.GetVersionInfo() == "" {
			t.Fatalf("EDS response type_url %q version %q nonce %q", resp.GetTypeUrl(), resp.GetVersionInfo(), resp.GetNonce())
		}
		for _, a := range resp.GetResources() {
			if a.GetTypeUrl() != resourcev3.EndpointType {
				t.Fatalf("resource type %q", a.GetTypeUrl())
			}
			cla := decodeCLA(t, a.GetValue())
			got[cla.GetClusterName()] = cla
		}
		if err := stream.Send(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: resourcev3.EndpointType, ResourceNames: names, VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()}); err != nil {
			t.Fatal(err)
		}
	}
	want := map[string]struct{ service, port, match string }{
		inventory: {"inventory-service.shop", "8080", "tlsMode-istio"},
		legacyDB:  {"legacy-db.legacy", "5432", "tlsMode-disabled"},
	}
	for name, w := range want {
		cluster := envoyCluster(t, ca, w.service, w.port)
		var eps []*endpointv3.LbEndpoint
		for _, l := range got[name].GetEndpoints() {
			eps = append(eps, l.GetLbEndpoints()...)
		}
		if len(eps) == 0 {
			t.Fatalf("%s: no endpoints", name)
		}
		for _, ep := range eps {
			if m := socketMatch(cluster, ep); m != w.match {
				t.Fatalf("%s endpoint %v: Envoy would pick %q, want %q (metadata %v)", name, ep.GetEndpoint().GetAddress(), m, w.match, ep.GetMetadata())
			}
		}
	}
}

// TestDeltaEDSAnswersKnownClustersAndRemovesUnknownOnes: DeltaEndpoints subscribing to
// inventory-service's cluster and a cluster of a service nobody knows: the first comes back as
// a Resource whose ClusterLoadAssignment decodes strictly, the second in removed_resources.
func TestDeltaEDSAnswersKnownClustersAndRemovesUnknownOnes(t *testing.T) {
	t.Parallel()
	ca := meshidproc.NewCA(t, "cluster.local")
	srv := ca.Start(meshidproc.Config{Args: []string{"--discovery-snapshot", snapshot()}})
	conn := xdsclient.Dial(t, srv, ca.Token("shop", "product"))
	ctx, cancel := context.WithTimeout(context.Background(), xdsclient.Wait)
	defer cancel()
	stream, err := edsv3.NewEndpointDiscoveryServiceClient(conn).DeltaEndpoints(ctx)
	if err != nil {
		t.Fatal(err)
	}
	unknown := "outbound|9999||nobody.shop.svc.cluster.local"
	if err := stream.Send(&discoveryv3.DeltaDiscoveryRequest{Node: node, TypeUrl: resourcev3.EndpointType, ResourceNamesSubscribe: []string{inventory, unknown}}); err != nil {
		t.Fatal(err)
	}
	var have, removed bool
	for !have || !removed {
		resp, err := stream.Recv()
		if err != nil {
			t.Fatalf("DeltaEndpoints: %v", err)
		}
		if err := resp.ValidateAll(); err != nil {
			t.Fatalf("DeltaDiscoveryResponse.ValidateAll: %v", err)
		}
		for _, r := range resp.GetResources() {
			cla := decodeCLA(t, r.GetResource().GetValue())
			if r.GetName() != inventory || cla.GetClusterName() != inventory || r.GetVersion() == "" {
				t.Fatalf("delta resource %q (version %q) carries cluster %q", r.GetName(), r.GetVersion(), cla.GetClusterName())
			}
			have = true
		}
		for _, n := range resp.GetRemovedResources() {
			if n != unknown {
				t.Fatalf("removed_resources lists %q", n)
			}
			removed = true
		}
		if err := stream.Send(&discoveryv3.DeltaDiscoveryRequest{Node: node, TypeUrl: resourcev3.EndpointType, ResponseNonce: resp.GetNonce()}); err != nil {
			t.Fatal(err)
		}
	}
}
