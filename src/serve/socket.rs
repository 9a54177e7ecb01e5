//! The plain TCP socket of a connection, shared: hyper and the WebSocket session read and write
//! it through [`SharedTcp`] as through any stream, and after an HTTP/1.1 WebSocket upgrade the
//! distributor may also write finished frames into it directly ([`PlainUpgraded::socket`]),
//! without waking the session's task (see `distributor::outbox`, which decides when it may).
//!
//! Sharing needs no lock: tokio's `TcpStream` reads and writes through `&self`, tracking
//! readiness per direction.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::admission::Guarded;

/// A TCP stream that others may also write to through a clone of its `Arc`.
#[derive(Debug)]
pub(super) struct SharedTcp(pub(super) Arc<TcpStream>);

impl AsyncRead for SharedTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            // A `WouldBlock` clears the readiness, so the next poll waits for the socket.
            match self.0.try_read_buf_readbuf(buf) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                result => return Poll::Ready(result),
            }
        }
    }
}

/// `try_read` into a `ReadBuf` (tokio offers it for `BufMut`s only).
trait TryReadBuf {
    fn try_read_buf_readbuf(&self, buf: &mut ReadBuf<'_>) -> io::Result<()>;
}

impl TryReadBuf for TcpStream {
    fn try_read_buf_readbuf(&self, buf: &mut ReadBuf<'_>) -> io::Result<()> {
        let read = self.try_read(buf.initialize_unfilled())?;
        buf.advance(read);
        Ok(())
    }
}

impl AsyncWrite for SharedTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write(buf) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                result => return Poll::Ready(result),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write_vectored(bufs) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                result => return Poll::Ready(result),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // What `TcpStream::poll_shutdown` does: shut the write side, never wait.
        Poll::Ready(socket2::SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write))
    }
}

/// The byte stream hyper serves on a plain TCP connection.
pub(super) type PlainIo = TokioIo<Guarded<SharedTcp>>;

/// An HTTP/1.1 connection upgraded on plain TCP, taken back from hyper whole.
#[derive(Debug)]
pub struct PlainUpgraded {
    /// The connection's stream, still holding its admission ticket and write deadline.
    pub stream: PlainStream,
    /// The same socket, for writes that must not wait (`try_write`).
    pub socket: Arc<TcpStream>,
    /// Bytes the client sent after its request that hyper had already read.
    pub read_ahead: Bytes,
}

/// A plain connection's stream after an upgrade.
#[derive(Debug)]
pub struct PlainStream(Guarded<SharedTcp>);

/// The upgraded connection's own stream and socket if it is plain TCP (an HTTP/1.1 upgrade on
/// a listener without TLS); otherwise the upgrade as it was.
pub fn plain_upgraded(upgraded: Upgraded) -> Result<PlainUpgraded, Upgraded> {
    let parts = hyper_util::server::conn::auto::upgrade::downcast::<PlainIo>(upgraded)?;
    let stream = parts.io.into_inner();
    let socket = Arc::clone(&stream.get_ref().0);
    Ok(PlainUpgraded {
        stream: PlainStream(stream),
        socket,
        read_ahead: parts.read_buf,
    })
}

impl AsyncRead for PlainStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for PlainStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
