//! Istio's client-side TLS decision, split the way Istio splits it, so that what meshid serves
//! and what it explains come from the same answers:
//!
//! - the **cluster side** (`cluster_tls`, after pilot's `cluster_tls.go`
//!   `buildAutoMtlsSettings` / `applyUpstreamTLSSettings`): per service port (and subset),
//!   whether the Envoy cluster carries one fixed TLS setting from a DestinationRule, no TLS,
//!   or the auto-mTLS transport socket matches (`tlsMode-istio` / `tlsMode-disabled`);
//! - the **endpoint side** (`endpoint_metadata`, after `endpoints/mtls_checker.go`
//!   `checkMtlsEnabled`): per endpoint, whether EDS marks it
//!   `envoy.transport_socket_match: {tlsMode: istio}`;
//! - the **data plane** (`outcome`): what the client proxy then sends to the endpoint, and
//!   whether the endpoint's inbound side (its PeerAuthentication, enforced only by a proxy)
//!   accepts it. Combinations that cannot work are "will fail", with the reason.
//!
//! meshid's own answer and the prediction of what an Istio sidecar does (`describe --mesh
//! istio`) run through the same three functions; they differ only in their inputs (see
//! `plan.rs`): Istio infers the service's mode from namespace/mesh PeerAuthentication only and
//! treats headless services all-or-nothing (`push_context.go` `BestEffortInferServiceMTLSMode`).

use serde::Serialize;

use super::PeerAuthMode;

/// A DestinationRule's client TLS mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DrTlsMode {
    Disable,
    Simple,
    Mutual,
    IstioMutual,
}

impl DrTlsMode {
    /// Parses Istio's spelling; unknown values are `None` (treated as not set, and reported).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "DISABLE" => Some(Self::Disable),
            "SIMPLE" => Some(Self::Simple),
            "MUTUAL" => Some(Self::Mutual),
            "ISTIO_MUTUAL" => Some(Self::IstioMutual),
            _ => None,
        }
    }
}

/// What the client proxy does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    /// Istio mTLS with mesh certificates.
    Mtls,
    /// No TLS from the proxy.
    Plaintext,
    /// TLS origination without a client certificate (DestinationRule SIMPLE).
    Tls,
    /// mTLS with user-provided certificates (DestinationRule MUTUAL).
    MutualUser,
    /// The connection cannot succeed.
    WillFail,
}

impl Decision {
    /// Short label for text output.
    pub fn label(self) -> &'static str {
        match self {
            Self::Mtls => "mTLS",
            Self::Plaintext => "plaintext",
            Self::Tls => "TLS origination (SIMPLE)",
            Self::MutualUser => "mTLS (user certificates)",
            Self::WillFail => "will fail",
        }
    }
}

/// The TLS an Envoy cluster carries for one service port (and subset).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "mode")]
pub enum ClusterTls {
    /// Auto mTLS: `transport_socket_matches` pick ISTIO_MUTUAL for endpoints whose EDS
    /// metadata says `tlsMode: istio` and raw_buffer for the rest.
    AutoMatch,
    /// One transport socket for every endpoint (a DestinationRule's mode, or Istio's
    /// auto-detected ISTIO_MUTUAL on an ORIGINAL_DST cluster, which gets no socket matches).
    Fixed(DrTlsMode),
    /// No TLS at all.
    Plain,
}

/// Inputs of the cluster side.
#[derive(Clone, Copy, Debug)]
pub struct ClusterInput {
    /// The DestinationRule TLS for this cluster (a port entry replaces the whole policy).
    pub dr_tls: Option<DrTlsMode>,
    pub mesh_external: bool,
    pub auto_mtls: bool,
    /// Istio only: the service-level mode `BestEffortInferServiceMTLSMode` inferred is DISABLE
    /// (namespace/mesh PeerAuthentication DISABLE, or a passthrough service with an endpoint
    /// without a sidecar), with why.
    pub inferred_disable: Option<&'static str>,
    /// Istio only: a passthrough (headless) service's ORIGINAL_DST cluster, which never gets
    /// socket matches.
    pub original_dst: bool,
}

/// The cluster side: `cluster_tls.go` `buildAutoMtlsSettings` + `applyUpstreamTLSSettings`.
pub fn cluster_tls(i: ClusterInput) -> (ClusterTls, &'static str) {
    if let Some(mode) = i.dr_tls {
        return match mode {
            DrTlsMode::Disable => (ClusterTls::Plain, "DestinationRule tls DISABLE"),
            m => (
                ClusterTls::Fixed(m),
                "the DestinationRule sets tls: one setting for every endpoint, no socket matches",
            ),
        };
    }
    if i.mesh_external {
        return (
            ClusterTls::Plain,
            "mesh-external service: auto mTLS does not apply",
        );
    }
    if !i.auto_mtls {
        return (
            ClusterTls::Plain,
            "auto mTLS is off and no DestinationRule sets tls",
        );
    }
    if let Some(why) = i.inferred_disable {
        return (ClusterTls::Plain, why);
    }
    if i.original_dst {
        return (
            ClusterTls::Fixed(DrTlsMode::IstioMutual),
            "passthrough (headless) service whose endpoints all have sidecars: ORIGINAL_DST cluster with ISTIO_MUTUAL for every endpoint, no socket matches",
        );
    }
    (
        ClusterTls::AutoMatch,
        "auto mTLS: socket matches tlsMode-istio / tlsMode-disabled",
    )
}

/// Inputs of the endpoint side.
#[derive(Clone, Copy, Debug)]
pub struct EndpointInput {
    /// The DestinationRule TLS for the endpoint's port (`tlsModeForDestinationRule`).
    pub dr_tls: Option<DrTlsMode>,
    /// The endpoint's own tlsMode is `istio` (its label; for meshid also the proxy proof when
    /// `discovery.require_proxy_proof` is on).
    pub sidecar: bool,
    /// PeerAuthentication in force at the endpoint for its workload and port.
    pub peer_auth: PeerAuthMode,
}

/// The endpoint side: `endpoints/mtls_checker.go` `checkMtlsEnabled`, applied by
/// `endpoint_builder.go` `buildEnvoyLbEndpoint` (`if !mtlsEnabled { meta.TLSMode = "" }`): the
/// check can only clear the endpoint's own tlsMode, never set it. `true` means EDS marks the
/// endpoint `tlsMode: istio`.
pub fn endpoint_metadata(i: EndpointInput) -> (bool, &'static str) {
    if !i.sidecar {
        return (
            false,
            "no sidecar (tlsMode not istio): EDS never marks the endpoint (checkMtlsEnabled can only clear the mark)",
        );
    }
    if let Some(mode) = i.dr_tls {
        return if mode == DrTlsMode::IstioMutual {
            (
                true,
                "sidecar, and the DestinationRule's tls for this port is ISTIO_MUTUAL: EDS marks it tlsMode istio",
            )
        } else {
            (
                false,
                "the DestinationRule's tls for this port is not ISTIO_MUTUAL: EDS clears the endpoint's tlsMode",
            )
        };
    }
    if i.peer_auth == PeerAuthMode::Disable {
        return (
            false,
            "the endpoint's PeerAuthentication is DISABLE: EDS clears its tlsMode",
        );
    }
    (true, "sidecar: EDS marks the endpoint tlsMode istio")
}

/// What actually sits in front of the endpoint.
#[derive(Clone, Copy, Debug)]
pub struct Inbound {
    /// A proxy intercepts inbound traffic (labelled or running istio-proxy).
    pub proxy: bool,
    /// That proxy holds a mesh certificate (false when meshid knows no proxy of the pod ever
    /// fetched one).
    pub proxy_has_cert: bool,
    /// The PeerAuthentication the proxy enforces.
    pub peer_auth: PeerAuthMode,
    /// The endpoint's identity is among the SANs the cluster checks (none set: any).
    pub identity_accepted: bool,
}

/// The data plane: what the client sends given the cluster and the endpoint metadata, and
/// whether the endpoint accepts it.
pub fn outcome(
    cluster: ClusterTls,
    metadata_istio: bool,
    inbound: Inbound,
    client_sidecar: bool,
) -> (Decision, &'static str) {
    use Decision::*;
    let strict = inbound.proxy && inbound.peer_auth == PeerAuthMode::Strict;
    if !client_sidecar {
        return if strict {
            (
                WillFail,
                "the destination is STRICT and the client has no sidecar to originate mTLS",
            )
        } else {
            (
                Plaintext,
                "the client has no sidecar: it sends plaintext, which the destination accepts",
            )
        };
    }
    let sent = match cluster {
        ClusterTls::Plain => Plaintext,
        ClusterTls::AutoMatch if metadata_istio => Mtls,
        ClusterTls::AutoMatch => Plaintext,
        ClusterTls::Fixed(DrTlsMode::IstioMutual) => Mtls,
        ClusterTls::Fixed(DrTlsMode::Simple) => Tls,
        ClusterTls::Fixed(DrTlsMode::Mutual) => MutualUser,
        ClusterTls::Fixed(DrTlsMode::Disable) => Plaintext,
    };
    match sent {
        Mtls if !inbound.proxy => (
            WillFail,
            "mTLS is sent to an endpoint without a sidecar to terminate it",
        ),
        Mtls if !inbound.proxy_has_cert => (
            WillFail,
            "mTLS is sent but no proxy of this pod has fetched a certificate",
        ),
        Mtls if inbound.peer_auth == PeerAuthMode::Disable => (
            WillFail,
            "mTLS is sent to a sidecar whose PeerAuthentication is DISABLE (its inbound is plaintext only)",
        ),
        Mtls if !inbound.identity_accepted => (
            WillFail,
            "mTLS is sent but the endpoint's identity is not among the SANs the cluster checks (the DestinationRule's subjectAltNames, else the service's accounts)",
        ),
        Mtls => (Mtls, "mTLS to the endpoint's sidecar"),
        Plaintext if strict => (WillFail, "plaintext is sent to a STRICT destination"),
        Plaintext => (Plaintext, "plaintext, which the destination accepts"),
        Tls if strict => (
            WillFail,
            "TLS without a mesh certificate is sent to a STRICT destination",
        ),
        Tls => (
            Tls,
            "TLS origination: the proxy opens TLS to the destination without a client certificate",
        ),
        MutualUser if strict => (
            WillFail,
            "TLS with the DestinationRule's own client certificate (not a mesh certificate) is sent to a STRICT destination",
        ),
        other => (other, "mTLS with the DestinationRule's certificates"),
    }
}

#[cfg(test)]
mod tests {
    use super::{Decision::*, DrTlsMode::*, *};
    use PeerAuthMode::{Disable as PaDisable, Permissive, Strict};

    struct Case {
        dr_cluster: Option<DrTlsMode>,
        dr_endpoint: Option<DrTlsMode>,
        mesh_external: bool,
        auto_mtls: bool,
        sidecar: bool,
        pa: PeerAuthMode,
        client_sidecar: bool,
    }

    fn base() -> Case {
        Case {
            dr_cluster: None,
            dr_endpoint: None,
            mesh_external: false,
            auto_mtls: true,
            sidecar: true,
            pa: Permissive,
            client_sidecar: true,
        }
    }

    fn run(c: &Case) -> Decision {
        let (cl, _) = cluster_tls(ClusterInput {
            dr_tls: c.dr_cluster,
            mesh_external: c.mesh_external,
            auto_mtls: c.auto_mtls,
            inferred_disable: None,
            original_dst: false,
        });
        let (meta, _) = endpoint_metadata(EndpointInput {
            dr_tls: c.dr_endpoint,
            sidecar: c.sidecar,
            peer_auth: c.pa,
        });
        let inbound = Inbound {
            proxy: c.sidecar,
            proxy_has_cert: true,
            peer_auth: c.pa,
            identity_accepted: true,
        };
        outcome(cl, meta, inbound, c.client_sidecar).0
    }

    /// The decision table, one row per rule, named after the Istio function it follows.
    #[test]
    fn decision_table() {
        type Edit = fn(&mut Case);
        let dr = |c: &mut Case, m: DrTlsMode| {
            c.dr_cluster = Some(m);
            c.dr_endpoint = Some(m);
        };
        let _ = dr;
        let rows: &[(&str, Edit, Decision)] = &[
            ("checkMtlsEnabled: sidecar endpoint gets mTLS", |_| {}, Mtls),
            (
                "checkMtlsEnabled: endpoint without sidecar gets plaintext",
                |c| c.sidecar = false,
                Plaintext,
            ),
            (
                "checkMtlsEnabled: STRICT sidecar endpoint still gets mTLS",
                |c| c.pa = Strict,
                Mtls,
            ),
            (
                "checkMtlsEnabled: PeerAuthentication DISABLE gives plaintext",
                |c| c.pa = PaDisable,
                Plaintext,
            ),
            (
                "buildAutoMtlsSettings: auto mTLS off gives plaintext",
                |c| c.auto_mtls = false,
                Plaintext,
            ),
            (
                "buildAutoMtlsSettings: auto mTLS off to STRICT will fail",
                |c| {
                    c.auto_mtls = false;
                    c.pa = Strict
                },
                WillFail,
            ),
            (
                "buildAutoMtlsSettings: mesh-external gives plaintext",
                |c| c.mesh_external = true,
                Plaintext,
            ),
            (
                "buildAutoMtlsSettings: DR DISABLE wins",
                |c| {
                    c.dr_cluster = Some(Disable);
                    c.dr_endpoint = Some(Disable)
                },
                Plaintext,
            ),
            (
                "buildAutoMtlsSettings: DR DISABLE to STRICT will fail",
                |c| {
                    c.dr_cluster = Some(Disable);
                    c.dr_endpoint = Some(Disable);
                    c.pa = Strict
                },
                WillFail,
            ),
            (
                "buildAutoMtlsSettings: DR ISTIO_MUTUAL wins over auto mTLS off",
                |c| {
                    c.dr_cluster = Some(IstioMutual);
                    c.dr_endpoint = Some(IstioMutual);
                    c.auto_mtls = false
                },
                Mtls,
            ),
            (
                "buildAutoMtlsSettings: DR ISTIO_MUTUAL to an endpoint without sidecar will fail",
                |c| {
                    c.dr_cluster = Some(IstioMutual);
                    c.dr_endpoint = Some(IstioMutual);
                    c.sidecar = false
                },
                WillFail,
            ),
            (
                "buildAutoMtlsSettings: DR ISTIO_MUTUAL to a PeerAuthentication DISABLE sidecar will fail",
                |c| {
                    c.dr_cluster = Some(IstioMutual);
                    c.dr_endpoint = Some(IstioMutual);
                    c.pa = PaDisable
                },
                WillFail,
            ),
            (
                "buildAutoMtlsSettings: DR SIMPLE originates TLS",
                |c| {
                    c.dr_cluster = Some(Simple);
                    c.dr_endpoint = Some(Simple);
                    c.sidecar = false
                },
                Tls,
            ),
            (
                "buildAutoMtlsSettings: DR SIMPLE to STRICT will fail",
                |c| {
                    c.dr_cluster = Some(Simple);
                    c.dr_endpoint = Some(Simple);
                    c.pa = Strict
                },
                WillFail,
            ),
            (
                "buildAutoMtlsSettings: DR MUTUAL uses user certificates",
                |c| {
                    c.dr_cluster = Some(Mutual);
                    c.dr_endpoint = Some(Mutual)
                },
                MutualUser,
            ),
            (
                "buildAutoMtlsSettings: DR wins over mesh-external",
                |c| {
                    c.dr_cluster = Some(IstioMutual);
                    c.dr_endpoint = Some(IstioMutual);
                    c.mesh_external = true
                },
                Mtls,
            ),
            (
                "GetPortLevelTrafficPolicy + trafficPolicyTLSModeForPort: port entry without tls under top-level DISABLE: auto on the cluster, DISABLE metadata on the endpoint",
                |c| c.dr_endpoint = Some(Disable),
                Plaintext,
            ),
            (
                "buildEnvoyLbEndpoint: checkMtlsEnabled only clears tlsMode: a port entry without tls (auto cluster) under a top-level ISTIO_MUTUAL leaves an endpoint without sidecar plaintext",
                |c| {
                    c.dr_endpoint = Some(IstioMutual);
                    c.sidecar = false
                },
                Plaintext,
            ),
            (
                "buildEnvoyLbEndpoint: a port entry without tls under a top-level ISTIO_MUTUAL keeps a sidecar endpoint's tlsMode istio",
                |c| c.dr_endpoint = Some(IstioMutual),
                Mtls,
            ),
            (
                "buildUpstreamClusterTLSContext: DR MUTUAL (user certificates) to STRICT will fail",
                |c| {
                    c.dr_cluster = Some(Mutual);
                    c.dr_endpoint = Some(Mutual);
                    c.pa = Strict
                },
                WillFail,
            ),
            (
                "client without sidecar to PERMISSIVE: plaintext",
                |c| c.client_sidecar = false,
                Plaintext,
            ),
            (
                "client without sidecar to STRICT will fail",
                |c| {
                    c.client_sidecar = false;
                    c.pa = Strict
                },
                WillFail,
            ),
            (
                "STRICT without a sidecar is not enforced",
                |c| {
                    c.sidecar = false;
                    c.pa = Strict;
                    c.client_sidecar = false
                },
                Plaintext,
            ),
        ];
        for (rule, edit, want) in rows {
            let mut c = base();
            edit(&mut c);
            assert_eq!(run(&c), *want, "rule: {rule}");
        }
    }

    /// `BestEffortInferServiceMTLSMode`: a passthrough service all with sidecars gets one
    /// ISTIO_MUTUAL setting, so a DISABLE endpoint among them fails.
    #[test]
    fn istio_original_dst_is_all_or_nothing() {
        let (cl, _) = cluster_tls(ClusterInput {
            dr_tls: None,
            mesh_external: false,
            auto_mtls: true,
            inferred_disable: None,
            original_dst: true,
        });
        assert_eq!(cl, ClusterTls::Fixed(IstioMutual));
        let inbound = Inbound {
            proxy: true,
            proxy_has_cert: true,
            peer_auth: PaDisable,
            identity_accepted: true,
        };
        assert_eq!(outcome(cl, false, inbound, true).0, WillFail);
    }
}
