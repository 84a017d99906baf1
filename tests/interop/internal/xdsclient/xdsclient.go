// Package xdsclient is a thin grpc-go client of meshid's gRPC surfaces built from Envoy's own
// protos (go-control-plane/envoy): a connection carrying what a sidecar sends (TLS to meshid's
// serving certificate, `authorization: Bearer <token>`, `ClusterID: Kubernetes`), and an SDS
// state-of-the-world stream that ACKs every response the way Envoy does (version_info and
// response_nonce of the last response, no error_detail).
package xdsclient

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/proto"

	"meshid.dev/interop/internal/meshidproc"
)

// SecretTypeURL is the type of SDS resources.
const SecretTypeURL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

// SpiffeValidatorName is the typed extension Envoy's SPIFFE certificate validator is named by.
const SpiffeValidatorName = "envoy.tls.cert_validator.spiffe"

// Wait bounds every wait for a response. It guards against a hang; no test asserts on it.
const Wait = 90 * time.Second

// bearer adds the caller's token (and ClusterID, when set) to every call, as Envoy's
// file_based_metadata credentials do.
type bearer struct{ token, clusterID string }

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	md := map[string]string{"authorization": "Bearer " + b.token}
	if b.clusterID != "" {
		md["ClusterID"] = b.clusterID
	}
	return md, nil
}

func (bearer) RequireTransportSecurity() bool { return true }

// Dial connects to meshid's gRPC listener over TLS (verified against the CA's roots, server
// name localhost) with `token` and `ClusterID: Kubernetes` on every call, as a stock sidecar
// sends them; closed when the test ends.
func Dial(t testing.TB, s *meshidproc.Server, token string) *grpc.ClientConn {
	t.Helper()
	return DialTLS(t, s.GRPCAddr, s.TLSConfig(), bearer{token, "Kubernetes"})
}

// DialToken is Dial with only the bearer token as per-RPC credentials (the caller adds
// ClusterID itself, as istio-agent's citadel client does with outgoing metadata).
func DialToken(t testing.TB, s *meshidproc.Server, token string) *grpc.ClientConn {
	t.Helper()
	return DialTLS(t, s.GRPCAddr, s.TLSConfig(), bearer{token: token})
}

// DialTLS connects with an explicit address, TLS configuration and credentials.
func DialTLS(t testing.TB, addr string, cfg *tls.Config, creds credentials.PerRPCCredentials) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr,
		grpc.WithTransportCredentials(credentials.NewTLS(cfg)),
		grpc.WithPerRPCCredentials(creds))
	if err != nil {
		t.Fatalf("grpc.NewClient %s: %v", addr, err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// SDS is one StreamSecrets stream. Secrets holds the latest copy of every secret received.
type SDS struct {
	t       testing.TB
	stream  secretv3.SecretDiscoveryService_StreamSecretsClient
	cancel  context.CancelFunc
	names   []string
	node    *corev3.Node
	recv    chan recvd
	mu      sync.Mutex
	Secrets map[string]*tlsv3.Secret
	// Responses counts the responses received.
	Responses int
}

type recvd struct {
	resp *discoveryv3.DiscoveryResponse
	err  error
}

// OpenSDS opens StreamSecrets on conn and subscribes to names (with Envoy's node shape).
func OpenSDS(t testing.TB, conn *grpc.ClientConn, names ...string) *SDS {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	stream, err := secretv3.NewSecretDiscoveryServiceClient(conn).StreamSecrets(ctx)
	if err != nil {
		cancel()
		t.Fatalf("StreamSecrets: %v", err)
	}
	s := &SDS{
		t: t, stream: stream, cancel: cancel, names: names,
		node:    &corev3.Node{Id: "sidecar~127.0.0.1~interop.test~test.svc.cluster.local", Cluster: "interop"},
		recv:    make(chan recvd, 16),
		Secrets: map[string]*tlsv3.Secret{},
	}
	t.Cleanup(s.Close)
	go func() {
		for {
			resp, err := stream.Recv()
			s.recv <- recvd{resp, err}
			if err != nil {
				close(s.recv)
				return
			}
		}
	}()
	s.send(&discoveryv3.DiscoveryRequest{Node: s.node, TypeUrl: SecretTypeURL, ResourceNames: names})
	return s
}

// Close ends the stream.
func (s *SDS) Close() {
	_ = s.stream.CloseSend()
	s.cancel()
}

func (s *SDS) send(req *discoveryv3.DiscoveryRequest) {
	if err := s.stream.Send(req); err != nil {
		s.t.Errorf("StreamSecrets send: %v", err)
	}
}

// Next receives one response, checks it (type URL, version, nonce, strict decoding and
// go-control-plane's validation rules of every Secret), records its secrets and ACKs it.
func (s *SDS) Next(ctx context.Context) (*discoveryv3.DiscoveryResponse, error) {
	select {
	case r, ok := <-s.recv:
		if !ok {
			return nil, fmt.Errorf("stream closed")
		}
		if r.err != nil {
			return nil, fmt.Errorf("StreamSecrets: %w", r.err)
		}
		resp := r.resp
		if resp.GetTypeUrl() != SecretTypeURL || resp.GetVersionInfo() == "" || resp.GetNonce() == "" {
			return nil, fmt.Errorf("response type_url %q version_info %q nonce %q: all three are required", resp.GetTypeUrl(), resp.GetVersionInfo(), resp.GetNonce())
		}
		secrets, err := DecodeSecrets(resp.GetResources())
		if err != nil {
			return nil, err
		}
		s.mu.Lock()
		for _, sec := range secrets {
			s.Secrets[sec.GetName()] = sec
		}
		s.Responses++
		s.mu.Unlock()
		s.send(&discoveryv3.DiscoveryRequest{
			Node: s.node, TypeUrl: SecretTypeURL, ResourceNames: s.names,
			VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce(),
		})
		return resp, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// WaitFor receives responses until cond holds for the secrets held (checked first against
// what is already held), at most Wait.
func (s *SDS) WaitFor(what string, cond func(map[string]*tlsv3.Secret) bool) {
	s.t.Helper()
	if err := s.WaitForErr(what, cond); err != nil {
		s.t.Fatal(err)
	}
}

// WaitForErr is WaitFor returning the failure instead of failing the test.
func (s *SDS) WaitForErr(what string, cond func(map[string]*tlsv3.Secret) bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), Wait)
	defer cancel()
	for {
		s.mu.Lock()
		ok := cond(s.Secrets)
		s.mu.Unlock()
		if ok {
			return nil
		}
		if _, err := s.Next(ctx); err != nil {
			return fmt.Errorf("SDS %v: waiting for %s: %w", s.names, what, err)
		}
	}
}

// Snapshot is a copy of the secrets held.
func (s *SDS) Snapshot() map[string]*tlsv3.Secret {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]*tlsv3.Secret, len(s.Secrets))
	for k, v := range s.Secrets {
		out[k] = v
	}
	return out
}

// DecodeSecrets unmarshals SDS resources strictly: the type URL must be Secret's, no field
// may be unknown to Envoy's protos, and each Secret must pass go-control-plane's generated
// validation (protoc-gen-validate rules of the Envoy API).
func DecodeSecrets(res []*anyMsg) ([]*tlsv3.Secret, error) {
	var out []*tlsv3.Secret
	for _, a := range res {
		if a.GetTypeUrl() != SecretTypeURL {
			return nil, fmt.Errorf("resource type %q, want %q", a.GetTypeUrl(), SecretTypeURL)
		}
		sec := &tlsv3.Secret{}
		if err := Strict(a.GetValue(), sec); err != nil {
			return nil, fmt.Errorf("Secret: %w", err)
		}
		out = append(out, sec)
	}
	return out, nil
}

// Strict unmarshals b into m, refusing unknown fields anywhere and violations of the
// message's generated validation rules.
func Strict(b []byte, m interface {
	proto.Message
	ValidateAll() error
}) error {
	if err := proto.Unmarshal(b, m); err != nil {
		return err
	}
	if err := noUnknown(m.ProtoReflect()); err != nil {
		return err
	}
	if err := m.ValidateAll(); err != nil {
		return fmt.Errorf("go-control-plane validation: %w", err)
	}
	return nil
}

// TLSCertificate is the certificate chain and key of a `default` secret (inline PEM).
func TLSCertificate(sec *tlsv3.Secret) (chainPEM, keyPEM []byte, err error) {
	tc := sec.GetTlsCertificate()
	if tc == nil {
		return nil, nil, fmt.Errorf("secret %q is not a TlsCertificate", sec.GetName())
	}
	chainPEM = tc.GetCertificateChain().GetInlineBytes()
	keyPEM = tc.GetPrivateKey().GetInlineBytes()
	if len(chainPEM) == 0 || len(keyPEM) == 0 {
		return nil, nil, fmt.Errorf("secret %q: certificate_chain and private_key must be inline_bytes", sec.GetName())
	}
	return chainPEM, keyPEM, nil
}

// TrustedCA is the trusted_ca of a validation-context secret (ROOTCA, spiffe://<td>).
func TrustedCA(sec *tlsv3.Secret) ([]*x509.Certificate, error) {
	vc := sec.GetValidationContext()
	if vc == nil {
		return nil, fmt.Errorf("secret %q is not a ValidationContext", sec.GetName())
	}
	return meshidproc.ParsePEMCerts(vc.GetTrustedCa().GetInlineBytes())
}

// SpiffeValidator decodes the `ALL` secret: a validation context whose custom validator is
// Envoy's SPIFFE validator; returns each trust domain's roots.
func SpiffeValidator(sec *tlsv3.Secret) (map[string][]*x509.Certificate, error) {
	vc := sec.GetValidationContext()
	if vc == nil {
		return nil, fmt.Errorf("secret %q is not a ValidationContext", sec.GetName())
	}
	cv := vc.GetCustomValidatorConfig()
	if cv.GetName() != SpiffeValidatorName {
		return nil, fmt.Errorf("custom_validator_config name %q, want %q", cv.GetName(), SpiffeValidatorName)
	}
	cfg := &tlsv3.SPIFFECertValidatorConfig{}
	if err := Strict(cv.GetTypedConfig().GetValue(), cfg); err != nil {
		return nil, fmt.Errorf("SPIFFECertValidatorConfig: %w", err)
	}
	out := map[string][]*x509.Certificate{}
	for _, td := range cfg.GetTrustDomains() {
		certs, err := meshidproc.ParsePEMCerts(td.GetTrustBundle().GetInlineBytes())
		if err != nil {
			return nil, fmt.Errorf("trust domain %s: %w", td.GetName(), err)
		}
		out[td.GetName()] = certs
	}
	return out, nil
}
