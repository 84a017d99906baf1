// Package envoy drives meshid's SDS and EDS with a grpc-go client built from Envoy's own protos
// (github.com/envoyproxy/go-control-plane/envoy): every resource is decoded strictly (no field
// unknown to Envoy's API) and checked with go-control-plane's generated validation rules
// (protoc-gen-validate, the constraints Envoy itself enforces on config), and the xDS exchange
// follows Envoy's xds_protocol (version_info, nonce, ACK/NACK; Delta subscribe/remove).
package envoy

import (
	"context"
	"crypto/tls"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/anypb"

	"meshid.dev/interop/internal/meshidproc"
	"meshid.dev/interop/internal/testca"
	"meshid.dev/interop/internal/xdsclient"
)

var node = &corev3.Node{Id: "sidecar~127.0.0.1~product-7d4b9.shop~shop.svc.cluster.local", Cluster: "product.shop"}

// TestSDSStateOfTheWorldDecodesWithEnvoyProtosAndFollowsACKNACK: StreamSecrets for `default`,
// `ROOTCA`, `ALL` and `spiffe://mesh.test`, as Envoy subscribes (type URL of
// go-control-plane's resource.SecretType): every Secret decodes strictly and passes
// Secret.ValidateAll; `default` is a TlsCertificate whose chain and key form a key pair
// (crypto/tls.X509KeyPair, what Envoy's TLS context does with them); ROOTCA and
// spiffe://mesh.test hold the CA's roots; ALL is Envoy's SPIFFE validator
// (SPIFFECertValidatorConfig) with mesh.test. A root prepared by the CLI is pushed with a new
// version and nonce; a NACK of it is not answered with the same resources (xds_protocol
// "ACK/NACK and resource type instance version"): the next response is the next change.
func TestSDSStateOfTheWorldDecodesWithEnvoyProtosAndFollowsACKNACK(t *testing.T) {
	t.Parallel()
	if xdsclient.SecretTypeURL != resourcev3.SecretType {
		t.Fatalf("type URL %q differs from go-control-plane's resource.SecretType %q", xdsclient.SecretTypeURL, resourcev3.SecretType)
	}
	ca := meshidproc.NewCA(t, "mesh.test")
	srv := ca.Start(meshidproc.Config{})
	conn := xdsclient.Dial(t, srv, ca.Token("shop", "product"))
	ctx, cancel := context.WithTimeout(context.Background(), xdsclient.Wait)
	defer cancel()
	stream, err := secretv3.NewSecretDiscoveryServiceClient(conn).StreamSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	names := []string{"default", "ROOTCA", "ALL", "spiffe://mesh.test"}
	send := func(req *discoveryv3.DiscoveryRequest) {
		t.Helper()
		req.Node, req.TypeUrl, req.ResourceNames = node, resourcev3.SecretType, names
		if err := stream.Send(req); err != nil {
			t.Fatal(err)
		}
	}
	recv := func() (*discoveryv3.DiscoveryResponse, map[string]*tlsv3.Secret) {
		t.Helper()
		resp, err := stream.Recv()
		if err != nil {
			t.Fatalf("StreamSecrets: %v", err)
		}
		if resp.GetTypeUrl() != resourcev3.SecretType || resp.GetVersionInfo() == "" || resp.GetNonce() == "" {
			t.Fatalf("response type_url %q version_info %q nonce %q", resp.GetTypeUrl(), resp.GetVersionInfo(), resp.GetNonce())
		}
		if err := resp.ValidateAll(); err != nil {
			t.Fatalf("DiscoveryResponse.ValidateAll: %v", err)
		}
		secs, err := xdsclient.DecodeSecrets(resp.GetResources())
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]*tlsv3.Secret{}
		for _, s := range secs {
			out[s.GetName()] = s
		}
		return resp, out
	}

	send(&discoveryv3.DiscoveryRequest{})
	held := map[string]*tlsv3.Secret{}
	var last *discoveryv3.DiscoveryResponse
	for len(held) < len(names) {
		resp, secs := recv()
		for k, v := range secs {
			held[k] = v
		}
		last = resp
		send(&discoveryv3.DiscoveryRequest{VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()})
	}
	chain, key, err := xdsclient.TLSCertificate(held["default"])
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tls.X509KeyPair(chain, key); err != nil {
		t.Fatalf("default: certificate_chain and private_key are not a key pair: %v", err)
	}
	roots := ca.Roots()
	for _, n := range []string{"ROOTCA", "spiffe://mesh.test"} {
		got, err := xdsclient.TrustedCA(held[n])
		if err != nil || !testca.SameCerts(got, roots) {
			t.Fatalf("%s: trusted_ca %d certs (%v), want the CA's %d roots", n, len(got), err, len(roots))
		}
	}
	all, err := xdsclient.SpiffeValidator(held["ALL"])
	if err != nil || !testca.SameCerts(all["mesh.test"], roots) {
		t.Fatalf("ALL: %v, trust domains %v", err, all)
	}

	// A change: the new root is pushed with a new version and nonce.
	ca.Run("root", "prepare", "--state-dir", ca.StateDir)
	resp, secs := recv()
	if resp.GetVersionInfo() == last.GetVersionInfo() || resp.GetNonce() == last.GetNonce() {
		t.Fatalf("push after root prepare reuses version %q / nonce %q", resp.GetVersionInfo(), resp.GetNonce())
	}
	got, err := xdsclient.TrustedCA(secs["ROOTCA"])
	if err != nil || len(got) != 2 {
		t.Fatalf("ROOTCA after prepare: %d roots (%v), want 2", len(got), err)
	}
	// NACK it (keeping the version we had), as Envoy does when it rejects a config.
	send(&discoveryv3.DiscoveryRequest{
		VersionInfo: last.GetVersionInfo(), ResponseNonce: resp.GetNonce(),
		ErrorDetail: &status.Status{Code: int32(codes.InvalidArgument), Message: "interop: rejected on purpose"},
	})
	// The next change (the prepared root withdrawn) is what comes next, not a resend.
	ca.Run("root", "revoke", ca.RootID("prepared"), "--state-dir", ca.StateDir)
	after, secs := recv()
	if after.GetVersionInfo() == resp.GetVersionInfo() {
		t.Fatalf("after a NACK, meshid re-sent version %q", after.GetVersionInfo())
	}
	if got, err := xdsclient.TrustedCA(secs["ROOTCA"]); err != nil || !testca.SameCerts(got, roots) {
		t.Fatalf("ROOTCA after the prepared root was withdrawn: %d roots (%v), want the original", len(got), err)
	}
}

// TestSDSDeltaSubscribesRemovesAndPushesWithEnvoyProtos: DeltaSecrets as Envoy's delta SDS
// subscription does it: the subscribed names come back as Resources (name, version, a Secret
// that decodes strictly), a name meshid does not serve is listed in removed_resources
// (xds_protocol "Knowing When a Requested Resource Does Not Exist"), the ACK carries the
// response nonce, and a root change pushes ROOTCA alone with a new version.
func TestSDSDeltaSubscribesRemovesAndPushesWithEnvoyProtos(t *testing.T) {
	t.Parallel()
	ca := meshidproc.NewCA(t, "mesh.test")
	srv := ca.Start(meshidproc.Config{})
	conn := xdsclient.Dial(t, srv, ca.Token("shop", "product"))
	ctx, cancel := context.WithTimeout(context.Background(), xdsclient.Wait)
	defer cancel()
	stream, err := secretv3.NewSecretDiscoveryServiceClient(conn).DeltaSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	send := func(req *discoveryv3.DeltaDiscoveryRequest) {
		t.Helper()
		req.Node, req.TypeUrl = node, resourcev3.SecretType
		if err := stream.Send(req); err != nil {
			t.Fatal(err)
		}
	}
	versions := map[string]string{}
	removed := map[string]bool{}
	recv := func() *discoveryv3.DeltaDiscoveryResponse {
		t.Helper()
		resp, err := stream.Recv()
		if err != nil {
			t.Fatalf("DeltaSecrets: %v", err)
		}
		if resp.GetTypeUrl() != resourcev3.SecretType || resp.GetNonce() == "" {
			t.Fatalf("delta response type_url %q nonce %q", resp.GetTypeUrl(), resp.GetNonce())
		}
		if err := resp.ValidateAll(); err != nil {
			t.Fatalf("DeltaDiscoveryResponse.ValidateAll: %v", err)
		}
		for _, r := range resp.GetResources() {
			if r.GetName() == "" || r.GetVersion() == "" {
				t.Fatalf("delta resource without name or version: %q %q", r.GetName(), r.GetVersion())
			}
			secs, err := xdsclient.DecodeSecrets([]*anypb.Any{r.GetResource()})
			if err != nil {
				t.Fatal(err)
			}
			if secs[0].GetName() != r.GetName() {
				t.Fatalf("resource %q carries Secret %q", r.GetName(), secs[0].GetName())
			}
			versions[r.GetName()] = r.GetVersion()
		}
		for _, n := range resp.GetRemovedResources() {
			removed[n] = true
		}
		send(&discoveryv3.DeltaDiscoveryRequest{ResponseNonce: resp.GetNonce()})
		return resp
	}
	send(&discoveryv3.DeltaDiscoveryRequest{ResourceNamesSubscribe: []string{"default", "ROOTCA", "spiffe://nowhere.test"}})
	for versions["default"] == "" || versions["ROOTCA"] == "" || !removed["spiffe://nowhere.test"] {
		recv()
	}
	before := versions["ROOTCA"]
	defaultVersion := versions["default"]
	ca.Run("root", "prepare", "--state-dir", ca.StateDir)
	resp := recv()
	if len(resp.GetResources()) != 1 || resp.GetResources()[0].GetName() != "ROOTCA" {
		var got []string
		for _, r := range resp.GetResources() {
			got = append(got, r.GetName())
		}
		t.Fatalf("push after root prepare carries %v, want ROOTCA alone", got)
	}
	if versions["ROOTCA"] == before || versions["default"] != defaultVersion {
		t.Fatalf("versions after prepare: ROOTCA %q (was %q), default %q (was %q)", versions["ROOTCA"], before, versions["default"], defaultVersion)
	}
}

// TestFetchSecretsUnaryReturnsROOTCA: FetchSecrets (the unary SDS call) returns the ROOTCA
// Secret, decoded strictly.
func TestFetchSecretsUnaryReturnsROOTCA(t *testing.T) {
	t.Parallel()
	ca := meshidproc.NewCA(t, "mesh.test")
	srv := ca.Start(meshidproc.Config{})
	conn := xdsclient.Dial(t, srv, ca.Token("shop", "product"))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := secretv3.NewSecretDiscoveryServiceClient(conn).FetchSecrets(ctx, &discoveryv3.DiscoveryRequest{
		Node: node, TypeUrl: resourcev3.SecretType, ResourceNames: []string{"ROOTCA"},
	})
	if err != nil {
		t.Fatalf("FetchSecrets: %v", err)
	}
	secs, err := xdsclient.DecodeSecrets(resp.GetResources())
	if err != nil || len(secs) != 1 {
		t.Fatalf("FetchSecrets: %d secrets, %v", len(secs), err)
	}
	if got, err := xdsclient.TrustedCA(secs[0]); err != nil || !testca.SameCerts(got, ca.Roots()) {
		t.Fatalf("ROOTCA: %v", err)
	}
}
