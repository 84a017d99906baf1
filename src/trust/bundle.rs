use std::collections::BTreeMap;

use crate::{
    ca::{cert, CertDer},
    spiffe::TrustDomain,
};

/// Roots per trust domain: our own (from the CA state) and every federated one (its last good
/// bundle, also from the CA state).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustBundleSet {
    own: TrustDomain,
    domains: BTreeMap<TrustDomain, Vec<CertDer>>,
    /// Bumped on every change (SPIFFE bundle `spiffe_sequence`).
    sequence: u64,
    /// Our roots as PEM, encoded once: every CSR response and ROOTCA push carries it.
    own_pem: String,
    /// Our plug-in CA's CRLs (`ca-crl.pem`), PEM, when it has any.
    own_crl: Option<String>,
}

impl TrustBundleSet {
    /// A set holding only our own trust domain's roots.
    pub fn own(td: TrustDomain, roots: Vec<CertDer>, sequence: u64) -> Self {
        let mut domains = BTreeMap::new();
        domains.insert(td.clone(), roots);
        let own_pem = cert::to_pem_bundle(domains.get(&td).into_iter().flatten());
        Self {
            own: td,
            domains,
            sequence,
            own_pem,
            own_crl: None,
        }
    }

    /// This set, with our CA's CRLs (PEM; empty or `None` for none).
    pub fn with_own_crl(mut self, crl: Option<String>) -> Self {
        self.own_crl = crl.filter(|c| !c.trim().is_empty());
        self
    }

    /// Our CA's CRLs, PEM, when it has any.
    pub fn own_crl_pem(&self) -> Option<&str> {
        self.own_crl.as_deref()
    }

    /// This set, also trusting `td` with `roots` (a federated trust domain); `td` may be our
    /// own, replacing our roots.
    pub fn with_trust_domain(mut self, td: TrustDomain, roots: Vec<CertDer>) -> Self {
        if td == self.own {
            self.own_pem = cert::to_pem_bundle(&roots);
        }
        self.domains.insert(td, roots);
        self
    }

    /// Our trust domain.
    pub fn own_trust_domain(&self) -> &TrustDomain {
        &self.own
    }

    /// Our own roots.
    pub fn own_roots(&self) -> &[CertDer] {
        self.domains
            .get(&self.own)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Our own roots, PEM.
    pub fn own_roots_pem(&self) -> &str {
        &self.own_pem
    }

    /// The roots of `td`, if it is trusted.
    pub fn roots_of(&self, td: &TrustDomain) -> Option<&[CertDer]> {
        self.domains.get(td).map(Vec::as_slice)
    }

    /// Every trusted trust domain with its roots, ours included.
    pub fn iter(&self) -> impl Iterator<Item = (&TrustDomain, &[CertDer])> {
        self.domains.iter().map(|(td, r)| (td, r.as_slice()))
    }

    /// The change counter.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// PEM of `td`'s roots.
    pub fn pem_of(&self, td: &TrustDomain) -> Option<String> {
        self.roots_of(td).map(cert::to_pem_bundle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(td: &TrustDomain) -> CertDer {
        let now = time::OffsetDateTime::now_utc();
        crate::ca::root::generate_root(
            td,
            crate::ca::KeyType::EcdsaP256,
            crate::ca::root::DEFAULT_ROOT_TTL,
            now,
        )
        .unwrap()
        .cert
    }

    #[test]
    fn another_trust_domain_is_added_and_ours_can_be_replaced() {
        let own = TrustDomain::new("cluster.local").unwrap();
        let other = TrustDomain::new("other.example").unwrap();
        let (a, b, c) = (root(&own), root(&other), root(&own));
        let set = TrustBundleSet::own(own.clone(), vec![a.clone()], 7)
            .with_trust_domain(other.clone(), vec![b.clone()]);
        let tds: Vec<&TrustDomain> = set.iter().map(|(td, _)| td).collect();
        assert_eq!(tds, [&own, &other]);
        assert_eq!(set.roots_of(&other), Some(&[b][..]));
        assert_eq!(set.own_roots_pem(), cert::to_pem(&a));
        let set = set.with_trust_domain(own, vec![c.clone()]);
        assert_eq!(set.own_roots(), &[c.clone()][..]);
        assert_eq!(
            set.own_roots_pem(),
            cert::to_pem(&c),
            "our PEM follows our roots"
        );
        assert_eq!(set.sequence(), 7);
    }
}
