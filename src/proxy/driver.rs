//! The session driver: one task per session that owns the upstream
//! connection's read half and every attached client's write half.
//!
//! It relays upstream bytes to the clients unchanged (frame headers are
//! only tracked), buffers whole messages while no client is attached
//! (resume), and is the one place that decides how a session ends and
//! which close code each side gets. Client-to-upstream bytes are relayed by
//! one reader task per client (`client_reader.rs`).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use std::future::Future;
use std::pin::{pin, Pin};
use std::task::Poll;

use tokio::io::AsyncWriteExt;
use tokio::time::{sleep_until, Instant, Sleep};

use bytes::{Bytes, BytesMut};

use super::buffer::ReadBuffer;
use super::client_reader::{self, ReaderStart, SharedUpstream, UpstreamWriter};
use super::frame::{self, Event, FrameError, FrameScanner};
use super::io::{ClientConn, ReadSide, UpstreamIo, WriteSide};
use super::kick::{Kick, Signal};
use super::session::{Cmd, ConnGuard, EndReason, Reservation, Session};
use crate::broker::Broker;
use crate::clock;
use crate::control::upstreams::UpstreamLease;

/// How long a finishing close handshake may take.
pub(super) const CLOSE_LINGER: Duration = Duration::from_secs(5);
/// Bound on one injected close frame's write.
pub(super) const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Operator messages queued while the upstream is mid-message.
const MAX_PENDING_SENDS: usize = 64;

/// One attached client, seen from the driver.
struct Client {
    id: u64,
    writer: WriteSide,
    /// Fires when the client is replaced or closed by the broker, or the
    /// session stops: its reader stops forwarding and its writes stop
    /// waiting.
    kicked: Kick,
    /// The client's stream is at a message boundary of the upstream stream
    /// (a client that joins mid-message starts at the next message).
    synced: bool,
    /// Its reader has ended after passing on the client's Close: nothing
    /// more is read from the connection.
    reader_done: bool,
    _conn: ConnGuard,
}

/// The resume window: no client attached.
struct Detached {
    deadline: Instant,
    /// Upstream messages kept for replay, raw frames.
    buffer: Vec<u8>,
    /// The buffer starts at a message boundary (false while the rest of a
    /// message the dropped client saw in part is skipped).
    synced: bool,
}

/// Why the driver loop stopped.
enum Stop {
    End(EndReason),
    UpstreamLost,
    UpstreamFault(FrameError),
    ClientTorn {
        mid_frame: bool,
    },
    ClientFault {
        client: u64,
        code: u16,
        reason: &'static str,
    },
    /// A close handshake finished (or timed out): just close the sockets.
    Done,
}

const RESUME_EXPIRED: EndReason = EndReason {
    client_code: 1001,
    client_reason: "resume grace expired",
    upstream_code: 1001,
    upstream_reason: "client did not return",
};
const RESUME_OVERFLOW: EndReason = EndReason {
    client_code: 1001,
    client_reason: "resume buffer overflow",
    upstream_code: 1001,
    upstream_reason: "client did not return",
};
const CLIENT_LEFT: EndReason = EndReason {
    client_code: 1001,
    client_reason: "session ended",
    upstream_code: 1001,
    upstream_reason: "client went away",
};

pub struct Driver {
    broker: Arc<Broker>,
    session: Arc<Session>,
    up_read: ReadSide,
    up_write: SharedUpstream,
    _lease: UpstreamLease,
    clients: Vec<Client>,
    next_client: u64,
    scanner: FrameScanner,
    buf: ReadBuffer,
    events: Vec<Event>,
    detached: Option<Detached>,
    pending_sends: VecDeque<Vec<u8>>,
    /// The upstream sent a Close frame.
    upstream_closed: bool,
    /// The upstream's end of the stream was read: nothing is left to drain.
    upstream_eof: bool,
    /// A close handshake is under way; the session stops by this time.
    closing_deadline: Option<Instant>,
    /// Out of the table and the registry (see `retire`).
    retired: bool,
    /// A scheduled end (drain jitter).
    end_at: Option<(Instant, EndReason)>,
    /// When to look at the idle timeout next (activity only moves it later,
    /// so the timer is re-armed when it fires, not on every message).
    idle_check: Instant,
}

/// What woke the driver.
enum Wake {
    Cmd(Cmd),
    Upstream(std::io::Result<usize>),
    Timer,
}

/// A created session's driver that has not started yet: it starts with
/// the session's first client already attached once that client has its
/// 101 (no command round trip, and the client's reader runs on the task
/// that answered it), or without a client when the upgrade did not finish.
/// Dropped unstarted, it starts without a client: a created session always
/// gets its driver (and so its end, and its registry entry's removal).
pub struct PendingDriver(Option<Box<Driver>>);

impl PendingDriver {
    pub fn new(driver: Driver) -> PendingDriver {
        // Boxed now: the driver's state lives in this block from here on,
        // while it waits and once it runs.
        PendingDriver(Some(Box::new(driver)))
    }

    /// Starts the driver with `io` attached through `reservation` (the
    /// session's first place); returns the client's reader, to be run by
    /// the caller.
    pub fn start_with(
        mut self,
        reservation: Reservation,
        io: ClientConn,
        conn: ConnGuard,
    ) -> Option<ReaderStart> {
        let mut driver = self.0.take()?;
        let reader = reservation
            .into_first_place()
            .map(|kicked| driver.attach_first(io, kicked, conn));
        driver.spawn();
        reader
    }

    /// Starts the driver with no client (the hyper path attaches its client
    /// through a command once the upgrade completes).
    pub fn start(mut self) {
        if let Some(driver) = self.0.take() {
            driver.spawn();
        }
    }
}

impl Drop for PendingDriver {
    fn drop(&mut self) {
        // Outside a runtime (it is shutting down) there is nothing to run on.
        if let Some(driver) = self.0.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                driver.spawn();
            }
        }
    }
}

impl Driver {
    pub fn new(
        broker: Arc<Broker>,
        session: Arc<Session>,
        upstream: UpstreamIo,
        leftover: BytesMut,
        lease: UpstreamLease,
    ) -> Driver {
        let (up_read, up_write) = upstream.into_sides();
        let idle_check = Instant::now() + broker.config.session.idle_timeout;
        let max = broker.config.limits.max_message_size;
        let buf = ReadBuffer::with_bytes(&leftover);
        let first_attach_window =
            broker.config.limits.handshake_timeout + broker.config.session.resume_grace;
        Driver {
            broker,
            session,
            up_read,
            up_write: Arc::new(tokio::sync::Mutex::new(UpstreamWriter {
                io: up_write,
                mid_frame: false,
            })),
            _lease: lease,
            clients: Vec::new(),
            next_client: 0,
            scanner: FrameScanner::new(false, max).holding_frames_up_to(frame::HOLD_FRAMES_UP_TO),
            buf,
            events: Vec::with_capacity(2),
            // Until the first client's upgrade completes, upstream messages
            // (a greeting, say) are kept exactly as for a resuming client.
            detached: Some(Detached {
                deadline: Instant::now() + first_attach_window,
                buffer: Vec::new(),
                synced: true,
            }),
            pending_sends: VecDeque::new(),
            upstream_closed: false,
            upstream_eof: false,
            closing_deadline: None,
            retired: false,
            end_at: None,
            idle_check,
        }
    }

    /// Runs the driver as a task of the node's.
    fn spawn(self: Box<Self>) {
        let tasks = self.broker.tasks.clone();
        tasks.spawn(self.run());
    }

    /// Runs the session to its end, then cleans up after it. The driver's
    /// state lives in its own heap block: the task's future holds a
    /// pointer, not a second copy of it.
    async fn run(mut self: Box<Self>) {
        self.broker.metrics.sessions_active.inc();
        let stop = if self.buf.buf.is_empty() {
            self.run_loop().await
        } else {
            match Box::pin(self.on_upstream_bytes()).await {
                Some(stop) => stop,
                None => self.run_loop().await,
            }
        };
        // Refuse new attaches and stop the readers before closing: a new
        // upgrade for this id now creates a fresh session.
        self.retire();
        self.session.close_commands();
        self.session.signal.stop();
        // Rare and large: boxed so that an idle session's task stays small.
        Box::pin(self.finish(stop)).await;
        let (broker, session) = (self.broker.clone(), self.session.clone());
        drop(self);
        broker.metrics.sessions_active.dec();
        tracing::debug!(session = %session.id, "session ended");
    }

    /// The earliest deadline: idle check, resume grace, scheduled end,
    /// close handshake.
    fn next_deadline(&self) -> Instant {
        let mut at = self.idle_check;
        for t in [
            self.detached.as_ref().map(|d| d.deadline),
            self.end_at.as_ref().map(|(t, _)| *t),
            self.closing_deadline,
        ]
        .into_iter()
        .flatten()
        {
            at = at.min(t);
        }
        at
    }

    /// One timer serves every deadline; returns why the session stops, if
    /// a deadline has passed.
    fn on_timer(&mut self) -> Option<Stop> {
        let now = Instant::now();
        if self.closing_deadline.is_some_and(|t| t <= now) {
            return Some(Stop::Done);
        }
        if self.detached.as_ref().is_some_and(|d| d.deadline <= now) {
            return Some(Stop::End(RESUME_EXPIRED));
        }
        if self.end_at.as_ref().is_some_and(|(t, _)| *t <= now) {
            let reason = self
                .end_at
                .take()
                .map(|(_, r)| r)
                .unwrap_or(EndReason::DRAIN);
            return Some(Stop::End(reason));
        }
        if self.idle_check <= now {
            let last = self.session.last_active_ms.load(Ordering::Relaxed);
            let idle_at = clock::instant_at(last) + self.broker.config.session.idle_timeout;
            if idle_at <= now {
                return Some(Stop::End(EndReason::IDLE));
            }
            self.idle_check = idle_at;
        }
        None
    }

    async fn run_loop(&mut self) -> Stop {
        let mut armed = self.next_deadline();
        let mut timer: Pin<Box<Sleep>> = Box::pin(sleep_until(armed));
        loop {
            let due = self.next_deadline();
            if due != armed {
                timer.as_mut().reset(due);
                armed = due;
            }
            let wake = tokio::select! {
                biased;
                cmd = self.session.next_cmd() => Wake::Cmd(cmd),
                r = self.up_read.read_into(&mut self.buf) => Wake::Upstream(r),
                _ = timer.as_mut() => Wake::Timer,
            };
            let stop = match wake {
                // Commands are rare and their handling large: boxed.
                Wake::Cmd(cmd) => Box::pin(self.on_cmd(cmd)).await,
                Wake::Upstream(Ok(n)) if n > 0 => self.on_upstream_bytes().await,
                Wake::Upstream(r) => {
                    self.upstream_eof = matches!(r, Ok(0));
                    Some(if self.upstream_closed {
                        Stop::Done
                    } else {
                        Stop::UpstreamLost
                    })
                }
                Wake::Timer => self.on_timer(),
            };
            if let Some(stop) = stop {
                return stop;
            }
        }
    }

    fn closing(&self) -> bool {
        self.closing_deadline.is_some()
    }

    /// The session is over for everyone but its closing handshake: it
    /// leaves the table (a new upgrade for the id creates a new session,
    /// at epoch 1) and the registry. Done once, when a Close starts the
    /// end or when the driver stops, before the connections' closing
    /// waits; the registry end is queued, never waited for here.
    fn retire(&mut self) {
        if self.retired {
            return;
        }
        self.retired = true;
        self.session.mark_ended();
        self.broker.sessions.remove(&self.session);
        let s = &self.session;
        let up = Some(&*s.upstream);
        if self
            .broker
            .registry
            .try_session_ended(&s.id, s.epoch, up)
            .is_err()
        {
            // Rare (the registry's end queue is full): waiting for room
            // must not hold this session's closing up.
            let (broker, s) = (self.broker.clone(), s.clone());
            self.broker.tasks.spawn(async move {
                let up = Some(&*s.upstream);
                broker.registry.session_ended(&s.id, s.epoch, up).await;
            });
        }
    }

    fn start_closing(&mut self) {
        if self.closing_deadline.is_none() {
            self.closing_deadline = Some(Instant::now() + CLOSE_LINGER);
        }
    }

    async fn on_upstream_bytes(&mut self) -> Option<Stop> {
        self.events.clear();
        let (valid, fault) = match self.scanner.scan(&self.buf.buf, &mut self.events) {
            Ok(n) => (n, None),
            Err(e) => (e.valid_upto(), Some(e)),
        };
        if valid > 0 {
            self.session.touch();
            let m = &self.broker.metrics;
            m.bytes.downstream.inc_by(valid as u64);
            let ended = self
                .events
                .iter()
                .filter(|e| matches!(e, Event::MessageEnd { .. }))
                .count();
            m.messages.downstream.inc_by(ended as u64);
            let data = std::mem::take(&mut self.buf.buf);
            let events = std::mem::take(&mut self.events);
            let stop = self.deliver(&data[..valid], &events).await;
            self.events = events;
            self.buf.buf = data;
            self.buf.consume(valid);
            if stop.is_some() {
                return stop;
            }
        }
        if let Some(e) = fault {
            return Some(Stop::UpstreamFault(e));
        }
        if self.scanner.at_message_boundary() && !self.pending_sends.is_empty() {
            return Box::pin(self.flush_sends()).await;
        }
        None
    }

    /// Relays one scanned chunk to the clients, or into the resume buffer.
    async fn deliver(&mut self, chunk: &[u8], events: &[Event]) -> Option<Stop> {
        if self.detached.is_some() {
            // Rare (no client attached): boxed to keep the session small.
            return Box::pin(self.deliver_detached(chunk, events)).await;
        }
        for ev in events {
            if let Event::Control {
                opcode: frame::OP_CLOSE,
                ..
            } = ev
            {
                self.upstream_closed = true;
                self.start_closing();
                self.retire();
            }
        }
        if self.clients.iter().all(|c| c.synced) {
            self.write_clients(chunk, false).await;
            return None;
        }
        let mut pos = 0;
        for ev in events {
            match *ev {
                Event::MessageStart { at } => {
                    self.write_clients(&chunk[pos..at], false).await;
                    pos = at;
                    self.clients.iter_mut().for_each(|c| c.synced = true);
                }
                Event::Control { at, len, .. } => {
                    self.write_clients(&chunk[pos..at], false).await;
                    self.write_clients(&chunk[at..at + len], true).await;
                    pos = at + len;
                }
                Event::MessageEnd { .. } => {}
            }
        }
        self.write_clients(&chunk[pos..], false).await;
        None
    }

    async fn deliver_detached(&mut self, chunk: &[u8], events: &[Event]) -> Option<Stop> {
        let limit = self.broker.config.session.resume_buffer as usize;
        let mut pos = 0;
        let mut pongs = Vec::new();
        let mut closed = false;
        {
            let d = self.detached.as_mut()?;
            for ev in events {
                match *ev {
                    Event::MessageStart { at } => {
                        if d.synced {
                            d.buffer.extend_from_slice(&chunk[pos..at]);
                        }
                        d.synced = true;
                        pos = at;
                    }
                    Event::Control { at, len, opcode } => {
                        if d.synced {
                            d.buffer.extend_from_slice(&chunk[pos..at]);
                        }
                        pos = at + len;
                        match opcode {
                            frame::OP_PING => pongs.push(frame::encode_frame(
                                frame::OP_PONG,
                                &frame::frame_payload(&chunk[at..at + len]),
                                true,
                            )),
                            frame::OP_CLOSE => {
                                closed = true;
                                pongs.push(frame::remask_control(&chunk[at..at + len], true));
                                break;
                            }
                            _ => {}
                        }
                    }
                    Event::MessageEnd { .. } => {}
                }
            }
            if d.synced && !closed {
                d.buffer.extend_from_slice(&chunk[pos..]);
            }
        }
        for frame in pongs {
            let mut w = self.up_write.lock().await;
            let _ = w.io.write_all(&frame).await;
        }
        if closed {
            self.upstream_closed = true;
            return Some(Stop::Done);
        }
        let held = self.detached.as_ref().map_or(0, |d| d.buffer.len());
        self.session.buffered.store(held as u64, Ordering::Relaxed);
        if held > limit {
            return Some(Stop::End(RESUME_OVERFLOW));
        }
        None
    }

    /// Writes bytes to every synced client (every client with `all`);
    /// clients whose write fails or who are kicked are dropped.
    async fn write_clients(&mut self, bytes: &[u8], all: bool) {
        if bytes.is_empty() || self.clients.is_empty() {
            return;
        }
        let stall = self.broker.config.session.idle_timeout;
        let signal = &self.session.signal;
        let shutdown = &self.broker.shutdown;
        let mut failed = Vec::new();
        for c in self.clients.iter_mut().filter(|c| all || c.synced) {
            let mut write = pin!(c.writer.write_all(bytes));
            // Most writes complete at once: no timer or kick waiter for those.
            let first = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
            let ok = match first {
                Poll::Ready(r) => r.is_ok(),
                // A slow client: bounded by the stall timeout; boxed, as
                // the timer is large and rarely needed.
                Poll::Pending => {
                    Box::pin(async {
                        tokio::select! {
                            biased;
                            r = write.as_mut() => r.is_ok(),
                            _ = c.kicked.fired_in(signal) => false,
                            // Past drain_timeout: the node is stopping.
                            _ = shutdown.cancelled() => false,
                            _ = tokio::time::sleep(stall) => false,
                        }
                    })
                    .await
                }
            };
            if !ok {
                failed.push(c.id);
            }
        }
        for id in failed {
            if let Some(c) = self.remove_client(id) {
                c.kicked.fire(&self.session.signal);
            }
        }
        if self.clients.is_empty() && !self.closing() {
            self.detach();
        }
    }

    fn remove_client(&mut self, id: u64) -> Option<Client> {
        let i = self.clients.iter().position(|c| c.id == id)?;
        self.session.mark_detached();
        Some(self.clients.swap_remove(i))
    }

    /// Starts the resume window (or ends at once when it is disabled; the
    /// end comes from the caller checking `detached`).
    fn detach(&mut self) {
        let grace = self.broker.config.session.resume_grace;
        self.detached = Some(Detached {
            deadline: Instant::now() + grace,
            buffer: Vec::new(),
            synced: self.scanner.at_message_boundary(),
        });
        tracing::debug!(session = %self.session.id, "client dropped; session detached");
    }

    /// Attaches a new session's first client before the driver runs (no
    /// one else can have attached or been kicked; nothing was relayed yet).
    fn attach_first(&mut self, io: ClientConn, kicked: Kick, conn: ConnGuard) -> ReaderStart {
        self.session.mark_attached();
        let ClientConn {
            read,
            write,
            leftover,
        } = io;
        // Upstream bytes that came with its 101 go to this client, first.
        self.detached = None;
        let client = self.new_client(write, kicked, conn, true);
        self.seat(client, read, leftover)
    }

    fn new_client(
        &mut self,
        writer: WriteSide,
        kicked: Kick,
        conn: ConnGuard,
        synced: bool,
    ) -> Client {
        let id = self.next_client;
        self.next_client += 1;
        Client {
            id,
            writer,
            kicked,
            synced,
            reader_done: false,
            _conn: conn,
        }
    }

    /// Adds an attached client; returns its reader, to be run.
    fn seat(&mut self, client: Client, rd: ReadSide, leftover: Bytes) -> ReaderStart {
        let reader = client_reader::Reader {
            broker: self.broker.clone(),
            session: self.session.clone(),
            client: client.id,
            upstream: self.up_write.clone(),
            kicked: client.kicked.clone(),
        };
        // Most sessions have one client: no room for more until needed.
        self.clients.reserve_exact(1);
        self.clients.push(client);
        ReaderStart {
            reader,
            rd,
            leftover,
        }
    }

    async fn on_cmd(&mut self, cmd: Cmd) -> Option<Stop> {
        match cmd {
            Cmd::Attach(a) => {
                let a = *a;
                self.attach(a.io, a.kicked, a.conn).await
            }
            Cmd::ClientGone {
                client,
                torn,
                mid_frame,
            } => {
                let removed = self.remove_client(client).is_some();
                if torn {
                    return Some(Stop::ClientTorn { mid_frame });
                }
                if removed && self.clients.is_empty() {
                    if self.closing() {
                        return Some(Stop::Done);
                    }
                    if self.broker.config.session.resume_grace.is_zero() {
                        return Some(Stop::End(CLIENT_LEFT));
                    }
                    self.detach();
                }
                None
            }
            Cmd::ClientClose {
                client,
                frame: close,
            } => self.on_client_close(client, close).await,
            Cmd::ClientFault {
                client,
                code,
                reason,
            } => Some(Stop::ClientFault {
                client,
                code,
                reason,
            }),
            Cmd::Send(m) => {
                let super::session::Outgoing {
                    payload,
                    text,
                    done,
                } = *m;
                let opcode = if text {
                    frame::OP_TEXT
                } else {
                    frame::OP_BINARY
                };
                let accepted = self.pending_sends.len() < MAX_PENDING_SENDS && !self.closing();
                let mut stop = None;
                if accepted {
                    self.pending_sends
                        .push_back(frame::encode_frame(opcode, &payload, false));
                    if self.scanner.at_message_boundary() {
                        stop = self.flush_sends().await;
                    }
                }
                let _ = done.send(accepted);
                stop
            }
            Cmd::End { reason, after } => {
                if after.is_zero() || self.detached.is_some() {
                    return Some(Stop::End(*reason));
                }
                self.end_at = Some((Instant::now() + after, *reason));
                None
            }
        }
    }

    async fn attach(&mut self, io: ClientConn, kicked: Kick, conn: ConnGuard) -> Option<Stop> {
        self.session.mark_attached();
        let ClientConn {
            read: rd,
            write: writer,
            leftover,
        } = io;
        let synced = self.scanner.at_message_boundary();
        let mut client = self.new_client(writer, kicked, conn, synced);
        if self.closing() {
            // The session is finishing its close handshake: turn the newcomer away.
            let _ = self.close_one(&mut client, 1001, "session ended").await;
            self.session.mark_detached();
            return None;
        }
        if client.kicked.fired(&self.session.signal) {
            // A later client took the session over after this one's place
            // was taken but before its attach was handled (the session's
            // first client attaches before the driver reads its commands).
            let _ = self
                .close_one(&mut client, 4001, "session taken over")
                .await;
            self.session.mark_detached();
            return None;
        }
        // Takeover: every client of an older generation has been kicked.
        let kicked_ids: Vec<u64> = self
            .clients
            .iter()
            .filter(|c| c.kicked.fired(&self.session.signal))
            .map(|c| c.id)
            .collect();
        for old in kicked_ids {
            if let Some(mut c) = self.remove_client(old) {
                let _ = self.close_one(&mut c, 4001, "session taken over").await;
            }
        }
        if let Some(d) = self.detached.take() {
            self.session.buffered.store(0, Ordering::Relaxed);
            if d.synced {
                let ok = client.writer.write_all(&d.buffer).await.is_ok();
                if !ok {
                    self.session.mark_detached();
                    self.detach();
                    return None;
                }
                client.synced = true;
            } else {
                client.synced = false;
            }
            tracing::debug!(session = %self.session.id, replayed = d.buffer.len(), "client resumed");
        }
        let reader = self.seat(client, rd, leftover);
        self.broker.tasks.spawn(reader.run());
        if self.scanner.at_message_boundary() && !self.pending_sends.is_empty() {
            return self.flush_sends().await;
        }
        None
    }

    async fn on_client_close(&mut self, client: u64, close: Vec<u8>) -> Option<Stop> {
        if self.upstream_closed {
            // The client's answer to the upstream's Close: pass it on.
            self.write_upstream(&close).await;
            if let Some(mut c) = self.remove_client(client) {
                let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, c.writer.shutdown()).await;
            }
            return None;
        }
        if self.clients.len() > 1 {
            // One of several shared clients leaves; the session goes on.
            let (code, reason) = frame::parse_close(&frame::frame_payload(&close));
            if let Some(mut c) = self.remove_client(client) {
                let code = if code == 1005 { 1000 } else { code };
                let _ = self.close_one(&mut c, code, &reason).await;
            }
            return None;
        }
        // The last client closes: the session ends, the code passes through.
        if let Some(c) = self.clients.iter_mut().find(|c| c.id == client) {
            c.reader_done = true;
        }
        self.write_upstream(&close).await;
        self.start_closing();
        self.retire();
        None
    }

    /// Delivers queued admin sends; while detached they go into the resume
    /// buffer, under its bound like upstream messages.
    async fn flush_sends(&mut self) -> Option<Stop> {
        while let Some(msg) = self.pending_sends.pop_front() {
            if let Some(d) = self.detached.as_mut() {
                if !d.synced {
                    self.pending_sends.push_front(msg);
                    return None;
                }
                d.buffer.extend_from_slice(&msg);
                let held = d.buffer.len();
                self.session.buffered.store(held as u64, Ordering::Relaxed);
                if held > self.broker.config.session.resume_buffer as usize {
                    return Some(Stop::End(RESUME_OVERFLOW));
                }
                continue;
            }
            self.write_clients(&msg, false).await;
        }
        None
    }

    /// Writes a whole frame to the upstream when its stream is at a frame
    /// boundary; returns whether it was written.
    async fn write_upstream(&mut self, bytes: &[u8]) -> bool {
        write_frame(&self.up_write, bytes).await
    }

    async fn close_one(&mut self, c: &mut Client, code: u16, reason: &str) -> bool {
        close_client(
            c,
            &self.session.signal,
            self.scanner.at_frame_boundary(),
            code,
            reason,
        )
        .await
    }

    async fn close_clients(&mut self, code: u16, reason: &str) {
        let mut clients = std::mem::take(&mut self.clients);
        let boundary = self.scanner.at_frame_boundary();
        for c in clients.iter_mut() {
            close_client(c, &self.session.signal, boundary, code, reason).await;
            self.session.mark_detached();
        }
    }

    async fn close_upstream(&mut self, code: u16, reason: &str) {
        let close = frame::encode_close(code, reason, true);
        self.write_upstream(&close).await;
    }

    async fn finish(&mut self, stop: Stop) {
        let id = self.session.id.clone();
        match stop {
            Stop::End(r) => {
                tracing::info!(session = %id, client_code = r.client_code, reason = r.client_reason, "session ending");
                self.close_clients(r.client_code, r.client_reason).await;
                self.close_upstream(r.upstream_code, r.upstream_reason)
                    .await;
            }
            Stop::UpstreamLost => {
                tracing::info!(session = %id, upstream = %self.session.upstream, "upstream connection lost");
                self.close_clients(1014, "upstream connection lost").await;
            }
            Stop::UpstreamFault(e) => {
                tracing::warn!(session = %id, upstream = %self.session.upstream, error = %e, "upstream broke the protocol");
                self.close_upstream(e.close_code(), "invalid or oversized message")
                    .await;
                self.close_clients(1014, "upstream sent an invalid message")
                    .await;
            }
            Stop::ClientTorn { mid_frame } => {
                tracing::info!(session = %id, "client dropped inside a message; session ends");
                if !mid_frame {
                    self.close_upstream(1001, "client dropped mid-message")
                        .await;
                }
                self.close_clients(1001, "session ended").await;
            }
            Stop::ClientFault {
                client,
                code,
                reason,
            } => {
                tracing::info!(session = %id, code, reason, "client fault; session ends");
                if let Some(mut c) = self.remove_client(client) {
                    self.close_one(&mut c, code, reason).await;
                }
                self.close_upstream(1001, "client error").await;
                self.close_clients(1001, "session ended").await;
            }
            Stop::Done => {
                // The close handshake is over. A client whose reader has
                // ended is closed with one `close` (no `shutdown` first);
                // one still read from gets its FIN now.
                for c in self.clients.iter_mut() {
                    if !(c.reader_done && c.writer.close_quietly()) {
                        let _ =
                            tokio::time::timeout(CLOSE_WRITE_TIMEOUT, c.writer.shutdown()).await;
                    }
                }
                self.clients.clear();
            }
        }
        if let Ok(mut w) = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, self.up_write.lock()).await {
            // The upstream ended its stream: closing the socket is enough.
            if !(self.upstream_eof && w.io.close_quietly()) {
                let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, w.io.shutdown()).await;
            }
        }
        if !self.upstream_eof {
            let stop = &self.broker.shutdown;
            Box::pin(client_reader::linger_until_stop(&mut self.up_read, stop)).await;
        }
    }
}

/// Writes a whole frame to the upstream when its stream is at a frame
/// boundary; returns whether it was written.
async fn write_frame(up: &SharedUpstream, bytes: &[u8]) -> bool {
    let Ok(mut w) = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, up.lock()).await else {
        return false;
    };
    if w.mid_frame {
        return false;
    }
    matches!(
        tokio::time::timeout(CLOSE_WRITE_TIMEOUT, w.io.write_all(bytes)).await,
        Ok(Ok(()))
    )
}

/// Sends one client a Close frame (when its stream is at a frame boundary)
/// and ends its half of the connection.
async fn close_client(
    c: &mut Client,
    signal: &Signal,
    at_boundary: bool,
    code: u16,
    reason: &str,
) -> bool {
    c.kicked.fire(signal);
    let mut ok = false;
    if at_boundary {
        let close = frame::encode_close(code, reason, false);
        ok = matches!(
            tokio::time::timeout(CLOSE_WRITE_TIMEOUT, c.writer.write_all(&close)).await,
            Ok(Ok(()))
        );
    }
    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, c.writer.shutdown()).await;
    ok
}
