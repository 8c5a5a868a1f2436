//! Client-to-upstream relay: one task per attached client.
//!
//! Bytes go upstream unchanged. The reader holds the upstream writer for a
//! whole message (from its first frame to its last), so messages of shared
//! clients never interleave. A Close frame, a protocol fault or the end of
//! the connection is reported to the driver, which decides what follows.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::buffer::ReadBuffer;
use super::frame::{self, Event, FrameScanner};
use super::io::{ClientIo, UpstreamIo};
use super::session::{Cmd, Session};
use crate::broker::Broker;

/// How long a kicked client may take to finish the message it is sending.
const KICK_GRACE: Duration = Duration::from_secs(2);

/// The upstream connection's write half, shared by a session's readers and
/// its driver; holding the lock means owning the upstream message stream.
pub struct UpstreamWriter {
    pub io: WriteHalf<UpstreamIo>,
    /// Bytes of a frame are partly written: no frame may be injected now.
    pub mid_frame: bool,
}

pub type SharedUpstream = Arc<tokio::sync::Mutex<UpstreamWriter>>;

pub struct Reader {
    pub broker: Arc<Broker>,
    pub session: Arc<Session>,
    pub client: u64,
    pub upstream: SharedUpstream,
    /// Cancelled when the broker closes this client (takeover, fault).
    pub kicked: CancellationToken,
}

impl Reader {
    pub async fn run(self, mut rd: ReadHalf<ClientIo>) {
        let max = self.broker.config.limits.max_message_size;
        let mut scanner = FrameScanner::new(true, max);
        let mut rb = ReadBuffer::default();
        let mut events = Vec::new();
        let mut guard: Option<tokio::sync::OwnedMutexGuard<UpstreamWriter>> = None;
        let mut kick_deadline: Option<Instant> = None;
        let stopped = self.session.stopped.clone();
        loop {
            let kicked_now = self.kicked.is_cancelled();
            if kicked_now && guard.is_none() {
                linger(&mut rd).await;
                return;
            }
            if kicked_now && kick_deadline.is_none() {
                kick_deadline = Some(Instant::now() + KICK_GRACE);
            }
            rb.prepare();
            let far = Instant::now() + Duration::from_secs(3600);
            let read = tokio::select! {
                biased;
                _ = stopped.cancelled() => {
                    drop(guard);
                    linger(&mut rd).await;
                    return;
                }
                _ = self.kicked.cancelled(), if !kicked_now => continue,
                _ = tokio::time::sleep_until(kick_deadline.unwrap_or(far)), if kick_deadline.is_some() => {
                    // Kicked inside a message that never finished: the upstream
                    // stream is torn and the session cannot go on.
                    self.report(Cmd::ClientGone { client: self.client, torn: true, mid_frame: !scanner.at_frame_boundary() }).await;
                    return;
                }
                r = rd.read_buf(&mut rb.buf) => r,
            };
            match read {
                Ok(n) if n > 0 => rb.filled(n),
                _ => {
                    let torn = !scanner.at_message_boundary();
                    let mid_frame = !scanner.at_frame_boundary();
                    drop(guard);
                    self.report(Cmd::ClientGone {
                        client: self.client,
                        torn,
                        mid_frame,
                    })
                    .await;
                    return;
                }
            }
            let buf = &mut rb.buf;
            events.clear();
            let (valid, fault) = match scanner.scan(buf, &mut events) {
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
                    guard = tokio::select! {
                        g = self.upstream.clone().lock_owned() => Some(g),
                        _ = stopped.cancelled() => return,
                    };
                }
                let Some(w) = guard.as_mut() else { return };
                w.mid_frame = true;
                let written = tokio::select! {
                    r = w.io.write_all(&buf[..upto]) => r.is_ok(),
                    _ = stopped.cancelled() => return,
                };
                if !written {
                    // The upstream is gone; the driver sees it on its side.
                    return;
                }
                w.mid_frame = close.is_none() && fault.is_none() && !scanner.at_frame_boundary();
                let m = &self.broker.metrics;
                m.bytes.upstream.inc_by(upto as u64);
                let ended = events
                    .iter()
                    .filter(|e| matches!(e, Event::MessageEnd { at } if *at <= upto))
                    .count();
                m.messages.upstream.inc_by(ended as u64);
                self.session.touch();
            }
            if let Some((at, len)) = close {
                drop(guard);
                let close_frame = buf[at..at + len].to_vec();
                self.report(Cmd::ClientClose {
                    client: self.client,
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
                self.report(Cmd::ClientFault {
                    client: self.client,
                    code: e.close_code(),
                    reason,
                })
                .await;
                return;
            }
            let _ = buf.split_to(valid);
            if scanner.at_message_boundary() {
                guard = None;
            }
        }
    }

    async fn report(&self, cmd: Cmd) {
        // A stopped driver needs no report.
        let _ = self.session.send(cmd).await;
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
