//! The registry: where nodes and session ownership are recorded. `memory`
//! (one node, the default) or `valkey` (a cluster). The data path asks one
//! question per new session — claim it, or who owns it — and says when a
//! session ends; the membership loop (`control::membership`) does the rest.

pub mod keys;
pub mod lane;
mod memory;
mod scripts;
pub mod sentinel;
pub mod valkey;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use memory::MemoryRegistry;
pub use valkey::ValkeyRegistry;

use crate::clock;

/// What a claim for a session id decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This node owns the session now, at `epoch`; `prefer` is the
    /// upstream it used before, if known; `took_over` when it moved here
    /// from a node that is gone.
    Owned {
        epoch: u64,
        prefer: Option<Arc<str>>,
        took_over: bool,
    },
    /// The registry says this node owns it, but this process does not hold
    /// it (a restart under the same id).
    Mine {
        epoch: u64,
        prefer: Option<Arc<str>>,
    },
    /// A live node owns it.
    Elsewhere {
        node: String,
        advertise: String,
        epoch: u64,
    },
    /// Its owner is not live, but takeovers are on hold after a registry
    /// failover or outage; retry later.
    Wait,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry unavailable: {0}")]
    Unavailable(String),
}

/// The registry part of `/health`.
#[derive(Debug, Clone, Serialize)]
pub struct RegistryStatus {
    pub kind: &'static str,
    /// `connected`, `degraded` (primary up, no Sentinel reachable) or
    /// `disconnected`.
    pub status: &'static str,
    pub primary: Option<String>,
}

/// The configured registry.
pub enum Registry {
    Memory(MemoryRegistry),
    Valkey(Box<ValkeyState>),
}

/// The Valkey registry plus the takeover hold-off.
pub struct ValkeyState {
    pub registry: ValkeyRegistry,
    /// Until this time (ms on [`clock`]) no node is treated as gone: set
    /// after the registry came back from a failover or an outage.
    hold_off_until_ms: AtomicU64,
    /// Held around each heartbeat; true once the node has left (drain), so
    /// no heartbeat in flight can register it again.
    pub left: tokio::sync::Mutex<bool>,
    /// Last successful heartbeat (ms on [`clock`]).
    last_beat_ms: AtomicU64,
    /// Session ends waiting to be written (see [`ValkeyState::write_ends`]).
    ends: mpsc::Sender<SessionEnd>,
    ends_rx: std::sync::Mutex<Option<mpsc::Receiver<SessionEnd>>>,
}

/// A session that ended, at its epoch, with the upstream on record when
/// known (the registry's value is then known exactly).
#[derive(Debug, Clone)]
pub struct SessionEnd {
    pub session: Arc<str>,
    pub epoch: u64,
    pub upstream: Option<String>,
}

/// Session ends queued for the registry; past this, an end is written on
/// its own.
pub const END_QUEUE: usize = 4096;
/// Most session ends written in one pipelined round trip.
const END_BATCH: usize = 256;
/// Most ends kept for writing again while the registry is out of reach
/// (about 100 bytes each).
const MAX_UNWRITTEN: usize = 100_000;

/// Keeps ends to write again, dropping the oldest past [`MAX_UNWRITTEN`]
/// (logged: their keys are left behind).
fn keep_unwritten(unwritten: &mut VecDeque<SessionEnd>, ends: impl Iterator<Item = SessionEnd>) {
    unwritten.extend(ends);
    let over = unwritten.len().saturating_sub(MAX_UNWRITTEN);
    if over > 0 {
        tracing::warn!(
            dropped = over,
            "too many session ends waiting for the registry; dropping the oldest"
        );
        unwritten.drain(..over);
    }
}

impl ValkeyState {
    pub fn new(registry: ValkeyRegistry) -> ValkeyState {
        let (ends, ends_rx) = mpsc::channel(END_QUEUE);
        ValkeyState {
            registry,
            hold_off_until_ms: AtomicU64::new(0),
            left: tokio::sync::Mutex::new(false),
            last_beat_ms: AtomicU64::new(clock::now_ms()),
            ends,
            ends_rx: std::sync::Mutex::new(Some(ends_rx)),
        }
    }

    /// Writes queued session ends, as many as have gathered in one
    /// pipelined round trip (which waits up to 2 ms to go out with the
    /// next claim's write), until `stop`; then writes what is left.
    /// `live`: whether this node holds a session of that id now; an end
    /// kept from an outage is dropped for such a one (the session came
    /// back under the same epoch: its key is its own again).
    pub async fn write_ends(&self, stop: CancellationToken, live: impl Fn(&str) -> bool) {
        let rx = self
            .ends_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(mut rx) = rx else { return };
        let retry_every = self.registry.heartbeat_interval();
        let mut batch = Vec::with_capacity(END_BATCH);
        // Ends the registry did not take (it was out of reach): written
        // again every heartbeat until it does, so no key outlives its
        // session. Bounded; the oldest go first past the bound.
        let mut unwritten: VecDeque<SessionEnd> = VecDeque::new();
        // When to write the kept ends again: one heartbeat after they were
        // kept or last tried, however many new ends arrive meanwhile.
        let mut next_retry: Option<tokio::time::Instant> = None;
        loop {
            if unwritten.is_empty() {
                next_retry = None;
            } else if next_retry.is_none() {
                next_retry = Some(tokio::time::Instant::now() + retry_every);
            }
            let retry = async {
                match next_retry {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending::<()>().await,
                }
            };
            let first = tokio::select! {
                m = rx.recv() => m,
                _ = retry => {
                    unwritten.retain(|end| !live(&end.session));
                    self.write_again(&mut unwritten).await;
                    next_retry = None;
                    continue;
                }
                _ = stop.cancelled() => None,
            };
            let Some(first) = first else { break };
            batch.push(first);
            while batch.len() < END_BATCH {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            if let Err(e) = self.registry.end_many(&batch).await {
                tracing::debug!(sessions = batch.len(), error = %e, "could not remove ended sessions; will retry");
                keep_unwritten(&mut unwritten, batch.drain(..));
            }
            batch.clear();
        }
        rx.close();
        while let Ok(m) = rx.try_recv() {
            batch.push(m);
        }
        batch.extend(unwritten);
        for chunk in batch.chunks(END_BATCH) {
            let _ = self.registry.end_many(chunk).await;
        }
    }

    /// Writes kept ends again, a batch at a time, until one fails.
    async fn write_again(&self, unwritten: &mut VecDeque<SessionEnd>) {
        while !unwritten.is_empty() {
            let n = unwritten.len().min(END_BATCH);
            let batch: Vec<SessionEnd> = unwritten.drain(..n).collect();
            if let Err(e) = self.registry.end_many(&batch).await {
                tracing::debug!(sessions = batch.len(), error = %e, "could not remove ended sessions; will retry");
                for end in batch.into_iter().rev() {
                    unwritten.push_front(end);
                }
                return;
            }
            tracing::debug!(
                sessions = batch.len(),
                "removed sessions that ended while the registry was out of reach"
            );
        }
    }

    /// Starts the hold-off: every node gets `stale_ttl` to re-register.
    pub fn hold_off(&self) {
        let until = clock::now_ms() + self.registry.stale_ttl().as_millis() as u64;
        self.hold_off_until_ms.store(until, Ordering::Release);
    }

    pub fn beat_ok(&self) -> bool {
        self.last_beat_ms.store(clock::now_ms(), Ordering::Release);
        true
    }

    /// This node's registration was renewed within `stale_ttl`: no other
    /// node can have taken its sessions over. False after a freeze or a
    /// partition, until the next heartbeat re-asserts them.
    pub fn registration_fresh(&self) -> bool {
        let age = clock::now_ms().saturating_sub(self.last_beat_ms.load(Ordering::Acquire));
        age < self.registry.stale_ttl().as_millis() as u64
    }

    pub fn holding_off(&self) -> bool {
        clock::now_ms() < self.hold_off_until_ms.load(Ordering::Acquire)
    }
}

impl Registry {
    pub fn valkey(&self) -> Option<&ValkeyState> {
        match self {
            Registry::Valkey(v) => Some(v),
            Registry::Memory(_) => None,
        }
    }

    /// Claims `session` for this node, or says who owns it. `proposed`:
    /// the upstream this node would open, recorded in the same step when
    /// the session has none; the claim's `prefer` is then the upstream on
    /// record.
    pub async fn claim(
        &self,
        session: &Arc<str>,
        proposed: Option<&Arc<str>>,
    ) -> Result<Claim, RegistryError> {
        match self {
            Registry::Memory(m) => Ok(m.claim(session, proposed)),
            // Boxed: the Valkey call's future is large, and would otherwise be
            // carried inline by every connection's task.
            Registry::Valkey(v) => {
                Box::pin(v.registry.claim(session, !v.holding_off(), proposed)).await
            }
        }
    }

    /// Raises the epoch of a session recorded as this node's that this
    /// process does not hold.
    pub async fn bump(&self, session: &str, seen: u64) -> Result<Option<u64>, RegistryError> {
        match self {
            Registry::Memory(_) => Ok(Some(seen + 1)),
            Registry::Valkey(v) => Box::pin(v.registry.bump(session, seen)).await,
        }
    }

    /// Records which upstream a claimed session uses.
    pub async fn set_upstream(&self, session: &Arc<str>, epoch: u64, upstream: &Arc<str>) {
        match self {
            Registry::Memory(m) => m.set_upstream(session, epoch, upstream),
            Registry::Valkey(v) => {
                if let Err(e) = Box::pin(v.registry.set_upstream(session, epoch, upstream)).await {
                    tracing::debug!(session = %session, error = %e, "could not record the upstream");
                }
            }
        }
    }

    /// The session ended for good: forget it (if still ours at `epoch`).
    /// `upstream`: the one on record, when known. On Valkey the end is
    /// queued and written in a batch with others.
    pub async fn session_ended(&self, session: &Arc<str>, epoch: u64, upstream: Option<&str>) {
        let Err(end) = self.try_session_ended(session, epoch, upstream) else {
            return;
        };
        let Registry::Valkey(v) = self else { return };
        // The queue is full: wait for room (its writer keeps what the
        // registry does not take); write it here only once that writer
        // has stopped.
        if v.ends.send(end).await.is_ok() {
            return;
        }
        if let Err(e) = Box::pin(v.registry.end(session, epoch)).await {
            tracing::debug!(session = %session, error = %e, "could not remove the session key");
        }
    }

    /// Records a session's end without waiting: done, or (the end queue
    /// being full) the end back for [`session_ended`](Self::session_ended).
    #[allow(clippy::result_large_err)]
    pub fn try_session_ended(
        &self,
        session: &Arc<str>,
        epoch: u64,
        upstream: Option<&str>,
    ) -> Result<(), SessionEnd> {
        match self {
            Registry::Memory(m) => {
                m.ended(session, epoch);
                Ok(())
            }
            Registry::Valkey(v) => {
                let end = SessionEnd {
                    session: session.clone(),
                    epoch,
                    upstream: upstream.map(str::to_string),
                };
                v.ends.try_send(end).map_err(|e| match e {
                    mpsc::error::TrySendError::Full(end)
                    | mpsc::error::TrySendError::Closed(end) => end,
                })
            }
        }
    }

    /// A live round trip, bounded by a timeout.
    pub async fn status(&self) -> RegistryStatus {
        match self {
            Registry::Memory(_) => RegistryStatus {
                kind: "memory",
                status: "connected",
                primary: None,
            },
            Registry::Valkey(v) => RegistryStatus {
                kind: "valkey",
                // `degraded`: the primary answers but no Sentinel does, so a
                // failover could not be followed.
                status: match (
                    v.registry.ping().await.is_ok(),
                    v.registry.sentinels_ok().await,
                ) {
                    (true, true) => "connected",
                    (true, false) => "degraded",
                    (false, _) => "disconnected",
                },
                primary: Some(v.registry.primary()),
            },
        }
    }
}
