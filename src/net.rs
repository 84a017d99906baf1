//! TCP listeners with the accept backlog Go (and so istiod) uses, instead of mio's 128: a
//! cold-start storm of proxies must wait in the kernel's queue, not be dropped and retry.

use std::{net::SocketAddr, sync::OnceLock};

use tokio::net::{TcpListener, TcpSocket};

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
}
