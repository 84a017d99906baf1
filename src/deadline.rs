//! The deadline of the gRPC call being served: set by the server's deadline layer
//! (`api::deadline`) around each call, read by whatever would wait on the caller's behalf (the
//! TokenReview queue), so nothing queues a call it cannot answer in time.

use std::{future::Future, time::Duration};

use tokio::time::Instant;

tokio::task_local! {
    static DEADLINE: Instant;
}

/// Runs `fut` with `deadline` as the current call's deadline.
pub fn scope<F: Future>(deadline: Instant, fut: F) -> impl Future<Output = F::Output> {
    DEADLINE.scope(deadline, fut)
}

/// Time left before the current call's deadline (zero once passed); `None` outside a call.
pub fn remaining() -> Option<Duration> {
    DEADLINE
        .try_with(|d| d.saturating_duration_since(Instant::now()))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn remaining_is_the_time_left_in_scope_only() {
        assert_eq!(remaining(), None);
        let deadline = Instant::now() + Duration::from_secs(3);
        scope(deadline, async {
            assert_eq!(remaining(), Some(Duration::from_secs(3)));
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(remaining(), Some(Duration::from_secs(2)));
            tokio::time::sleep(Duration::from_secs(5)).await;
            assert_eq!(remaining(), Some(Duration::ZERO));
        })
        .await;
    }
}
