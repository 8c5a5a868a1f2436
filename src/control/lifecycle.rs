//! The node's lifecycle phase (starting → running → draining), which
//! `/health` reports and the data path consults before taking sessions.

use std::sync::atomic::{AtomicU8, Ordering};

use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Listeners are not bound yet or the registry is not joined yet.
    Starting,
    /// Serving.
    Running,
    /// Shutting down gracefully: no new sessions, clients sent away.
    Draining,
}

#[derive(Debug)]
pub struct Lifecycle {
    phase: AtomicU8,
    /// Fires once, when draining starts (signal or admin request).
    pub drain: CancellationToken,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            phase: AtomicU8::new(Phase::Starting as u8),
            drain: CancellationToken::new(),
        }
    }
}

impl Lifecycle {
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Starting,
            1 => Phase::Running,
            _ => Phase::Draining,
        }
    }

    pub fn set_running(&self) {
        // Never leave Draining.
        let _ = self.phase.compare_exchange(
            Phase::Starting as u8,
            Phase::Running as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Back to starting (not serving), unless draining: the node lost its
    /// id to another live process and must register again.
    pub fn set_starting(&self) {
        let _ = self.phase.compare_exchange(
            Phase::Running as u8,
            Phase::Starting as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Starts draining; returns false if it had already started.
    pub fn begin_drain(&self) -> bool {
        let before = self.phase.swap(Phase::Draining as u8, Ordering::AcqRel);
        self.drain.cancel();
        before != Phase::Draining as u8
    }
}
