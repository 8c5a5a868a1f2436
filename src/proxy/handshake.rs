//! The public listener's HTTP handling: `/health`, `/live`, 426 for plain
//! requests, and the WebSocket upgrade — checked, routed, answered with a
//! 101 that carries the upstream's subprotocol, then handed to the session.

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode};

use super::conn_slot::ConnSlot;
use super::driver::PendingDriver;
use super::forward::{forward, Tunnel};
use super::hop::HOP_HEADER;
use super::io::ClientConn;
use super::route::{route, Decision, RouteError, UpstreamRequest};
use super::session::{ConnGuard, Reservation};
use super::session_id;
use super::upstream_dial::accept_key_bytes;
use crate::broker::Broker;
use crate::config::SessionKey;
use crate::control::lifecycle::Phase;
use crate::control::metrics::UpgradeResult;
use crate::control::{health, sessions_api};
use crate::decimal::{ip_str, MAX_IP_TEXT};

pub type Body = Full<Bytes>;

/// Facts about the connection a request arrived on.
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    /// The connection's place under `max_connections`: held by the
    /// connection and, after an upgrade, by the session's client (through
    /// [`ConnInfo::guard`]).
    pub slot: ConnSlot,
}

impl ConnInfo {
    /// Keeps the connection's place while its client lives.
    pub fn guard(self: &Arc<Self>) -> ConnGuard {
        self.clone()
    }
}

pub fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// `405 Method Not Allowed` naming the methods the path answers.
pub fn not_allowed(allow: &'static str) -> Response<Body> {
    let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "405 Method Not Allowed");
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

pub fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    values_have_token(&headers.get_all(name), token)
}

/// Whether one of a header's values (comma-separated lists) names `token`,
/// ignoring case.
pub(super) fn values_have_token(values: &header::GetAll<'_, HeaderValue>, token: &str) -> bool {
    values.iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// Whether a request asks for an upgrade (answered on the upgrade path,
/// with 400 when the upgrade itself is malformed).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    header_has_token(headers, header::CONNECTION, "upgrade")
        || headers.contains_key(header::UPGRADE)
}

/// What follows the answer to an upgrade request.
pub enum After {
    /// The answer was not a 101: nothing.
    Nothing,
    /// Hand the client to its session; `driver`: the session was created
    /// for this upgrade and its driver waits to be started.
    Attach {
        reservation: Reservation,
        driver: Option<PendingDriver>,
    },
    /// Tunnel the client's bytes to the session's owner.
    Tunnel(Tunnel),
}

/// Serves one request that reached hyper (everything but the upgrades the
/// listener answers itself).
pub async fn handle(
    mut req: Request<Incoming>,
    conn: Arc<ConnInfo>,
    broker: Arc<Broker>,
) -> Result<Response<Body>, Infallible> {
    let is_upgrade = is_upgrade(req.headers());
    // The node-to-node endpoint exists only for requests that carry a hop
    // (verified there); to anyone else its path is like any other: 426.
    if !is_upgrade
        && req.uri().path().starts_with(sessions_api::INTERNAL_PREFIX)
        && req.headers().contains_key(HOP_HEADER)
    {
        return Ok(sessions_api::internal(req, &broker).await);
    }
    if !is_upgrade {
        return Ok(plain(&req, &broker).await);
    }
    // RFC 6455 section 4.1: the opening handshake is HTTP/1.1 or later.
    if req.version() != hyper::Version::HTTP_11 {
        broker.metrics.upgrade(UpgradeResult::Rejected);
        return Ok(text(
            StatusCode::BAD_REQUEST,
            "400 Bad Request: WebSocket upgrades need HTTP/1.1",
        ));
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    let (parts, _body) = req.into_parts();
    // On a task of its own: hyper drops this future when the client goes,
    // and a routing step cut short would leave a claimed session or a
    // half-open circuit's trial behind. Run to its end, it leaves a
    // session waiting for its client to resume, as on the listener's path.
    let routing = {
        let (conn, task_broker) = (conn.clone(), broker.clone());
        broker
            .tasks
            .spawn(async move { upgrade(parts, &conn, &task_broker).await })
    };
    let Ok((answer, after)) = routing.await else {
        return Ok(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "503 Service Unavailable: the node is stopping",
        ));
    };
    match after {
        After::Nothing => {}
        After::Attach {
            reservation,
            driver,
        } => {
            // Through hyper the client attaches once the upgrade completes,
            // by a command to the running driver.
            if let Some(d) = driver {
                d.start();
            }
            let guard = conn.guard();
            broker.tasks.spawn(async move {
                match on_upgrade.await {
                    Ok(upgraded) => {
                        reservation
                            .attach(ClientConn::from_upgraded(upgraded), guard)
                            .await;
                    }
                    Err(e) => tracing::debug!(error = %e, "client upgrade did not complete"),
                }
            });
        }
        After::Tunnel(tunnel) => {
            broker.tasks.spawn(async move {
                if let Ok(upgraded) = on_upgrade.await {
                    tunnel.run(ClientConn::from_upgraded(upgraded)).await;
                }
            });
        }
    }
    Ok(answer.into_response())
}

async fn plain(req: &Request<Incoming>, broker: &Arc<Broker>) -> Response<Body> {
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    match req.uri().path() {
        "/health" if get => {
            let (status, report) = health::report(broker).await;
            json(status, &report)
        }
        "/live" if get => text(StatusCode::OK, "live"),
        "/health" | "/live" => not_allowed("GET, HEAD"),
        _ => {
            let mut r = text(
                StatusCode::UPGRADE_REQUIRED,
                "426 Upgrade Required: this endpoint accepts WebSocket upgrades only",
            );
            r.headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            r
        }
    }
}

fn bad(reason: &str) -> Response<Body> {
    text(
        StatusCode::BAD_REQUEST,
        &format!("400 Bad Request: {reason}"),
    )
}

/// The answer to an upgrade request.
pub enum Answer {
    /// 101: the upgrade goes ahead (rendered by whichever path serves it).
    Switching(Switching),
    /// Anything else: refusals, errors, and a forwarded upgrade's answer
    /// relayed from the owner.
    Response(Response<Body>),
}

impl Answer {
    pub fn into_response(self) -> Response<Body> {
        match self {
            Answer::Switching(s) => s.into_response(),
            Answer::Response(r) => r,
        }
    }
}

/// A 101 for a client attached on this node: its header lines.
pub struct Switching {
    /// `Sec-WebSocket-Accept`, 28 base64 characters.
    accept: [u8; 28],
    /// The upstream's subprotocol, when the client offered it.
    protocol: Option<String>,
    session: Arc<str>,
    /// `Set-Cookie` for a minted id under a cookie session key.
    cookie: Option<String>,
}

impl Switching {
    /// The header lines, in order; values that could not be sent in a
    /// header (control characters) are left out.
    fn headers(&self) -> impl Iterator<Item = (&'static str, &str)> {
        let accept = std::str::from_utf8(&self.accept).unwrap_or("");
        [
            ("upgrade", Some("websocket")),
            ("connection", Some("Upgrade")),
            ("sec-websocket-accept", Some(accept)),
            ("sec-websocket-protocol", self.protocol.as_deref()),
            ("x-session-id", Some(&*self.session)),
            ("set-cookie", self.cookie.as_deref()),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name, value?)))
        .filter(|(_, value)| {
            value
                .bytes()
                .all(|b| (b >= 0x20 && b != 0x7f) || b == b'\t')
        })
    }

    /// The response head, ready to write.
    pub fn head(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\n");
        for (name, value) in self.headers() {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    fn into_response(self) -> Response<Body> {
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        for (name, value) in self.headers() {
            if let Ok(v) = HeaderValue::from_str(value) {
                resp.headers_mut()
                    .append(header::HeaderName::from_static(name), v);
            }
        }
        resp
    }
}

/// Answers an upgrade request (already read): the answer, and what
/// follows it once written.
pub async fn upgrade(parts: Parts, conn: &Arc<ConnInfo>, broker: &Arc<Broker>) -> (Answer, After) {
    let started = tokio::time::Instant::now();
    let (answer, after) = match check_and_route(parts, conn, broker).await {
        Ok(done) => done,
        Err(response) => (Answer::Response(response), After::Nothing),
    };
    let m = &broker.metrics;
    let status = match &answer {
        Answer::Switching(_) => StatusCode::SWITCHING_PROTOCOLS,
        Answer::Response(r) => r.status(),
    };
    if status == StatusCode::SWITCHING_PROTOCOLS {
        m.handshake_seconds.observe(started.elapsed().as_secs_f64());
    } else if status == StatusCode::BAD_GATEWAY {
        m.upgrade(UpgradeResult::UpstreamFailed);
    } else {
        m.upgrade(UpgradeResult::Rejected);
    }
    (answer, after)
}

async fn check_and_route(
    parts: Parts,
    conn: &Arc<ConnInfo>,
    broker: &Arc<Broker>,
) -> Result<(Answer, After), Response<Body>> {
    let headers = &parts.headers;
    if parts.method != Method::GET {
        return Err(bad("a WebSocket upgrade must be a GET"));
    }
    if !header_has_token(headers, header::UPGRADE, "websocket")
        || !header_has_token(headers, header::CONNECTION, "upgrade")
    {
        return Err(bad("expected Connection: Upgrade and Upgrade: websocket"));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        let mut r = text(
            StatusCode::UPGRADE_REQUIRED,
            "426 Upgrade Required: WebSocket version 13 only",
        );
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return Err(r);
    }
    // One key, one version, no body (RFC 6455 section 4.1): bytes after
    // the head are frames.
    if headers
        .get_all(header::SEC_WEBSOCKET_KEY)
        .iter()
        .nth(1)
        .is_some()
        || headers
            .get_all(header::SEC_WEBSOCKET_VERSION)
            .iter()
            .nth(1)
            .is_some()
    {
        return Err(bad(
            "more than one Sec-WebSocket-Key or Sec-WebSocket-Version",
        ));
    }
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        return Err(bad("an upgrade request has no body"));
    }
    // The key goes upstream as it came: the upstream's answer is then the
    // client's, and is checked against it (one digest per upgrade).
    let Some((key, accept)) = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|k| valid_key(k.as_bytes()))
        .and_then(|k| Some((k.to_str().ok()?, accept_key_bytes(k.as_bytes()))))
    else {
        return Err(bad("missing or malformed Sec-WebSocket-Key"));
    };
    let hop_header = headers
        .get(HOP_HEADER)
        .map(|v| v.to_str().unwrap_or("").to_string());
    let not_serving = match broker.lifecycle.phase() {
        Phase::Running => None,
        Phase::Starting => Some("503 Service Unavailable: node is starting"),
        Phase::Draining => Some("503 Service Unavailable: node is draining"),
    };
    if let Some(why) = not_serving {
        return Err(text(StatusCode::SERVICE_UNAVAILABLE, why));
    }

    let cfg = &broker.config.session;
    let (id, minted): (Arc<str>, bool) = match session_id::find(&cfg.key, &parts) {
        Some(raw) => match session_id::validate(raw) {
            Ok(()) => (Arc::from(raw), false),
            Err(reason) => return Err(bad(reason)),
        },
        None if cfg.mint => (Arc::from(session_id::mint()), true),
        None => return Err(bad("no session id in the request and minting is off")),
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");

    // A hop from another node names the original client; anything that
    // claims to be a hop and does not verify is refused.
    let mut ip_text = [0u8; MAX_IP_TEXT];
    let peer_ip = ip_str(conn.peer.ip().to_canonical(), &mut ip_text);
    let (mut client_ip, mut tls) = (Cow::Borrowed(peer_ip), conn.tls);
    let hopped = hop_header.is_some();
    if let Some(h) = hop_header {
        let verified = broker
            .hops
            .as_ref()
            .map(|k| k.verify(&h, &id, path_and_query, broker.upstreams.connect_timeout()));
        match verified {
            Some(Ok(hop)) => {
                tracing::debug!(session = %id, from = %hop.from, "forwarded upgrade");
                client_ip = Cow::Owned(hop.client);
                tls = hop.tls;
            }
            Some(Err(e)) => {
                tracing::warn!(session = %id, error = %e, "refused a node-to-node hop");
                return Err(text(StatusCode::FORBIDDEN, &format!("403 Forbidden: {e}")));
            }
            None => {
                return Err(text(
                    StatusCode::FORBIDDEN,
                    "403 Forbidden: node-to-node hop not accepted",
                ))
            }
        }
    }

    let upstream_req = UpstreamRequest {
        path_and_query,
        headers: upstream_headers(&parts.headers, &client_ip, tls),
        protocols: offered_protocols(&parts.headers),
        key,
        accept: &accept,
    };
    let routed = match route(broker, &id, &upstream_req, hopped).await {
        Ok(Decision::Local {
            reservation,
            driver,
        }) => (reservation, driver),
        Ok(Decision::Forward { node, advertise }) => {
            // Boxed: the hop's future is large and this path is the rarer one.
            let (response, tunnel) =
                Box::pin(forward(broker, &parts, conn, &id, &node, &advertise)).await;
            return Ok((
                Answer::Response(response),
                tunnel.map_or(After::Nothing, After::Tunnel),
            ));
        }
        Err(e) => {
            tracing::info!(session = %id, error = %e, "upgrade refused");
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY);
            let reason = match &e {
                RouteError::Busy => "409 Conflict: session already has a client".to_string(),
                RouteError::NoUpstream => "502 Bad Gateway: no upstream available".to_string(),
                other => format!("{}: {other}", status.as_u16()),
            };
            return Err(text(status, &reason));
        }
    };
    let (reservation, driver) = routed;
    let created = driver.is_some();
    let Some(session) = reservation.session().cloned() else {
        return Err(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "503 Service Unavailable: retry",
        ));
    };
    broker.metrics.upgrade(if created {
        UpgradeResult::New
    } else {
        UpgradeResult::Attached
    });

    // The upstream's subprotocol goes back only if this client offered it.
    let offered = upstream_req.protocols.as_deref().unwrap_or("");
    let protocol = session.protocol.as_ref().filter(|p| offers(offered, p));
    let cookie = match &cfg.key {
        SessionKey::Cookie(name) if minted => {
            let secure = if conn.tls { "; Secure" } else { "" };
            Some(format!(
                "{name}={id}; Path=/; HttpOnly; SameSite=Lax{secure}"
            ))
        }
        _ => None,
    };
    let answer = Answer::Switching(Switching {
        accept,
        protocol: protocol.cloned(),
        session: id,
        cookie,
    });

    Ok((
        answer,
        After::Attach {
            reservation,
            driver,
        },
    ))
}

/// A Sec-WebSocket-Key is the base64 of 16 bytes: 24 characters.
fn valid_key(key: &[u8]) -> bool {
    use base64::Engine;
    key.len() == 24
        && base64::engine::general_purpose::STANDARD
            .decode(key)
            .map(|k| k.len() == 16)
            .unwrap_or(false)
}

/// Headers the broker never passes upstream: hop-by-hop ones, those the
/// upstream handshake sets itself, and those the broker sets.
const NOT_FORWARDED: &[&str] = &[
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "host",
    "content-length",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-accept",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-session-id",
    "x-session-epoch",
];

/// The end-to-end headers passed to the upstream, then X-Forwarded-*,
/// rendered as header lines (`Name: value\r\n`) ready for the upstream's
/// request head; one allocation for all of them.
pub fn upstream_headers(headers: &HeaderMap, client: &str, tls: bool) -> String {
    let mut out = String::with_capacity(256);
    fn line(out: &mut String, name: &str, value: &str) {
        out.push_str(name);
        out.push_str(": ");
        out.push_str(value);
        out.push_str("\r\n");
    }
    let connection = headers.get_all(header::CONNECTION);
    for (name, value) in headers {
        let n = name.as_str();
        if NOT_FORWARDED.contains(&n)
            || n.starts_with("x-wsbroker-")
            || values_have_token(&connection, n)
        {
            continue;
        }
        // UTF-8 passes as sent (a cookie value with "é" in it); only bytes
        // that are not UTF-8 at all leave the header out.
        if let Ok(v) = std::str::from_utf8(value.as_bytes()) {
            line(&mut out, n, v);
        }
    }
    // X-Forwarded-For: the prior hops, then this client, in one line.
    out.push_str("X-Forwarded-For: ");
    for prior in headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
    {
        out.push_str(prior);
        out.push_str(", ");
    }
    out.push_str(client);
    out.push_str("\r\n");
    line(
        &mut out,
        "X-Forwarded-Proto",
        if tls { "https" } else { "http" },
    );
    if let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
        line(&mut out, "X-Forwarded-Host", host);
    }
    out
}

/// Whether a comma-separated subprotocol list names `protocol` (exactly:
/// subprotocol names are case-sensitive).
pub fn offers(list: &str, protocol: &str) -> bool {
    list.split(',').any(|o| o.trim() == protocol)
}

/// The subprotocols the client offered, as one comma-separated list.
pub fn offered_protocols(headers: &HeaderMap) -> Option<String> {
    let mut all = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok());
    let first = all.next()?;
    let mut list = first.to_string();
    for more in all {
        list.push_str(", ");
        list.push_str(more);
    }
    Some(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_headers_append_and_strip() {
        let mut h = HeaderMap::new();
        h.insert(
            header::HOST,
            HeaderValue::from_static("broker.example:8080"),
        );
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("hop"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        h.insert("x-session-epoch", HeaderValue::from_static("99"));
        h.insert(HOP_HEADER, HeaderValue::from_static("forged"));
        let out = upstream_headers(&h, "192.0.2.7", false);
        assert!(out.ends_with("\r\n"));
        let lines: Vec<(&str, &str)> = out
            .split_terminator("\r\n")
            .map(|l| l.split_once(": ").expect("a header line"))
            .collect();
        let get = |n: &str| {
            lines
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| *v)
        };
        assert_eq!(get("x-forwarded-for"), Some("10.0.0.1, 192.0.2.7"));
        assert_eq!(get("x-forwarded-proto"), Some("http"));
        assert_eq!(get("x-forwarded-host"), Some("broker.example:8080"));
        assert_eq!(get("authorization"), Some("Bearer t"));
        assert_eq!(get("x-secret"), None);
        assert_eq!(get("x-session-epoch"), None);
        assert_eq!(get(HOP_HEADER), None);
        assert_eq!(get("host"), None);
    }

    #[test]
    fn connection_tokens_match_whole_list_items_in_any_case() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.append(
            header::CONNECTION,
            HeaderValue::from_static(" x-a ,UpGrade"),
        );
        assert!(header_has_token(&h, header::CONNECTION, "upgrade"));
        assert!(header_has_token(&h, header::CONNECTION, "keep-alive"));
        assert!(header_has_token(&h, header::CONNECTION, "x-a"));
        let mut near = HeaderMap::new();
        near.insert(
            header::CONNECTION,
            HeaderValue::from_static("upgraded, x-upgrade"),
        );
        assert!(!header_has_token(&near, header::CONNECTION, "upgrade"));
        assert!(!header_has_token(
            &HeaderMap::new(),
            header::CONNECTION,
            "upgrade"
        ));
    }

    #[test]
    fn a_101_carries_accept_protocol_id_and_cookie_and_nothing_unsafe() {
        let s = Switching {
            accept: accept_key_bytes(b"dGhlIHNhbXBsZSBub25jZQ=="),
            protocol: Some("chat".into()),
            session: Arc::from("abc"),
            cookie: Some("sid=abc; Path=/".into()),
        };
        assert_eq!(
            String::from_utf8(s.head()).expect("ascii"),
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nsec-websocket-protocol: chat\r\nx-session-id: abc\r\nset-cookie: sid=abc; Path=/\r\n\r\n"
        );
        let bare = Switching {
            accept: accept_key_bytes(b"dGhlIHNhbXBsZSBub25jZQ=="),
            protocol: Some("bad\r\nx-injected: 1".into()),
            session: Arc::from("abc"),
            cookie: None,
        };
        let head = String::from_utf8(bare.head()).expect("ascii");
        assert!(!head.contains("sec-websocket-protocol"), "{head}");
        assert!(!head.contains("x-injected"), "{head}");
        assert!(!head.contains("set-cookie"), "{head}");
        let r = bare.into_response();
        assert_eq!(r.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(
            r.headers().get("x-session-id").map(|v| v.as_bytes()),
            Some(&b"abc"[..])
        );
        assert!(r.headers().get("sec-websocket-protocol").is_none());
    }

    #[test]
    fn keys_must_be_16_bytes_of_base64() {
        assert!(valid_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!valid_key(b"short"));
        assert!(!valid_key(b"!!!!!!!!!!!!!!!!!!!!!!!!"));
    }
}
