//! meshid's one HTTP client: a GET of a small document over HTTP/1.1, plain or over rustls,
//! with the whole exchange (connect, TLS, headers, body) bounded by one deadline, the body
//! bounded in size, and redirects refused (the caller configures the final URL). Used by the
//! CLI's reads of a server's status and by every fetch meshid makes of a document it trusts.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use thiserror::Error;

/// Why a GET failed. Each names the URL.
#[derive(Debug, Error)]
pub enum HttpError {
    #[error("{url}: not a URL ({why})")]
    BadUrl { url: String, why: String },
    #[error("{url}: {why}")]
    Scheme { url: String, why: &'static str },
    #[error("connecting to {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with {url}: {why}")]
    Tls { url: String, why: String },
    #[error("GET {url}: {why}")]
    Exchange { url: String, why: String },
    #[error("GET {url}: no complete answer within {}", crate::duration::fmt_duration(*.after))]
    TimedOut { url: String, after: Duration },
    #[error("GET {url}: the body is larger than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("GET {url}: redirected to {location:?}; configure the final URL (redirects are not followed)")]
    Redirect { url: String, location: String },
    #[error("GET {url}: HTTP {status}{}", if detail.is_empty() { String::new() } else { format!(": {detail}") })]
    Status {
        url: String,
        status: u16,
        /// The first line of a plain-text answer (what the server says is wrong), printable.
        detail: String,
    },
}

impl HttpError {
    /// The failure's kind, for metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BadUrl { .. } | Self::Scheme { .. } => "bad_url",
            Self::Connect { .. } => "connect",
            Self::Tls { .. } => "tls",
            Self::Exchange { .. } => "exchange",
            Self::TimedOut { .. } => "timeout",
            Self::TooLarge { .. } => "too_large",
            Self::Redirect { .. } => "redirect",
            Self::Status { .. } => "http_status",
        }
    }
}

/// One GET.
#[derive(Clone)]
pub struct Get<'a> {
    pub url: &'a str,
    /// `Some` for `https://` URLs (the caller decides what it trusts); `None` for `http://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The whole exchange, from connect to the body's last byte.
    pub timeout: Duration,
    pub max_body: usize,
    /// The `Accept` header.
    pub accept: &'a str,
}

impl<'a> Get<'a> {
    /// A GET of `url` with a 10 s deadline and a 1 MiB body limit.
    pub fn new(url: &'a str) -> Self {
        Self {
            url,
            tls: None,
            timeout: Duration::from_secs(10),
            max_body: 1 << 20,
            accept: "application/json",
        }
    }

    pub fn tls(mut self, tls: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(tls);
        self
    }

    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    pub fn max_body(mut self, n: usize) -> Self {
        self.max_body = n;
        self
    }

    /// The body of a `200 OK`.
    pub async fn send(&self) -> Result<Bytes, HttpError> {
        let after = self.timeout;
        tokio::time::timeout(after, self.exchange())
            .await
            .map_err(|_| HttpError::TimedOut {
                url: self.url.to_owned(),
                after,
            })?
    }

    /// [`Self::send`] from synchronous code (the CLI), inside or outside a Tokio runtime.
    pub fn send_blocking(&self) -> Result<Bytes, HttpError> {
        std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| self.exchange_error(format!("starting a runtime: {e}")))?;
                rt.block_on(self.send())
            })
            .join()
            .unwrap_or_else(|_| Err(self.exchange_error("the HTTP thread panicked".into())))
        })
    }

    fn exchange_error(&self, why: String) -> HttpError {
        HttpError::Exchange {
            url: self.url.to_owned(),
            why,
        }
    }

    async fn exchange(&self) -> Result<Bytes, HttpError> {
        let url = self.url.to_owned();
        let uri: hyper::Uri = self.url.parse().map_err(|e| HttpError::BadUrl {
            url: url.clone(),
            why: format!("{e}"),
        })?;
        let scheme = |why| HttpError::Scheme {
            url: url.clone(),
            why,
        };
        let https = match (uri.scheme_str(), &self.tls) {
            (Some("https"), Some(_)) => true,
            (Some("http"), None) => false,
            (Some("https"), None) => return Err(scheme("https needs a TLS configuration here")),
            (Some("http"), Some(_)) => {
                return Err(scheme("give an https:// URL (TLS is required)"))
            }
            _ => return Err(scheme("only http:// and https:// URLs are fetched")),
        };
        let host = uri
            .host()
            .ok_or_else(|| scheme("the URL has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|source| HttpError::Connect {
                url: url.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let resp = match &self.tls {
            Some(tls) => {
                let name = rustls_pki_types::ServerName::try_from(host.clone()).map_err(|e| {
                    HttpError::Tls {
                        url: url.clone(),
                        why: format!("bad server name ({e})"),
                    }
                })?;
                let stream = tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| HttpError::Tls {
                        url: url.clone(),
                        why: e.to_string(),
                    })?;
                self.request(&uri, &host, stream).await?
            }
            None => self.request(&uri, &host, tcp).await?,
        };
        Ok(resp)
    }

    async fn request<IO>(&self, uri: &hyper::Uri, host: &str, io: IO) -> Result<Bytes, HttpError>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
                .await
                .map_err(|e| self.exchange_error(e.to_string()))?;
        let conn = tokio::spawn(conn);
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let req = hyper::Request::get(path)
            .header(
                hyper::header::HOST,
                uri.authority().map_or(host.to_owned(), |a| a.to_string()),
            )
            .header(hyper::header::ACCEPT, self.accept)
            .body(Empty::<Bytes>::new())
            .map_err(|e| self.exchange_error(e.to_string()))?;
        let result = self.response(sender.send_request(req).await).await;
        conn.abort();
        result
    }

    async fn response(
        &self,
        resp: Result<hyper::Response<hyper::body::Incoming>, hyper::Error>,
    ) -> Result<Bytes, HttpError> {
        let resp = resp.map_err(|e| self.exchange_error(e.to_string()))?;
        let status = resp.status();
        if status.is_redirection() {
            let location = resp
                .headers()
                .get(hyper::header::LOCATION)
                .map(|l| String::from_utf8_lossy(l.as_bytes()).into_owned())
                .unwrap_or_default();
            return Err(HttpError::Redirect {
                url: self.url.to_owned(),
                location,
            });
        }
        if status != hyper::StatusCode::OK {
            let plain = resp
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .is_some_and(|t| t.as_bytes().starts_with(b"text/plain"));
            let detail = if plain {
                match Limited::new(resp.into_body(), 4096).collect().await {
                    Ok(b) => {
                        let text = String::from_utf8_lossy(&b.to_bytes()).into_owned();
                        let line = text.lines().next().unwrap_or("").trim();
                        printable(&line.chars().take(300).collect::<String>())
                    }
                    Err(_) => String::new(),
                }
            } else {
                String::new()
            };
            return Err(HttpError::Status {
                url: self.url.to_owned(),
                status: status.as_u16(),
                detail,
            });
        }
        match Limited::new(resp.into_body(), self.max_body)
            .collect()
            .await
        {
            Ok(b) => Ok(b.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(HttpError::TooLarge {
                url: self.url.to_owned(),
                limit: self.max_body,
            }),
            Err(e) => Err(self.exchange_error(format!("reading the body: {e}"))),
        }
    }
}

/// `text` without control characters but line breaks and tabs: a multi-line report a remote
/// party wrote, for an operator's terminal.
pub fn printable_text(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                '\u{FFFD}'
            } else {
                c
            }
        })
        .collect()
}

/// `text` without control characters (terminal escapes among them): for strings a remote
/// party wrote that reach an operator's terminal or a log line.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '\u{FFFD}' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers every connection with `reply`, written in `chunks` pieces `gap`
    /// apart (a drip-feeding server when the gap is long).
    async fn server(reply: &'static [u8], chunks: usize, gap: Duration) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = c.read(&mut buf).await;
                    for piece in reply.chunks(reply.len().div_ceil(chunks)) {
                        if c.write_all(piece).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(gap).await;
                    }
                });
            }
        });
        format!("http://{addr}/debug/rotation")
    }

    #[tokio::test]
    async fn a_drip_fed_answer_is_bounded_by_the_whole_deadline() {
        let body = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789";
        // 52 bytes, one every 100 ms: 5 s in all, each read well within any per-read timeout.
        let url = server(body, body.len(), Duration::from_millis(100)).await;
        let started = std::time::Instant::now();
        let err = Get::new(&url)
            .timeout(Duration::from_millis(500))
            .send()
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::TimedOut { .. }), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "bounded as a whole"
        );
    }

    // Multi-threaded: `send_blocking` blocks this thread while the test's server answers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn limits_redirects_and_status_are_refused_by_name() {
        let big = server(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789",
            1,
            Duration::ZERO,
        )
        .await;
        let err = Get::new(&big).max_body(10).send().await.unwrap_err();
        assert!(
            matches!(err, HttpError::TooLarge { limit: 10, .. }),
            "{err}"
        );
        let moved = server(
            b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere/\r\nContent-Length: 0\r\n\r\n",
            1,
            Duration::ZERO,
        )
        .await;
        let err = Get::new(&moved).send().await.unwrap_err();
        assert!(err.to_string().contains("http://elsewhere/"), "{err}");
        let missing = server(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
            1,
            Duration::ZERO,
        )
        .await;
        let err = Get::new(&missing).send_blocking().unwrap_err();
        assert!(
            matches!(err, HttpError::Status { status: 404, .. }),
            "{err}"
        );
        let ok = server(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
            1,
            Duration::ZERO,
        )
        .await;
        assert_eq!(&Get::new(&ok).send_blocking().unwrap()[..], b"{}");
    }

    #[test]
    fn printable_strips_terminal_escapes() {
        assert_eq!(printable("pod\u{1b}[2Jx\n"), "pod\u{FFFD}[2Jx\u{FFFD}");
    }
}
