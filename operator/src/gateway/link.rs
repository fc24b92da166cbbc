//! A connection as both sides of the gateway read it: the socket, and what has been read
//! from it and not yet taken (heads and bodies are split off the front of `read`).
use bytes::BytesMut;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::net::TcpStream;

/// The room a read asks for; below `MIN_READ` left, a buffer still shared is replaced.
const READ_BYTES: usize = 16 * 1024;
const MIN_READ: usize = 1024;

pub(super) struct Link {
    pub stream: TcpStream,
    pub read: BytesMut,
}

impl Link {
    pub(super) fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            read: BytesMut::new(),
        }
    }

    /// Reads more into `read`; `Ok(0)` once the peer has closed. Through tokio's
    /// `AsyncRead`, which takes a short read to mean the socket is drained: the next wait
    /// then costs no system call that would block. A read gets a full read's room when the
    /// buffer can give it back in place (nothing split off it still alive); while what was
    /// split off (a head, a body's bytes) still holds it, the room left is used as long as
    /// there is some, rather than moving to a new buffer for every read.
    pub(super) fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let room = self.read.capacity() - self.read.len();
        if room < READ_BYTES && !self.read.try_reclaim(READ_BYTES) && room < MIN_READ {
            self.read.reserve(READ_BYTES);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.read)
    }

    pub(super) async fn fill(&mut self) -> std::io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }
}
