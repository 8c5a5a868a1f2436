//! Client-to-upstream relay: one task per attached client.
//!
//! Bytes go upstream unchanged. The reader holds the upstream writer for a
//! whole message (from its first frame to its last), so messages of shared
//! clients never interleave. A Close frame, a protocol fault or the end of
//! the connection is reported to the driver, which decides what follows.

use std::pin::{pin, Pin};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, Sleep};

use super::buffer::ReadBuffer;
use super::frame::{self, Event, FrameScanner};
use super::io::{ReadSide, WriteSide};
use super::kick::Kick;
use super::session::{Cmd, Session};
use crate::broker::Broker;

/// How long a kicked client may take to finish the message it is sending.
const KICK_GRACE: Duration = Duration::from_secs(2);

/// The upstream connection's write half, shared by a session's readers and
/// its driver; holding the lock means owning the upstream message stream.
pub struct UpstreamWriter {
    pub io: WriteSide,
    /// Bytes of a frame are partly written: no frame may be injected now.
    pub mid_frame: bool,
}

pub type SharedUpstream = Arc<tokio::sync::Mutex<UpstreamWriter>>;

pub struct Reader {
    pub broker: Arc<Broker>,
    pub session: Arc<Session>,
    pub client: u64,
    pub upstream: SharedUpstream,
    /// Fires when the broker closes this client (takeover, fault) or the
    /// session stops.
    pub kicked: Kick,
}

/// A reader ready to run on the task that answered its client's upgrade
/// (no task of its own for a session's first client).
pub struct ReaderStart {
    pub reader: Reader,
    pub rd: ReadSide,
    /// Bytes read past the handshake.
    pub leftover: Bytes,
}

impl ReaderStart {
    pub fn run(self) -> impl std::future::Future<Output = ()> + Send {
        self.reader.run(self.rd, self.leftover)
    }
}

/// Waits for an optional timer; never completes without one.
async fn maybe_sleep(timer: &mut Option<Pin<Box<Sleep>>>) {
    match timer {
        Some(t) => t.as_mut().await,
        None => std::future::pending().await,
    }
}

/// What woke the reader.
enum Wake {
    Read(std::io::Result<usize>),
    Stopped,
    Kicked,
    KickExpired,
}

/// A running reader: everything lives in one heap block, so the task's
/// future holds only a pointer to it.
struct Running {
    reader: Reader,
    rd: ReadSide,
    rb: ReadBuffer,
    scanner: FrameScanner,
    events: Vec<Event>,
}

impl Reader {
    /// The reader task for one client; `leftover`: bytes read past the
    /// handshake.
    pub fn run(
        self,
        rd: ReadSide,
        leftover: Bytes,
    ) -> impl std::future::Future<Output = ()> + Send {
        let max = self.broker.config.limits.max_message_size;
        let running = Box::new(Running {
            reader: self,
            rd,
            rb: ReadBuffer::with_bytes(&leftover),
            scanner: FrameScanner::new(true, max).holding_frames_up_to(frame::HOLD_FRAMES_UP_TO),
            events: Vec::with_capacity(2),
        });
        running.run()
    }

    async fn report(&self, cmd: Cmd) {
        // A stopped driver needs no report. Rare: boxed to keep the task small.
        let _ = Box::pin(self.session.send(cmd)).await;
    }
}

impl Running {
    async fn run(mut self: Box<Self>) {
        let this = &mut *self;
        let me = &this.reader;
        let mut guard: Option<tokio::sync::OwnedMutexGuard<UpstreamWriter>> = None;
        // The client's kick fires on a takeover, a drop by the driver and
        // when the session stops: one waiter, created once, for all three.
        let signal = &me.session.signal;
        let mut kicked = pin!(me.kicked.fired_in(signal));
        let mut was_kicked = false;
        let mut kick_deadline: Option<Pin<Box<Sleep>>> = None;
        let mut pending = !this.rb.buf.is_empty();
        loop {
            if was_kicked && guard.is_none() {
                // Kicked, and no message of ours is half-sent upstream.
                Box::pin(linger_until_stop(&mut this.rd, &me.broker.shutdown)).await;
                return;
            }
            let wake = if pending {
                pending = false;
                Wake::Read(Ok(this.rb.buf.len()))
            } else {
                tokio::select! {
                    biased;
                    _ = kicked.as_mut(), if !was_kicked => {
                        if signal.is_stopped() { Wake::Stopped } else { Wake::Kicked }
                    }
                    _ = signal.stopped(), if was_kicked => Wake::Stopped,
                    _ = maybe_sleep(&mut kick_deadline) => Wake::KickExpired,
                    r = this.rd.read_into(&mut this.rb) => Wake::Read(r),
                }
            };
            match wake {
                Wake::Stopped => {
                    drop(guard);
                    Box::pin(linger_until_stop(&mut this.rd, &me.broker.shutdown)).await;
                    return;
                }
                Wake::Kicked => {
                    was_kicked = true;
                    if guard.is_none() {
                        Box::pin(linger_until_stop(&mut this.rd, &me.broker.shutdown)).await;
                        return;
                    }
                    kick_deadline = Some(Box::pin(tokio::time::sleep_until(
                        Instant::now() + KICK_GRACE,
                    )));
                    continue;
                }
                Wake::KickExpired => {
                    // Kicked inside a message that never finished: the upstream
                    // stream is torn and the session cannot go on.
                    me.report(Cmd::ClientGone {
                        client: me.client,
                        torn: true,
                        mid_frame: !this.scanner.at_frame_boundary(),
                    })
                    .await;
                    return;
                }
                Wake::Read(Ok(n)) if n > 0 => {}
                Wake::Read(_) => {
                    // Bytes held back that start a data frame: the client
                    // dropped inside a message, though none of it went
                    // upstream (the upstream is at a frame boundary).
                    let held_data = this.rb.buf.first().is_some_and(|b| b & 0x0F < 0x8);
                    let torn = !this.scanner.at_message_boundary() || held_data;
                    let mid_frame = !this.scanner.at_frame_boundary();
                    drop(guard);
                    me.report(Cmd::ClientGone {
                        client: me.client,
                        torn,
                        mid_frame,
                    })
                    .await;
                    return;
                }
            }
            let buf = &this.rb.buf;
            let events = &mut this.events;
            events.clear();
            let (valid, fault) = match this.scanner.scan(buf, events) {
                Ok(n) => (n, None),
                Err(e) => (e.valid_upto(), Some(e)),
            };
            let close = events.iter().find_map(|e| match *e {
                Event::Control {
                    at,
                    len,
                    opcode: frame::OP_CLOSE,
                } => Some((at, len)),
                _ => None,
            });
            let upto = close.map(|(at, _)| at).unwrap_or(valid);
            if upto > 0 {
                if guard.is_none() {
                    guard = match me.upstream.clone().try_lock_owned() {
                        Ok(g) => Some(g),
                        Err(_) => tokio::select! {
                            biased;
                            g = me.upstream.clone().lock_owned() => Some(g),
                            _ = signal.stopped() => return,
                        },
                    };
                }
                let Some(w) = guard.as_mut() else { return };
                w.mid_frame = true;
                let written = tokio::select! {
                    biased;
                    r = w.io.write_all(&buf[..upto]) => r.is_ok(),
                    _ = signal.stopped() => return,
                };
                if !written {
                    // The upstream is gone; the driver sees it on its side.
                    return;
                }
                w.mid_frame =
                    close.is_none() && fault.is_none() && !this.scanner.at_frame_boundary();
                let m = &me.broker.metrics;
                m.bytes.upstream.inc_by(upto as u64);
                let ended = events
                    .iter()
                    .filter(|e| matches!(e, Event::MessageEnd { at } if *at <= upto))
                    .count();
                m.messages.upstream.inc_by(ended as u64);
                me.session.touch();
            }
            if let Some((at, len)) = close {
                drop(guard);
                let close_frame = buf[at..at + len].to_vec();
                me.report(Cmd::ClientClose {
                    client: me.client,
                    frame: close_frame,
                })
                .await;
                return;
            }
            if let Some(e) = fault {
                drop(guard);
                let reason = match e {
                    frame::FrameError::TooBig { .. } => "message too big",
                    frame::FrameError::Protocol { reason, .. } => reason,
                };
                me.report(Cmd::ClientFault {
                    client: me.client,
                    code: e.close_code(),
                    reason,
                })
                .await;
                return;
            }
            this.rb.consume(valid);
            if this.scanner.at_message_boundary() {
                guard = None;
            }
        }
    }
}

/// [`linger`], cut short when the node stops (past its drain deadline
/// nothing waits for a peer's reply).
pub async fn linger_until_stop<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    stop: &tokio_util::sync::CancellationToken,
) {
    tokio::select! {
        _ = linger(rd) => {}
        _ = stop.cancelled() => {}
    }
}

/// After the broker closed a client: read and discard until its Close
/// reply and end of stream, or a short deadline. Closing a socket with
/// unread input sends a reset, which can destroy the Close frame the
/// client has not read yet.
pub async fn linger<R: tokio::io::AsyncRead + Unpin>(rd: &mut R) {
    let mut scratch = [0u8; 512];
    let deadline = tokio::time::sleep(KICK_GRACE);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => return,
            r = rd.read(&mut scratch) => match r {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
        }
    }
}
