//! How long a stream may live: no longer than the credentials that opened it, and no longer than
//! a maximum age, so proxies reconnect with their current token.
//!
//! - At the token's `exp` the stream ends with `UNAUTHENTICATED` ("token expired"); kubelet
//!   refreshes projected tokens at 80 % of their life, so a proxy holds a newer one by then and
//!   reconnects with it (Envoy re-reads a `file_based_metadata` token on every new stream).
//! - After `max_stream_age` (± 10 % jitter, like grpc-go's `MaxConnectionAge` that istiod sets to
//!   30 min with `--keepaliveMaxServerConnectionAge`) the stream ends gracefully with status `OK`,
//!   which Envoy's `GrpcStream::logClose` logs at debug level before it reconnects.
//! - Whoever owns the stream can end it early through a `StreamEnd` (e.g. when a re-check of the
//!   caller's token before a renewal fails).
//!
//! The bound wraps the response stream, so the xDS engine stays unaware of it: when the wrapper
//! ends, tonic drops it, the engine's sender sees the receiver closed, and its task exits.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::{Future, Stream};
use time::OffsetDateTime;
use tokio::sync::watch;
use tonic::{Code, Status};

use crate::{clock::Clock, identity::Identity, rotation::unit_random};

/// The limits every stream gets.
#[derive(Clone, Copy, Debug)]
pub struct StreamLimits {
    /// The stream ends gracefully after this (± 10 %).
    pub max_age: Duration,
}

/// Ends a stream from the inside with a given status.
#[derive(Clone)]
pub struct StreamEnd(Arc<watch::Sender<Option<Status>>>);

impl StreamEnd {
    /// Ends the stream with `status` (the first call wins).
    pub fn end(&self, status: Status) {
        self.0.send_if_modified(|s| {
            if s.is_none() {
                *s = Some(status);
                true
            } else {
                false
            }
        });
    }

    /// Whether `end` was called.
    pub fn is_ended(&self) -> bool {
        self.0.borrow().is_some()
    }
}

/// A new end handle and its receiver (for `bound`).
pub fn stream_end() -> (StreamEnd, watch::Receiver<Option<Status>>) {
    let (tx, rx) = watch::channel(None);
    (StreamEnd(Arc::new(tx)), rx)
}

/// When a stream opened by `identity` at `now` must end, and why.
pub fn deadline(
    identity: &Identity,
    limits: &StreamLimits,
    now: OffsetDateTime,
) -> (OffsetDateTime, Status) {
    let age = limits.max_age.mul_f64(0.9 + 0.2 * unit_random());
    let aged = now + age;
    match identity.expires_at {
        Some(exp) if exp <= aged => (
            exp,
            Status::unauthenticated(format!(
                "token expired at {}; reconnect with a fresh token",
                crate::clock::rfc3339(exp)
            )),
        ),
        _ => (
            aged,
            Status::new(
                Code::Ok,
                "stream reached its maximum age; reconnect (with the current token)",
            ),
        ),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// `inner`, ended with the deadline's status at `deadline` (on `clock`) or with the status given
/// to the `StreamEnd` whose receiver is `ended`, whichever comes first.
pub fn bound<T: Send + 'static>(
    inner: BoxStream<T>,
    clock: &Arc<dyn Clock>,
    deadline: (OffsetDateTime, Status),
    mut ended: watch::Receiver<Option<Status>>,
) -> BoxStream<T> {
    let (at, why) = deadline;
    let sleep = clock.sleep_until(at);
    let told = async move {
        let got = ended
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|s| s.clone());
        match got {
            Some(status) => status,
            // The owner is gone without a word: the inner stream ends by itself.
            None => std::future::pending().await,
        }
    };
    let end = Box::pin(async move {
        tokio::select! {
            () = sleep => why,
            status = told => status,
        }
    });
    Box::pin(Bounded {
        inner,
        end,
        done: false,
    })
}

struct Bounded<T> {
    inner: BoxStream<T>,
    end: Pin<Box<dyn Future<Output = Status> + Send>>,
    done: bool,
}

impl<T> Stream for Bounded<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Poll::Ready(status) = self.end.as_mut().poll(cx) {
            self.done = true;
            return Poll::Ready(Some(Err(status)));
        }
        match self.inner.as_mut().poll_next(cx) {
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        clock::ManualClock,
        identity::ClusterId,
        spiffe::{SpiffeId, TrustDomain},
    };
    use futures::StreamExt;

    fn identity(exp: Option<OffsetDateTime>) -> Identity {
        let td = TrustDomain::new("cluster.local").unwrap();
        Identity {
            spiffe_id: SpiffeId::for_service_account(&td, "ns", "sa").unwrap(),
            namespace: "ns".into(),
            service_account: "sa".into(),
            service_account_uid: None,
            pod: None,
            cluster: ClusterId("Kubernetes".into()),
            expires_at: exp,
        }
    }

    #[test]
    fn the_earlier_of_token_expiry_and_jittered_max_age() {
        let now = OffsetDateTime::now_utc();
        let limits = StreamLimits {
            max_age: Duration::from_secs(1800),
        };
        let (at, why) = deadline(&identity(Some(now + Duration::from_secs(30))), &limits, now);
        assert_eq!(at, now + Duration::from_secs(30));
        assert_eq!(why.code(), Code::Unauthenticated);
        assert!(why.message().contains("token expired"), "{why:?}");
        for _ in 0..50 {
            let (at, why) = deadline(&identity(None), &limits, now);
            assert!(at >= now + Duration::from_secs(1620) && at <= now + Duration::from_secs(1980));
            assert_eq!(why.code(), Code::Ok);
        }
    }

    #[tokio::test]
    async fn the_stream_ends_at_the_deadline_or_when_told() {
        let now = OffsetDateTime::now_utc();
        let clock = ManualClock::new(now);
        let c: Arc<dyn Clock> = Arc::new(clock.clone());
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<u32, Status>>(4);
        let inner: BoxStream<u32> = Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
        let (_end, ended) = stream_end();
        let mut s = bound(
            inner,
            &c,
            (
                now + Duration::from_secs(30),
                Status::unauthenticated("expired"),
            ),
            ended,
        );
        tx.send(Ok(1)).await.unwrap();
        assert_eq!(s.next().await.unwrap().unwrap(), 1);
        clock.advance(Duration::from_secs(30));
        let e = s.next().await.unwrap().unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        assert!(s.next().await.is_none());
        // The inner stream's producer sees the end once the bounded stream is dropped.
        drop(s);
        tx.closed().await;

        let (tx, rx) = tokio::sync::mpsc::channel::<Result<u32, Status>>(4);
        let inner: BoxStream<u32> = Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
        let (end, ended) = stream_end();
        let mut s = bound(
            inner,
            &c,
            (now + Duration::from_secs(3600), Status::ok("")),
            ended,
        );
        end.end(Status::permission_denied("service account deleted"));
        end.end(Status::internal("second call ignored"));
        let e = s.next().await.unwrap().unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        drop(tx);
    }
}
