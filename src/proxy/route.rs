//! The routing decision for one upgrade — the one place that decides where
//! a session lives: attach to a session this node holds, forward to the
//! live owner, or claim the session (new, or taken over from a node that
//! is gone) and open its upstream.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::driver::{Driver, PendingDriver};
use super::session::{AttachRefused, Cmd, EndReason, Reservation, Session};
use super::upstream_dial::{dial, DialError, DialRequest};
use crate::broker::Broker;
use crate::config::OnRegistryDown;
use crate::control::registry::{Claim, RegistryError};
use crate::control::upstreams::{prefer_first, Upstream};

/// Why an upgrade could not be routed; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("session already has a client (attach = exclusive)")]
    Busy,
    #[error("no upstream available")]
    NoUpstream,
    #[error("upstream refused the upgrade with {0}")]
    UpstreamRefused(u16),
    #[error("registry unavailable")]
    RegistryDown(#[from] RegistryError),
    #[error("session owner not confirmed yet; retry")]
    OwnerUnconfirmed,
    #[error("session is changing hands; retry")]
    Contended,
}

impl RouteError {
    pub fn status(&self) -> u16 {
        match self {
            RouteError::Busy => 409,
            RouteError::NoUpstream => 502,
            RouteError::UpstreamRefused(s) => *s,
            RouteError::RegistryDown(_) | RouteError::OwnerUnconfirmed | RouteError::Contended => {
                503
            }
        }
    }
}

/// What the upstream handshake carries besides the session headers.
pub struct UpstreamRequest<'a> {
    pub path_and_query: &'a str,
    /// End-to-end and X-Forwarded-* header lines (`Name: value\r\n`).
    pub headers: String,
    /// The subprotocols the client offered (comma-separated), if any.
    pub protocols: Option<String>,
    /// The client's `Sec-WebSocket-Key` (validated), sent upstream as is.
    pub key: &'a str,
    /// Its `Sec-WebSocket-Accept`: what the upstream must answer.
    pub accept: &'a [u8; 28],
}

/// Where an upgrade goes.
pub enum Decision {
    /// A place on a session this node holds.
    Local {
        reservation: Reservation,
        /// Some when the session was created for this upgrade: its driver,
        /// to be started once the client has been answered.
        driver: Option<PendingDriver>,
    },
    /// Another live node owns the session.
    Forward { node: String, advertise: String },
}

/// Routes one upgrade for session `id`. `hopped`: the request already
/// came from another node, so it is never forwarded again.
pub async fn route(
    broker: &Arc<Broker>,
    id: &Arc<str>,
    req: &UpstreamRequest<'_>,
    hopped: bool,
) -> Result<Decision, RouteError> {
    let mode = broker.config.session.attach;
    // Waiting for another request's creation of the same id is bounded in
    // time, not in turns: many clients arriving together (a shared session
    // reached through a node that forwards them) each wait their turn.
    // Set at the first wait: the common path reads no clock here.
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let late = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
        if attempts > 6 || late {
            return Err(RouteError::Contended);
        }
        if let Some(session) = broker.sessions.get(id) {
            if !still_owned(broker, &session).await {
                continue;
            }
            match session.reserve(mode) {
                Ok(reservation) => {
                    return Ok(Decision::Local {
                        reservation,
                        driver: None,
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
        // One creation per id on this node at a time; others wait for it.
        let creating = match broker.creating.entry(id.clone()) {
            dashmap::mapref::entry::Entry::Occupied(e) => {
                let done = e.get().clone();
                // Registered before the entry is let go: the creator's
                // removal (which needs the entry) comes after, and its
                // `notify_waiters` reaches this waiter.
                let notified = done.notified();
                drop(e);
                let wait = broker.upstreams.connect_timeout() + Duration::from_secs(1);
                let until = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + wait);
                let _ = tokio::time::timeout_at(until, notified).await;
                // A turn spent waiting is not an attempt.
                attempts -= 1;
                continue;
            }
            dashmap::mapref::entry::Entry::Vacant(v) => {
                v.insert(Arc::new(Notify::new()));
                CreatingGuard { broker, id }
            }
        };
        let outcome = claim_and_create(broker, id, req, hopped).await;
        drop(creating);
        match outcome? {
            Some(decision) => return Ok(decision),
            None => continue,
        }
    }
}

/// After a freeze or a partition (registration not renewed within
/// stale_ttl) another node may have taken the session over: check before
/// attaching anyone to the local copy, and end it if it was superseded.
async fn still_owned(broker: &Arc<Broker>, session: &Arc<Session>) -> bool {
    let Some(v) = broker.registry.valkey() else {
        return true;
    };
    if v.registration_fresh() {
        return true;
    }
    match Box::pin(v.registry.lookup(&session.id)).await {
        Ok(Some((owner, epoch, _))) if owner == broker.node_id && epoch == session.epoch => true,
        // Unreachable registry: live sessions go on.
        Err(_) => true,
        Ok(_) => {
            tracing::warn!(session = %session.id, epoch = session.epoch, "session moved while this node was away; closing this copy");
            session.mark_ended();
            session
                .send(Cmd::End {
                    reason: &EndReason::MOVED,
                    after: Duration::ZERO,
                })
                .await;
            broker.sessions.remove(session);
            false
        }
    }
}

/// Removes the creation marker (waking waiters) however creation ends.
struct CreatingGuard<'a> {
    broker: &'a Arc<Broker>,
    id: &'a Arc<str>,
}

impl Drop for CreatingGuard<'_> {
    fn drop(&mut self) {
        if let Some((_, done)) = self.broker.creating.remove(self.id) {
            done.notify_waiters();
        }
    }
}

async fn claim_and_create(
    broker: &Arc<Broker>,
    id: &Arc<str>,
    req: &UpstreamRequest<'_>,
    hopped: bool,
) -> Result<Option<Decision>, RouteError> {
    // The upstream this node would open goes into the claim itself: a new
    // session costs one registry round trip.
    let order = broker.upstreams.order(id);
    let proposed = order.first().map(|u| &u.url.url);
    let (epoch, prefer, took_over) = match broker.registry.claim(id, proposed).await {
        Ok(Claim::Owned {
            epoch,
            prefer,
            took_over,
        }) => (epoch, prefer, took_over),
        Ok(Claim::Mine { epoch, prefer }) => match broker.registry.bump(id, epoch).await? {
            Some(epoch) => (epoch, prefer, true),
            None => return Ok(None),
        },
        Ok(Claim::Elsewhere {
            node, advertise, ..
        }) => {
            if hopped || node == broker.node_id {
                // The owner changed while the hop was under way.
                return Err(RouteError::Contended);
            }
            return Ok(Some(Decision::Forward { node, advertise }));
        }
        Ok(Claim::Wait) => return Err(RouteError::OwnerUnconfirmed),
        Err(e) => match broker.config.cluster.on_registry_down {
            // Serve it here; the membership loop records it once the
            // registry is back (conflicts settled by epoch).
            OnRegistryDown::Local => {
                tracing::warn!(session = %id, error = %e, "registry down: serving the session locally");
                (1, None, false)
            }
            OnRegistryDown::Reject => return Err(RouteError::RegistryDown(e)),
        },
    };
    let (reservation, driver) = create(broker, id, req, epoch, prefer.as_deref(), order).await?;
    if took_over {
        broker.metrics.migrations.inc();
        tracing::info!(session = %id, epoch, node = %broker.node_id, "session taken over");
    }
    Ok(Some(Decision::Local {
        reservation,
        driver,
    }))
}

/// Opens the upstream for a claimed session and makes its driver (not
/// started yet: see [`PendingDriver`]).
async fn create(
    broker: &Arc<Broker>,
    id: &Arc<str>,
    req: &UpstreamRequest<'_>,
    epoch: u64,
    prefer: Option<&str>,
    mut order: Vec<Arc<Upstream>>,
) -> Result<(Reservation, Option<PendingDriver>), RouteError> {
    let dial_req = DialRequest {
        path_and_query: req.path_and_query,
        headers: &req.headers,
        protocols: req.protocols.as_deref(),
        session: (id, epoch),
        key: req.key,
        accept: req.accept,
    };
    let upstreams = &broker.upstreams;
    // `prefer`: the upstream on record (a taken-over session goes back to it).
    prefer_first(&mut order, prefer);
    for u in order {
        if !upstreams.begin_attempt(&u) {
            continue;
        }
        let conn = match dial(
            &u.url,
            &u.addrs,
            upstreams.tls(),
            upstreams.connect_timeout(),
            &dial_req,
        )
        .await
        {
            Ok(conn) => conn,
            Err(e) if !e.is_upstream_fault() => {
                upstreams.record_success(&u);
                broker.registry.session_ended(id, epoch, None).await;
                let status = match e {
                    DialError::Refused { status } => status,
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
        let session = Session::new(id.clone(), epoch, u.url.url.clone(), conn.protocol.clone());
        if let Err(existing) = broker.sessions.insert_new(&session) {
            // Cannot happen while creations are serialised per id; keep
            // the existing session and drop this upstream connection.
            drop(conn);
            return existing
                .reserve(broker.config.session.attach)
                .map(|r| (r, None))
                .map_err(|_| RouteError::Contended);
        }
        // The driver exists before anything else is awaited: however this
        // future ends from here on, the session gets it (see PendingDriver).
        let reservation = session.reserve(broker.config.session.attach);
        let driver = Driver::new(broker.clone(), session, conn.io, conn.leftover, u.lease());
        let driver = PendingDriver::new(driver);
        if prefer != Some(&*u.url.url) {
            broker.registry.set_upstream(id, epoch, &u.url.url).await;
        }
        tracing::info!(session = %id, epoch, upstream = %u.url.url, node = %broker.node_id, "session created");
        return match reservation {
            Ok(r) => Ok((r, Some(driver))),
            // Dropped, the driver starts and ends the session unattached.
            Err(_) => Err(RouteError::Contended),
        };
    }
    broker.registry.session_ended(id, epoch, None).await;
    Err(RouteError::NoUpstream)
}
