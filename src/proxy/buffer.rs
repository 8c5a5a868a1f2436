//! Read buffers that exist only while data moves.
//!
//! A plain TCP connection holds no buffer while it waits (see `io.rs`): a
//! buffer is taken from a small per-thread pool when the socket becomes
//! readable and given back once every byte in it has been relayed. Its
//! size adapts: it doubles while reads fill it and halves when traffic
//! calms down, between [`MIN`] and [`MAX`]. Each thread's pool keeps at
//! most [`POOL_PER_CLASS`] buffers of each size (about 2 MiB in all).

use std::cell::RefCell;

/// Smallest buffer.
pub const MIN: usize = 1024;
/// Largest buffer a busy connection grows to.
pub const MAX: usize = 64 * 1024;
/// Sizes MIN, 2*MIN, ... MAX.
const CLASSES: usize = 7;
/// Buffers of one size a thread keeps for reuse.
pub const POOL_PER_CLASS: usize = 16;

thread_local! {
    static POOL: RefCell<[Vec<Vec<u8>>; CLASSES]> = const { RefCell::new([const { Vec::new() }; CLASSES]) };
}

fn class_of(capacity: usize) -> Option<usize> {
    if !(MIN..=MAX).contains(&capacity) || !capacity.is_power_of_two() {
        return None;
    }
    Some((capacity / MIN).trailing_zeros() as usize)
}

/// A buffer of exactly `size` bytes of capacity (a power of two in range).
fn take(size: usize) -> Vec<u8> {
    let reused = class_of(size).and_then(|c| POOL.with(|p| p.borrow_mut()[c].pop()));
    reused.unwrap_or_else(|| Vec::with_capacity(size))
}

fn give(mut buf: Vec<u8>) {
    if let Some(c) = class_of(buf.capacity()) {
        buf.clear();
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            if p[c].len() < POOL_PER_CLASS {
                p[c].push(buf);
            }
        });
    }
}

#[derive(Debug)]
pub struct ReadBuffer {
    /// Bytes read and not yet relayed (a partial frame at most, between reads).
    pub buf: Vec<u8>,
    /// Capacity the next read should have room for.
    want: usize,
    /// Room the last `prepare` left, to tell a full read from a short one.
    spare: usize,
}

impl Default for ReadBuffer {
    fn default() -> Self {
        ReadBuffer {
            buf: Vec::new(),
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

    /// Makes room before a read: takes a buffer of the wanted size, or a
    /// larger one when held bytes leave too little room.
    pub fn prepare(&mut self) {
        if self.buf.capacity() == 0 {
            self.buf = take(self.want);
        } else if self.buf.capacity() - self.buf.len() < self.want / 2 {
            let size = (self.buf.len() + self.want).next_power_of_two().max(MIN);
            let mut bigger = take(size);
            bigger.extend_from_slice(&self.buf);
            give(std::mem::replace(&mut self.buf, bigger));
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

    /// Drops the first `n` bytes (relayed).
    pub fn consume(&mut self, n: usize) {
        if n >= self.buf.len() {
            self.buf.clear();
        } else {
            self.buf.drain(..n);
        }
    }

    /// Gives the memory back when no bytes are held (a partial frame keeps
    /// its buffer).
    pub fn release(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            give(std::mem::take(&mut self.buf));
        }
    }
}

impl Drop for ReadBuffer {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_when_full_and_shrinks_when_quiet() {
        let mut b = ReadBuffer::default();
        b.prepare();
        assert_eq!(b.buf.capacity(), MIN);
        for _ in 0..10 {
            b.prepare();
            let room = b.buf.capacity() - b.buf.len();
            b.buf.extend_from_slice(&vec![0u8; room]);
            b.filled(room);
            b.consume(room);
            b.release();
        }
        b.prepare();
        assert_eq!(b.buf.capacity(), MAX, "grew to {}", b.buf.capacity());
        for _ in 0..20 {
            b.release();
            b.prepare();
            b.buf.extend_from_slice(b"tiny");
            b.filled(4);
            b.consume(4);
        }
        b.release();
        b.prepare();
        assert_eq!(b.buf.capacity(), MIN, "shrank to {}", b.buf.capacity());
    }

    #[test]
    fn holds_nothing_once_released_and_keeps_partial_bytes() {
        let mut b = ReadBuffer::default();
        b.prepare();
        b.buf.extend_from_slice(b"abcdef");
        b.consume(4);
        b.release();
        assert_eq!(b.buf, b"ef", "held bytes survive a release");
        b.consume(2);
        b.release();
        assert_eq!(b.buf.capacity(), 0);
    }

    #[test]
    fn pool_is_bounded() {
        let bufs: Vec<Vec<u8>> = (0..POOL_PER_CLASS * 3).map(|_| take(MIN)).collect();
        for b in bufs {
            give(b);
        }
        let kept = POOL.with(|p| p.borrow()[0].len());
        assert_eq!(kept, POOL_PER_CLASS);
    }
}
