//! Accepting connections on the gRPC port without trusting the peer: at most
//! [`ServeOptions::max_connections`] at once, each closed when it sends nothing within
//! [`ServeOptions::handshake_timeout`] of being accepted (a client that never sends
//! the HTTP/2 preface) or moves no byte either way for
//! [`ServeOptions::idle_timeout`]; and an accept loop that backs off and says why
//! when `accept` fails (file descriptors exhausted) instead of spinning on the error.
//!
//! tonic's own `TcpIncoming` has none of these: idle and preface-only connections
//! stayed open forever, and with descriptors exhausted its loop spun at 100 % of a
//! core with nothing logged.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::options::ServeOptions;

/// Connection counters, for the metrics endpoint.
#[derive(Debug, Default)]
pub(crate) struct ConnStats {
    /// Connections open now.
    pub open: AtomicUsize,
    /// Connections refused at the limit.
    pub refused: AtomicU64,
    /// Connections closed for sending nothing in time (handshake or idle).
    pub timed_out: AtomicU64,
    /// `accept` failures (such as file descriptors exhausted).
    pub accept_errors: AtomicU64,
}

/// The accepted connections of `listener`, within the limits of `options`.
pub(crate) fn incoming(
    listener: TcpListener,
    options: &ServeOptions,
    stats: Arc<ConnStats>,
) -> impl Stream<Item = io::Result<Conn>> + Send + 'static {
    let limits = Limits {
        max: options.max_connections.max(1),
        handshake: options.handshake_timeout,
        idle: options.idle_timeout,
    };
    futures::stream::unfold(
        (listener, stats, None::<Instant>),
        move |(listener, stats, mut last_warning)| async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        if stats.open.load(Ordering::Acquire) >= limits.max {
                            // Dropping the socket closes it at once.
                            stats.refused.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let _ = stream.set_nodelay(true);
                        let conn = Conn::new(stream, &limits, stats.clone());
                        return Some((Ok(conn), (listener, stats, last_warning)));
                    }
                    Err(e) => {
                        stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                        if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                            tracing::warn!(
                                error = %e,
                                open = stats.open.load(Ordering::Relaxed),
                                failures = stats.accept_errors.load(Ordering::Relaxed),
                                "accepting a connection failed; backing off"
                            );
                            last_warning = Some(Instant::now());
                        }
                        // Descriptors come back as connections close: retry soon, but
                        // do not spin.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        },
    )
}

#[derive(Clone, Copy, Debug)]
struct Limits {
    max: usize,
    handshake: Duration,
    idle: Duration,
}

/// An accepted connection, closed (its reads fail with `TimedOut`) once it has moved no
/// byte for its deadline: the handshake timeout until the peer's first byte arrives,
/// then the idle timeout after each byte read or written.
#[derive(Debug)]
pub(crate) struct Conn {
    stream: TcpStream,
    deadline: Pin<Box<Sleep>>,
    idle: Duration,
    /// Whether the peer has sent a byte: until then only its bytes extend the deadline
    /// (the server's own HTTP/2 settings, written at once, must not).
    heard: bool,
    stats: Arc<ConnStats>,
}

impl Conn {
    fn new(stream: TcpStream, limits: &Limits, stats: Arc<ConnStats>) -> Self {
        stats.open.fetch_add(1, Ordering::AcqRel);
        Conn {
            stream,
            deadline: Box::pin(tokio::time::sleep(limits.handshake)),
            idle: limits.idle,
            heard: false,
            stats,
        }
    }

    fn moved(&mut self) {
        let next = tokio::time::Instant::now() + self.idle;
        self.deadline.as_mut().reset(next);
    }

    /// `Err(TimedOut)` once the deadline passed (and the waker registered otherwise).
    fn check_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the connection sent nothing within its deadline",
            ));
        }
        Ok(())
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.heard = true;
                    self.moved();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match self.check_deadline(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = written
            && n > 0
            && self.heard
        {
            self.moved();
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}
