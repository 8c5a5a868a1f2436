//! The floor: the least a proxy can do on this machine. A plain TCP relay
//! with nginx's process model and nothing else — one thread per CPU, each
//! with its own `SO_REUSEPORT` listener and epoll, a connection staying on
//! the thread that accepted it, bytes copied through one buffer per
//! direction, no parsing, no timers, no registry. WebSocket clients work
//! through it because after the request every byte is opaque anyway.
//!
//! It is a yardstick, not a product: what no WebSocket proxy can beat on
//! this machine (the kernel's work for the same sockets and copies), so
//! the gap between it and nginx shows how much room a target leaves.

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

const BUF: usize = 16 * 1024;
const LISTENER: Token = Token(usize::MAX - 1);

/// Runs the relay on `threads` threads until the process is killed.
pub fn run(listen: SocketAddr, upstream: SocketAddr, threads: usize) -> ! {
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let listener = reuseport_listener(listen);
            std::thread::spawn(move || worker(listener, upstream))
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    std::process::exit(1)
}

fn reuseport_listener(addr: SocketAddr) -> TcpListener {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .expect("floor socket");
    s.set_reuse_port(true).expect("SO_REUSEPORT");
    s.set_reuse_address(true).expect("SO_REUSEADDR");
    s.set_nonblocking(true).expect("nonblocking");
    s.bind(&addr.into()).expect("floor bind");
    s.listen(1024).expect("floor listen");
    TcpListener::from_std(s.into())
}

/// One direction of a connection: bytes read from one side and not yet
/// written to the other.
struct Pipe {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// The source's FIN was seen (edge-triggered: it is not reported
    /// again, so the end of stream must be read for even after a pause).
    read_closed: bool,
}

impl Pipe {
    /// A pipe with a buffer from the thread's pool (nginx reuses its
    /// buffers too; a fresh zeroed 16 KiB per direction per connection
    /// would put a memset on every session).
    fn new(pool: &mut Vec<Box<[u8]>>) -> Self {
        Pipe {
            buf: pool
                .pop()
                .unwrap_or_else(|| vec![0; BUF].into_boxed_slice()),
            start: 0,
            end: 0,
            read_closed: false,
        }
    }

    /// Writes held bytes to `to`; false when the connection is over.
    fn flush(&mut self, to: &mut TcpStream) -> bool {
        while self.start < self.end {
            match to.write(&self.buf[self.start..self.end]) {
                Ok(n) => self.start += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(_) => return false,
            }
        }
        self.start = 0;
        self.end = 0;
        true
    }

    /// One write of the held bytes (a full socket leaves them held); false
    /// when the connection is over.
    fn write_once(&mut self, to: &mut TcpStream) -> bool {
        match to.write(&self.buf[self.start..self.end]) {
            Ok(n) => self.start += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => return false,
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        true
    }

    /// Reads what `from` has (while there is room), writes what it can to
    /// `to`. Returns false when the connection is over.
    /// `closing`: the peer's FIN has been seen, so a short read is
    /// not the end of what there is to read (the end of stream is next).
    fn pump(
        &mut self,
        from: &mut TcpStream,
        to: &mut TcpStream,
        to_ready: bool,
        closing: bool,
    ) -> bool {
        loop {
            if to_ready && self.start < self.end && !self.write_once(to) {
                return false;
            }
            if self.end == self.buf.len() {
                // Full: wait for `to` to drain (its writable event).
                return true;
            }
            let room = self.buf.len() - self.end;
            match from.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    // Pass on what is held, as far as the socket takes it.
                    if to_ready {
                        self.flush(to);
                    }
                    return false;
                }
                Ok(n) => {
                    self.end += n;
                    if n < room && !closing {
                        // A short read drained the socket (as nginx and
                        // tokio assume): write it and wait for the next edge.
                        return !to_ready || self.write_once(to);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(_) => return false,
            }
        }
    }
}

struct Conn {
    client: TcpStream,
    upstream: TcpStream,
    connected: bool,
    up: Pipe,
    down: Pipe,
}

/// Buffers a thread keeps for new connections.
const POOL_MAX: usize = 256;

fn recycle(conn: Conn, pool: &mut Vec<Box<[u8]>>) {
    for buf in [conn.up.buf, conn.down.buf] {
        if pool.len() < POOL_MAX {
            pool.push(buf);
        }
    }
}

fn worker(mut listener: TcpListener, upstream_addr: SocketAddr) {
    let mut poll = Poll::new().expect("epoll");
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .expect("register listener");
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut events = Events::with_capacity(512);
    let mut pool: Vec<Box<[u8]>> = Vec::new();
    loop {
        if poll.poll(&mut events, None).is_err() {
            continue;
        }
        for ev in events.iter() {
            if ev.token() == LISTENER {
                while let Ok((mut client, _)) = listener.accept() {
                    let Ok(mut upstream) = TcpStream::connect(upstream_addr) else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let slot = free.pop().unwrap_or_else(|| {
                        conns.push(None);
                        conns.len() - 1
                    });
                    let both = Interest::READABLE | Interest::WRITABLE;
                    let r = poll.registry();
                    if r.register(&mut client, Token(slot * 2), both).is_err()
                        || r.register(&mut upstream, Token(slot * 2 + 1), both)
                            .is_err()
                    {
                        free.push(slot);
                        continue;
                    }
                    conns[slot] = Some(Conn {
                        client,
                        upstream,
                        connected: false,
                        up: Pipe::new(&mut pool),
                        down: Pipe::new(&mut pool),
                    });
                }
                continue;
            }
            let slot = ev.token().0 / 2;
            let Some(Some(c)) = conns.get_mut(slot) else {
                continue;
            };
            let from_client = ev.token().0 % 2 == 0;
            if !from_client && !c.connected && ev.is_writable() {
                if c.upstream.take_error().ok().flatten().is_some() {
                    if let Some(conn) = conns[slot].take() {
                        recycle(conn, &mut pool);
                    }
                    free.push(slot);
                    continue;
                }
                c.connected = true;
                let _ = c.upstream.set_nodelay(true);
            }
            let Conn {
                client,
                upstream,
                connected,
                up,
                down,
            } = c;
            // Each side's event moves the bytes it can: reads on readable;
            // on writable the bytes held for it (including what a client
            // sent before the upstream connected), then reads resume if the
            // buffer had filled.
            let (side, other, from_side, to_side, other_ready) = if from_client {
                (client, upstream, up, down, *connected)
            } else {
                (upstream, client, down, up, true)
            };
            let mut alive = true;
            if ev.is_writable() && (from_client || *connected) && to_side.end > 0 {
                let was_full = to_side.end == BUF;
                let closing = to_side.read_closed;
                alive &=
                    to_side.flush(side) && (!was_full || to_side.pump(other, side, true, closing));
            }
            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                from_side.read_closed |= ev.is_read_closed() || ev.is_error();
                let closing = from_side.read_closed;
                alive &= from_side.pump(side, other, other_ready, closing);
            }
            if !alive {
                if let Some(conn) = conns[slot].take() {
                    recycle(conn, &mut pool);
                }
                free.push(slot);
            }
        }
    }
}
