//! Call deadlines: each gRPC call is answered DEADLINE_EXCEEDED when it is not answered by the
//! sooner of the caller's `grpc-timeout` and `limits.unary_timeout`, as grpc-go's server does
//! (`internal/transport/http2_server.go` `operateHeaders` puts the timeout on the call's
//! context; the handler's `context.DeadlineExceeded` becomes `codes.DeadlineExceeded` by
//! `status.FromContextError`). tonic's own `Server::timeout` answers CANCELLED instead.
//!
//! Like tonic's timeout it bounds the future that produces the response: a unary call whole, a
//! stream only up to its opening, never its body. The deadline is also published to the call
//! (`crate::deadline`), so the TokenReview queue refuses what it could not serve in time.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tonic::codegen::http;
use tower::{Layer, Service};

/// Applies [`Deadline`] with the server's unary timeout.
#[derive(Clone, Copy, Debug)]
pub struct DeadlineLayer {
    server_timeout: Duration,
}

impl DeadlineLayer {
    pub fn new(server_timeout: Duration) -> Self {
        Self { server_timeout }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline {
            inner,
            server_timeout: self.server_timeout,
        }
    }
}

/// Answers DEADLINE_EXCEEDED for a call whose response is not ready by its deadline.
#[derive(Clone, Debug)]
pub struct Deadline<S> {
    inner: S,
    server_timeout: Duration,
}

impl<S, B, RB> Service<http::Request<B>> for Deadline<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Default + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let timeout = call_timeout(req.headers(), self.server_timeout);
        let deadline = tokio::time::Instant::now() + timeout;
        let fut = crate::deadline::scope(deadline, self.inner.call(req));
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, fut).await {
                Ok(answer) => answer,
                Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                    "deadline exceeded: no answer within {} ms (the sooner of the caller's grpc-timeout and limits.unary_timeout)",
                    timeout.as_millis()
                ))
                .into_http()),
            }
        })
    }
}

/// The sooner of the caller's `grpc-timeout` and the server's timeout. A client deadline is
/// taken 1 ms early: tonic's own header timer (outside every layer, started a moment before
/// this one) would otherwise answer the same deadline CANCELLED first.
fn call_timeout(headers: &http::HeaderMap, server_timeout: Duration) -> Duration {
    match headers
        .get("grpc-timeout")
        .and_then(|v| parse_grpc_timeout(v.as_bytes()))
    {
        Some(client) => server_timeout.min(client.saturating_sub(Duration::from_millis(1))),
        None => server_timeout,
    }
}

/// `grpc-timeout` per the gRPC over HTTP/2 spec (`PROTOCOL-HTTP2.md`): at most 8 digits and a
/// unit (`H M S m u n`). Anything else is ignored, as tonic and grpc-go ignore it.
fn parse_grpc_timeout(v: &[u8]) -> Option<Duration> {
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_parses_per_the_spec() {
        let rows: &[(&str, Option<Duration>)] = &[
            ("3H", Some(Duration::from_secs(3 * 3600))),
            ("2M", Some(Duration::from_secs(120))),
            ("5S", Some(Duration::from_secs(5))),
            ("250m", Some(Duration::from_millis(250))),
            ("7u", Some(Duration::from_micros(7))),
            ("9n", Some(Duration::from_nanos(9))),
            ("99999999S", Some(Duration::from_secs(99_999_999))),
            ("123456789S", None),
            ("S", None),
            ("", None),
            ("10x", None),
            ("-1S", None),
            ("1.5S", None),
        ];
        for (text, want) in rows {
            assert_eq!(parse_grpc_timeout(text.as_bytes()), *want, "{text:?}");
        }
    }

    #[test]
    fn the_sooner_deadline_wins() {
        let mut h = http::HeaderMap::new();
        let server = Duration::from_secs(10);
        assert_eq!(call_timeout(&h, server), server);
        h.insert("grpc-timeout", http::HeaderValue::from_static("2S"));
        assert_eq!(call_timeout(&h, server), Duration::from_millis(1999));
        h.insert("grpc-timeout", http::HeaderValue::from_static("1H"));
        assert_eq!(call_timeout(&h, server), server);
        h.insert("grpc-timeout", http::HeaderValue::from_static("bogus"));
        assert_eq!(call_timeout(&h, server), server);
    }

    /// A handler that is too slow is answered DEADLINE_EXCEEDED (not tonic's CANCELLED), and it
    /// ran with the deadline published to it.
    #[tokio::test(start_paused = true)]
    async fn a_slow_call_is_answered_deadline_exceeded() {
        let slow = tower::service_fn(|_req: http::Request<()>| async {
            assert_eq!(
                crate::deadline::remaining(),
                Some(Duration::from_millis(500))
            );
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::default()))
        });
        let mut svc = DeadlineLayer::new(Duration::from_millis(500)).layer(slow);
        let answer = svc.call(http::Request::new(())).await.unwrap();
        let status = tonic::Status::from_header_map(answer.headers()).expect("a grpc-status");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    }
}
