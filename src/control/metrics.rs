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

    /// Every metric in the OpenMetrics text format (what a Prometheus
    /// server asks for first).
    pub fn render_openmetrics(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Every metric in the classic Prometheus text format (0.0.4), which
    /// plain scrapers and parsers expect.
    pub fn render(&self) -> String {
        classic_text(&self.render_openmetrics())
    }
}

/// Rewrites OpenMetrics text as Prometheus text 0.0.4. The two differ, for
/// what this node exports, in two places: a counter's `# HELP`/`# TYPE`
/// lines name the family without `_total` in OpenMetrics but must name the
/// samples exactly (`…_total`) in 0.0.4, and OpenMetrics ends with `# EOF`.
fn classic_text(open: &str) -> String {
    let counters: std::collections::HashSet<&str> = open
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open.len() + 16 * counters.len());
    for line in open.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        if let Some((prefix, rest)) = meta {
            let name = rest.split(' ').next().unwrap_or_default();
            if counters.contains(name) && !name.ends_with("_total") {
                out.push_str(prefix);
                out.push_str(name);
                out.push_str("_total");
                out.push_str(&rest[name.len()..]);
                out.push('\n');
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
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

    /// The 0.0.4 text format's rule: a family's `# TYPE` line names its
    /// samples exactly (histograms add `_bucket`, `_sum`, `_count`), and
    /// there is no `# EOF`.
    #[test]
    fn classic_text_names_every_sample_after_its_type_line() {
        let m = Metrics::new();
        m.upgrade(UpgradeResult::New);
        m.forwarded.inc();
        m.handshake_seconds.observe(0.01);
        let text = m.render();
        assert!(!text.contains("# EOF"), "{text}");
        let mut family: Option<(String, String)> = None;
        let mut typed = 0;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split(' ');
                let name = parts.next().unwrap_or_default().to_string();
                let kind = parts.next().unwrap_or_default().to_string();
                family = Some((name, kind));
                typed += 1;
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let sample = line.split(['{', ' ']).next().unwrap_or_default();
            let (name, kind) = family.as_ref().expect("a sample before any # TYPE line");
            let ok = match kind.as_str() {
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| sample.strip_suffix(s) == Some(name.as_str())),
                _ => sample == name,
            };
            assert!(ok, "sample {sample} under # TYPE {name} {kind}:\n{text}");
        }
        assert!(typed >= 10, "{text}");
        assert!(
            text.contains("# TYPE wsbroker_upgrades_total counter"),
            "{text}"
        );
        assert!(text.contains("# HELP wsbroker_upgrades_total "), "{text}");
    }

    #[test]
    fn openmetrics_text_keeps_its_own_form() {
        let text = Metrics::new().render_openmetrics();
        assert!(text.contains("# TYPE wsbroker_upgrades counter"), "{text}");
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }
}
