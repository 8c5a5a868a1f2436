//! The routing decision for one upgrade: attach to a session this node
//! owns, or claim the session and open its upstream. This is the one place
//! that decides where a session lives.

use std::sync::Arc;

use super::driver::Driver;
use super::session::{AttachRefused, Reservation, Session};
use super::upstream_dial::{dial, DialRequest};
use crate::broker::Broker;
use crate::control::registry::{Claim, RegistryError};

/// Why an upgrade could not be routed; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("session already has a client (attach = exclusive)")]
    Busy,
    #[error("no upstream available")]
    NoUpstream,
    #[error("upstream refused the upgrade with {0}")]
    UpstreamRefused(u16),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("session is changing hands; retry")]
    Contended,
}

impl RouteError {
    pub fn status(&self) -> u16 {
        match self {
            RouteError::Busy => 409,
            RouteError::NoUpstream => 502,
            RouteError::UpstreamRefused(s) => *s,
            RouteError::Registry(_) | RouteError::Contended => 503,
        }
    }
}

/// What the upstream handshake carries besides the session headers.
pub struct UpstreamRequest<'a> {
    pub path_and_query: &'a str,
    pub headers: Vec<(String, String)>,
}

/// A routed upgrade.
pub struct Routed {
    /// The client's place on the session.
    pub reservation: Reservation,
    /// The session was created for this upgrade.
    pub created: bool,
}

/// Routes one upgrade for session `id`: returns a place on the session,
/// which the caller fills with the client once the 101 is sent.
pub async fn route(
    broker: &Arc<Broker>,
    id: &Arc<str>,
    req: &UpstreamRequest<'_>,
) -> Result<Routed, RouteError> {
    let mode = broker.config.session.attach;
    for _ in 0..4 {
        if let Some(session) = broker.sessions.get(id) {
            match session.reserve(mode) {
                Ok(reservation) => {
                    return Ok(Routed {
                        reservation,
                        created: false,
                    })
                }
                Err(AttachRefused::Busy) => return Err(RouteError::Busy),
                // It is ending this instant; create it anew.
                Err(AttachRefused::Ended) => {
                    tokio::task::yield_now().await;
                    continue;
                }
            }
        }
        if let Some(reservation) = create(broker, id, req).await? {
            return Ok(Routed {
                reservation,
                created: true,
            });
        }
    }
    Err(RouteError::Contended)
}

/// Claims the session and opens its upstream. `None` when another upgrade
/// for the same id created it first (the caller attaches to that one).
async fn create(
    broker: &Arc<Broker>,
    id: &Arc<str>,
    req: &UpstreamRequest<'_>,
) -> Result<Option<Reservation>, RouteError> {
    let Claim::Owned { epoch, prefer } = broker.registry.claim(id).await?;
    let mut headers = req.headers.clone();
    headers.push(("X-Session-Id".into(), id.to_string()));
    headers.push(("X-Session-Epoch".into(), epoch.to_string()));
    let dial_req = DialRequest {
        path_and_query: req.path_and_query,
        headers: &headers,
    };
    let upstreams = &broker.upstreams;
    for u in upstreams.candidates(id, prefer.as_deref()) {
        if !upstreams.begin_attempt(&u) {
            continue;
        }
        let conn = match dial(
            &u.url,
            upstreams.tls(),
            upstreams.connect_timeout(),
            &dial_req,
        )
        .await
        {
            Ok(conn) => conn,
            Err(e) if !e.is_upstream_fault() => {
                upstreams.record_success(&u);
                broker.registry.session_ended(id, epoch).await;
                let status = match e {
                    super::upstream_dial::DialError::Refused { status } => status,
                    _ => 502,
                };
                return Err(RouteError::UpstreamRefused(status));
            }
            Err(e) => {
                upstreams.record_failure(&u);
                broker.metrics.upstream_failures.inc();
                tracing::warn!(session = %id, upstream = %u.url.url, error = %e, "upstream handshake failed");
                continue;
            }
        };
        upstreams.record_success(&u);
        let (session, rx) =
            Session::new(id.clone(), epoch, u.url.url.clone(), conn.protocol.clone());
        if broker.sessions.insert_new(&session).is_err() {
            // Lost a race with a concurrent upgrade for the same id.
            broker.registry.session_ended(id, epoch).await;
            return Ok(None);
        }
        broker.registry.set_upstream(id, epoch, &u.url.url).await;
        let reservation = session.reserve(broker.config.session.attach);
        let driver = Driver::new(
            broker.clone(),
            session,
            rx,
            conn.io,
            conn.leftover,
            u.lease(),
        );
        broker.tasks.spawn(driver.run());
        tracing::info!(session = %id, epoch, upstream = %u.url.url, node = %broker.node_id, "session created");
        return reservation.map(Some).map_err(|_| RouteError::Contended);
    }
    broker.registry.session_ended(id, epoch).await;
    Err(RouteError::NoUpstream)
}
