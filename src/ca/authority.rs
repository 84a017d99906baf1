//! The authority: signs leaves for authenticated identities, template → sign → validate.

use std::{sync::Arc, time::Duration};

use rcgen::{Issuer, PublicKeyData, SignatureAlgorithm, SigningKey};
use time::OffsetDateTime;

use super::{
    cert::{self, CertDer, Serial},
    chain,
    csr::{SanCheck, VerifiedCsr},
    error::CaError,
    issuer_name::{self, DeferredKey},
    key::PrivateKey,
    key_type::KeyType,
    policy::IssuancePolicy,
    profile,
    validate::{LeafExpectation, LeafValidator},
};
use crate::{
    clock::Clock,
    spiffe::{SpiffeId, TrustDomain},
};

/// The key and certificates an authority signs with.
#[derive(Debug)]
pub struct SigningMaterial {
    /// The certificate whose key signs leaves (the root itself, or an intermediate).
    pub signer_cert: CertDer,
    pub signer_key: PrivateKey,
    /// Certificates between the signer and its root, signer's issuer first; never a root.
    pub intermediates: Vec<CertDer>,
    /// Every trusted root of the trust domain; one of them anchors the signer.
    pub roots: Vec<CertDer>,
}

/// A certificate the authority issued, with what a peer needs to verify it.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    pub id: SpiffeId,
    pub serial: Serial,
    pub leaf: CertDer,
    /// Signer (unless it is the root) then intermediates, never a root.
    pub chain: Arc<[CertDer]>,
    /// The trust bundle: every trusted root of the trust domain.
    pub roots: Arc<[CertDer]>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl IssuedCert {
    /// Leaf then chain, PEM (the `cert-chain.pem` / SDS `certificate_chain` form).
    pub fn chain_pem(&self) -> String {
        cert::to_pem_bundle(std::iter::once(&self.leaf).chain(self.chain.iter()))
    }

    /// The roots, PEM.
    pub fn roots_pem(&self) -> String {
        cert::to_pem_bundle(self.roots.iter())
    }
}

/// Issues X.509-SVIDs in one trust domain.
pub struct Authority {
    td: TrustDomain,
    /// rcgen's view of the signer: placeholder name, deferred signature (see `issuer_name`).
    issuer: Issuer<'static, DeferredKey>,
    /// The signer's subject exactly as its certificate encodes it: every leaf's issuer.
    issuer_raw: Vec<u8>,
    chain: Arc<[CertDer]>,
    roots: Arc<[CertDer]>,
    chain_not_after: OffsetDateTime,
    validator: LeafValidator,
    policy: IssuancePolicy,
    clock: Arc<dyn Clock>,
}

// === impl Authority ===

impl Authority {
    /// Builds an authority after checking the material: the signer is a CA, the key matches
    /// it, and the chain verifies to one of the roots now.
    pub fn new(
        td: TrustDomain,
        material: SigningMaterial,
        policy: IssuancePolicy,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, CaError> {
        policy.validate().map_err(CaError::PolicyInvalid)?;
        let SigningMaterial {
            signer_cert,
            signer_key,
            intermediates,
            roots,
        } = material;
        let signer = cert::parse(&signer_cert, "signing certificate")?;
        if let Some(why) = cert::signing_cert_problem(&signer) {
            return Err(CaError::SignerNotCa(why));
        }
        if signer.public_key().subject_public_key.data.as_ref() != signer_key.public_key_raw() {
            return Err(CaError::SignerKeyMismatch);
        }
        let mut path = vec![signer_cert.clone()];
        path.extend(intermediates.iter().cloned());
        chain::verify_ca_chain(&path, &roots, clock.now()).map_err(CaError::SignerChainInvalid)?;
        let chain_not_after = chain_not_after(&path, &roots)?;
        let signer_is_root = roots.iter().any(|r| r.as_ref() == signer_cert.as_ref());
        let validator = LeafValidator::new(td.clone(), &signer);
        let issuer_raw = signer.subject().as_raw().to_vec();
        let issuer = issuer_name::issuer_for(&signer, signer_key);
        let chain: Vec<CertDer> = if signer_is_root { Vec::new() } else { path };
        Ok(Self {
            td,
            issuer,
            issuer_raw,
            chain: chain.into(),
            roots: roots.into(),
            chain_not_after,
            validator,
            policy,
            clock,
        })
    }

    /// The trust domain this authority issues in.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    /// Every trusted root of the trust domain.
    pub fn roots(&self) -> &Arc<[CertDer]> {
        &self.roots
    }

    /// The issuance policy in force.
    pub fn policy(&self) -> &IssuancePolicy {
        &self.policy
    }

    /// The latest notAfter any leaf can have: the earliest notAfter along the signing chain.
    pub fn chain_not_after(&self) -> OffsetDateTime {
        self.chain_not_after
    }

    /// Signs a CSR for the authenticated `id`. The CSR contributes only its public key.
    pub fn sign_csr(
        &self,
        csr: &[u8],
        id: &SpiffeId,
        ttl: Option<Duration>,
    ) -> Result<IssuedCert, CaError> {
        self.sign_csr_with(csr, id, ttl, SanCheck::MatchIdentity)
    }

    /// As [`sign_csr`](Self::sign_csr), holding the CSR's SANs to `sans`: the certificate names
    /// `id` alone either way.
    pub fn sign_csr_with(
        &self,
        csr: &[u8],
        id: &SpiffeId,
        ttl: Option<Duration>,
        sans: SanCheck,
    ) -> Result<IssuedCert, CaError> {
        self.check_identity(id)?;
        let ttl = self.policy.ttl_for(ttl)?;
        let csr = VerifiedCsr::verify_with(csr, id, sans)?;
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(csr.spki_der()).map_err(|e| {
            CaError::CsrKeyUnsupported {
                algorithm: e.to_string(),
            }
        })?;
        self.issue(
            id,
            &[],
            &public_key,
            csr.public_key_raw(),
            csr.is_rsa(),
            ttl,
        )
    }

    /// Generates a fresh ECDSA P-256 key and a certificate for it (for SDS clients that send
    /// no CSR).
    pub fn issue_with_new_key(
        &self,
        id: &SpiffeId,
        ttl: Option<Duration>,
    ) -> Result<(IssuedCert, PrivateKey), CaError> {
        self.check_identity(id)?;
        let ttl = self.policy.ttl_for(ttl)?;
        let key = PrivateKey::generate(KeyType::EcdsaP256)?;
        let issued = self.issue(id, &[], &key, key.public_key_raw(), false, ttl)?;
        Ok((issued, key))
    }

    /// A serving certificate for meshid itself: its SPIFFE ID, then the DNS names clients dial.
    pub fn issue_server_cert(
        &self,
        id: &SpiffeId,
        dns_names: &[String],
        ttl: Option<Duration>,
    ) -> Result<(IssuedCert, PrivateKey), CaError> {
        self.check_identity(id)?;
        let ttl = self.policy.ttl_for(ttl)?;
        let key = PrivateKey::generate(KeyType::EcdsaP256)?;
        let issued = self.issue(id, dns_names, &key, key.public_key_raw(), false, ttl)?;
        Ok((issued, key))
    }

    /// Issues a throwaway leaf and verifies it with webpki against the roots: proof, before
    /// the authority is put to work, that what it signs is accepted by a TLS stack.
    pub fn self_test(&self) -> Result<(), CaError> {
        let id = SpiffeId::parse(&format!("{}/meshid/self-test", self.td.id_string()))
            .expect("a valid trust domain with a fixed valid path is a valid SPIFFE ID");
        let (issued, _key) = self.issue_with_new_key(&id, None)?;
        chain::verify_leaf(&issued.leaf, &issued.chain, &issued.roots, self.clock.now())
            .map_err(CaError::SelfTestFailed)
    }

    fn check_identity(&self, id: &SpiffeId) -> Result<(), CaError> {
        if id.trust_domain() != &self.td {
            return Err(CaError::IdentityOutsideTrustDomain {
                id: id.clone(),
                trust_domain: self.td.to_string(),
            });
        }
        if id.is_trust_domain_id() {
            // A workload must never carry the trust domain's own ID, which marks signing certs.
            return Err(CaError::IdentityOutsideTrustDomain {
                id: id.clone(),
                trust_domain: format!("{} (a workload ID needs a path)", self.td),
            });
        }
        Ok(())
    }

    fn issue(
        &self,
        id: &SpiffeId,
        dns_names: &[String],
        public_key: &impl PublicKeyData,
        public_key_raw: &[u8],
        rsa_key: bool,
        ttl: Duration,
    ) -> Result<IssuedCert, CaError> {
        let now = self
            .clock
            .now()
            .replace_nanosecond(0)
            .expect("0 is a valid nanosecond");
        if now >= self.chain_not_after {
            return Err(CaError::SignerExpired {
                not_after: self.chain_not_after.to_string(),
            });
        }
        let not_before = now - self.policy.backdate;
        let not_after = (now + ttl).min(self.chain_not_after);
        let serial = Serial::random()?;
        let params = profile::leaf(id, dns_names, &serial, not_before, not_after, rsa_key)?;
        let unsigned = params
            .signed_by(public_key, &self.issuer)
            .map_err(|e| CaError::Crypto(format!("signing failed: {e}")))?;
        let leaf = issuer_name::finish(unsigned.der(), &self.issuer_raw, &self.issuer.key().0)?;
        let expectation = LeafExpectation {
            id,
            dns_names,
            serial: &serial,
            public_key_raw,
            rsa_key,
            not_before,
            not_after_max: self.chain_not_after,
        };
        self.validator.validate(&leaf, &expectation)?;
        Ok(IssuedCert {
            id: id.clone(),
            serial,
            leaf,
            chain: self.chain.clone(),
            roots: self.roots.clone(),
            not_before,
            not_after,
        })
    }
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.td)
            .field("chain_len", &self.chain.len())
            .field("roots", &self.roots.len())
            .field("chain_not_after", &self.chain_not_after)
            .finish_non_exhaustive()
    }
}

/// The earliest notAfter along the path and the root that anchors it (found by signature:
/// two roots may share a subject, and the one that did not sign must not cap the chain).
fn chain_not_after(path: &[CertDer], roots: &[CertDer]) -> Result<OffsetDateTime, CaError> {
    let mut min = OffsetDateTime::new_utc(time::Date::MAX, time::Time::MIDNIGHT);
    for c in path {
        let p = cert::parse(c, "chain")?;
        min = min.min(p.validity().not_after.to_datetime());
    }
    if let Some(i) = path
        .last()
        .and_then(|last| chain::anchor_index(last, roots))
    {
        let p = cert::parse(&roots[i], "root")?;
        min = min.min(p.validity().not_after.to_datetime());
    }
    Ok(min)
}

// === impl rcgen traits for PrivateKey ===

impl PublicKeyData for PrivateKey {
    fn der_bytes(&self) -> &[u8] {
        self.signer().der_bytes()
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.signer().algorithm()
    }
}

impl SigningKey for PrivateKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.signer().sign(msg)
    }
}
