//! The agent's own credential, renewed through the same `rotation::Renewer` as every credential
//! the server holds: a new key each time; on a server outage the current certificate stays in
//! service and the renewal is retried with backoff; a bundle that no longer trusts the chain
//! makes it due at once.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::watch;

use super::{
    upstream::Upstream,
    view::{verifies_to, Svid, TrustSource, View},
    AgentMetrics,
};
use crate::{
    ca::cert,
    rotation::{RenewPolicy, Renewer, SignerView},
    shutdown::stopping,
    state::write_file_atomic,
};

/// What the renewal loop needs.
pub struct SvidKeeper {
    pub upstream: Arc<Upstream>,
    pub view: Arc<watch::Sender<View>>,
    pub policy: RenewPolicy,
    pub ttl: Option<Duration>,
    /// Where to write `cert-chain.pem`, `key.pem` (0600) and `root-cert.pem` after each
    /// renewal, if asked (istio-agent's `OUTPUT_CERTS`).
    pub out_dir: Option<PathBuf>,
    pub metrics: Arc<AgentMetrics>,
}

impl SvidKeeper {
    /// Keeps an SVID until `stop` fires.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let clock = self.upstream.clock.clone();
        let mut renewer: Renewer<Arc<Svid>> = Renewer::new(self.policy, clock.clone());
        let mut changes = self.view.subscribe();
        let mut trust_seq = changes.borrow_and_update().trust.seq;
        loop {
            if renewer.current().is_none() || renewer.is_due() {
                self.renew(&mut renewer).await;
            }
            let wake = renewer.wake();
            tokio::select! {
                _ = stopping(&mut stop) => return,
                _ = wake => {}
                r = changes.changed() => {
                    if r.is_err() {
                        return;
                    }
                    let v = changes.borrow_and_update().clone();
                    if v.trust.seq != trust_seq {
                        trust_seq = v.trust.seq;
                        self.observe_trust(&mut renewer, &v);
                    }
                }
            }
        }
    }

    /// A chain the new bundle no longer trusts (its root removed) is replaced at once.
    fn observe_trust(&self, renewer: &mut Renewer<Arc<Svid>>, v: &View) {
        let (Some(held), Some(roots)) = (renewer.current().cloned(), v.own_roots()) else {
            return;
        };
        let now = self.upstream.clock.now();
        let trusted = verifies_to(&held.chain, roots, now).is_some();
        let untrusted = |_: &str| !trusted;
        if renewer.observe(&SignerView {
            current: &held.anchor,
            is_tainted: &untrusted,
        }) {
            tracing::info!(id = %held.spiffe_id, "the trust bundle no longer trusts the held certificate; renewing now");
        }
    }

    async fn renew(&self, renewer: &mut Renewer<Arc<Svid>>) {
        let current = self.view.borrow().clone();
        let result = self.upstream.issue(&current, self.ttl).await;
        let mut roots = None;
        let outcome = renewer.renew(|| {
            result.map(|(issued, r)| {
                roots = Some(r);
                issued
            })
        });
        match outcome {
            Ok(()) => {
                let Some(svid) = renewer.current().cloned() else {
                    return;
                };
                self.metrics
                    .renewals
                    .get_or_create(&crate::telemetry::Metrics::label("result", "ok"))
                    .inc();
                self.metrics
                    .svid_expiry
                    .set(svid.not_after.unix_timestamp());
                tracing::info!(id = %svid.spiffe_id, serial = %svid.serial, not_after = %crate::clock::rfc3339(svid.not_after), "certificate received (key made here)");
                self.publish(svid, roots.unwrap_or_default());
            }
            Err(e) => {
                self.metrics
                    .renewals
                    .get_or_create(&crate::telemetry::Metrics::label("result", "error"))
                    .inc();
                let keeping = renewer
                    .current()
                    .map(|s| {
                        format!(
                            "keeping {} until {}",
                            s.serial,
                            crate::clock::rfc3339(s.not_after)
                        )
                    })
                    .unwrap_or_else(|| "no certificate yet".into());
                tracing::warn!(error = %e, failures = renewer.failures(), retry_at = ?renewer.next_wake().map(crate::clock::rfc3339), %keeping, "certificate renewal failed; retrying with backoff");
            }
        }
    }

    /// Hands a new SVID to every local stream (and to `out_dir`). Until the server's SDS stream
    /// has answered, the roots that came with the certificate stand for the trust bundle.
    fn publish(&self, svid: Arc<Svid>, roots: Vec<crate::ca::CertDer>) {
        self.view.send_modify(|v| {
            if v.trust.source != TrustSource::Sds && !roots.is_empty() {
                let mut t = (*v.trust).clone();
                t.domains
                    .insert(svid.spiffe_id.trust_domain().clone(), roots.clone());
                t.rootca_pem = cert::to_pem_bundle(&roots);
                t.source = TrustSource::CsrResponse;
                t.seq += 1;
                v.trust = Arc::new(t);
            }
            v.svid = Some(svid.clone());
        });
        if let Some(dir) = &self.out_dir {
            if let Err(e) = write_out(dir, &svid, &self.view.borrow()) {
                tracing::error!(dir = %dir.display(), error = %e, "could not write the certificate files");
            }
        }
    }
}

/// Writes the files istio-agent writes with `OUTPUT_CERTS`: each atomically, the key 0600.
fn write_out(dir: &std::path::Path, svid: &Svid, v: &View) -> Result<(), crate::state::StateError> {
    std::fs::create_dir_all(dir).map_err(|error| crate::state::StateError::Io {
        op: "creating",
        path: dir.to_owned(),
        error,
    })?;
    write_file_atomic(
        &dir.join("key.pem"),
        svid.key.secret_pkcs8_pem().as_bytes(),
        0o600,
    )?;
    write_file_atomic(
        &dir.join("cert-chain.pem"),
        svid.chain_pem().as_bytes(),
        0o644,
    )?;
    let roots = v.own_roots().map(cert::to_pem_bundle).unwrap_or_default();
    write_file_atomic(&dir.join("root-cert.pem"), roots.as_bytes(), 0o644)
}
