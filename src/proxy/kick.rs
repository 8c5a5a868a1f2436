//! Telling a session's clients to leave. A client must go when the session
//! stops, when a later client takes the session over (`attach =
//! "takeover"`), or when the driver drops that one client. A session has
//! one [`Signal`]: a stop flag, a takeover generation and one `Notify`
//! that wakes every waiter, each then checking its own [`Kick`]. Kicks are
//! rare; waiting costs no allocation per session and one small flag per
//! client.

use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// A session's stop and takeover state, shared by its driver and readers.
#[derive(Debug, Default)]
pub struct Signal {
    stopped: AtomicBool,
    /// Clients that joined under an older generation have been taken over.
    generation: AtomicU64,
    changed: Notify,
}

impl Signal {
    /// The driver has stopped: every client leaves.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Resolves once the session has stopped.
    pub async fn stopped(&self) {
        self.wait_until(|| self.is_stopped()).await
    }

    /// The standing of a client joining now. `takeover`: every client
    /// that joined before must leave.
    pub fn join(&self, takeover: bool) -> Kick {
        let generation = if takeover {
            let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
            self.changed.notify_waiters();
            g
        } else {
            self.generation.load(Ordering::Acquire)
        };
        Kick {
            generation,
            dropped: Arc::new(AtomicBool::new(false)),
        }
    }

    async fn wait_until(&self, done: impl Fn() -> bool) {
        loop {
            // Registered before the check: a change made between the check
            // and the wait still wakes this waiter.
            let mut changed = pin!(self.changed.notified());
            changed.as_mut().enable();
            if done() {
                return;
            }
            changed.await;
        }
    }
}

/// One client's standing in its session.
#[derive(Debug, Clone)]
pub struct Kick {
    generation: u64,
    /// Set when the driver drops this client.
    dropped: Arc<AtomicBool>,
}

impl Kick {
    /// Whether this client must leave (for any of the three reasons).
    pub fn fired(&self, signal: &Signal) -> bool {
        self.dropped.load(Ordering::Acquire)
            || signal.generation.load(Ordering::Acquire) > self.generation
            || signal.is_stopped()
    }

    /// The driver drops this client: its reader stops.
    pub fn fire(&self, signal: &Signal) {
        self.dropped.store(true, Ordering::Release);
        signal.changed.notify_waiters();
    }

    /// Resolves once this client must leave.
    pub async fn fired_in(&self, signal: &Signal) {
        signal.wait_until(|| self.fired(signal)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn resolves(f: impl std::future::Future<Output = ()>) -> bool {
        tokio::time::timeout(Duration::from_secs(2), f)
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_takeover_kicks_earlier_clients_only() {
        let signal = Arc::new(Signal::default());
        let first = signal.join(true);
        let shared = signal.join(false);
        assert!(!first.fired(&signal) && !shared.fired(&signal));
        let waiter = {
            let (first, signal) = (first.clone(), signal.clone());
            tokio::spawn(async move { first.fired_in(&signal).await })
        };
        // Let the waiter register before the takeover.
        tokio::task::yield_now().await;
        let later = signal.join(true);
        assert!(
            resolves(async { waiter.await.expect("waiter ran") }).await,
            "the earlier client is woken"
        );
        assert!(first.fired(&signal) && !signal.is_stopped());
        assert!(shared.fired(&signal), "joined before the takeover");
        assert!(!later.fired(&signal), "the taker stays");
    }

    #[tokio::test]
    async fn a_dropped_client_leaves_and_the_others_stay() {
        let signal = Arc::new(Signal::default());
        let a = signal.join(false);
        let b = signal.join(false);
        let wait_a = {
            let (a, signal) = (a.clone(), signal.clone());
            tokio::spawn(async move { a.fired_in(&signal).await })
        };
        // Let the waiter register before the kick.
        tokio::task::yield_now().await;
        a.fire(&signal);
        assert!(resolves(async { wait_a.await.expect("waiter ran") }).await);
        assert!(a.fired(&signal));
        assert!(!b.fired(&signal));
    }

    #[tokio::test]
    async fn a_stop_wakes_every_waiter() {
        let signal = Arc::new(Signal::default());
        let kick = signal.join(false);
        let stopped = {
            let signal = signal.clone();
            tokio::spawn(async move { signal.stopped().await })
        };
        let kicked = {
            let signal = signal.clone();
            tokio::spawn(async move { kick.fired_in(&signal).await })
        };
        tokio::task::yield_now().await;
        assert!(!signal.is_stopped());
        signal.stop();
        assert!(resolves(async { stopped.await.expect("waiter ran") }).await);
        assert!(resolves(async { kicked.await.expect("waiter ran") }).await);
    }
}
