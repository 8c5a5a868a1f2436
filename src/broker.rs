//! The node: the state every part of the data and control paths shares.

use std::sync::Arc;
use std::time::SystemTime;

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::control::lifecycle::Lifecycle;
use crate::control::metrics::Metrics;
use crate::control::registry::valkey::Member;
use crate::control::registry::Registry;
use crate::control::upstreams::Upstreams;
use crate::proxy::hop::HopKeys;
use crate::proxy::session::{Cmd, EndReason, SessionTable};

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
    /// Signs and checks node-to-node hops (cluster mode only).
    pub hops: Option<HopKeys>,
    /// Session ids being created on this node right now; concurrent
    /// upgrades for the same id wait for the first instead of claiming.
    pub creating: DashMap<Arc<str>, Arc<tokio::sync::Notify>>,
    /// The members as the last heartbeat saw them (cluster mode).
    pub members: std::sync::Mutex<Vec<Member>>,
    /// Clients this node tunnels to their sessions' owners right now
    /// (a drain waits for them as for its own sessions).
    pub tunnels: std::sync::atomic::AtomicUsize,
}

impl Broker {
    /// Ends every session now with the drain close codes (after the
    /// drain window; drivers do not watch `shutdown`, which would cost
    /// every relayed message a lock).
    pub fn end_all_sessions(&self) {
        for s in self.sessions.all() {
            s.try_send(Cmd::End {
                reason: &EndReason::DRAIN,
                after: std::time::Duration::ZERO,
            });
        }
    }

    pub fn new(config: Arc<Config>, upstreams: Upstreams, registry: Registry) -> Arc<Broker> {
        let hops = match &registry {
            Registry::Valkey(_) => Some(HopKeys::new(&config.cluster.secret)),
            Registry::Memory(_) => None,
        };
        Arc::new(Broker {
            hops,
            node_id: config.node.id.clone(),
            config,
            started_at: SystemTime::now(),
            started: tokio::time::Instant::now(),
            metrics: {
                let mut m = Metrics::new();
                if let Registry::Valkey(v) = &registry {
                    m.add_counter(
                        "wsbroker_registry_failovers",
                        "Registry primary changes followed (Sentinel failovers)",
                        v.registry.failovers.clone(),
                    );
                }
                m
            },
            upstreams: Arc::new(upstreams),
            sessions: SessionTable::default(),
            registry,
            lifecycle: Lifecycle::default(),
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            creating: DashMap::new(),
            members: std::sync::Mutex::new(Vec::new()),
            tunnels: std::sync::atomic::AtomicUsize::new(0),
        })
    }
}

impl Broker {
    /// The members seen by the last heartbeat.
    pub fn members(&self) -> Vec<Member> {
        self.members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
