//! The fast lane: one pipelined connection to the primary for the two
//! calls every session makes — claiming a new session and recording its
//! end — written and parsed here in a few hundred instructions instead of
//! the general client's tens of thousands. Everything else goes through
//! the general connection in `valkey.rs`, which also finds the primary:
//! the lane is opened to the primary that connection uses and is rebuilt
//! whenever that connection is. Any failure kills the lane; the calls
//! waiting on it get an error, and the next call opens a new one.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::decimal::decimal;

/// One RESP reply (the lane sends no command that answers with an array).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Nil,
    Int(i64),
    Bulk(Vec<u8>),
    Status(String),
    Error(String),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum LaneError {
    #[error("registry connection: {0}")]
    Io(String),
    #[error("registry connection closed")]
    Closed,
    #[error("registry reply timed out")]
    Timeout,
    #[error("registry protocol: {0}")]
    Protocol(&'static str),
    #[error("too many registry calls waiting")]
    Busy,
    #[error("registry connection setup refused: {0}")]
    Setup(String),
}

/// Most calls waiting for replies at once.
const MAX_WAITING: usize = 4096;
/// Largest reply (or unparsed run of bytes) accepted.
const MAX_REPLY: usize = 64 * 1024;

/// Credentials and database for the lane's connection.
#[derive(Debug, Clone, Default)]
pub struct LaneAuth {
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: i64,
}

type Answer = Result<Vec<Reply>, LaneError>;

struct Waiter {
    replies: usize,
    got: Vec<Reply>,
    tx: oneshot::Sender<Answer>,
}

#[derive(Default)]
struct Queue {
    /// Encoded commands not yet written.
    out: Vec<u8>,
    /// Calls in the order their commands were queued.
    waiting: VecDeque<Waiter>,
    dead: Option<LaneError>,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while holding it; a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fails every waiting call; later calls are refused.
    fn kill(&self, why: LaneError) {
        let waiting = {
            let mut q = self.lock();
            if q.dead.is_none() {
                q.dead = Some(why.clone());
            }
            q.out.clear();
            std::mem::take(&mut q.waiting)
        };
        for w in waiting {
            let _ = w.tx.send(Err(why.clone()));
        }
    }

    /// Hands one reply to the oldest waiting call; false when none waits.
    fn deliver(&self, reply: Reply) -> bool {
        let done = {
            let mut q = self.lock();
            let Some(front) = q.waiting.front_mut() else {
                return false;
            };
            front.got.push(reply);
            if front.got.len() < front.replies {
                return true;
            }
            q.waiting.pop_front()
        };
        if let Some(w) = done {
            let _ = w.tx.send(Ok(w.got));
        }
        true
    }
}

/// An open lane.
pub struct Lane {
    shared: Arc<Shared>,
    write: tokio::sync::Mutex<OwnedWriteHalf>,
    reader: tokio::task::AbortHandle,
    /// The general connection's generation this lane belongs to.
    pub generation: u64,
}

impl Drop for Lane {
    fn drop(&mut self) {
        self.reader.abort();
        self.shared.kill(LaneError::Closed);
    }
}

/// Kills the lane if a write is abandoned halfway (its caller was
/// cancelled): the stream would hold half a command.
struct WriteGuard<'a> {
    shared: &'a Shared,
    done: bool,
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.shared
                .kill(LaneError::Io("write abandoned halfway".into()));
        }
    }
}

impl Lane {
    /// Connects to `host:port`, authenticates and selects the database,
    /// within `timeout`.
    pub async fn open(
        addr: (&str, u16),
        auth: &LaneAuth,
        generation: u64,
        timeout: Duration,
    ) -> Result<Lane, LaneError> {
        tokio::time::timeout(timeout, Lane::open_inner(addr, auth, generation))
            .await
            .map_err(|_| LaneError::Timeout)?
    }

    async fn open_inner(
        addr: (&str, u16),
        auth: &LaneAuth,
        generation: u64,
    ) -> Result<Lane, LaneError> {
        let io = |e: std::io::Error| LaneError::Io(e.to_string());
        let mut tcp = TcpStream::connect(addr).await.map_err(io)?;
        let _ = tcp.set_nodelay(true);
        let mut setup = Vec::new();
        let mut expected = 0;
        if let Some(password) = &auth.password {
            match &auth.username {
                Some(user) => encode(&mut setup, &[b"AUTH", user.as_bytes(), password.as_bytes()]),
                None => encode(&mut setup, &[b"AUTH", password.as_bytes()]),
            }
            expected += 1;
        }
        if auth.db != 0 {
            let mut digits = [0u8; 20];
            let db = decimal(auth.db.unsigned_abs(), &mut digits);
            encode(&mut setup, &[b"SELECT", db]);
            expected += 1;
        }
        let mut buf = BytesMut::with_capacity(512);
        if expected > 0 {
            tcp.write_all(&setup).await.map_err(io)?;
            let mut seen = 0;
            while seen < expected {
                match parse(&buf)? {
                    Some((reply, used)) => {
                        buf.advance(used);
                        seen += 1;
                        if let Reply::Error(e) = reply {
                            return Err(LaneError::Setup(e));
                        }
                    }
                    None => {
                        if tcp.read_buf(&mut buf).await.map_err(io)? == 0 {
                            return Err(LaneError::Closed);
                        }
                    }
                }
            }
        }
        let (rd, wr) = tcp.into_split();
        let shared = Arc::new(Shared::default());
        let reader = tokio::spawn(read_replies(rd, buf, shared.clone())).abort_handle();
        Ok(Lane {
            shared,
            write: tokio::sync::Mutex::new(wr),
            reader,
            generation,
        })
    }

    /// The lane failed and must be replaced.
    pub fn is_dead(&self) -> bool {
        self.shared.lock().dead.is_some()
    }

    pub fn kill(&self, why: LaneError) {
        self.shared.kill(why);
    }

    /// Sends `commands` as one pipeline and returns their replies, in
    /// order, within `timeout`. A timeout or an I/O failure kills the lane
    /// (replies could no longer be matched to calls).
    pub async fn call(&self, commands: &[&[&[u8]]], timeout: Duration) -> Answer {
        let rx = self.enqueue(commands)?;
        let exchange = async {
            self.flush().await?;
            rx.await.map_err(|_| LaneError::Closed)?
        };
        self.bounded(timeout, exchange).await
    }

    /// Like [`Lane::call`], but the commands first wait up to `delay` for
    /// another call's write to carry them: a session end rides along with
    /// the next claim instead of costing a write (and a read on the
    /// server) of its own.
    pub async fn call_deferred(
        &self,
        commands: &[&[&[u8]]],
        timeout: Duration,
        delay: Duration,
    ) -> Answer {
        let mut rx = self.enqueue(commands)?;
        let exchange = async {
            tokio::select! {
                biased;
                answer = &mut rx => return answer.map_err(|_| LaneError::Closed)?,
                _ = tokio::time::sleep(delay) => {}
            }
            // Nobody wrote them meanwhile (or did, and the replies are on
            // their way): a flush finds nothing in the latter case.
            self.flush().await?;
            rx.await.map_err(|_| LaneError::Closed)?
        };
        self.bounded(timeout, exchange).await
    }

    /// Queues `commands` for the next write and a waiter for their replies.
    fn enqueue(&self, commands: &[&[&[u8]]]) -> Result<oneshot::Receiver<Answer>, LaneError> {
        let (tx, rx) = oneshot::channel();
        let mut q = self.shared.lock();
        if let Some(why) = &q.dead {
            return Err(why.clone());
        }
        if q.waiting.len() >= MAX_WAITING {
            return Err(LaneError::Busy);
        }
        // Commands and waiters are queued under one lock, so the order of
        // the bytes written is the order replies are handed out in.
        for c in commands {
            encode(&mut q.out, c);
        }
        q.waiting.push_back(Waiter {
            replies: commands.len(),
            got: Vec::with_capacity(commands.len()),
            tx,
        });
        Ok(rx)
    }

    /// Writes whatever is queued now in one write; a call whose bytes
    /// another caller already wrote finds nothing.
    async fn flush(&self) -> Result<(), LaneError> {
        let mut w = self.write.lock().await;
        let mut out = std::mem::take(&mut self.shared.lock().out);
        if out.is_empty() {
            return Ok(());
        }
        let mut guard = WriteGuard {
            shared: &self.shared,
            done: false,
        };
        w.write_all(&out)
            .await
            .map_err(|e| LaneError::Io(e.to_string()))?;
        guard.done = true;
        // Give the buffer back for the next calls' commands, unless some
        // arrived meanwhile or it grew large.
        out.clear();
        let mut q = self.shared.lock();
        if q.out.is_empty() && out.capacity() <= MAX_REPLY {
            q.out = out;
        }
        Ok(())
    }

    /// Runs one exchange within `timeout`; a timeout or a failure kills
    /// the lane.
    async fn bounded(
        &self,
        timeout: Duration,
        exchange: impl std::future::Future<Output = Answer>,
    ) -> Answer {
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(replies)) => Ok(replies),
            Ok(Err(e)) => {
                self.shared.kill(e.clone());
                Err(e)
            }
            Err(_) => {
                self.shared.kill(LaneError::Timeout);
                Err(LaneError::Timeout)
            }
        }
    }
}

/// Reads replies and hands them to the waiting calls, until the
/// connection fails or the lane is dropped.
async fn read_replies(mut rd: OwnedReadHalf, mut buf: BytesMut, shared: Arc<Shared>) {
    let why = loop {
        let mut fault = None;
        loop {
            match parse(&buf) {
                Ok(Some((reply, used))) => {
                    buf.advance(used);
                    if !shared.deliver(reply) {
                        fault = Some(LaneError::Protocol("a reply nobody asked for"));
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    fault = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = fault {
            break e;
        }
        if buf.len() > MAX_REPLY {
            break LaneError::Protocol("reply too large");
        }
        buf.reserve(4096);
        match rd.read_buf(&mut buf).await {
            Ok(0) => break LaneError::Closed,
            Ok(_) => {}
            Err(e) => break LaneError::Io(e.to_string()),
        }
    };
    shared.kill(why);
}

/// Appends one command in RESP.
pub fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    // `$len\r\n` + arg + `\r\n` per argument, after `*n\r\n`.
    out.reserve(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    let mut digits = [0u8; 20];
    out.push(b'*');
    out.extend_from_slice(decimal(args.len() as u64, &mut digits));
    out.extend_from_slice(b"\r\n");
    for a in args {
        out.push(b'$');
        out.extend_from_slice(decimal(a.len() as u64, &mut digits));
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// One reply from the front of `buf` and its length; None while
/// incomplete.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, LaneError> {
    let Some(&kind) = buf.first() else {
        return Ok(None);
    };
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() > MAX_REPLY {
            return Err(LaneError::Protocol("reply line too long"));
        }
        return Ok(None);
    };
    let line = &buf[1..eol];
    let text = || String::from_utf8_lossy(line).into_owned();
    let number = || -> Result<i64, LaneError> {
        std::str::from_utf8(line)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(LaneError::Protocol("bad number"))
    };
    let after = eol + 2;
    Ok(Some(match kind {
        b'+' => (Reply::Status(text()), after),
        b'-' => (Reply::Error(text()), after),
        b':' => (Reply::Int(number()?), after),
        b'_' => (Reply::Nil, after),
        b'$' => {
            let len = number()?;
            if len < 0 {
                (Reply::Nil, after)
            } else {
                let len = len as usize;
                if len > MAX_REPLY {
                    return Err(LaneError::Protocol("reply too large"));
                }
                if buf.len() < after + len + 2 {
                    return Ok(None);
                }
                if &buf[after + len..after + len + 2] != b"\r\n" {
                    return Err(LaneError::Protocol("bulk reply not terminated"));
                }
                (
                    Reply::Bulk(buf[after..after + len].to_vec()),
                    after + len + 2,
                )
            }
        }
        _ => return Err(LaneError::Protocol("unexpected reply type")),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_encoded_in_resp() {
        let mut out = Vec::new();
        encode(&mut out, &[b"SET", b"k", b"v|1|"]);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$4\r\nv|1|\r\n");
    }

    #[test]
    fn replies_parse_and_wait_for_more_bytes() {
        assert_eq!(parse(b":12\r\n").unwrap(), Some((Reply::Int(12), 5)));
        assert_eq!(parse(b"$-1\r\n").unwrap(), Some((Reply::Nil, 5)));
        assert_eq!(parse(b"_\r\n").unwrap(), Some((Reply::Nil, 3)));
        assert_eq!(
            parse(b"$3\r\nabc\r\n:1\r\n").unwrap(),
            Some((Reply::Bulk(b"abc".to_vec()), 9))
        );
        assert_eq!(
            parse(b"-ERR unknown command 'DELIFEQ'\r\n").unwrap(),
            Some((Reply::Error("ERR unknown command 'DELIFEQ'".into()), 32))
        );
        assert_eq!(
            parse(b"+OK\r\n").unwrap(),
            Some((Reply::Status("OK".into()), 5))
        );
        for partial in [&b""[..], b":1", b"$3\r\nab", b"$3\r\nabc\r"] {
            assert_eq!(parse(partial).unwrap(), None, "{partial:?}");
        }
    }

    #[test]
    fn malformed_replies_are_errors() {
        assert!(parse(b"*2\r\n").is_err());
        assert!(parse(b":x\r\n").is_err());
        assert!(parse(b"$3\r\nabcd\r\n").is_err());
        assert!(parse(b"$99999999\r\n").is_err());
    }

    #[test]
    fn replies_go_to_calls_in_order_and_a_kill_fails_the_rest() {
        let shared = Shared::default();
        let (tx1, mut rx1) = oneshot::channel();
        let (tx2, mut rx2) = oneshot::channel();
        {
            let mut q = shared.lock();
            q.waiting.push_back(Waiter {
                replies: 2,
                got: Vec::new(),
                tx: tx1,
            });
            q.waiting.push_back(Waiter {
                replies: 1,
                got: Vec::new(),
                tx: tx2,
            });
        }
        assert!(shared.deliver(Reply::Int(1)));
        assert!(rx1.try_recv().is_err(), "first call still needs a reply");
        assert!(shared.deliver(Reply::Nil));
        assert_eq!(
            rx1.try_recv().unwrap().unwrap(),
            vec![Reply::Int(1), Reply::Nil]
        );
        shared.kill(LaneError::Closed);
        assert!(matches!(rx2.try_recv().unwrap(), Err(LaneError::Closed)));
        assert!(!shared.deliver(Reply::Int(0)), "nobody waits any more");
    }
}
