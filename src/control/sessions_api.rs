//! The sessions API and its cluster backplane: look up, end, or send to a
//! session from any node. A session owned elsewhere is reached through its
//! owner's public listener at `/_wsbroker/sessions/...`, with the same
//! signed hop header as forwarded upgrades.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

use crate::broker::Broker;
use crate::proxy::forward;
use crate::proxy::handshake::{json, text, Body};
use crate::proxy::hop::HOP_HEADER;
use crate::proxy::session::{Cmd, EndReason, Outgoing, SessionInfo};

/// Path prefix of the node-to-node endpoint on the public listener.
pub const INTERNAL_PREFIX: &str = "/_wsbroker/sessions";
/// Largest reply accepted from a peer.
const MAX_REPLY: usize = 8 << 20;

/// One operation on sessions.
pub enum Op {
    List,
    Get(String),
    End(String),
    Send {
        id: String,
        payload: Bytes,
        text: bool,
    },
}

impl Op {
    fn session(&self) -> &str {
        match self {
            Op::List => "*",
            Op::Get(id) | Op::End(id) | Op::Send { id, .. } => id,
        }
    }

    fn request_line(&self) -> (&'static str, String) {
        match self {
            Op::List => ("GET", INTERNAL_PREFIX.to_string()),
            Op::Get(id) => ("GET", format!("{INTERNAL_PREFIX}/{id}")),
            Op::End(id) => ("DELETE", format!("{INTERNAL_PREFIX}/{id}")),
            Op::Send { id, .. } => ("POST", format!("{INTERNAL_PREFIX}/{id}/send")),
        }
    }
}

fn not_found() -> Response<Body> {
    text(StatusCode::NOT_FOUND, "404 Not Found: unknown session")
}

/// Runs `op` on this node's own sessions.
pub async fn local(broker: &Arc<Broker>, op: Op) -> Response<Body> {
    match op {
        Op::List => {
            let list: Vec<SessionInfo> = broker
                .sessions
                .all()
                .iter()
                .map(|s| s.info(&broker.node_id))
                .collect();
            json(StatusCode::OK, &list)
        }
        Op::Get(id) => match broker.sessions.get(&id) {
            Some(s) => json(StatusCode::OK, &s.info(&broker.node_id)),
            None => not_found(),
        },
        Op::End(id) => match broker.sessions.get(&id) {
            Some(s) => {
                s.send(Cmd::End {
                    reason: &EndReason::OPERATOR,
                    after: Duration::ZERO,
                })
                .await;
                json(
                    StatusCode::OK,
                    &serde_json::json!({"id": id, "ended": true, "owner": broker.node_id}),
                )
            }
            None => not_found(),
        },
        Op::Send {
            id,
            payload,
            text: is_text,
        } => {
            let Some(s) = broker.sessions.get(&id) else {
                return not_found();
            };
            let (done, answer) = oneshot::channel();
            let sent = s
                .send(Cmd::Send(Box::new(Outgoing {
                    payload,
                    text: is_text,
                    done,
                })))
                .await;
            match (sent, answer.await) {
                (true, Ok(true)) => json(
                    StatusCode::ACCEPTED,
                    &serde_json::json!({"id": id, "delivered": true, "owner": broker.node_id}),
                ),
                (true, Ok(false)) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "503 Service Unavailable: session busy or closing",
                ),
                _ => not_found(),
            }
        }
    }
}

/// Runs `op` wherever the session lives: here, or on its owner.
pub async fn anywhere(broker: &Arc<Broker>, op: Op) -> Response<Body> {
    if let Op::List = op {
        return list_cluster(broker).await;
    }
    if broker.sessions.get(op.session()).is_some() || broker.registry.valkey().is_none() {
        return local(broker, op).await;
    }
    let Some(v) = broker.registry.valkey() else {
        return not_found();
    };
    let owner = match v.registry.lookup(op.session()).await {
        Ok(Some((owner, _, _))) if !owner.is_empty() && owner != broker.node_id => owner,
        Ok(_) => return not_found(),
        Err(_) => {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "503 Service Unavailable: registry unreachable",
            )
        }
    };
    match v.registry.node(&owner).await {
        Ok(Some(node)) => remote(broker, &node.advertise, op).await,
        Ok(None) => not_found(),
        Err(_) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "503 Service Unavailable: registry unreachable",
        ),
    }
}

/// This node's sessions, plus every live member's in a cluster.
async fn list_cluster(broker: &Arc<Broker>) -> Response<Body> {
    let mut all: Vec<serde_json::Value> = broker
        .sessions
        .all()
        .iter()
        .filter_map(|s| serde_json::to_value(s.info(&broker.node_id)).ok())
        .collect();
    for m in broker.members() {
        if m.record.id == broker.node_id {
            continue;
        }
        let r = remote(broker, &m.record.advertise, Op::List).await;
        if r.status() != StatusCode::OK {
            continue;
        }
        // The body is a complete in-memory buffer: collecting cannot fail.
        let Ok(collected) = http_body_util::BodyExt::collect(r.into_body()).await;
        if let Ok(serde_json::Value::Array(items)) = serde_json::from_slice(&collected.to_bytes()) {
            all.extend(items);
        }
    }
    json(StatusCode::OK, &all)
}

/// Sends `op` to the node at `advertise` over the internal endpoint.
pub async fn remote(broker: &Arc<Broker>, advertise: &str, op: Op) -> Response<Body> {
    let Some(hops) = broker.hops.as_ref() else {
        return not_found();
    };
    let (method, path) = op.request_line();
    let hop = hops.sign(&broker.node_id, "127.0.0.1", false, op.session(), &path);
    let (body, content_type) = match &op {
        Op::Send {
            payload,
            text: true,
            ..
        } => (payload.clone(), "text/plain; charset=utf-8"),
        Op::Send { payload, .. } => (payload.clone(), "application/octet-stream"),
        _ => (Bytes::new(), "application/octet-stream"),
    };
    let exchange = async {
        let mut io = forward::connect(broker, advertise).await.ok()?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {advertise}\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{HOP_HEADER}: {hop}\r\n\r\n",
            body.len()
        );
        io.write_all(head.as_bytes()).await.ok()?;
        io.write_all(&body).await.ok()?;
        let mut reply = Vec::new();
        (&mut io)
            .take(MAX_REPLY as u64)
            .read_to_end(&mut reply)
            .await
            .ok()?;
        parse_reply(&reply)
    };
    match tokio::time::timeout(broker.upstreams.connect_timeout() * 2, exchange).await {
        Ok(Some((status, content_type, body))) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            if let Ok(v) = HeaderValue::from_str(&content_type) {
                r.headers_mut().insert(header::CONTENT_TYPE, v);
            }
            r
        }
        _ => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "503 Service Unavailable: session owner unreachable",
        ),
    }
}

fn parse_reply(buf: &[u8]) -> Option<(u16, String, Vec<u8>)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    resp.parse(&buf[..end + 4]).ok()?;
    let content_type = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-type"))
        .map(|h| String::from_utf8_lossy(h.value).into_owned())
        .unwrap_or_else(|| "text/plain".into());
    Some((resp.code?, content_type, buf[end + 4..].to_vec()))
}

/// Serves `/_wsbroker/sessions/...` on the public listener: only for peers
/// holding the cluster secret.
pub async fn internal(
    req: hyper::Request<hyper::body::Incoming>,
    broker: &Arc<Broker>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let rest = path
        .trim_start_matches(INTERNAL_PREFIX)
        .trim_start_matches('/');
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let session = segments.first().copied().unwrap_or("*");
    let hop = req
        .headers()
        .get(HOP_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let verified = broker
        .hops
        .as_ref()
        .map(|k| k.verify(hop, session, &path, broker.upstreams.connect_timeout()));
    if !matches!(verified, Some(Ok(_))) {
        return text(
            StatusCode::FORBIDDEN,
            "403 Forbidden: node-to-node requests only",
        );
    }
    let method = req.method().clone();
    let op = match (&method, segments.as_slice()) {
        (&Method::GET, []) => Op::List,
        (&Method::GET, [id]) => Op::Get(id.to_string()),
        (&Method::DELETE, [id]) => Op::End(id.to_string()),
        (&Method::POST, [id, "send"]) => {
            let id = id.to_string();
            match read_message(req, broker).await {
                Ok((payload, is_text)) => Op::Send {
                    id,
                    payload,
                    text: is_text,
                },
                Err(r) => return r,
            }
        }
        _ => return text(StatusCode::NOT_FOUND, "404 Not Found"),
    };
    local(broker, op).await
}

/// Reads a message body: text when `Content-Type: text/*` and UTF-8.
pub async fn read_message(
    req: hyper::Request<hyper::body::Incoming>,
    broker: &Arc<Broker>,
) -> Result<(Bytes, bool), Response<Body>> {
    let text_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/"));
    let limit = broker.config.limits.max_message_size as usize;
    let body =
        http_body_util::BodyExt::collect(http_body_util::Limited::new(req.into_body(), limit))
            .await
            .map(|b| b.to_bytes())
            .map_err(|_| {
                text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "413 Payload Too Large: over max_message_size",
                )
            })?;
    let is_text = text_type && std::str::from_utf8(&body).is_ok();
    Ok((body, is_text))
}
