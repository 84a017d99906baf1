package automtls

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"time"

	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
)

// Obj is one Kubernetes-shaped object of a snapshot.
type Obj = map[string]any

// Generated is one snapshot with the clients and targets to ask about.
type Generated struct {
	Seed    uint64
	Objects []Obj
	Clients []Client
	// Targets are `name.namespace` of Services, and ServiceEntry hosts.
	Targets []string
}

// JSON is the snapshot as meshid and the oracle read it (a kubectl List).
func (g *Generated) JSON() []byte {
	b, err := json.MarshalIndent(Obj{"apiVersion": "v1", "kind": "List", "items": g.Objects}, "", " ")
	if err != nil {
		panic(err)
	}
	return b
}

type gen struct {
	r       *rand.Rand
	g       *Generated
	ip      int
	created time.Time
}

func (x *gen) pick(choices ...string) string { return choices[x.r.IntN(len(choices))] }
func (x *gen) chance(p float64) bool         { return x.r.Float64() < p }

func (x *gen) nextIP() string {
	x.ip++
	return fmt.Sprintf("10.%d.%d.%d", 40+x.ip/65536, (x.ip/256)%256, x.ip%256)
}

func (x *gen) stamp() string {
	x.created = x.created.Add(time.Minute)
	return x.created.Format(time.RFC3339)
}

func (x *gen) add(o Obj) { x.g.Objects = append(x.g.Objects, o) }

func meta(name, ns string) Obj { return Obj{"name": name, "namespace": ns} }

// Namespaces of generated snapshots: services live in svcNamespaces, clients in all three.
var (
	svcNamespaces    = []string{"ns-a", "ns-b"}
	clientNamespaces = []string{"ns-a", "ns-b", "ns-c"}
)

// Generate makes the snapshot of `seed`: the same seed gives the same snapshot.
func Generate(seed uint64) *Generated {
	x := &gen{
		r:       rand.New(rand.NewPCG(seed, 0x6d65736869640a)),
		g:       &Generated{Seed: seed},
		created: time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC),
	}
	for _, ns := range []string{"istio-system", "ns-a", "ns-b", "ns-c"} {
		x.add(Obj{"apiVersion": "v1", "kind": "Namespace", "metadata": Obj{"name": ns}})
	}
	if x.chance(0.5) {
		x.peerAuth("istio-system", "default", nil, x.pick("STRICT", "PERMISSIVE", "DISABLE"), nil)
	}
	for _, ns := range svcNamespaces {
		if x.chance(0.5) {
			x.peerAuth(ns, "default", nil, x.pick("STRICT", "PERMISSIVE", "DISABLE", "UNSET"), nil)
		}
		n := 1 + x.r.IntN(2)
		for i := 0; i < n; i++ {
			x.service(ns, fmt.Sprintf("svc%d", i))
		}
		if x.chance(0.4) {
			x.serviceEntry(ns, "se0")
		}
	}
	for _, ns := range clientNamespaces {
		for i, role := range []string{"", "x"} {
			labels := Obj{"app": fmt.Sprintf("client%d", i)}
			if role != "" {
				labels["role"] = role
			}
			sidecar := i == 0 || x.chance(0.7)
			name := fmt.Sprintf("client%d", i)
			ip := x.pod(ns, name, labels, sidecarMode(sidecar), true)
			l := map[string]string{}
			for k, v := range labels {
				l[k] = v.(string)
			}
			if sidecar {
				l["security.istio.io/tlsMode"] = "istio"
			}
			x.g.Clients = append(x.g.Clients, Client{Pod: name + "." + ns, Namespace: ns, Labels: l, IP: ip, Sidecar: sidecar})
		}
	}
	return x.g
}

type side int

const (
	sideFull      side = iota // label, istio-proxy container, injection annotation
	sideNone                  // neither
	sideLabelOnly             // labelled, no proxy
	sideProxyOnly             // runs istio-proxy, not labelled
)

func sidecarMode(b bool) side {
	if b {
		return sideFull
	}
	return sideNone
}

func (x *gen) randomSide() side {
	switch f := x.r.Float64(); {
	case f < 0.5:
		return sideFull
	case f < 0.8:
		return sideNone
	case f < 0.9:
		return sideLabelOnly
	default:
		return sideProxyOnly
	}
}

// pod adds a pod and returns its IP.
func (x *gen) pod(ns, name string, labels Obj, s side, ready bool) string {
	ip := x.nextIP()
	l := Obj{}
	for k, v := range labels {
		l[k] = v
	}
	m := meta(name, ns)
	m["uid"] = "uid-" + ns + "-" + name
	containers := []any{Obj{"name": "app", "image": "example/app", "ports": []any{
		Obj{"name": "http", "containerPort": 8080, "protocol": "TCP"},
		Obj{"name": "grpc", "containerPort": 9090, "protocol": "TCP"},
	}}}
	if s == sideFull || s == sideLabelOnly {
		l["security.istio.io/tlsMode"] = "istio"
	}
	if s == sideFull || s == sideProxyOnly {
		containers = append(containers, Obj{"name": "istio-proxy", "image": "istio/proxyv2"})
		m["annotations"] = Obj{"sidecar.istio.io/status": "{}"}
	}
	m["labels"] = l
	status := "True"
	if !ready {
		status = "False"
	}
	x.add(Obj{"apiVersion": "v1", "kind": "Pod", "metadata": m,
		"spec": Obj{"serviceAccountName": fmt.Sprint(labels["app"]), "containers": containers},
		"status": Obj{"phase": "Running", "podIP": ip, "podIPs": []any{Obj{"ip": ip}},
			"conditions": []any{Obj{"type": "Ready", "status": status}}}})
	return ip
}

func (x *gen) peerAuth(ns, name string, selector Obj, mode string, ports Obj) {
	spec := Obj{"mtls": Obj{"mode": mode}}
	if selector != nil {
		spec["selector"] = Obj{"matchLabels": selector}
	}
	if ports != nil {
		spec["portLevelMtls"] = ports
	}
	m := meta(name, ns)
	m["creationTimestamp"] = x.stamp()
	x.add(Obj{"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": m, "spec": spec})
}

func (x *gen) service(ns, name string) {
	headless := x.chance(0.2)
	type port struct {
		name   string
		number int
		target any
	}
	ports := []port{{"http", 80, "http"}}
	if x.chance(0.5) {
		ports[0].target = 8080
	}
	if x.chance(0.4) {
		ports = append(ports, port{"grpc", 9000, 9090})
	}
	var sp []any
	for _, p := range ports {
		sp = append(sp, Obj{"name": p.name, "port": p.number, "targetPort": p.target, "protocol": "TCP"})
	}
	spec := Obj{"selector": Obj{"app": name}, "ports": sp, "clusterIP": "10.96.0.10"}
	if headless {
		spec["clusterIP"] = "None"
	}
	x.add(Obj{"apiVersion": "v1", "kind": "Service", "metadata": meta(name, ns), "spec": spec})
	var eps []any
	npods := 1 + x.r.IntN(3)
	for i := 0; i < npods; i++ {
		pn := fmt.Sprintf("%s-%d", name, i)
		labels := Obj{"app": name, "version": x.pick("v1", "v2")}
		ready := x.chance(0.9)
		ip := x.pod(ns, pn, labels, x.randomSide(), ready)
		ep := Obj{"addresses": []any{ip}, "conditions": Obj{"ready": ready}}
		if x.chance(0.8) {
			ep["targetRef"] = Obj{"kind": "Pod", "name": pn, "namespace": ns}
		}
		eps = append(eps, ep)
	}
	var slicePorts []any
	for _, p := range ports {
		n := 8080
		if p.name == "grpc" {
			n = 9090
		}
		slicePorts = append(slicePorts, Obj{"name": p.name, "port": n, "protocol": "TCP"})
	}
	x.add(Obj{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
		"metadata": Obj{"name": name + "-abc", "namespace": ns, "labels": Obj{"kubernetes.io/service-name": name}},
		"ports":    slicePorts, "endpoints": eps})
	x.g.Targets = append(x.g.Targets, name+"."+ns)
	// Workload PeerAuthentication, with a port-level setting on a container port.
	if x.chance(0.4) {
		var pl Obj
		if x.chance(0.5) {
			pl = Obj{x.pick("8080", "9090"): Obj{"mode": x.pick("STRICT", "PERMISSIVE", "DISABLE")}}
		}
		x.peerAuth(ns, name, Obj{"app": name}, x.pick("STRICT", "PERMISSIVE", "DISABLE", "UNSET"), pl)
	}
	nrules := x.r.IntN(3)
	for i := 0; i < nrules; i++ {
		x.destinationRule(ns, name, name+"."+ns+".svc.cluster.local", "*."+ns+".svc.cluster.local", fmt.Sprintf("%s-%s-dr%d", name, ns, i))
	}
}

func (x *gen) tls() Obj {
	switch f := x.r.Float64(); {
	case f < 0.3:
		return Obj{"mode": "ISTIO_MUTUAL"}
	case f < 0.4:
		return Obj{"mode": "ISTIO_MUTUAL", "subjectAltNames": []any{x.pick(
			"spiffe://cluster.local/ns/ns-a/sa/svc0", "spiffe://cluster.local/ns/ns-b/sa/svc1", "spiffe://cluster.local/ns/other/sa/x")}}
	case f < 0.55:
		return Obj{"mode": "DISABLE"}
	case f < 0.65:
		return Obj{"mode": "SIMPLE"}
	case f < 0.7:
		return Obj{"mode": "SIMPLE", "credentialName": "client-cert"}
	case f < 0.8:
		return Obj{"mode": "MUTUAL"}
	case f < 0.85:
		return Obj{"mode": "MUTUAL", "clientCertificate": "/etc/certs/cert.pem", "privateKey": "/etc/certs/key.pem"}
	default:
		return Obj{}
	}
}

func (x *gen) policy(depth int) Obj {
	tp := Obj{}
	if x.chance(0.7) {
		tp["tls"] = x.tls()
	}
	if x.chance(0.15) {
		tp["loadBalancer"] = Obj{"simple": x.pick("PASSTHROUGH", "ROUND_ROBIN")}
	}
	if depth == 0 && x.chance(0.4) {
		entry := Obj{"port": Obj{"number": x.pick2(80, 9000, 80)}}
		if x.chance(0.6) {
			entry["tls"] = x.tls()
		}
		if x.chance(0.2) {
			entry["loadBalancer"] = Obj{"simple": x.pick("PASSTHROUGH", "LEAST_REQUEST")}
		}
		tp["portLevelSettings"] = []any{entry}
	}
	return tp
}

func (x *gen) pick2(n ...int) int { return n[x.r.IntN(len(n))] }

func (x *gen) destinationRule(svcNs, svc, fqdn, wildcard, name string) {
	ns := x.pick(svcNs, svcNs, "istio-system", x.pick(clientNamespaces...))
	host := x.pick(fqdn, wildcard, fqdn)
	if ns == svcNs && x.chance(0.3) && svc != "" {
		host = svc
	}
	spec := Obj{"host": host}
	switch f := x.r.Float64(); {
	case f < 0.5:
	case f < 0.6:
		spec["exportTo"] = []any{"."}
	case f < 0.7:
		spec["exportTo"] = []any{"*"}
	case f < 0.85:
		spec["exportTo"] = []any{x.pick(clientNamespaces...)}
	default:
		spec["exportTo"] = []any{"~"}
	}
	switch f := x.r.Float64(); {
	case f < 0.75:
	case f < 0.85:
		spec["workloadSelector"] = Obj{}
	default:
		spec["workloadSelector"] = Obj{"matchLabels": Obj{"role": "x"}}
	}
	if x.chance(0.85) {
		spec["trafficPolicy"] = x.policy(0)
	}
	if x.chance(0.4) {
		var subsets []any
		for _, v := range []string{"v1", "v2"} {
			s := Obj{"name": v, "labels": Obj{"version": v}}
			if x.chance(0.5) {
				s["trafficPolicy"] = x.policy(0)
			}
			subsets = append(subsets, s)
		}
		spec["subsets"] = subsets
	}
	m := meta(name, ns)
	m["creationTimestamp"] = x.stamp()
	x.add(Obj{"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": m, "spec": spec})
}

// serviceEntry adds a MESH_INTERNAL STATIC ServiceEntry with inline endpoints and/or
// WorkloadEntries (and pods) selected by label.
func (x *gen) serviceEntry(ns, name string) {
	host := name + "." + ns + ".example.internal"
	spec := Obj{"hosts": []any{host}, "location": "MESH_INTERNAL", "resolution": "STATIC",
		"ports": []any{Obj{"number": 7000, "name": "http", "protocol": "HTTP", "targetPort": 7070}}}
	entry := func() Obj {
		e := Obj{"address": x.nextIP()}
		if x.chance(0.5) {
			e["serviceAccount"] = "vm"
		}
		if f := x.r.Float64(); f < 0.3 {
			e["labels"] = Obj{"security.istio.io/tlsMode": "istio", "app": name}
		} else if f < 0.4 {
			e["labels"] = Obj{"security.istio.io/tlsMode": "disabled", "app": name}
		} else {
			e["labels"] = Obj{"app": name}
		}
		if x.chance(0.5) {
			e["ports"] = Obj{"http": 7171}
		}
		return e
	}
	if x.chance(0.5) {
		spec["endpoints"] = []any{entry()}
	} else {
		spec["workloadSelector"] = Obj{"labels": Obj{"app": name}}
		for i := 0; i < 1+x.r.IntN(2); i++ {
			m := meta(fmt.Sprintf("%s-vm%d", name, i), ns)
			x.add(Obj{"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry", "metadata": m, "spec": entry()})
		}
		if x.chance(0.5) {
			x.pod(ns, name+"-pod", Obj{"app": name}, x.randomSide(), x.chance(0.8))
		}
	}
	m := meta(name, ns)
	m["creationTimestamp"] = x.stamp()
	x.add(Obj{"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": m, "spec": spec})
	x.g.Targets = append(x.g.Targets, host)
	if x.chance(0.5) {
		x.destinationRule(ns, "", host, "*."+ns+".example.internal", name+"-"+ns+"-dr")
	}
}

// FromFile reads a snapshot file as a Generated: every pod is a client (with its labels), every
// Service and ServiceEntry host a target.
func FromFile(path string) (*Generated, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
	g := &Generated{}
	for {
		var doc Obj
		if err := dec.Decode(&doc); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			return nil, err
		}
		if doc == nil {
			continue
		}
		g.add(doc)
	}
	return g, nil
}

// add takes one object of a snapshot file (a List's items one by one).
func (g *Generated) add(doc Obj) {
	if items, ok := doc["items"].([]any); ok {
		for _, it := range items {
			if o, ok := it.(map[string]any); ok {
				g.add(o)
			}
		}
		return
	}
	{
		g.Objects = append(g.Objects, doc)
		m, _ := doc["metadata"].(map[string]any)
		name, _ := m["name"].(string)
		ns, _ := m["namespace"].(string)
		switch doc["kind"] {
		case "Service":
			g.Targets = append(g.Targets, name+"."+ns)
		case "ServiceEntry":
			spec, _ := doc["spec"].(map[string]any)
			hosts, _ := spec["hosts"].([]any)
			for _, h := range hosts {
				g.Targets = append(g.Targets, fmt.Sprint(h))
			}
		case "Pod":
			labels := map[string]string{}
			if l, ok := m["labels"].(map[string]any); ok {
				for k, v := range l {
					labels[k] = fmt.Sprint(v)
				}
			}
			status, _ := doc["status"].(map[string]any)
			ip, _ := status["podIP"].(string)
			g.Clients = append(g.Clients, Client{Pod: name + "." + ns, Namespace: ns, Labels: labels, IP: ip,
				Sidecar: labels["security.istio.io/tlsMode"] == "istio"})
		}
	}
}
