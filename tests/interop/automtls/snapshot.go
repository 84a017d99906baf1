package automtls

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"

	"k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"

	kubelib "istio.io/istio/pkg/kube"
)

// Snapshot is a snapshot file (what meshid's `--snapshot` reads) split the way istiod's fake
// discovery server takes it: Kubernetes objects for its kube registry, Istio configs as YAML
// for its config store. Pods are also kept raw, as the ground truth of which workloads run a
// proxy (what an istiod never sees: whether the container is there).
type Snapshot struct {
	Kube   []runtime.Object
	Config string
	// Pods by IP: namespace, name, labels, whether it runs istio-proxy.
	Pods map[string]PodFacts
	// Kinds seen, in order, for the report.
	Kinds []string
}

// PodFacts is what the snapshot says about one pod.
type PodFacts struct {
	Namespace, Name string
	Labels          map[string]string
	RunsProxy       bool
}

var istioKinds = map[string]bool{
	"PeerAuthentication": true, "DestinationRule": true, "ServiceEntry": true, "WorkloadEntry": true,
	"Sidecar": true, "VirtualService": true,
}

var kubeKinds = map[string]bool{"Pod": true, "Service": true, "EndpointSlice": true, "Namespace": true}

// ParseSnapshot reads a JSON List (or object) or multi-document YAML.
func ParseSnapshot(data []byte) (*Snapshot, error) {
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
	s := &Snapshot{Pods: map[string]PodFacts{}}
	var configs []string
	for {
		var doc map[string]any
		if err := dec.Decode(&doc); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			return nil, fmt.Errorf("snapshot: %w", err)
		}
		if doc == nil {
			continue
		}
		if err := s.add(doc, &configs); err != nil {
			return nil, err
		}
	}
	s.Config = strings.Join(configs, "\n---\n")
	return s, nil
}

func (s *Snapshot) add(doc map[string]any, configs *[]string) error {
	kind, _ := doc["kind"].(string)
	if strings.HasSuffix(kind, "List") {
		items, _ := doc["items"].([]any)
		for _, it := range items {
			m, ok := it.(map[string]any)
			if !ok {
				return fmt.Errorf("snapshot: a %s item is not an object", kind)
			}
			if err := s.add(m, configs); err != nil {
				return err
			}
		}
		return nil
	}
	raw, err := json.Marshal(doc)
	if err != nil {
		return err
	}
	s.Kinds = append(s.Kinds, kind)
	switch {
	case istioKinds[kind]:
		*configs = append(*configs, string(raw))
	case kubeKinds[kind]:
		obj, _, err := kubelib.IstioCodec.UniversalDeserializer().Decode(raw, nil, nil)
		if err != nil {
			return fmt.Errorf("snapshot: decoding %s: %w", kind, err)
		}
		s.Kube = append(s.Kube, obj)
		if kind == "Pod" {
			s.addPod(doc)
		}
	default:
		return fmt.Errorf("snapshot: kind %q is not one the oracle feeds to istiod", kind)
	}
	return nil
}

func (s *Snapshot) addPod(doc map[string]any) {
	meta, _ := doc["metadata"].(map[string]any)
	spec, _ := doc["spec"].(map[string]any)
	status, _ := doc["status"].(map[string]any)
	ip, _ := status["podIP"].(string)
	f := PodFacts{Labels: map[string]string{}}
	f.Namespace, _ = meta["namespace"].(string)
	f.Name, _ = meta["name"].(string)
	if l, ok := meta["labels"].(map[string]any); ok {
		for k, v := range l {
			f.Labels[k], _ = v.(string)
		}
	}
	if a, ok := meta["annotations"].(map[string]any); ok {
		if _, ok := a["sidecar.istio.io/status"]; ok {
			f.RunsProxy = true
		}
	}
	for _, key := range []string{"containers", "initContainers"} {
		cs, _ := spec[key].([]any)
		for _, c := range cs {
			if m, ok := c.(map[string]any); ok && m["name"] == "istio-proxy" {
				f.RunsProxy = true
			}
		}
	}
	if ip != "" {
		s.Pods[ip] = f
	}
}
