//! One credential's lifecycle, on the injected clock: issue, schedule the refresh, retry with
//! backoff, and re-issue when the signer changes (spread over a window) or is tainted (at once).
//!
//! Every credential meshid hands out or holds — its own serving certificate, each SDS `default`,
//! later the node agent's — is owned by one `Renewer`, so they all follow the same rules:
//! - the refresh is scheduled from the *issue time*, at `ratio ± jitter` of the remaining
//!   lifetime (never from the backdated notBefore, which near the end of a chain or with a short
//!   TTL put the refresh in the past and made a stream re-issue in a tight loop);
//! - a refresh time is never in the past and never sooner than `retry_min` from now;
//! - a failed issuance is retried with exponential backoff and jitter (`retry_min` doubling up to
//!   `retry_max`), never in a tight loop, whatever the failure;
//! - a signer change moves the refresh to a random point within `signer_change_spread`, so ten
//!   thousand streams do not re-key in the same instant; a tainted signer re-keys at once.

use std::{sync::Arc, time::Duration};

use time::OffsetDateTime;
use tokio::sync::watch;

use super::RefreshPolicy;
use crate::{clock::Clock, trust::CaSnapshot};

/// How far before its issue time a credential's notBefore lies (the CA backdates every leaf
/// and serving certificate by a minute for clock skew).
const NOT_BEFORE_BACKDATE: time::Duration = time::Duration::seconds(60);

/// A credential as issued: the value, who signed it, and until when it is valid.
pub struct Issued<T> {
    pub value: T,
    /// Fingerprint id of the certificate that signed it.
    pub signer_id: String,
    pub not_after: OffsetDateTime,
}

/// The credential a renewer holds, with its schedule.
pub struct Held<T> {
    pub value: T,
    pub signer_id: String,
    pub issued_at: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub refresh_at: OffsetDateTime,
}

/// What a `Renewer` needs to know about the signing side at one moment.
pub struct SignerView<'a> {
    /// The signer new credentials come from.
    pub current: &'a str,
    /// Whether a signer is tainted: credentials it signed are replaced at once.
    pub is_tainted: &'a dyn Fn(&str) -> bool,
}

/// The schedule rules of every renewer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RenewPolicy {
    pub refresh: RefreshPolicy,
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub signer_change_spread: Duration,
}

impl Default for RenewPolicy {
    fn default() -> Self {
        let r = RefreshPolicy::default();
        Self {
            refresh: r,
            retry_min: r.retry_min,
            retry_max: r.retry_max,
            signer_change_spread: r.signer_change_spread,
        }
    }
}

impl From<RefreshPolicy> for RenewPolicy {
    fn from(r: RefreshPolicy) -> Self {
        Self {
            refresh: r,
            retry_min: r.retry_min,
            retry_max: r.retry_max,
            signer_change_spread: r.signer_change_spread,
        }
    }
}

/// One credential's cycle.
pub struct Renewer<T> {
    policy: RenewPolicy,
    clock: Arc<dyn Clock>,
    held: Option<Held<T>>,
    /// Set after a failure: when to try again.
    retry_at: Option<OffsetDateTime>,
    failures: u32,
    issued: u64,
}

pub(crate) use crate::backoff::unit_random;

impl<T> Renewer<T> {
    pub fn new(policy: impl Into<RenewPolicy>, clock: Arc<dyn Clock>) -> Self {
        Self {
            policy: policy.into(),
            clock,
            held: None,
            retry_at: None,
            failures: 0,
            issued: 0,
        }
    }

    /// The clock the renewer runs on.
    pub fn clock(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }

    /// The credential held now, if any.
    pub fn current(&self) -> Option<&T> {
        self.held.as_ref().map(|h| &h.value)
    }

    /// The credential with its schedule.
    pub fn held(&self) -> Option<&Held<T>> {
        self.held.as_ref()
    }

    /// How many credentials this renewer has issued.
    pub fn issued_count(&self) -> u64 {
        self.issued
    }

    /// Consecutive failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// When the renewer next wants to act: the retry after a failure, else the refresh; now,
    /// when the clock went back to before the held credential's notBefore (issued minus the
    /// CA's 60 s backdate): a credential that is not valid yet is replaced at once.
    pub fn next_wake(&self) -> Option<OffsetDateTime> {
        let now = self.clock.now();
        if let Some(h) = &self.held {
            if now < h.issued_at - NOT_BEFORE_BACKDATE {
                return Some(now);
            }
        }
        match (self.retry_at, &self.held) {
            (Some(r), _) => Some(r),
            (None, Some(h)) => Some(h.refresh_at),
            (None, None) => None,
        }
    }

    /// Completes when the renewer wants to act: at its next wake, or as soon as the clock is
    /// set back to before the held credential's notBefore (which makes it due, see
    /// [`next_wake`](Self::next_wake)). Every renewal loop waits on this.
    pub fn wake(&self) -> crate::clock::Sleep {
        let planned = match self.next_wake() {
            Some(t) => self.clock.sleep_until(t),
            None => Box::pin(std::future::pending()),
        };
        let back = match &self.held {
            Some(h) => self
                .clock
                .set_back(h.issued_at - NOT_BEFORE_BACKDATE + crate::clock::CLOCK_BACK),
            None => Box::pin(std::future::pending()),
        };
        Box::pin(async move {
            tokio::select! {
                () = planned => {}
                () = back => {}
            }
        })
    }

    /// Whether the credential should be (re)issued now.
    pub fn is_due(&self) -> bool {
        match self.next_wake() {
            Some(t) => self.clock.now() >= t,
            None => self.held.is_none(),
        }
    }

    /// Takes note of the signing side. A tainted signer of the held credential makes it due at
    /// once; a new signer makes it due at a random point of the spread window (or sooner if
    /// already scheduled sooner). Returns whether it is due now.
    pub fn observe(&mut self, signer: &SignerView<'_>) -> bool {
        let now = self.clock.now();
        if let Some(h) = &mut self.held {
            if (signer.is_tainted)(&h.signer_id) {
                h.refresh_at = now;
            } else if h.signer_id != signer.current {
                let spread = self.policy.signer_change_spread.mul_f64(unit_random());
                h.refresh_at = h.refresh_at.min(now + spread);
            }
        }
        self.is_due()
    }

    /// Issues through `issue`. On success the credential is replaced and its refresh scheduled
    /// from now; on failure the previous credential (if any) stays and a retry is scheduled with
    /// backoff. The error is returned either way so the caller can log or surface it.
    pub fn renew<E>(&mut self, issue: impl FnOnce() -> Result<Issued<T>, E>) -> Result<(), E> {
        let now = self.clock.now();
        match issue() {
            Ok(i) if i.not_after > now => {
                let refresh_at = self.refresh_at(now, i.not_after);
                self.held = Some(Held {
                    value: i.value,
                    signer_id: i.signer_id,
                    issued_at: now,
                    not_after: i.not_after,
                    refresh_at,
                });
                self.retry_at = None;
                self.failures = 0;
                self.issued += 1;
                Ok(())
            }
            Ok(i) => {
                // An issuer that hands out an already-expired credential has failed; keep the
                // old one and back off rather than loop on it.
                tracing::warn!(not_after = %i.not_after, "issued credential is already expired; backing off");
                self.fail(now);
                Ok(())
            }
            Err(e) => {
                self.fail(now);
                Err(e)
            }
        }
    }

    /// Schedules a retry after a failure that happened outside `renew` (e.g. the caller's
    /// credentials could not be re-checked because the identity backend was unavailable).
    pub fn backoff(&mut self) {
        let now = self.clock.now();
        self.fail(now);
    }

    fn fail(&mut self, now: OffsetDateTime) {
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Some(now + self.backoff_delay(self.failures));
    }

    /// The one backoff schedule (`crate::backoff`) from `retry_min` to `retry_max`.
    fn backoff_delay(&self, n: u32) -> Duration {
        crate::backoff::Backoff::new(self.policy.retry_min, self.policy.retry_max)
            .delay(n, unit_random())
    }

    /// At `ratio ± jitter` of the lifetime remaining from `now`, and never sooner than
    /// `retry_min` from now (a credential that lives for less is renewed at that pace, not in
    /// a loop).
    fn refresh_at(&self, now: OffsetDateTime, not_after: OffsetDateTime) -> OffsetDateTime {
        let at = self
            .policy
            .refresh
            .refresh_at_with(now, not_after, unit_random());
        at.max(now + self.policy.retry_min)
    }
}

// === the driver ===

/// What woke a renewer waiting for its next turn.
pub enum Turn {
    /// The refresh or retry time came (or the credential is otherwise due now).
    Due,
    /// The CA changed; the renewer has observed it (a taint makes it due at once, a new
    /// signer within the spread window). The new snapshot, for callers that serve it too.
    Changed(Arc<CaSnapshot>),
    /// The CA channel closed: the server is going away.
    Closed,
}

impl<T> Renewer<T> {
    /// One turn of the renewal driver every credential shares: waits on the renewer's clock
    /// until its next wake (only when `armed`: a stream that does not hold the credential
    /// now does not renew it) or a CA change, which it observes.
    pub async fn next_turn(
        &mut self,
        ca: &mut watch::Receiver<Arc<CaSnapshot>>,
        armed: bool,
    ) -> Turn {
        let wake = if armed {
            self.wake()
        } else {
            Box::pin(std::future::pending())
        };
        tokio::select! {
            _ = wake => Turn::Due,
            r = ca.changed() => match r {
                Err(_) => Turn::Closed,
                Ok(()) => {
                    let snap = ca.borrow_and_update().clone();
                    self.observe_ca(&snap);
                    Turn::Changed(snap)
                }
            },
        }
    }

    /// Observes the signing side of `snap`.
    pub fn observe_ca(&mut self, snap: &CaSnapshot) -> bool {
        let tainted = |s: &str| snap.tainted_signers.contains(s);
        self.observe(&SignerView {
            current: &snap.signer_id,
            is_tainted: &tainted,
        })
    }

    /// Runs the renewal of a credential the server holds for itself until `stop` fires or the
    /// CA goes away: renews through `issue` whenever due (retrying with backoff on failure,
    /// keeping the previous credential meanwhile) and hands every new one to `renewed`.
    pub async fn drive<E: std::fmt::Display>(
        mut self,
        mut ca: watch::Receiver<Arc<CaSnapshot>>,
        mut stop: watch::Receiver<bool>,
        what: &str,
        mut issue: impl FnMut(&CaSnapshot) -> Result<Issued<T>, E>,
        mut renewed: impl FnMut(&T),
    ) {
        loop {
            tokio::select! {
                turn = self.next_turn(&mut ca, true) => {
                    if matches!(turn, Turn::Closed) {
                        return;
                    }
                }
                () = crate::shutdown::stopping(&mut stop) => return,
            }
            if !self.is_due() {
                continue;
            }
            let snap = ca.borrow_and_update().clone();
            match self.renew(|| issue(&snap)) {
                Ok(()) => {
                    if let Some(v) = self.current() {
                        renewed(v);
                    }
                    tracing::info!(credential = what, refresh_at = ?self.next_wake(), "renewed");
                }
                Err(e) => {
                    tracing::error!(credential = what, error = %e, retry_at = ?self.next_wake(), "renewal failed; retrying with backoff");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn policy() -> RenewPolicy {
        RenewPolicy {
            refresh: RefreshPolicy::default(),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            signer_change_spread: Duration::from_secs(10),
        }
    }

    fn issued(signer: &str, not_after: OffsetDateTime) -> Issued<u32> {
        Issued {
            value: 1,
            signer_id: signer.into(),
            not_after,
        }
    }

    /// A clock set back past the held credential's notBefore (issue time minus the 60 s
    /// backdate) makes it due at once, and `wake` fires for it; a smaller step back does not.
    #[tokio::test]
    async fn a_clock_set_back_before_the_credential_makes_it_due() {
        let t0 = OffsetDateTime::now_utc();
        let clock = ManualClock::new(t0);
        let mut r: Renewer<u32> = Renewer::new(policy(), Arc::new(clock.clone()));
        r.renew(|| Ok::<_, ()>(issued("s", t0 + Duration::from_secs(3600))))
            .unwrap();
        assert!(!r.is_due());
        clock.set(t0 - Duration::from_secs(30));
        assert!(!r.is_due(), "within the backdate: still valid");
        let wake = r.wake();
        clock.set(t0 - Duration::from_secs(86_400));
        tokio::time::timeout(std::time::Duration::from_secs(5), wake)
            .await
            .expect("wake fires when the clock is set back");
        assert!(r.is_due(), "not valid yet at the new time: due now");
        r.renew(|| Ok::<_, ()>(issued("s", clock.now() + Duration::from_secs(3600))))
            .unwrap();
        assert!(!r.is_due(), "the replacement is valid now: no loop");
    }

    #[test]
    fn refresh_is_scheduled_from_the_issue_time_never_in_the_past() {
        let t0 = OffsetDateTime::now_utc();
        let clock = ManualClock::new(t0);
        let mut r: Renewer<u32> = Renewer::new(policy(), Arc::new(clock.clone()));
        // A leaf of 1 h: refresh between 27 and 33 minutes from now.
        r.renew(|| Ok::<_, ()>(issued("a", t0 + Duration::from_secs(3600))))
            .unwrap();
        let at = r.next_wake().unwrap();
        assert!(at >= t0 + Duration::from_secs(1620) && at <= t0 + Duration::from_secs(1980));
        assert!(!r.is_due());
        // A leaf capped by the end of the chain, 1 s away: not a loop, at most once a second.
        r.renew(|| Ok::<_, ()>(issued("a", t0 + Duration::from_millis(400))))
            .unwrap();
        assert!(r.next_wake().unwrap() >= t0 + Duration::from_secs(1));
        assert!(!r.is_due());
    }

    #[test]
    fn failures_back_off_exponentially_with_a_cap() {
        let t0 = OffsetDateTime::now_utc();
        let clock = ManualClock::new(t0);
        let mut r: Renewer<u32> = Renewer::new(policy(), Arc::new(clock.clone()));
        let mut last = Duration::ZERO;
        for n in 1..=12u32 {
            let now = clock.now();
            assert!(r.renew(|| Err::<Issued<u32>, _>("down")).is_err());
            let wait: Duration = (r.next_wake().unwrap() - now).try_into().unwrap();
            let ceiling = Duration::from_secs(1 << (n - 1).min(6)).min(Duration::from_secs(60));
            assert!(
                wait >= ceiling / 2 && wait <= ceiling,
                "attempt {n}: {wait:?} not in [{:?}, {ceiling:?}]",
                ceiling / 2
            );
            assert!(!r.is_due(), "a retry is never immediate");
            if n > 7 {
                assert!(
                    wait >= Duration::from_secs(30),
                    "capped, not reset: {wait:?}"
                );
            }
            last = wait;
            clock.advance(wait);
        }
        assert!(last <= Duration::from_secs(60));
        // Success resets the backoff.
        let now = clock.now();
        r.renew(|| Ok::<_, ()>(issued("a", now + Duration::from_secs(3600))))
            .unwrap();
        assert_eq!(r.failures(), 0);
    }

    #[test]
    fn an_expired_credential_from_the_issuer_is_a_failure() {
        let t0 = OffsetDateTime::now_utc();
        let clock = ManualClock::new(t0);
        let mut r: Renewer<u32> = Renewer::new(policy(), Arc::new(clock.clone()));
        r.renew(|| Ok::<_, ()>(issued("a", t0 - Duration::from_secs(1))))
            .unwrap();
        assert!(r.current().is_none());
        assert_eq!(r.failures(), 1);
        assert!(r.next_wake().unwrap() > t0);
    }

    #[test]
    fn signer_change_spreads_and_taint_is_immediate() {
        let t0 = OffsetDateTime::now_utc();
        let clock = ManualClock::new(t0);
        let mut r: Renewer<u32> = Renewer::new(policy(), Arc::new(clock.clone()));
        r.renew(|| Ok::<_, ()>(issued("old", t0 + Duration::from_secs(3600))))
            .unwrap();
        let none = |_: &str| false;
        assert!(!r.observe(&SignerView {
            current: "old",
            is_tainted: &none
        }));
        r.observe(&SignerView {
            current: "new",
            is_tainted: &none,
        });
        let at = r.next_wake().unwrap();
        assert!(
            at <= t0 + Duration::from_secs(10),
            "within the spread window"
        );
        clock.advance(Duration::from_secs(10));
        assert!(r.is_due());

        let mut r: Renewer<u32> = Renewer::new(policy(), Arc::new(clock.clone()));
        r.renew(|| Ok::<_, ()>(issued("old", clock.now() + Duration::from_secs(3600))))
            .unwrap();
        let tainted = |s: &str| s == "old";
        assert!(r.observe(&SignerView {
            current: "new",
            is_tainted: &tainted
        }));
    }
}
