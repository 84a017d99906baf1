//! The workloads' applications: plain TCP echo servers that remember, per connection, who
//! connected and whether the first bytes they read were a TLS record (they never should be:
//! a sidecar terminates mTLS before the app, and legacy-db speaks only plaintext).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

use super::DemoError;

/// What an app saw on one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    pub from: SocketAddr,
    /// The first byte was a TLS handshake record (0x16): encrypted bytes reached the app.
    pub looked_like_tls: bool,
    /// Bytes in the first read.
    pub first_read: usize,
}

/// A TCP echo server on 127.0.0.1.
#[derive(Clone)]
pub struct EchoApp {
    pub name: String,
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Received>>>,
}

impl EchoApp {
    /// Binds an ephemeral loopback port and echoes until `stop`.
    pub async fn start(name: &str, stop: watch::Receiver<bool>) -> Result<Self, DemoError> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| DemoError::setup(format!("binding {name}'s app port"), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| DemoError::setup(format!("{name}'s app address"), e))?;
        let app = Self {
            name: name.into(),
            addr,
            seen: Arc::default(),
        };
        tokio::spawn(app.clone().serve(listener, stop));
        Ok(app)
    }

    /// Every connection seen so far.
    pub fn received(&self) -> Vec<Received> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn serve(self, listener: TcpListener, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((conn, from)) => { tokio::spawn(self.clone().echo(conn, from)); }
                    Err(e) => tracing::debug!(app = %self.name, error = %e, "accept failed"),
                },
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Echoes until EOF. The connection is recorded on its first read, before anything is
    /// echoed, so a client that got its bytes back can look the record up at once.
    async fn echo(self, mut conn: TcpStream, from: SocketAddr) {
        let mut buf = [0u8; 4096];
        let mut first = true;
        loop {
            let n = match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if std::mem::take(&mut first) {
                self.seen
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Received {
                        from,
                        looked_like_tls: buf[0] == 0x16,
                        first_read: n,
                    });
            }
            if conn.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    }
}
