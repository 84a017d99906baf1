//! What the agent holds at one moment: its SVID (the key made here) and the trust it follows
//! from the server. One `watch` channel carries it to every local stream (SDS, Workload API), so
//! a renewal or a bundle change reaches them all at once.

use std::{collections::BTreeMap, sync::Arc};

use time::OffsetDateTime;

use crate::{
    ca::{cert, CertDer, PrivateKey},
    spiffe::{SpiffeId, TrustDomain},
};

/// The agent's X.509-SVID: a chain the server signed for a key that never left this process.
pub struct Svid {
    pub spiffe_id: SpiffeId,
    /// Leaf first, then intermediates (no root).
    pub chain: Vec<CertDer>,
    pub key: PrivateKey,
    /// The leaf's serial, hex: the SDS version of `default`.
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// Fingerprint id of the root the chain verified to when it was received.
    pub anchor: String,
}

impl Svid {
    /// The chain as PEM, leaf first.
    pub fn chain_pem(&self) -> String {
        cert::to_pem_bundle(&self.chain)
    }

    /// The chain as concatenated DER (the Workload API's `x509_svid`).
    pub fn chain_der(&self) -> Vec<u8> {
        self.chain.iter().flat_map(|c| c.iter().copied()).collect()
    }
}

/// Where the agent's trust came from: the CSR API's last chain element until the server's SDS
/// stream has answered, then that stream only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TrustSource {
    /// Nothing yet.
    #[default]
    None,
    /// The roots the CSR API returned with a certificate (own trust domain only).
    CsrResponse,
    /// The server's `ROOTCA` and `ALL` over SDS: pushed on every change.
    Sds,
}

/// The trust bundles the agent follows.
#[derive(Clone, Debug, Default)]
pub struct Trust {
    /// Moves on every change.
    pub seq: u64,
    pub source: TrustSource,
    /// Every trusted trust domain's roots (the server's `ALL`).
    pub domains: BTreeMap<TrustDomain, Vec<CertDer>>,
    /// `ROOTCA` as the server serves it (with `federation.merge_into_rootca`, federated roots
    /// too), PEM.
    pub rootca_pem: String,
    /// The CRLs the server puts into `ROOTCA` (a plug-in CA's), PEM.
    pub crl_pem: Option<String>,
}

impl Trust {
    /// The roots of `td`, if it is trusted.
    pub fn roots_of(&self, td: &TrustDomain) -> Option<&[CertDer]> {
        self.domains.get(td).map(Vec::as_slice)
    }

    /// Whether anything is known yet.
    pub fn is_empty(&self) -> bool {
        self.domains.is_empty() && self.rootca_pem.is_empty()
    }

    /// The same content (ignoring the sequence).
    pub fn same_content(&self, other: &Trust) -> bool {
        self.domains == other.domains
            && self.rootca_pem == other.rootca_pem
            && self.crl_pem == other.crl_pem
    }

    /// The CRLs as DER (the Workload API's `crl`).
    pub fn crls_der(&self) -> Vec<Vec<u8>> {
        use rustls_pki_types::{pem::PemObject, CertificateRevocationListDer};
        let Some(pem) = &self.crl_pem else {
            return Vec::new();
        };
        CertificateRevocationListDer::pem_slice_iter(pem.as_bytes())
            .filter_map(Result::ok)
            .map(|c| c.as_ref().to_vec())
            .collect()
    }
}

/// What the agent holds now.
#[derive(Clone, Default)]
pub struct View {
    pub svid: Option<Arc<Svid>>,
    pub trust: Arc<Trust>,
}

impl View {
    /// The agent's own trust domain: its SVID's.
    pub fn own_trust_domain(&self) -> Option<&TrustDomain> {
        self.svid.as_ref().map(|s| s.spiffe_id.trust_domain())
    }

    /// The own trust domain's roots.
    pub fn own_roots(&self) -> Option<&[CertDer]> {
        self.trust.roots_of(self.own_trust_domain()?)
    }
}

/// Concatenated DER of `certs` (the Workload API's bundle encoding).
pub fn concat_der(certs: &[CertDer]) -> Vec<u8> {
    certs.iter().flat_map(|c| c.iter().copied()).collect()
}

/// Whether `chain` (leaf first) verifies to one of `roots` at `now`, as a client certificate;
/// the fingerprint id of that root when it does.
pub fn verifies_to(chain: &[CertDer], roots: &[CertDer], now: OffsetDateTime) -> Option<String> {
    use rustls_pki_types::UnixTime;
    let (leaf, intermediates) = chain.split_first()?;
    let ee = webpki::EndEntityCert::try_from(leaf).ok()?;
    let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        now.unix_timestamp().max(0) as u64,
    ));
    roots.iter().find_map(|root| {
        let anchor = webpki::anchor_from_trusted_cert(root).ok()?;
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            intermediates,
            at,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .ok()
        .map(|_| cert::fingerprint_id(root))
    })
}
