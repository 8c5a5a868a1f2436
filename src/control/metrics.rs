//! Every Prometheus metric the node exports, named in this one place.
//!
//! Counters on the hot path are resolved once (label lookups happen at
//! start-up), so counting a message is one relaxed atomic add.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Label set with one `result` label.
type ResultLabel = Vec<(&'static str, &'static str)>;

/// Result labels of `wsbroker_upgrades_total`.
#[derive(Debug, Clone, Copy)]
pub enum UpgradeResult {
    /// A new session was created on this node.
    New,
    /// A client attached to an existing session on this node.
    Attached,
    /// A client was forwarded to the owner node.
    Forwarded,
    /// The upgrade was refused (4xx/5xx).
    Rejected,
    /// No upstream could take the session (502).
    UpstreamFailed,
}

impl UpgradeResult {
    fn label(self) -> &'static str {
        match self {
            UpgradeResult::New => "new",
            UpgradeResult::Attached => "attached",
            UpgradeResult::Forwarded => "forwarded",
            UpgradeResult::Rejected => "rejected",
            UpgradeResult::UpstreamFailed => "upstream_failed",
        }
    }
    const ALL: [UpgradeResult; 5] = [
        UpgradeResult::New,
        UpgradeResult::Attached,
        UpgradeResult::Forwarded,
        UpgradeResult::Rejected,
        UpgradeResult::UpstreamFailed,
    ];
}

/// Traffic direction label of the message and byte counters.
#[derive(Debug, Clone)]
pub struct Directional {
    /// Client to upstream.
    pub upstream: Counter,
    /// Upstream to client.
    pub downstream: Counter,
}

/// The node's metrics.
pub struct Metrics {
    registry: Registry,
    pub connections_active: Gauge,
    pub sessions_active: Gauge,
    upgrade_counters: [Counter; 5],
    pub forwarded: Counter,
    pub migrations: Counter,
    pub messages: Directional,
    pub bytes: Directional,
    pub registry_up: Gauge,
    pub cluster_instances: Gauge,
    pub handshake_seconds: Histogram,
    pub upstream_failures: Counter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let connections_active = Gauge::default();
        registry.register(
            "wsbroker_connections_active",
            "Open connections on the public listener (forwarded hops included)",
            connections_active.clone(),
        );
        let sessions_active = Gauge::default();
        registry.register(
            "wsbroker_sessions_active",
            "Sessions owned by this node",
            sessions_active.clone(),
        );
        let upgrades = Family::<ResultLabel, Counter>::default();
        registry.register(
            "wsbroker_upgrades",
            "WebSocket upgrade requests by result",
            upgrades.clone(),
        );
        let upgrade_counters = UpgradeResult::ALL.map(|r| {
            let counter = upgrades.get_or_create(&vec![("result", r.label())]).clone();
            counter
        });
        let forwarded = Counter::default();
        registry.register(
            "wsbroker_forwarded",
            "Upgrades forwarded to the owner node",
            forwarded.clone(),
        );
        let migrations = Counter::default();
        registry.register(
            "wsbroker_migrations",
            "Sessions taken over from a node that was gone",
            migrations.clone(),
        );
        let messages_family = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
        registry.register(
            "wsbroker_messages",
            "WebSocket data messages relayed",
            messages_family.clone(),
        );
        let bytes_family = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
        registry.register(
            "wsbroker_bytes",
            "Bytes relayed after the upgrade",
            bytes_family.clone(),
        );
        // Each lookup's read guard must be gone before the next lookup
        // inserts (it takes the write lock), hence one statement each.
        let directional = |f: &Family<Vec<(&'static str, &'static str)>, Counter>| {
            let upstream = f.get_or_create(&vec![("direction", "upstream")]).clone();
            let downstream = f.get_or_create(&vec![("direction", "downstream")]).clone();
            Directional {
                upstream,
                downstream,
            }
        };
        let messages = directional(&messages_family);
        let bytes = directional(&bytes_family);
        let registry_up = Gauge::default();
        registry.register(
            "wsbroker_registry_up",
            "1 when the registry answered its last probe",
            registry_up.clone(),
        );
        let cluster_instances = Gauge::default();
        registry.register(
            "wsbroker_cluster_instances",
            "Live nodes in the registry",
            cluster_instances.clone(),
        );
        let handshake_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "wsbroker_handshake_seconds",
            "Time from upgrade request to 101, upstream handshake included",
            handshake_seconds.clone(),
        );
        let upstream_failures = Counter::default();
        registry.register(
            "wsbroker_upstream_connect_failures",
            "Failed upstream WebSocket handshakes",
            upstream_failures.clone(),
        );
        Metrics {
            registry,
            connections_active,
            sessions_active,
            upgrade_counters,
            forwarded,
            migrations,
            messages,
            bytes,
            registry_up,
            cluster_instances,
            handshake_seconds,
            upstream_failures,
        }
    }

    /// Registers a counter owned by another part of the node.
    pub fn add_counter(&mut self, name: &str, help: &str, counter: Counter) {
        self.registry.register(name, help, counter);
    }

    pub fn upgrade(&self, result: UpgradeResult) {
        self.upgrade_counters[result as usize].inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_metric_is_exported() {
        let m = Metrics::new();
        m.upgrade(UpgradeResult::New);
        m.handshake_seconds.observe(0.01);
        let text = m.render();
        for name in [
            "wsbroker_connections_active",
            "wsbroker_sessions_active",
            "wsbroker_upgrades_total{result=\"new\"} 1",
            "wsbroker_forwarded_total",
            "wsbroker_migrations_total",
            "wsbroker_messages_total{direction=\"upstream\"}",
            "wsbroker_bytes_total{direction=\"downstream\"}",
            "wsbroker_registry_up",
            "wsbroker_cluster_instances",
            "wsbroker_handshake_seconds_bucket",
        ] {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
    }
}
