//! Istio's client-side TLS decision for one endpoint. A DestinationRule's `tls` wins as
//! written; without one: plaintext for mesh-external services, when auto mTLS is off, or when
//! the destination's PeerAuthentication is DISABLE; otherwise ISTIO_MUTUAL with per-endpoint
//! socket matching — mTLS to sidecar endpoints, plaintext to the rest. Combinations that
//! cannot work are reported as "will fail" with the reason.
//!
//! Better than the anchor, on purpose: the decision is per endpoint, so one backend without a
//! sidecar does not turn auto mTLS off for the whole service (Istio issue 49584), and headless
//! services are decided per endpoint too (Istio issue 19703).

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
            Self::Tls => "TLS (SIMPLE)",
            Self::MutualUser => "mTLS (user certificates)",
            Self::WillFail => "will fail",
        }
    }
}

/// Everything the decision depends on.
#[derive(Clone, Copy, Debug)]
pub struct DecisionInput {
    /// The DestinationRule TLS mode for this host and port, if any.
    pub dr_tls: Option<DrTlsMode>,
    pub mesh_external: bool,
    pub auto_mtls: bool,
    /// The endpoint's pod is labelled tlsMode=istio.
    pub endpoint_sidecar: bool,
    /// PeerAuthentication in force at the endpoint (for its workload and port).
    pub endpoint_peer_auth: PeerAuthMode,
    /// The calling client has a sidecar (a client without one always sends plaintext).
    pub client_sidecar: bool,
}

/// The decision and the rule that made it.
pub fn decide(i: DecisionInput) -> (Decision, &'static str) {
    use Decision::*;
    // Only a sidecar enforces PeerAuthentication.
    let strict = i.endpoint_sidecar && i.endpoint_peer_auth == PeerAuthMode::Strict;
    if !i.client_sidecar {
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
    if let Some(mode) = i.dr_tls {
        return match mode {
            DrTlsMode::Disable if strict => (
                WillFail,
                "DestinationRule tls DISABLE sends plaintext to a STRICT destination",
            ),
            DrTlsMode::Disable => (Plaintext, "DestinationRule tls DISABLE"),
            DrTlsMode::IstioMutual if !i.endpoint_sidecar => (
                WillFail,
                "DestinationRule tls ISTIO_MUTUAL to an endpoint without a sidecar to terminate it",
            ),
            DrTlsMode::IstioMutual => (Mtls, "DestinationRule tls ISTIO_MUTUAL"),
            DrTlsMode::Simple if strict => (
                WillFail,
                "DestinationRule tls SIMPLE presents no mesh certificate to a STRICT destination",
            ),
            DrTlsMode::Simple => (Tls, "DestinationRule tls SIMPLE"),
            DrTlsMode::Mutual => (MutualUser, "DestinationRule tls MUTUAL"),
        };
    }
    if i.mesh_external {
        return (Plaintext, "mesh-external service: auto mTLS does not apply");
    }
    if !i.auto_mtls {
        return if strict {
            (WillFail, "auto mTLS is off and no DestinationRule sets ISTIO_MUTUAL for a STRICT destination")
        } else {
            (
                Plaintext,
                "auto mTLS is off and no DestinationRule sets tls",
            )
        };
    }
    if i.endpoint_sidecar && i.endpoint_peer_auth == PeerAuthMode::Disable {
        return (Plaintext, "the destination's PeerAuthentication is DISABLE");
    }
    if i.endpoint_sidecar {
        (
            Mtls,
            "auto mTLS: the endpoint has a sidecar (tlsMode=istio)",
        )
    } else {
        (
            Plaintext,
            "auto mTLS: the endpoint has no sidecar (tlsMode absent)",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{Decision::*, DrTlsMode::*, *};
    use PeerAuthMode::{Disable as PaDisable, Permissive, Strict};

    fn input() -> DecisionInput {
        DecisionInput {
            dr_tls: None,
            mesh_external: false,
            auto_mtls: true,
            endpoint_sidecar: true,
            endpoint_peer_auth: Permissive,
            client_sidecar: true,
        }
    }

    /// Istio's decision table, one row per rule, named after the rule.
    #[test]
    fn decision_table() {
        type Edit = fn(&mut DecisionInput);
        let rows: &[(&str, Edit, Decision)] = &[
            ("auto mTLS: sidecar endpoint gets mTLS", |_| {}, Mtls),
            (
                "auto mTLS: endpoint without sidecar gets plaintext",
                |i| i.endpoint_sidecar = false,
                Plaintext,
            ),
            (
                "auto mTLS: STRICT sidecar endpoint still gets mTLS",
                |i| i.endpoint_peer_auth = Strict,
                Mtls,
            ),
            (
                "PeerAuthentication DISABLE gives plaintext",
                |i| i.endpoint_peer_auth = PaDisable,
                Plaintext,
            ),
            (
                "auto mTLS off gives plaintext",
                |i| i.auto_mtls = false,
                Plaintext,
            ),
            (
                "auto mTLS off to a STRICT destination will fail",
                |i| {
                    i.auto_mtls = false;
                    i.endpoint_peer_auth = Strict
                },
                WillFail,
            ),
            (
                "mesh-external gives plaintext",
                |i| i.mesh_external = true,
                Plaintext,
            ),
            ("DR DISABLE wins", |i| i.dr_tls = Some(Disable), Plaintext),
            (
                "DR DISABLE to STRICT will fail",
                |i| {
                    i.dr_tls = Some(Disable);
                    i.endpoint_peer_auth = Strict
                },
                WillFail,
            ),
            (
                "DR ISTIO_MUTUAL wins over auto mTLS off",
                |i| {
                    i.dr_tls = Some(IstioMutual);
                    i.auto_mtls = false
                },
                Mtls,
            ),
            (
                "DR ISTIO_MUTUAL to endpoint without sidecar will fail",
                |i| {
                    i.dr_tls = Some(IstioMutual);
                    i.endpoint_sidecar = false
                },
                WillFail,
            ),
            (
                "DR SIMPLE originates TLS",
                |i| {
                    i.dr_tls = Some(Simple);
                    i.endpoint_sidecar = false
                },
                Tls,
            ),
            (
                "DR SIMPLE to STRICT will fail",
                |i| {
                    i.dr_tls = Some(Simple);
                    i.endpoint_peer_auth = Strict
                },
                WillFail,
            ),
            (
                "DR MUTUAL uses user certificates",
                |i| i.dr_tls = Some(Mutual),
                MutualUser,
            ),
            (
                "DR wins over mesh-external",
                |i| {
                    i.dr_tls = Some(IstioMutual);
                    i.mesh_external = true
                },
                Mtls,
            ),
            (
                "client without sidecar to PERMISSIVE: plaintext",
                |i| i.client_sidecar = false,
                Plaintext,
            ),
            (
                "client without sidecar to STRICT will fail",
                |i| {
                    i.client_sidecar = false;
                    i.endpoint_peer_auth = Strict
                },
                WillFail,
            ),
            (
                "STRICT without a sidecar is not enforced",
                |i| {
                    i.endpoint_sidecar = false;
                    i.endpoint_peer_auth = Strict;
                    i.client_sidecar = false
                },
                Plaintext,
            ),
        ];
        for (rule, edit, want) in rows {
            let mut i = input();
            edit(&mut i);
            let (got, why) = decide(i);
            assert_eq!(got, *want, "rule: {rule} (said: {why})");
            assert!(!why.is_empty());
        }
    }
}
