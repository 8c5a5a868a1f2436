//! The `/health` report, served on both listeners.

use std::sync::Arc;

use hyper::StatusCode;
use serde::Serialize;

use super::lifecycle::Phase;
use super::registry::RegistryStatus;
use super::upstreams::UpstreamStatus;
use crate::broker::Broker;

#[derive(Debug, Clone, Serialize)]
pub struct ClusterSummary {
    pub registered_instances: usize,
    pub healthy_instances: usize,
    pub total_sessions: usize,
    pub local_sessions: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct HealthReport {
    /// `healthy`, `degraded`, `draining` or `starting`.
    pub status: &'static str,
    pub instance_id: String,
    pub version: &'static str,
    pub uptime_secs: u64,
    pub registry: RegistryStatus,
    pub cluster: ClusterSummary,
    pub upstreams: Vec<UpstreamStatus>,
}

/// The report and the HTTP status it is served with: 200 while the node
/// serves (healthy or degraded), 503 while starting or draining.
pub async fn report(broker: &Arc<Broker>) -> (StatusCode, HealthReport) {
    let registry = broker.registry.status().await;
    let upstreams = broker.upstreams.status();
    let local = broker.sessions.len();
    let any_upstream = upstreams
        .iter()
        .any(|u| u.healthy && u.circuit != super::upstreams::Circuit::Open);
    let (code, status) = match broker.lifecycle.phase() {
        Phase::Starting => (StatusCode::SERVICE_UNAVAILABLE, "starting"),
        Phase::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
        Phase::Running if registry.status == "connected" && any_upstream => {
            (StatusCode::OK, "healthy")
        }
        Phase::Running => (StatusCode::OK, "degraded"),
    };
    broker
        .metrics
        .registry_up
        .set(i64::from(registry.status == "connected"));
    let cluster = match broker.registry.valkey() {
        None => {
            broker.metrics.cluster_instances.set(1);
            ClusterSummary {
                registered_instances: 1,
                healthy_instances: usize::from(status != "draining"),
                total_sessions: local,
                local_sessions: local,
            }
        }
        Some(_) => {
            let members = broker.members();
            ClusterSummary {
                registered_instances: members.len(),
                healthy_instances: members.iter().filter(|m| m.ttl_left_ms > 0).count(),
                total_sessions: members.iter().map(|m| m.sessions).sum(),
                local_sessions: local,
            }
        }
    };
    let report = HealthReport {
        status,
        instance_id: broker.node_id.clone(),
        version: env!("CARGO_PKG_VERSION"),
        uptime_secs: broker.started.elapsed().as_secs(),
        registry,
        cluster,
        upstreams,
    };
    (code, report)
}
