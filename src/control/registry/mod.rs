//! The registry: where session ownership is recorded. `memory` (one node,
//! the default) lives here; the data path asks it one question per new
//! session — claim it, or who owns it — and tells it when a session ends.

mod memory;

use serde::Serialize;

pub use memory::MemoryRegistry;

/// What a claim for a session id decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This node owns the session now, at `epoch`; `prefer` is the
    /// upstream a previous owner used, if known.
    Owned { epoch: u64, prefer: Option<String> },
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
    pub status: &'static str,
    pub primary: Option<String>,
}

/// The configured registry.
pub enum Registry {
    Memory(MemoryRegistry),
}

impl Registry {
    /// Claims `session` for this node, or says who owns it.
    pub async fn claim(&self, session: &str) -> Result<Claim, RegistryError> {
        match self {
            Registry::Memory(m) => Ok(m.claim(session)),
        }
    }

    /// Records which upstream a claimed session uses.
    pub async fn set_upstream(&self, session: &str, epoch: u64, upstream: &str) {
        match self {
            Registry::Memory(m) => m.set_upstream(session, epoch, upstream),
        }
    }

    /// The session ended for good: forget it.
    pub async fn session_ended(&self, session: &str, epoch: u64) {
        match self {
            Registry::Memory(m) => m.ended(session, epoch),
        }
    }

    pub async fn status(&self) -> RegistryStatus {
        match self {
            Registry::Memory(_) => RegistryStatus {
                kind: "memory",
                status: "connected",
                primary: None,
            },
        }
    }

    pub fn is_up(&self) -> bool {
        match self {
            Registry::Memory(_) => true,
        }
    }
}
