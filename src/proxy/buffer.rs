//! Adaptive read buffers: small while a connection is quiet (an idle
//! session holds about 1 KiB per direction), doubling while reads fill
//! them, shrinking again when traffic calms down.

use bytes::BytesMut;

/// Smallest buffer, kept by quiet connections.
pub const MIN: usize = 1024;
/// Largest buffer a busy connection grows to.
pub const MAX: usize = 64 * 1024;

#[derive(Debug)]
pub struct ReadBuffer {
    pub buf: BytesMut,
    /// Capacity the next read should have room for.
    want: usize,
    /// Room the last `prepare` left, to tell a full read from a short one.
    spare: usize,
}

impl Default for ReadBuffer {
    fn default() -> Self {
        ReadBuffer {
            buf: BytesMut::new(),
            want: MIN,
            spare: 0,
        }
    }
}

impl ReadBuffer {
    /// Starts with bytes already read (e.g. after a handshake).
    pub fn with_bytes(bytes: &[u8]) -> ReadBuffer {
        let mut b = ReadBuffer::default();
        b.buf.extend_from_slice(bytes);
        b
    }

    /// Makes room before a read: a drained oversized buffer is replaced by
    /// one of the wanted size, a nearly full one grows.
    pub fn prepare(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 2 * self.want {
            self.buf = BytesMut::with_capacity(self.want);
        } else if self.buf.capacity() - self.buf.len() < self.want / 2 {
            self.buf.reserve(self.want);
        }
        self.spare = self.buf.capacity() - self.buf.len();
    }

    /// Adapts to a read of `n` bytes.
    pub fn filled(&mut self, n: usize) {
        if n >= self.spare {
            self.want = (self.want * 2).min(MAX);
        } else if n < self.want / 8 {
            self.want = (self.want / 2).max(MIN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_when_full_and_shrinks_when_quiet() {
        let mut b = ReadBuffer::default();
        b.prepare();
        assert!(b.buf.capacity() >= MIN && b.buf.capacity() < 4 * MIN);
        for _ in 0..10 {
            b.prepare();
            let room = b.buf.capacity() - b.buf.len();
            b.buf.extend_from_slice(&vec![0u8; room]);
            b.filled(room);
            b.buf.clear();
        }
        b.prepare();
        assert!(b.buf.capacity() >= MAX / 2, "grew to {}", b.buf.capacity());
        for _ in 0..20 {
            b.prepare();
            b.buf.extend_from_slice(b"tiny");
            b.filled(4);
            b.buf.clear();
        }
        b.prepare();
        assert!(
            b.buf.capacity() <= 2 * MIN,
            "shrank to {}",
            b.buf.capacity()
        );
    }
}
