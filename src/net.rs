//! Listeners: TCP with the accept backlog Go (and so istiod) uses, instead of mio's 128 (a
//! cold-start storm of proxies must wait in the kernel's queue, not be dropped and retry), and
//! the one accept loop every listener runs: a connection cap, and backoff on exhaustion; and the
//! adapters that hand tonic TLS and Unix-socket connections holding their listener slot.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpSocket},
    sync::{watch, OwnedSemaphorePermit, Semaphore},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::shutdown::stopping;

/// A listener the accept loop can take connections from.
pub trait Accept: Send + 'static {
    type Conn: Send + 'static;
    fn accept_one(&self) -> impl std::future::Future<Output = std::io::Result<Self::Conn>> + Send;
}

impl Accept for TcpListener {
    type Conn = tokio::net::TcpStream;
    async fn accept_one(&self) -> std::io::Result<Self::Conn> {
        self.accept().await.map(|(c, _)| c)
    }
}

impl Accept for tokio::net::UnixListener {
    type Conn = tokio::net::UnixStream;
    async fn accept_one(&self) -> std::io::Result<Self::Conn> {
        self.accept().await.map(|(c, _)| c)
    }
}

/// Accepts connections while fewer than `max_connections` are open, until `stop` fires: at the
/// cap the loop stops accepting, so further clients wait in the kernel's backlog. Accept errors
/// from resource exhaustion (EMFILE) back off instead of spinning. `handle` takes each
/// connection with its slot (the connection holds it until it closes); it returns false when
/// nobody takes connections any more.
pub async fn accept_loop<L, F, Fut>(
    listener: L,
    max_connections: usize,
    what: &'static str,
    mut stop: watch::Receiver<bool>,
    mut handle: F,
) where
    L: Accept,
    F: FnMut(L::Conn, OwnedSemaphorePermit) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut backoff = AcceptBackoff::default();
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            () = stopping(&mut stop) => return,
        };
        let conn = tokio::select! {
            r = listener.accept_one() => match r {
                Ok(conn) => { backoff.reset(); conn }
                Err(e) => { backoff.wait(&e, what).await; continue; }
            },
            () = stopping(&mut stop) => return,
        };
        if !handle(conn, permit).await {
            return;
        }
    }
}

/// Backoff for accept errors: a process out of file descriptors (EMFILE/ENFILE) or memory gets
/// the same error at once on every retry, so retrying in a loop would spin a core.
#[derive(Default)]
pub struct AcceptBackoff(std::time::Duration);

impl AcceptBackoff {
    /// Waits after an accept error: 5 ms doubling up to 1 s for resource exhaustion; nothing
    /// for errors of one connection (aborted or reset before accept).
    pub async fn wait(&mut self, e: &std::io::Error, listener: &str) {
        use std::io::ErrorKind::*;
        if matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted) {
            return;
        }
        self.0 = (self.0 * 2).clamp(
            std::time::Duration::from_millis(5),
            std::time::Duration::from_secs(1),
        );
        tracing::warn!(error = %e, listener, backoff_ms = self.0.as_millis() as u64, "accept failed; backing off");
        tokio::time::sleep(self.0).await;
    }

    pub fn reset(&mut self) {
        self.0 = std::time::Duration::ZERO;
    }

    /// The current delay (for tests).
    pub fn current(&self) -> std::time::Duration {
        self.0
    }
}

/// The backlog when the kernel's limit cannot be read (Linux's `somaxconn` default since 5.4).
pub const FALLBACK_BACKLOG: u32 = 4096;

/// Binds `addr` (v4 or v6 as it says) with `SO_REUSEADDR` as tokio sets it, and listens with
/// [`listen_backlog`].
pub fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // As mio's `TcpListener::bind`: quick rebinds on Unix; on Windows it would allow hijacking.
    #[cfg(not(windows))]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(listen_backlog())
}

/// The backlog of every listener: `/proc/sys/net/core/somaxconn`, read once.
pub fn listen_backlog() -> u32 {
    static BACKLOG: OnceLock<u32> = OnceLock::new();
    *BACKLOG.get_or_init(|| {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        backlog_from(
            read("/proc/sys/net/core/somaxconn").as_deref(),
            read("/proc/sys/kernel/osrelease").as_deref(),
        )
    })
}

/// Go's `maxListenerBacklog` (`src/net/sock_linux.go`): the first field of `somaxconn`; the
/// fallback when it is absent, unreadable or zero; above 65,535 capped by `maxAckBacklog` to
/// what the kernel stores (u16 before Linux 4.1, u32 after) and to `listen(2)`'s `int`.
pub fn backlog_from(somaxconn: Option<&str>, kernel_release: Option<&str>) -> u32 {
    let n = somaxconn
        .and_then(|s| s.split_whitespace().next())
        .and_then(|f| f.parse::<u64>().ok())
        .filter(|n| *n > 0);
    let Some(n) = n else {
        return FALLBACK_BACKLOG;
    };
    if n <= u64::from(u16::MAX) {
        return n as u32;
    }
    let wide = kernel_release
        .and_then(kernel_version)
        .is_some_and(|(major, minor)| major > 4 || (major == 4 && minor >= 1));
    let max = if wide {
        i32::MAX as u64
    } else {
        u64::from(u16::MAX)
    };
    n.min(max) as u32
}

/// `major.minor` of a kernel release such as `6.8.0-45-generic`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().and_then(|m| m.parse().ok()).unwrap_or(0);
    Some((major, minor))
}

// === address ranges ===

/// An address range (`10.0.0.0/8`, `::1/128`, or one address), for who may read a debug page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in the range (an IPv4-mapped IPv6 address counts as its IPv4 one).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => mask_eq(&net.octets(), &a.octets(), self.prefix),
            (IpAddr::V6(net), IpAddr::V6(a)) => mask_eq(&net.octets(), &a.octets(), self.prefix),
            _ => false,
        }
    }
}

fn mask_eq(net: &[u8], a: &[u8], prefix: u8) -> bool {
    let (full, rest) = ((prefix / 8) as usize, prefix % 8);
    if net[..full] != a[..full] {
        return false;
    }
    rest == 0 || (net[full] ^ a[full]) >> (8 - rest) == 0
}

/// Why a string is not an address range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not an address or ADDRESS/PREFIX")]
    NotAnAddress(String),
    #[error("{input:?}: the prefix must be 0..={max}")]
    BadPrefix { input: String, max: u8 },
}

impl std::str::FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, CidrError> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: std::net::IpAddr = a
            .parse()
            .map_err(|_| CidrError::NotAnAddress(s.to_owned()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| CidrError::BadPrefix {
                    input: s.to_owned(),
                    max,
                })?
        };
        Ok(Self { addr, prefix })
    }
}

impl TryFrom<String> for Cidr {
    type Error = CidrError;
    fn try_from(s: String) -> Result<Self, CidrError> {
        s.parse()
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        format!("{}/{}", c.addr, c.prefix)
    }
}

/// Whether a debug page may be served to `peer`: loopback always, others only in `allowed`.
pub fn debug_allowed(peer: Option<std::net::IpAddr>, allowed: &[Cidr]) -> bool {
    match peer {
        None => false,
        Some(ip) => {
            let ip = match ip {
                std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
                v4 => v4,
            };
            ip.is_loopback() || allowed.iter().any(|c| c.contains(ip))
        }
    }
}

// --- connection adapters for tonic: TLS and Unix listeners as streams of limited connections ---

/// A TLS connection holding its listener slot.
pub type TlsConn = Limited<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>;

/// Runs [`accept_loop`] on its own task.
fn spawn_accept_loop<L, F, Fut>(
    listener: L,
    max_connections: usize,
    what: &'static str,
    stop: watch::Receiver<bool>,
    handle: F,
) where
    L: Accept,
    F: FnMut(L::Conn, OwnedSemaphorePermit) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    tokio::spawn(accept_loop(listener, max_connections, what, stop, handle));
}

/// Accepts TCP connections (at most `max_connections` open) and completes TLS handshakes off
/// the accept loop, each within `handshake_timeout`.
pub fn tls_incoming(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    max_connections: usize,
    handshake_timeout: std::time::Duration,
    stop: watch::Receiver<bool>,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    spawn_accept_loop(
        listener,
        max_connections,
        "gRPC",
        stop,
        move |tcp, permit| {
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let limited = Limited {
                            io: tls,
                            _permit: permit,
                        };
                        let _ = tx.send(Ok(limited)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                }
            });
            std::future::ready(true)
        },
    );
    ReceiverStream::new(rx)
}

/// Accepts Unix-socket connections, at most `max_connections` open at once.
pub fn unix_incoming(
    listener: tokio::net::UnixListener,
    max_connections: usize,
    stop: watch::Receiver<bool>,
) -> ReceiverStream<
    Result<Limited<crate::h2_authority::AuthorityFix<tokio::net::UnixStream>>, std::io::Error>,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    spawn_accept_loop(
        listener,
        max_connections,
        "Unix socket",
        stop,
        move |conn, permit| {
            let tx = tx.clone();
            async move {
                // Clients on grpc's C core send an authority h2 refuses: fixed here.
                let limited = Limited {
                    io: crate::h2_authority::AuthorityFix::new(conn),
                    _permit: permit,
                };
                tx.send(Ok(limited)).await.is_ok()
            }
        },
    );
    ReceiverStream::new(rx)
}

/// A connection that holds one of the listener's connection slots until it closes.
pub struct Limited<IO> {
    io: IO,
    _permit: OwnedSemaphorePermit,
}

impl<IO: Connected> Connected for Limited<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Limited<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Limited<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One row per rule of Go's `maxListenerBacklog` / `maxAckBacklog` (`src/net/sock_linux.go`).
    #[test]
    fn the_backlog_follows_gos_max_listener_backlog() {
        let rows: &[(&str, Option<&str>, Option<&str>, u32)] = &[
            ("somaxconn as read", Some("4096\n"), Some("6.8.0"), 4096),
            (
                "a small somaxconn is kept",
                Some("128\n"),
                Some("6.8.0"),
                128,
            ),
            ("first field only", Some("  512 junk\n"), None, 512),
            (
                "unreadable falls back",
                None,
                Some("6.8.0"),
                FALLBACK_BACKLOG,
            ),
            ("empty falls back", Some(""), None, FALLBACK_BACKLOG),
            ("zero falls back", Some("0\n"), None, FALLBACK_BACKLOG),
            (
                "not a number falls back",
                Some("lots\n"),
                None,
                FALLBACK_BACKLOG,
            ),
            ("u16 max is kept", Some("65535"), Some("3.10.0"), 65535),
            (
                "above u16 on an old kernel caps to u16",
                Some("100000"),
                Some("4.0.9"),
                65535,
            ),
            (
                "above u16 with no kernel version caps to u16",
                Some("100000"),
                None,
                65535,
            ),
            (
                "above u16 on 4.1+ is kept",
                Some("100000"),
                Some("4.1.0"),
                100_000,
            ),
            (
                "above u16 on 6.x is kept",
                Some("200000"),
                Some("6.18.44-fc"),
                200_000,
            ),
            (
                "beyond listen(2)'s int caps to i32",
                Some("4294967295"),
                Some("6.1"),
                i32::MAX as u32,
            ),
        ];
        for (rule, somaxconn, release, want) in rows {
            assert_eq!(backlog_from(*somaxconn, *release), *want, "{rule}");
        }
    }

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(kernel_version("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(kernel_version("4.1"), Some((4, 1)));
        assert_eq!(kernel_version("5"), Some((5, 0)));
        assert_eq!(kernel_version("x"), None);
    }

    #[tokio::test]
    async fn binds_v4_and_v6() {
        let v4 = bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(v4.local_addr().unwrap().is_ipv4());
        if let Ok(v6) = bind_tcp("[::1]:0".parse().unwrap()) {
            assert!(v6.local_addr().unwrap().is_ipv6());
        }
    }

    /// EMFILE used to be retried at once, forever: a spinning accept loop.
    #[tokio::test(start_paused = true)]
    async fn accept_errors_from_exhaustion_back_off_and_per_connection_ones_do_not() {
        let mut b = AcceptBackoff::default();
        let emfile = std::io::Error::from_raw_os_error(24);
        let mut waits = Vec::new();
        for _ in 0..10 {
            let t = tokio::time::Instant::now();
            b.wait(&emfile, "test").await;
            waits.push(t.elapsed());
        }
        assert_eq!(waits[0], std::time::Duration::from_millis(5));
        assert_eq!(waits[1], std::time::Duration::from_millis(10));
        assert_eq!(
            *waits.last().unwrap(),
            std::time::Duration::from_secs(1),
            "capped"
        );
        let t = tokio::time::Instant::now();
        b.wait(
            &std::io::Error::from(std::io::ErrorKind::ConnectionAborted),
            "test",
        )
        .await;
        assert!(t.elapsed().is_zero());
        b.reset();
        assert!(b.current().is_zero());
    }

    #[test]
    fn debug_pages_go_to_loopback_and_allowed_ranges_only() {
        let allowed: Vec<Cidr> = ["10.1.0.0/16", "fd00::/8"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        for (peer, ok) in [
            ("127.0.0.1", true),
            ("::1", true),
            ("::ffff:127.0.0.1", true),
            ("10.1.200.3", true),
            ("::ffff:10.1.0.9", true),
            ("10.2.0.1", false),
            ("fd12::1", true),
            ("2001:db8::1", false),
            ("192.168.1.1", false),
        ] {
            assert_eq!(
                debug_allowed(Some(peer.parse().unwrap()), &allowed),
                ok,
                "{peer}"
            );
        }
        assert!(!debug_allowed(None, &allowed));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
        assert!("10.0.0.7"
            .parse::<Cidr>()
            .unwrap()
            .contains("10.0.0.7".parse().unwrap()));
    }
}
