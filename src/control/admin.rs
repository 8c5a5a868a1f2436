//! The admin listener: `/metrics`, `/health`, the sessions API, drain, and
//! the status page. `/admin/*` needs the token (Bearer, or the password of
//! HTTP Basic so a browser can open the page).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::health;
use super::sessions_api::{self, Op};
use crate::broker::Broker;
use crate::clock;
use crate::proxy::handshake::{json, not_allowed, text, Body};

const STATUS_PAGE: &str = include_str!("status_page.html");

/// Accepts admin connections until `stop` fires.
pub async fn serve(listener: TcpListener, broker: Arc<Broker>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let b = broker.clone();
        let stop = stop.clone();
        broker.tasks.spawn(async move {
            let svc_broker = b.clone();
            let service = service_fn(move |req| handle(req, svc_broker.clone()));
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(b.config.limits.handshake_timeout);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

fn unauthorized() -> Response<Body> {
    let mut r = text(
        StatusCode::UNAUTHORIZED,
        "401 Unauthorized: admin token required",
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"wsbroker\""),
    );
    r
}

/// Compares without an early exit, so timing does not reveal the token.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(req: &Request<Incoming>, token: &str) -> bool {
    if token.is_empty() {
        return true;
    }
    let Some(auth) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    // The scheme name is case-insensitive (RFC 9110, section 11.1).
    let (scheme, credentials) = auth.trim_start().split_once(' ').unwrap_or((auth, ""));
    let credentials = credentials.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return same(credentials.as_bytes(), token.as_bytes());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(credentials) else {
            return false;
        };
        let password = decoded.splitn(2, |b| *b == b':').nth(1).unwrap_or_default();
        return same(password, token.as_bytes());
    }
    false
}

/// Whether the client prefers OpenMetrics (a Prometheus server does) to
/// the classic text format, by the `q` values of its `Accept` header.
fn wants_openmetrics(req: &Request<Incoming>) -> bool {
    let (mut open, mut plain) = (0.0f32, 0.0f32);
    let ranges = req
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','));
    for range in ranges {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.strip_prefix("q="))
            .find_map(|q| q.parse::<f32>().ok())
            .unwrap_or(1.0);
        match media.as_str() {
            "application/openmetrics-text" => open = open.max(q),
            "text/plain" => plain = plain.max(q),
            _ => {}
        }
    }
    open > 0.0 && open >= plain
}

#[derive(Serialize)]
struct Instance {
    id: String,
    advertise: String,
    version: String,
    started_at: String,
    heartbeat_age_ms: u64,
    healthy: bool,
    sessions: usize,
}

async fn handle(req: Request<Incoming>, broker: Arc<Broker>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    // HEAD is answered as GET; hyper leaves the body out.
    let method = match req.method() {
        &Method::HEAD => Method::GET,
        m => m.clone(),
    };
    let read_only = ["/metrics", "/health", "/live"];
    if read_only.contains(&path.as_str()) && method != Method::GET {
        return Ok(not_allowed("GET, HEAD"));
    }
    if path == "/metrics" {
        let (_, _) = health::report(&broker).await;
        let (body, content_type) = if wants_openmetrics(&req) {
            (
                broker.metrics.render_openmetrics(),
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
        } else {
            (
                broker.metrics.render(),
                "text/plain; version=0.0.4; charset=utf-8",
            )
        };
        let mut r = Response::new(Full::new(Bytes::from(body)));
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        return Ok(r);
    }
    if path == "/health" {
        let (status, report) = health::report(&broker).await;
        return Ok(json(status, &report));
    }
    if path == "/live" {
        return Ok(text(StatusCode::OK, "live"));
    }
    if !(path == "/admin" || path.starts_with("/admin/")) {
        return Ok(text(StatusCode::NOT_FOUND, "404 Not Found"));
    }
    let token = broker
        .config
        .admin
        .as_ref()
        .map(|a| a.token.as_str())
        .unwrap_or("");
    if !authorized(&req, token) {
        return Ok(unauthorized());
    }
    let rest = path.trim_start_matches("/admin").trim_start_matches('/');
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let resp = match (&method, segments.as_slice()) {
        (&Method::GET, []) => {
            let mut r = Response::new(Full::new(Bytes::from_static(STATUS_PAGE.as_bytes())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            r
        }
        (&Method::GET, ["cluster"]) => cluster(&broker).await,
        (&Method::GET, ["sessions"]) => {
            let node = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("node=")))
                .map(str::to_string);
            sessions_for(&broker, node.as_deref()).await
        }
        (&Method::GET, ["sessions", id]) => {
            sessions_api::anywhere(&broker, Op::Get(id.to_string())).await
        }
        (&Method::DELETE, ["sessions", id]) => {
            sessions_api::anywhere(&broker, Op::End(id.to_string())).await
        }
        (&Method::POST, ["sessions", id, "send"]) => {
            let id = id.to_string();
            match sessions_api::read_message(req, &broker).await {
                Ok((payload, is_text)) => {
                    sessions_api::anywhere(
                        &broker,
                        Op::Send {
                            id,
                            payload,
                            text: is_text,
                        },
                    )
                    .await
                }
                Err(r) => r,
            }
        }
        (&Method::POST, ["drain"]) => {
            broker.lifecycle.begin_drain();
            json(
                StatusCode::ACCEPTED,
                &serde_json::json!({"status": "draining"}),
            )
        }
        (_, []) | (_, ["cluster"]) | (_, ["sessions"]) => not_allowed("GET, HEAD"),
        (_, ["sessions", _]) => not_allowed("GET, HEAD, DELETE"),
        (_, ["sessions", _, "send"]) | (_, ["drain"]) => not_allowed("POST"),
        _ => text(StatusCode::NOT_FOUND, "404 Not Found"),
    };
    Ok(resp)
}

async fn cluster(broker: &Arc<Broker>) -> Response<Body> {
    let (_, report) = health::report(broker).await;
    let instances: Vec<Instance> = match broker.registry.valkey() {
        None => vec![Instance {
            id: broker.node_id.clone(),
            advertise: broker
                .config
                .node
                .advertise
                .clone()
                .unwrap_or_else(|| broker.config.node.listen.to_string()),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: clock::rfc3339(broker.started_at),
            heartbeat_age_ms: 0,
            healthy: report.status == "healthy" || report.status == "degraded",
            sessions: broker.sessions.len(),
        }],
        Some(v) => {
            let ttl = v.registry.stale_ttl().as_millis() as u64;
            broker
                .members()
                .into_iter()
                .map(|m| Instance {
                    healthy: m.ttl_left_ms > 0,
                    heartbeat_age_ms: ttl.saturating_sub(m.ttl_left_ms),
                    id: m.record.id,
                    advertise: m.record.advertise,
                    version: m.record.version,
                    started_at: clock::rfc3339(
                        std::time::UNIX_EPOCH + Duration::from_secs(m.record.started_at),
                    ),
                    sessions: m.sessions,
                })
                .collect()
        }
    };
    json(
        StatusCode::OK,
        &serde_json::json!({"instances": instances, "registry": report.registry}),
    )
}

/// `GET /admin/sessions[?node=ID]`: the whole cluster's sessions, or one node's.
async fn sessions_for(broker: &Arc<Broker>, node: Option<&str>) -> Response<Body> {
    match node {
        None => sessions_api::anywhere(broker, Op::List).await,
        Some(n) if n == broker.node_id => sessions_api::local(broker, Op::List).await,
        Some(n) => match broker.members().into_iter().find(|m| m.record.id == n) {
            Some(m) => sessions_api::remote(broker, &m.record.advertise, Op::List).await,
            None => json(StatusCode::OK, &Vec::<serde_json::Value>::new()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::same;

    #[test]
    fn token_comparison() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
    }
}
