//! Time as a parameter: everything that reads the time or waits for it takes a `Clock`, so
//! tests move time instead of sleeping.

use std::{future::Future, pin::Pin, sync::Arc};

use time::OffsetDateTime;
use tokio::sync::watch;

/// A future that completes at a deadline of some clock.
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A source of the current time, and of waiting for a later one.
pub trait Clock: Send + Sync + 'static {
    /// The current time, UTC.
    fn now(&self) -> OffsetDateTime;

    /// Completes once `now() >= deadline`.
    fn sleep_until(&self, deadline: OffsetDateTime) -> Sleep;

    /// Completes when the clock reads earlier than `since` by more than [`CLOCK_BACK`]: it was
    /// set back, and whoever planned from `since` (a credential issued then) must re-plan.
    fn set_back(&self, since: OffsetDateTime) -> Sleep;
}

/// How far the clock must go back for [`Clock::set_back`] to fire.
pub const CLOCK_BACK: time::Duration = time::Duration::seconds(1);

/// How often the system clock is re-read for [`Clock::set_back`].
const SET_BACK_POLL: std::time::Duration = std::time::Duration::from_secs(30);

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    fn sleep_until(&self, deadline: OffsetDateTime) -> Sleep {
        let wait = (deadline - OffsetDateTime::now_utc()).max(time::Duration::ZERO);
        let wait = std::time::Duration::try_from(wait).unwrap_or_default();
        Box::pin(tokio::time::sleep(wait))
    }

    fn set_back(&self, since: OffsetDateTime) -> Sleep {
        // The wall clock, re-read every SET_BACK_POLL on the monotonic timer.
        Box::pin(async move {
            while OffsetDateTime::now_utc() >= since - CLOCK_BACK {
                tokio::time::sleep(SET_BACK_POLL).await;
            }
        })
    }
}

/// A clock that only moves when told to, for tests and simulations.
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<watch::Sender<OffsetDateTime>>);

impl ManualClock {
    /// A clock stopped at `at`.
    pub fn new(at: OffsetDateTime) -> Self {
        Self(Arc::new(watch::Sender::new(at)))
    }

    /// Moves the clock forward by `by`, waking sleepers whose deadline has come.
    pub fn advance(&self, by: std::time::Duration) {
        self.0.send_modify(|t| *t += by);
    }

    /// Sets the clock to `at`.
    pub fn set(&self, at: OffsetDateTime) {
        self.0.send_replace(at);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.0.borrow()
    }

    fn sleep_until(&self, deadline: OffsetDateTime) -> Sleep {
        let mut rx = self.0.subscribe();
        Box::pin(async move {
            // The sender lives as long as the clock; if it is gone, time never comes.
            let _ = rx.wait_for(|now| *now >= deadline).await;
        })
    }

    fn set_back(&self, since: OffsetDateTime) -> Sleep {
        let mut rx = self.0.subscribe();
        Box::pin(async move {
            let _ = rx.wait_for(|now| *now < since - CLOCK_BACK).await;
        })
    }
}

/// Formats a time as RFC 3339 (`2026-11-28T01:00:00Z`), the form every CLI output uses.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn manual_sleep_wakes_when_time_is_moved() {
        let t0 = OffsetDateTime::now_utc();
        let clock = ManualClock::new(t0);
        let sleep = clock.sleep_until(t0 + Duration::from_secs(30));
        let task = tokio::spawn(sleep);
        clock.advance(Duration::from_secs(10));
        tokio::task::yield_now().await;
        assert!(!task.is_finished());
        clock.advance(Duration::from_secs(20));
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
}
