//! A session as the rest of the node sees it: its identity, its attach
//! bookkeeping, and the bounded command queue into its driver task.
//!
//! The driver (see `driver.rs`) owns the upstream connection and every
//! client's write half; everything else talks to it through [`Cmd`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use dashmap::DashMap;
use serde::Serialize;
use tokio::sync::{oneshot, Notify, Semaphore};

use super::io::ClientConn;
use super::kick::{Kick, Signal};
use crate::clock;
use crate::config::AttachMode;

/// Bound of a session's command queue.
pub const CMD_QUEUE: usize = 32;

/// A held place on the public listener's connection limit; dropping it
/// frees the place.
pub type ConnGuard = Arc<dyn Send + Sync>;

/// How a session ends, for each side.
#[derive(Debug, Clone, Copy)]
pub struct EndReason {
    pub client_code: u16,
    pub client_reason: &'static str,
    pub upstream_code: u16,
    pub upstream_reason: &'static str,
}

impl EndReason {
    pub const OPERATOR: EndReason = EndReason {
        client_code: 4002,
        client_reason: "ended by operator",
        upstream_code: 1000,
        upstream_reason: "ended by operator",
    };
    pub const DRAIN: EndReason = EndReason {
        client_code: 1012,
        client_reason: "service restart",
        upstream_code: 1001,
        upstream_reason: "broker node draining",
    };
    pub const MOVED: EndReason = EndReason {
        client_code: 4003,
        client_reason: "session moved",
        upstream_code: 4003,
        upstream_reason: "session moved",
    };
    pub const REGISTRY_LOST: EndReason = EndReason {
        client_code: 1001,
        client_reason: "registry unreachable",
        upstream_code: 1001,
        upstream_reason: "registry unreachable",
    };
    pub const IDLE: EndReason = EndReason {
        client_code: 1001,
        client_reason: "idle timeout",
        upstream_code: 1001,
        upstream_reason: "idle timeout",
    };
}

/// Messages into a session's driver.
pub enum Cmd {
    /// A client finished its upgrade and joins the session.
    Attach(Box<Attach>),
    /// A client's connection ended without a Close frame. `torn`: it
    /// stopped inside a message it was sending; `mid_frame`: inside a frame.
    ClientGone {
        client: u64,
        torn: bool,
        mid_frame: bool,
    },
    /// A client sent a Close frame (raw, as received).
    ClientClose { client: u64, frame: Vec<u8> },
    /// A client broke the protocol or a limit; it is closed with `code`.
    ClientFault {
        client: u64,
        code: u16,
        reason: &'static str,
    },
    /// Deliver one message to the session's clients.
    Send(Box<Outgoing>),
    /// End the session after `after`.
    End {
        reason: &'static EndReason,
        after: Duration,
    },
}

/// A client joining a session.
pub struct Attach {
    pub io: ClientConn,
    /// Fires when a later client takes the session over.
    pub kicked: Kick,
    pub conn: ConnGuard,
}

/// One message for a session's clients (admin API).
pub struct Outgoing {
    pub payload: Bytes,
    pub text: bool,
    pub done: oneshot::Sender<bool>,
}

/// Attach bookkeeping, guarded by a short std mutex.
#[derive(Debug, Default)]
pub struct AttachState {
    /// Clients attached to the driver.
    pub attached: usize,
    /// Upgrades answered 101 but not yet handed to the driver.
    pub pending: usize,
    /// The driver has stopped or is stopping: no more attaches.
    pub ended: bool,
}

/// Why an attach to an existing session was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachRefused {
    /// `attach = "exclusive"` and a client is already there (409).
    Busy,
    /// The session ended meanwhile: create it anew.
    Ended,
}

/// One session owned by this node.
pub struct Session {
    pub id: Arc<str>,
    pub epoch: u64,
    /// The upstream URL this session is bound to.
    pub upstream: Arc<str>,
    /// The subprotocol the upstream selected at the first handshake.
    pub protocol: Option<String>,
    pub created_at: SystemTime,
    /// Last time a message moved, ms on [`clock`].
    pub last_active_ms: AtomicU64,
    /// Upstream bytes held for replay while detached.
    pub buffered: AtomicU64,
    attach: Mutex<AttachState>,
    /// The driver's stop and takeovers: readers and pending attaches
    /// leave on either.
    pub signal: Signal,
    cmd: CmdQueue,
}

/// A session's command queue: bounded by [`CMD_QUEUE`], one consumer (the
/// driver), and no memory of its own while empty (most sessions, most of
/// the time).
struct CmdQueue {
    queue: Mutex<VecDeque<Cmd>>,
    /// Wakes the driver; a notification sent while it is busy is kept.
    ready: Notify,
    /// Free places; closed once the driver stops.
    space: Semaphore,
    closed: AtomicBool,
}

impl CmdQueue {
    fn new() -> CmdQueue {
        CmdQueue {
            queue: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
            space: Semaphore::new(CMD_QUEUE),
            closed: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Cmd>> {
        // A poisoned lock only means a panic elsewhere while it was held;
        // the queue itself is always consistent.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, cmd: Cmd) -> bool {
        {
            let mut q = self.lock();
            if self.closed.load(Ordering::Acquire) {
                return false;
            }
            q.push_back(cmd);
        }
        self.ready.notify_one();
        true
    }

    fn pop(&self) -> Option<Cmd> {
        let mut q = self.lock();
        let cmd = q.pop_front()?;
        if q.is_empty() {
            // Give the memory back: commands are rare.
            *q = VecDeque::new();
        }
        drop(q);
        self.space.add_permits(1);
        Some(cmd)
    }

    /// Refuses further commands and drops queued ones (their senders see
    /// the session gone).
    fn close(&self) {
        let dropped = {
            let mut q = self.lock();
            self.closed.store(true, Ordering::Release);
            std::mem::take(&mut *q)
        };
        self.space.close();
        drop(dropped);
    }
}

/// The admin API's view of a session.
#[derive(Debug, Clone, Serialize)]
pub struct SessionInfo {
    pub id: String,
    pub owner: String,
    pub epoch: u64,
    pub upstream: String,
    pub state: &'static str,
    pub clients: usize,
    pub created_at: String,
    pub last_active_at: String,
    /// Upstream bytes held for a client to resume.
    pub buffered_bytes: u64,
}

impl Session {
    pub fn new(
        id: Arc<str>,
        epoch: u64,
        upstream: Arc<str>,
        protocol: Option<String>,
    ) -> Arc<Session> {
        Arc::new(Session {
            id,
            epoch,
            upstream,
            protocol,
            created_at: SystemTime::now(),
            last_active_ms: AtomicU64::new(clock::now_ms()),
            buffered: AtomicU64::new(0),
            attach: Mutex::new(AttachState::default()),
            signal: Signal::default(),
            cmd: CmdQueue::new(),
        })
    }

    fn attach_state(&self) -> std::sync::MutexGuard<'_, AttachState> {
        // A poisoned lock only means another thread panicked while holding
        // it; the counters themselves are always consistent.
        self.attach.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn touch(&self) {
        self.last_active_ms
            .store(clock::now_ms(), Ordering::Relaxed);
    }

    /// Reserves a place for one more client under `mode`.
    pub fn reserve(self: &Arc<Self>, mode: AttachMode) -> Result<Reservation, AttachRefused> {
        let mut st = self.attach_state();
        if st.ended {
            return Err(AttachRefused::Ended);
        }
        if mode == AttachMode::Exclusive && st.attached + st.pending > 0 {
            return Err(AttachRefused::Busy);
        }
        st.pending += 1;
        Ok(Reservation {
            session: Some(self.clone()),
            mode,
        })
    }

    /// Driver side: a reserved client became attached.
    pub fn mark_attached(&self) {
        let mut st = self.attach_state();
        st.pending = st.pending.saturating_sub(1);
        st.attached += 1;
    }

    /// Driver side: an attached client left.
    pub fn mark_detached(&self) {
        let mut st = self.attach_state();
        st.attached = st.attached.saturating_sub(1);
    }

    /// Driver side: no further attaches.
    pub fn mark_ended(&self) {
        self.attach_state().ended = true;
    }

    /// Clients attached, plus upgrades answered and not yet handed over.
    pub fn clients_and_arriving(&self) -> usize {
        let st = self.attach_state();
        st.attached + st.pending
    }

    pub fn clients(&self) -> usize {
        self.attach_state().attached
    }

    /// Asks the driver to do something (waiting for room in the queue);
    /// false when it has stopped.
    pub async fn send(&self, cmd: Cmd) -> bool {
        match self.cmd.space.acquire().await {
            Ok(permit) => {
                permit.forget();
                self.cmd.push(cmd)
            }
            Err(_) => false,
        }
    }

    /// Like [`send`](Self::send) but never waits (for fan-out to many sessions).
    pub fn try_send(&self, cmd: Cmd) -> bool {
        match self.cmd.space.try_acquire() {
            Ok(permit) => {
                permit.forget();
                self.cmd.push(cmd)
            }
            Err(_) => false,
        }
    }

    /// Driver side: the next command.
    pub async fn next_cmd(&self) -> Cmd {
        loop {
            if let Some(cmd) = self.cmd.pop() {
                return cmd;
            }
            self.cmd.ready.notified().await;
        }
    }

    /// Driver side: the driver has stopped; later commands are refused.
    pub fn close_commands(&self) {
        self.cmd.close();
    }

    pub fn info(&self, owner: &str) -> SessionInfo {
        let clients = self.clients();
        let last_ms = self.last_active_ms.load(Ordering::Relaxed);
        let age = Duration::from_millis(clock::now_ms().saturating_sub(last_ms));
        SessionInfo {
            id: self.id.to_string(),
            owner: owner.to_string(),
            epoch: self.epoch,
            upstream: self.upstream.to_string(),
            state: if clients > 0 { "attached" } else { "detached" },
            clients,
            created_at: clock::rfc3339(self.created_at),
            last_active_at: clock::rfc3339(SystemTime::now() - age),
            buffered_bytes: self.buffered.load(Ordering::Relaxed),
        }
    }
}

/// A place held for one client between the 101 and the attach.
pub struct Reservation {
    session: Option<Arc<Session>>,
    mode: AttachMode,
}

impl Reservation {
    pub fn session(&self) -> Option<&Arc<Session>> {
        self.session.as_ref()
    }

    /// Turns the reserved place into a client's: the session, and the
    /// kick that fires when the client must leave. Under `takeover`, every
    /// client attached before is kicked now. The caller attaches the client
    /// (the place stays counted as pending until the driver does).
    fn take_place(&mut self) -> Option<(Arc<Session>, Kick)> {
        let session = self.session.take()?;
        let kicked = session.signal.join(self.mode == AttachMode::Takeover);
        Some((session, kicked))
    }

    /// The place for the first client of a session whose driver has not
    /// started yet (see `driver::PendingDriver`).
    pub fn into_first_place(mut self) -> Option<Kick> {
        self.take_place().map(|(_, kicked)| kicked)
    }

    /// Hands the upgraded client to the driver. Under `takeover`, every
    /// client attached before is kicked first.
    pub async fn attach(mut self, io: ClientConn, conn: ConnGuard) -> bool {
        let Some((session, kicked)) = self.take_place() else {
            return false;
        };
        let ok = session
            .send(Cmd::Attach(Box::new(Attach { io, kicked, conn })))
            .await;
        if !ok {
            let mut st = session.attach_state();
            st.pending = st.pending.saturating_sub(1);
        }
        ok
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let mut st = session.attach_state();
            st.pending = st.pending.saturating_sub(1);
        }
    }
}

/// The sessions this node owns, by id.
#[derive(Default)]
pub struct SessionTable {
    map: DashMap<Arc<str>, Arc<Session>>,
}

impl SessionTable {
    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.map.get(id).map(|e| e.value().clone())
    }

    /// Inserts `session` unless one with its id exists.
    pub fn insert_new(&self, session: &Arc<Session>) -> Result<(), Arc<Session>> {
        match self.map.entry(session.id.clone()) {
            dashmap::mapref::entry::Entry::Occupied(e) => Err(e.get().clone()),
            dashmap::mapref::entry::Entry::Vacant(v) => {
                v.insert(session.clone());
                Ok(())
            }
        }
    }

    /// Removes `session` if it is still the one in the table.
    pub fn remove(&self, session: &Arc<Session>) {
        self.map
            .remove_if(&session.id, |_, v| Arc::ptr_eq(v, session));
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn all(&self) -> Vec<Arc<Session>> {
        self.map.iter().map(|e| e.value().clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end_cmd() -> Cmd {
        Cmd::End {
            reason: &EndReason::OPERATOR,
            after: Duration::ZERO,
        }
    }

    #[tokio::test]
    async fn command_queue_is_bounded_ordered_and_closes() {
        let s = Session::new(Arc::from("q"), 1, "ws://u".into(), None);
        for _ in 0..CMD_QUEUE {
            assert!(s.try_send(end_cmd()));
        }
        assert!(!s.try_send(end_cmd()), "the queue holds CMD_QUEUE commands");
        let first = s.next_cmd().await;
        assert!(matches!(first, Cmd::End { .. }));
        assert!(
            s.try_send(end_cmd()),
            "a place frees once the driver takes one"
        );
        s.close_commands();
        assert!(!s.try_send(end_cmd()));
        assert!(
            !s.send(end_cmd()).await,
            "a stopped session refuses commands"
        );
    }

    #[tokio::test]
    async fn a_command_sent_while_the_driver_is_busy_wakes_it_later() {
        let s = Session::new(Arc::from("w"), 1, "ws://u".into(), None);
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.next_cmd().await })
        };
        tokio::task::yield_now().await;
        assert!(s.send(end_cmd()).await);
        let got = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .expect("the driver is woken")
            .expect("task");
        assert!(matches!(got, Cmd::End { .. }));
    }
}
