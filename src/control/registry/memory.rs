//! The single-node registry: ownership is this process's own session
//! table, so a claim always succeeds. It remembers each live session's
//! epoch and upstream so the shape matches the clustered registry.

use std::sync::Arc;

use dashmap::DashMap;

use super::Claim;

#[derive(Debug, Default)]
pub struct MemoryRegistry {
    /// Live sessions: epoch and upstream (both names shared, not copied).
    sessions: DashMap<Arc<str>, (u64, Option<Arc<str>>)>,
}

impl MemoryRegistry {
    pub fn claim(&self, session: &Arc<str>, proposed: Option<&Arc<str>>) -> Claim {
        let mut entry = self.sessions.entry(session.clone()).or_insert((0, None));
        entry.0 += 1;
        if entry.1.is_none() {
            entry.1 = proposed.cloned();
        }
        Claim::Owned {
            epoch: entry.0,
            prefer: entry.1.clone(),
            took_over: false,
        }
    }

    pub fn set_upstream(&self, session: &str, epoch: u64, upstream: &Arc<str>) {
        if let Some(mut e) = self.sessions.get_mut(session) {
            if e.0 == epoch {
                e.1 = Some(upstream.clone());
            }
        }
    }

    pub fn ended(&self, session: &str, epoch: u64) {
        self.sessions.remove_if(session, |_, v| v.0 == epoch);
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_sessions_leave_no_entry() {
        let r = MemoryRegistry::default();
        let s: Arc<str> = Arc::from("s");
        let Claim::Owned { epoch, .. } = r.claim(&s, None) else {
            panic!("memory claims always succeed")
        };
        assert_eq!(epoch, 1);
        r.set_upstream("s", 1, &Arc::from("ws://u"));
        r.ended("s", 1);
        assert!(r.is_empty());
    }

    #[test]
    fn a_stale_end_does_not_remove_a_newer_claim() {
        let r = MemoryRegistry::default();
        let s: Arc<str> = Arc::from("s");
        r.claim(&s, None);
        let Claim::Owned { epoch, .. } = r.claim(&s, None) else {
            panic!("memory claims always succeed")
        };
        assert_eq!(epoch, 2);
        r.ended("s", 1);
        assert_eq!(r.len(), 1);
    }
}
