//! The byte streams the relay moves data between: client connections (after
//! hyper's upgrade) and upstream connections (plain TCP or TLS), split into
//! a read side and a write side.
//!
//! On plain TCP the read side waits for readiness before it takes a read
//! buffer, so a quiet connection holds no buffer at all (the way HAProxy
//! keeps buffers only while data moves). TLS streams keep rustls's own
//! buffers and are read through a small adaptive buffer.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::buffer::ReadBuffer;

/// A client connection after the 101, as hyper hands it over.
pub type ClientIo = hyper::upgrade::Upgraded;

/// A TCP connection, plain or inside TLS (`T` is the TLS stream type).
pub enum MaybeTls<T> {
    Plain(TcpStream),
    Tls(Box<T>),
}

/// A connection to an upstream replica.
pub type UpstreamIo = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

/// A connection accepted on the public listener, before hyper sees it.
pub type PublicStream = MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;

/// Any byte stream the relay can use (TLS, or hyper's upgraded wrapper).
pub trait ByteStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> ByteStream for T {}

type Boxed = Box<dyn ByteStream>;

/// The read side of a relayed connection.
pub enum ReadSide {
    Tcp(OwnedReadHalf),
    Stream(ReadHalf<Boxed>),
}

/// The write side of a relayed connection.
pub enum WriteSide {
    Tcp(OwnedWriteHalf),
    Stream(WriteHalf<Boxed>),
    /// Given up with [`WriteSide::close_quietly`]: writes fail.
    Closed,
}

impl WriteSide {
    /// Gives a plain TCP write side up without a `shutdown` of its own:
    /// the connection closes (and its FIN goes out) with the `close` that
    /// follows once the read side is dropped too. For a connection whose
    /// close handshake is over, this saves a system call. False (and
    /// nothing done) for TLS, whose end needs a `close_notify` written by
    /// `shutdown`.
    pub fn close_quietly(&mut self) -> bool {
        match std::mem::replace(self, WriteSide::Closed) {
            WriteSide::Tcp(w) => {
                w.forget();
                true
            }
            other => {
                *self = other;
                false
            }
        }
    }
}

impl<T: ByteStream + 'static> MaybeTls<T> {
    /// Splits the connection into its two sides.
    pub fn into_sides(self) -> (ReadSide, WriteSide) {
        match self {
            MaybeTls::Plain(tcp) => {
                let (r, w) = tcp.into_split();
                (ReadSide::Tcp(r), WriteSide::Tcp(w))
            }
            MaybeTls::Tls(s) => split_boxed(s),
        }
    }
}

fn split_boxed(s: Boxed) -> (ReadSide, WriteSide) {
    let (r, w) = tokio::io::split(s);
    (ReadSide::Stream(r), WriteSide::Stream(w))
}

/// A client connection after its 101: both sides, and any bytes already
/// read past the handshake.
pub struct ClientConn {
    pub read: ReadSide,
    pub write: WriteSide,
    pub leftover: Bytes,
}

impl ClientConn {
    /// A connection whose handshake the listener answered itself.
    pub fn from_stream(stream: PublicStream, leftover: Bytes) -> ClientConn {
        let (read, write) = stream.into_sides();
        ClientConn {
            read,
            write,
            leftover,
        }
    }

    /// Takes an upgraded connection back from hyper.
    pub fn from_upgraded(upgraded: ClientIo) -> ClientConn {
        match upgraded.downcast::<hyper_util::rt::TokioIo<Prefixed<PublicStream>>>() {
            Ok(parts) => {
                let (stream, unread) = parts.io.into_inner().into_parts();
                let leftover = if unread.is_empty() {
                    parts.read_buf
                } else {
                    // Cannot happen: hyper reads the prefix before the head ends.
                    let mut all = unread.to_vec();
                    all.extend_from_slice(&parts.read_buf);
                    Bytes::from(all)
                };
                ClientConn::from_stream(stream, leftover)
            }
            // Not our listener's stream type (cannot happen with our
            // listener): relay through hyper's wrapper.
            Err(upgraded) => {
                let (read, write) = split_boxed(Box::new(hyper_util::rt::TokioIo::new(upgraded)));
                ClientConn {
                    read,
                    write,
                    leftover: Bytes::new(),
                }
            }
        }
    }
}

/// A stream whose first bytes were already read (by the listener, looking
/// at the request head) and are served again before the rest.
pub struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    pub fn new(prefix: Bytes, inner: T) -> Prefixed<T> {
        Prefixed { prefix, inner }
    }

    /// The stream and the part of the prefix not yet read.
    pub fn into_parts(self) -> (T, Bytes) {
        (self.inner, self.prefix)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if !me.prefix.is_empty() {
            let n = me.prefix.len().min(buf.remaining());
            buf.put_slice(&me.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl ReadSide {
    /// Reads at least one byte into `rb` (0 at end of stream). On plain TCP
    /// with nothing held, no buffer is taken until the socket is readable.
    pub async fn read_into(&mut self, rb: &mut ReadBuffer) -> io::Result<usize> {
        match self {
            ReadSide::Tcp(r) => {
                if rb.buf.is_empty() {
                    // Nothing held: wait without a buffer.
                    rb.release();
                    r.readable().await?;
                }
                rb.prepare();
                let n = r.read_buf(&mut rb.buf).await?;
                rb.filled(n);
                Ok(n)
            }
            ReadSide::Stream(r) => {
                rb.prepare();
                let n = r.read_buf(&mut rb.buf).await?;
                rb.filled(n);
                Ok(n)
            }
        }
    }
}

impl AsyncRead for ReadSide {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadSide::Tcp(r) => Pin::new(r).poll_read(cx, buf),
            ReadSide::Stream(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteSide {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteSide::Tcp(w) => Pin::new(w).poll_write(cx, buf),
            WriteSide::Stream(w) => Pin::new(w).poll_write(cx, buf),
            WriteSide::Closed => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteSide::Tcp(w) => Pin::new(w).poll_flush(cx),
            WriteSide::Stream(w) => Pin::new(w).poll_flush(cx),
            WriteSide::Closed => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteSide::Tcp(w) => Pin::new(w).poll_shutdown(cx),
            WriteSide::Stream(w) => Pin::new(w).poll_shutdown(cx),
            WriteSide::Closed => Poll::Ready(Ok(())),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for MaybeTls<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
