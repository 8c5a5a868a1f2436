//! Graceful shutdown: stop taking sessions, send every client away with
//! 1012 spread over a jitter window, and wait for the sessions (and the
//! clients tunnelled to other nodes) to end.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::broker::Broker;
use crate::proxy::session::{Cmd, EndReason};

/// How often the drain looks for sessions still open.
const POLL: Duration = Duration::from_millis(25);

/// Drains the node: returns once every session has ended, or when
/// `drain_timeout` has passed.
pub async fn drain(broker: &Arc<Broker>) {
    let timeout = broker.config.node.drain_timeout;
    let window = timeout / 2;
    let deadline = Instant::now() + timeout;
    tracing::info!(node = %broker.node_id, sessions = broker.sessions.len(), ?timeout, "draining");
    crate::control::membership::leave(broker).await;
    let mut told: HashSet<Arc<str>> = HashSet::new();
    loop {
        for s in broker.sessions.all() {
            if told.contains(&s.id) {
                continue;
            }
            // Attached clients leave spread over the window, so thousands
            // of them do not reconnect elsewhere in the same instant.
            let after = if s.clients() > 0 {
                window.mul_f64(fastrand::f64())
            } else {
                Duration::ZERO
            };
            if s.try_send(Cmd::End {
                reason: &EndReason::DRAIN,
                after,
            }) {
                told.insert(s.id.clone());
            }
        }
        // Tunnelled clients (sessions owned elsewhere) leave by themselves
        // over the same window (see `forward.rs`).
        let tunnels = broker.tunnels.load(Ordering::Acquire);
        if broker.sessions.is_empty() && tunnels == 0 {
            tracing::info!(node = %broker.node_id, "drained");
            return;
        }
        if Instant::now() >= deadline {
            tracing::warn!(node = %broker.node_id, left = broker.sessions.len(), tunnels, "drain timeout reached");
            return;
        }
        tokio::time::sleep(POLL).await;
    }
}
