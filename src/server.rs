//! Starting and stopping a node: bind, wire the parts together, run until
//! asked to drain, drain, stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::config::{Config, RegistryKind};
use crate::control::registry::{
    MemoryRegistry, Registry, RegistryError, ValkeyRegistry, ValkeyState,
};
use crate::control::upstreams::Upstreams;
use crate::control::{admin, drain, membership};
use crate::proxy::listener;
use crate::tls::{self, UpstreamTls};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// A running node.
pub struct Node {
    pub broker: Arc<Broker>,
    /// Where the public listener is bound (useful with port 0).
    pub public_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    /// Stops the listeners.
    listeners: CancellationToken,
}

/// Pending connections the kernel may queue before they are accepted
/// (capped by `net.core.somaxconn`).
const LISTEN_BACKLOG: u32 = 1024;

/// Binds a listener whose accepted connections come with `TCP_NODELAY`
/// already set: Linux copies it from the listening socket, which saves
/// a system call per connection.
fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    let bound = || -> std::io::Result<TcpListener> {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.set_nodelay(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    bound().map_err(|source| StartError::Bind { addr, source })
}

/// Binds the listeners and starts serving.
pub async fn start(config: Config) -> Result<Node, StartError> {
    let config = Arc::new(config);
    let acceptor = match &config.tls {
        Some(t) => Some(tls::server_acceptor(&t.cert, &t.key)?),
        None => None,
    };
    let upstream_tls = UpstreamTls::new(config.upstream.ca_file.as_deref())?;
    let registry = match config.cluster.registry {
        RegistryKind::Memory => Registry::Memory(MemoryRegistry::default()),
        RegistryKind::Valkey => {
            Registry::Valkey(Box::new(ValkeyState::new(ValkeyRegistry::new(&config)?)))
        }
    };
    let public = bind(config.node.listen)?;
    let public_addr = public.local_addr().map_err(|source| StartError::Bind {
        addr: config.node.listen,
        source,
    })?;
    let admin_listener = match &config.admin {
        Some(a) => Some(bind(a.listen)?),
        None => None,
    };
    let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
    let upstreams = Upstreams::new(&config.upstream, upstream_tls);
    let broker = Broker::new(config, upstreams, registry);
    let listeners = CancellationToken::new();
    // Ready before the first connection is accepted (memory registry); a
    // clustered node is ready once registered (the membership loop says so).
    if broker.registry.valkey().is_some() {
        broker
            .tasks
            .spawn(membership::run(broker.clone(), listeners.clone()));
        let ends = broker.clone();
        broker.tasks.spawn(async move {
            if let Some(v) = ends.registry.valkey() {
                let live = |sid: &str| ends.sessions.get(sid).is_some();
                v.write_ends(ends.shutdown.clone(), live).await;
            }
        });
    } else {
        broker.lifecycle.set_running();
    }

    broker.tasks.spawn(listener::serve(
        public,
        broker.clone(),
        acceptor,
        listeners.clone(),
    ));
    if let Some(l) = admin_listener {
        broker
            .tasks
            .spawn(admin::serve(l, broker.clone(), listeners.clone()));
    }
    broker.tasks.spawn(
        broker
            .upstreams
            .clone()
            .run_health_probes(listeners.clone()),
    );
    tracing::info!(node = %broker.node_id, listen = %public_addr, admin = ?admin_addr, "wsbroker running");
    Ok(Node {
        broker,
        public_addr,
        admin_addr,
        listeners,
    })
}

impl Node {
    /// Waits until `signal` resolves or a drain is requested (admin API),
    /// then drains and stops.
    pub async fn run_until(self, signal: impl Future<Output = ()>) {
        tokio::select! {
            _ = signal => {}
            _ = self.broker.lifecycle.drain.cancelled() => {}
        }
        self.shutdown().await;
    }

    /// Drains (sessions closed with 1012 over the jitter window, at most
    /// `drain_timeout`), then stops every task.
    pub async fn shutdown(self) {
        self.broker.lifecycle.begin_drain();
        drain::drain(&self.broker).await;
        self.broker.shutdown.cancel();
        self.listeners.cancel();
        self.broker.end_all_sessions();
        self.broker.tasks.close();
        // Tasks select on `shutdown`; the bound covers close handshakes
        // already under way, so the exit follows drain_timeout closely.
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(1), self.broker.tasks.wait()).await;
        tracing::info!(node = %self.broker.node_id, "stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_connections_inherit_tcp_nodelay() {
        let listener = bind("127.0.0.1:0".parse().expect("address")).expect("bind");
        let addr = listener.local_addr().expect("address");
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        assert!(accepted.nodelay().expect("TCP_NODELAY readable"));
    }
}
