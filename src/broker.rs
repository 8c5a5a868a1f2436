//! The node: the state every part of the data and control paths shares.

use std::sync::Arc;
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::control::lifecycle::Lifecycle;
use crate::control::metrics::Metrics;
use crate::control::registry::Registry;
use crate::control::upstreams::Upstreams;
use crate::proxy::session::SessionTable;

pub struct Broker {
    pub config: Arc<Config>,
    /// This node's id in the cluster (from `node.id`).
    pub node_id: String,
    pub started_at: SystemTime,
    pub started: tokio::time::Instant,
    pub metrics: Metrics,
    pub upstreams: Arc<Upstreams>,
    /// Sessions this node owns.
    pub sessions: SessionTable,
    pub registry: Registry,
    pub lifecycle: Lifecycle,
    /// Every task the node spawns, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Fires when the node must stop at once (drain timeout reached).
    pub shutdown: CancellationToken,
}

impl Broker {
    pub fn new(config: Arc<Config>, upstreams: Upstreams, registry: Registry) -> Arc<Broker> {
        Arc::new(Broker {
            node_id: config.node.id.clone(),
            config,
            started_at: SystemTime::now(),
            started: tokio::time::Instant::now(),
            metrics: Metrics::new(),
            upstreams: Arc::new(upstreams),
            sessions: SessionTable::default(),
            registry,
            lifecycle: Lifecycle::default(),
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        })
    }
}
