//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's `leaderelection` does
//! it (`LeaderElector.tryAcquireOrRenew` with a `LeaseLock`): the holder renews the Lease every
//! retry period; a candidate takes it over only once it has seen the same record unchanged for
//! a whole lease duration, timed on its own clock (never trusting the holder's `renewTime`, so
//! clock skew between nodes cannot shorten a lease); every write names the `resourceVersion`
//! it read, so of two candidates one wins. A leader that cannot renew within the renew
//! deadline (shorter than the lease) stops leading before anyone else may start; one that
//! sees another holder stops at once. On shutdown the leader releases the Lease (client-go's
//! `ReleaseOnCancel`) so the next replica takes over without waiting out the lease.
//!
//! Every replica serves (SDS, the CSR API, EDS, the bundle endpoint); only the leader runs the
//! schedules ([`while_leading`]): automatic rotation, federation polling, the ConfigMap
//! publishers.

use std::{future::Future, path::PathBuf, time::Duration};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::api::{Api, ObjectMeta, PostParams};
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, time::Instant};

use crate::{clock::Clock, shutdown::stopping};

/// How long a candidate's try may take at most (its client's own deadline is shorter).
const CANDIDATE_TRY_LIMIT: Duration = Duration::from_secs(60);

/// The response deadline of the elector's client: every call ends by then, and a connection
/// that got no answer is closed.
pub fn client_deadline(cfg: &LeaderElectionConfig) -> Duration {
    cfg.lease_duration.max(Duration::from_secs(10))
}

/// `[leader_election]`: off by default (one replica leads itself); on for several replicas
/// sharing a Secret state.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaderElectionConfig {
    pub enabled: bool,
    /// The Lease's namespace and name.
    pub namespace: String,
    pub name: String,
    /// This replica's name in the Lease (default: the pod's hostname).
    pub identity: Option<String>,
    /// The kubeconfig (default: in-cluster, or `KUBECONFIG`).
    pub kubeconfig: Option<PathBuf>,
    /// How long a holder's record must stay unchanged before another replica takes over.
    #[serde(with = "crate::duration::serde")]
    pub lease_duration: Duration,
    /// A leader that could not renew for this long stops leading (shorter than the lease).
    #[serde(with = "crate::duration::serde")]
    pub renew_deadline: Duration,
    /// How often the leader renews and a candidate tries.
    #[serde(with = "crate::duration::serde")]
    pub retry_period: Duration,
}

impl Default for LeaderElectionConfig {
    /// client-go's and kube-controller-manager's defaults: 15 s / 10 s / 2 s.
    fn default() -> Self {
        Self {
            enabled: false,
            namespace: "istio-system".into(),
            name: "meshid-leader".into(),
            identity: None,
            kubeconfig: None,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

impl LeaderElectionConfig {
    /// Every problem, naming its key (client-go `NewLeaderElector`'s checks).
    pub fn validate(&self, errs: &mut Vec<String>) {
        if !self.enabled {
            return;
        }
        let key = |k: &str| format!("leader_election.{k}");
        if self.lease_duration <= self.renew_deadline {
            errs.push(format!(
                "{}: must be longer than renew_deadline, or two replicas could lead at once",
                key("lease_duration")
            ));
        }
        if self.renew_deadline <= self.retry_period.mul_f64(1.2) {
            errs.push(format!(
                "{}: must be longer than 1.2 × retry_period, or a leader steps down between two tries",
                key("renew_deadline")
            ));
        }
        if self.retry_period.is_zero() {
            errs.push(format!("{}: must be above 0", key("retry_period")));
        }
        if self.namespace.is_empty() || self.name.is_empty() {
            errs.push(format!(
                "{}/{}: name the Lease",
                key("namespace"),
                key("name")
            ));
        }
    }
}

/// Whether this replica leads now; `true` from the start when there is no election.
pub fn always_leading() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(true);
    // The receiver keeps the value after the sender goes.
    drop(tx);
    rx
}

/// The record last seen, and when (on this replica's clock) it was first seen.
struct Observed {
    spec: LeaseSpec,
    at: Instant,
}

/// One replica's candidacy.
pub struct Elector {
    api: Api<Lease>,
    cfg: LeaderElectionConfig,
    identity: String,
    clock: std::sync::Arc<dyn Clock>,
    observed: Option<Observed>,
}

/// Why one try failed (logged; the elector tries again).
#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    #[error("Lease {lease}: {source}")]
    Api {
        lease: String,
        #[source]
        source: kube::Error,
    },
}

impl Elector {
    pub fn new(
        client: kube::Client,
        cfg: LeaderElectionConfig,
        identity: String,
        clock: std::sync::Arc<dyn Clock>,
    ) -> Self {
        Self {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
            identity,
            clock,
            observed: None,
        }
    }

    fn lease_name(&self) -> String {
        format!("{}/{}", self.cfg.namespace, self.cfg.name)
    }

    fn api_error(&self, source: kube::Error) -> ElectionError {
        ElectionError::Api {
            lease: self.lease_name(),
            source,
        }
    }

    fn now(&self) -> MicroTime {
        let now = self.clock.now();
        let nanos = now.unix_timestamp_nanos();
        MicroTime(
            k8s_openapi::jiff::Timestamp::from_nanosecond(nanos - nanos % 1000)
                .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        )
    }

    fn our_spec(&self, old: Option<&LeaseSpec>) -> LeaseSpec {
        let ours = old.is_some_and(|o| o.holder_identity.as_deref() == Some(&self.identity));
        let now = self.now();
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.cfg.lease_duration.as_secs().max(1) as i32),
            acquire_time: match old {
                Some(o) if ours => o.acquire_time.clone(),
                _ => Some(now.clone()),
            },
            renew_time: Some(now),
            lease_transitions: Some(match old {
                Some(o) if ours => o.lease_transitions.unwrap_or(0),
                Some(o) => o.lease_transitions.unwrap_or(0) + 1,
                None => 0,
            }),
            ..Default::default()
        }
    }

    /// client-go `tryAcquireOrRenew`: whether this replica holds the Lease after the try.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, ElectionError> {
        let current = self
            .api
            .get_opt(&self.cfg.name)
            .await
            .map_err(|e| self.api_error(e))?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(self.our_spec(None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(l) => {
                    self.observe(l.spec.unwrap_or_default());
                    Ok(true)
                }
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(self.api_error(e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        self.observe(spec.clone());
        let holder = spec.holder_identity.as_deref().unwrap_or("");
        let ours = holder == self.identity;
        let expired = self.observed.as_ref().is_some_and(|o| {
            let lease = spec
                .lease_duration_seconds
                .map_or(self.cfg.lease_duration, |s| {
                    Duration::from_secs(s.max(0) as u64)
                });
            o.at + lease <= Instant::now()
        });
        if !holder.is_empty() && !ours && !expired {
            return Ok(false);
        }
        lease.spec = Some(self.our_spec(Some(&spec)));
        // The write names the resourceVersion read: a concurrent candidate's write wins or ours.
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(l) => {
                self.observe(l.spec.unwrap_or_default());
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(self.api_error(e)),
        }
    }

    /// Remembers `spec` and, when it differs from the last one seen, when it was first seen.
    fn observe(&mut self, spec: LeaseSpec) {
        if self.observed.as_ref().is_some_and(|o| o.spec == spec) {
            return;
        }
        self.observed = Some(Observed {
            spec,
            at: Instant::now(),
        });
    }

    /// client-go `release`: an empty holder and a one-second lease, so another replica takes
    /// over at once. Only if we still hold it.
    async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.cfg.name).await else {
            return;
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return;
        }
        lease.spec = Some(LeaseSpec {
            holder_identity: None,
            lease_duration_seconds: Some(1),
            acquire_time: None,
            renew_time: Some(self.now()),
            lease_transitions: spec.lease_transitions,
            ..Default::default()
        });
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.lease_name(), "released the leader Lease"),
            Err(e) => {
                tracing::warn!(lease = %self.lease_name(), error = %e, "could not release the leader Lease; another replica takes over when it expires")
            }
        }
    }

    /// Campaigns until `stop`, publishing whether this replica leads on `leading`.
    pub async fn run(mut self, leading: watch::Sender<bool>, mut stop: watch::Receiver<bool>) {
        let mut last_renewed: Option<Instant> = None;
        loop {
            // A leader's renewal never outlives its renew deadline (client-go bounds `renew`
            // with the same deadline): an API server that hangs is an API server that failed.
            // A candidate's try is bounded by its client's own deadline only, as client-go's
            // `acquire` is: cutting it shorter could starve a slow API server of any try that
            // completes (a restart, a loaded control plane).
            let budget = match last_renewed {
                Some(t) => self
                    .cfg
                    .renew_deadline
                    .saturating_sub(t.elapsed())
                    .max(Duration::from_millis(50)),
                None => CANDIDATE_TRY_LIMIT,
            };
            let tried = tokio::time::timeout(budget, self.try_acquire_or_renew()).await;
            let now_leading = match tried {
                Ok(Ok(true)) => {
                    last_renewed = Some(Instant::now());
                    true
                }
                Ok(Ok(false)) => {
                    last_renewed = None;
                    false
                }
                failed => {
                    match failed {
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "leader election: Lease not read or written")
                        }
                        _ => {
                            tracing::warn!(lease = %self.lease_name(), after = ?budget, "leader election: the API server did not answer")
                        }
                    }
                    // A leader keeps leading until the renew deadline passes without a renewal;
                    // then it is a candidate again, whose tries are not cut at that deadline.
                    let still = last_renewed.is_some_and(|t| t.elapsed() < self.cfg.renew_deadline);
                    if !still {
                        last_renewed = None;
                    }
                    still
                }
            };
            if *leading.borrow() != now_leading {
                if now_leading {
                    tracing::info!(lease = %self.lease_name(), identity = %self.identity, "this replica leads: it runs the schedules");
                } else {
                    tracing::warn!(lease = %self.lease_name(), identity = %self.identity, holder = ?self.observed.as_ref().and_then(|o| o.spec.holder_identity.clone()), "this replica no longer leads: its schedules stop");
                }
                leading.send_replace(now_leading);
            }
            tokio::select! {
                () = tokio::time::sleep(self.cfg.retry_period) => {}
                () = stopping(&mut stop) => break,
            }
        }
        if *leading.borrow() {
            leading.send_replace(false);
            self.release().await;
        }
    }
}

/// Runs the task `make` builds while this replica leads: started when leadership is gained,
/// told to stop (and awaited) when it is lost or the server stops, started afresh on the next
/// gain.
pub async fn while_leading<F, Fut>(
    mut leading: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
    mut make: F,
) where
    F: FnMut(watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        tokio::select! {
            r = leading.wait_for(|l| *l) => if r.is_err() { return },
            () = stopping(&mut stop) => return,
        }
        let (task_stop, task_stop_rx) = watch::channel(false);
        let mut task = tokio::spawn(make(task_stop_rx));
        let (mut finished, mut settled) = (false, false);
        let lost = loop {
            tokio::select! {
                // Err: nobody can change leadership any more (no election): lead until stop.
                r = leading.wait_for(|l| !*l), if !settled => match r {
                    Ok(_) => break true,
                    Err(_) => settled = true,
                },
                () = stopping(&mut stop) => break false,
                _ = &mut task, if !finished => finished = true,
            }
        };
        let _ = task_stop.send(true);
        if !finished {
            let _ = task.await;
        }
        if !lost {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_durations_must_keep_one_leader() {
        let mut errs = Vec::new();
        LeaderElectionConfig {
            enabled: true,
            lease_duration: Duration::from_secs(10),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(9),
            ..Default::default()
        }
        .validate(&mut errs);
        assert_eq!(errs.len(), 2, "{errs:?}");
        let mut errs = Vec::new();
        LeaderElectionConfig {
            enabled: true,
            ..Default::default()
        }
        .validate(&mut errs);
        assert!(errs.is_empty(), "{errs:?}");
    }

    /// A task runs only while leading, restarts on the next gain, and stops with the server.
    #[tokio::test]
    async fn a_task_runs_only_while_leading() {
        let (lead, leading) = watch::channel(false);
        let (stop, stop_rx) = watch::channel(false);
        let (runs, mut started) = tokio::sync::mpsc::unbounded_channel();
        let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
        let sup = tokio::spawn(while_leading(leading, stop_rx, move |mut s| {
            let (runs, ended) = (runs.clone(), ended_tx.clone());
            async move {
                runs.send(()).unwrap();
                stopping(&mut s).await;
                ended.send(()).unwrap();
            }
        }));
        tokio::task::yield_now().await;
        assert!(started.try_recv().is_err(), "not started before leading");
        lead.send_replace(true);
        started.recv().await.unwrap();
        lead.send_replace(false);
        ended.recv().await.unwrap();
        lead.send_replace(true);
        started.recv().await.unwrap();
        stop.send_replace(true);
        ended.recv().await.unwrap();
        sup.await.unwrap();
    }

    /// Without an election the task runs until the server stops.
    #[tokio::test]
    async fn without_an_election_a_task_runs_until_stop() {
        let (stop, stop_rx) = watch::channel(false);
        let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
        let sup = tokio::spawn(while_leading(always_leading(), stop_rx, move |mut s| {
            let ended = ended_tx.clone();
            async move {
                stopping(&mut s).await;
                ended.send(()).unwrap();
            }
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(ended.try_recv().is_err(), "still running");
        stop.send_replace(true);
        ended.recv().await.unwrap();
        sup.await.unwrap();
    }
}
