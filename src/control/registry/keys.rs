//! Every Valkey key the cluster uses, and its lifetime. All live under
//! `cluster.key_prefix` (default `wsb:`).
//!
//! | key | type | value | TTL |
//! |---|---|---|---|
//! | `{p}node:{id}` | string | JSON `{id, advertise, started_at, version, instance}` | `stale_ttl`, refreshed every `heartbeat_interval` |
//! | `{p}nodes` | set | ids of registered nodes | none; a dead id is removed by the survivors |
//! | `{p}node-sessions:{id}` | set | session ids the node owns | none; removed with the node |
//! | `{p}session:{sid}` | string | `owner|epoch|upstream` | none while owned (liveness is the owner's node key); a released session is `|epoch|upstream` for `resume_grace + stale_ttl`, a dead node's for `stale_ttl - heartbeat_interval` |
//! | `{p}gc:{id}` | string | collecting node's id | `stale_ttl`: one survivor collects a dead node |
//!
//! Per heartbeat a node touches its own node key and reads the member set
//! and each member's key and session count: O(nodes), never O(sessions).

pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    /// `{prefix}{kind}{id}` in one allocation of the exact size.
    fn join(&self, kind: &str, id: &str) -> String {
        let mut key = String::with_capacity(self.prefix.len() + kind.len() + id.len());
        key.push_str(&self.prefix);
        key.push_str(kind);
        key.push_str(id);
        key
    }

    pub fn node(&self, id: &str) -> String {
        self.join("node:", id)
    }

    /// Prefix the claim script appends an owner id to.
    pub fn node_prefix(&self) -> String {
        format!("{}node:", self.prefix)
    }

    pub fn nodes(&self) -> String {
        format!("{}nodes", self.prefix)
    }

    pub fn node_sessions(&self, id: &str) -> String {
        self.join("node-sessions:", id)
    }

    pub fn session(&self, sid: &str) -> String {
        self.join("session:", sid)
    }

    pub fn gc(&self, id: &str) -> String {
        format!("{}gc:{id}", self.prefix)
    }
}
