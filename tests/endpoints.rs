//! `/health`, `/live`, `/metrics` and the admin API on one node.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn health_reports_the_single_node_values() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "").await;
    let mut a = connect(&node.url("/?session=h1")).await;
    let mut b = connect(&node.url("/?session=h2")).await;
    echo(&mut a, "x").await;
    echo(&mut b, "x").await;
    for addr in [node.public, node.admin] {
        let (status, h) = health(addr).await;
        assert_eq!(status, 200);
        assert_eq!(h["status"], "healthy");
        assert_eq!(h["instance_id"], "test-node");
        assert_eq!(h["version"], env!("CARGO_PKG_VERSION"));
        assert!(h["uptime_secs"].is_u64());
        assert_eq!(h["registry"]["kind"], "memory");
        assert_eq!(h["registry"]["status"], "connected");
        assert_eq!(h["cluster"]["registered_instances"], 1);
        assert_eq!(h["cluster"]["healthy_instances"], 1);
        assert_eq!(h["cluster"]["total_sessions"], 2);
        assert_eq!(h["cluster"]["local_sessions"], 2);
        let ups = h["upstreams"].as_array().expect("upstreams");
        assert_eq!(ups.len(), 1);
        assert_eq!(ups[0]["url"], up.url());
        assert_eq!(ups[0]["healthy"], true);
        assert_eq!(ups[0]["circuit"], "closed");
        assert_eq!(ups[0]["sessions"], 2);
    }
    assert_eq!(
        http(node.public, "GET", "/live", &[], b"")
            .await
            .map(|r| r.0),
        Some(200)
    );
}

#[tokio::test]
async fn metrics_export_every_contract_name_and_count_traffic() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "").await;
    let mut ws = connect(&node.url("/?session=m")).await;
    for i in 0..3 {
        echo(&mut ws, &format!("m{i}")).await;
    }
    let (status, _, body) = http(node.admin, "GET", "/metrics", &[], b"")
        .await
        .expect("metrics");
    assert_eq!(status, 200, "metrics need no token");
    let text = String::from_utf8(body).expect("utf8");
    let value = |line_start: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{line_start} missing:\n{text}"))
    };
    assert_eq!(value("wsbroker_connections_active "), 1.0);
    assert_eq!(value("wsbroker_sessions_active "), 1.0);
    assert_eq!(value("wsbroker_upgrades_total{result=\"new\"}"), 1.0);
    assert_eq!(
        value("wsbroker_messages_total{direction=\"upstream\"}"),
        3.0
    );
    assert_eq!(
        value("wsbroker_messages_total{direction=\"downstream\"}"),
        3.0
    );
    assert!(value("wsbroker_bytes_total{direction=\"upstream\"}") >= 3.0 * 8.0);
    assert_eq!(value("wsbroker_registry_up "), 1.0);
    assert_eq!(value("wsbroker_cluster_instances "), 1.0);
    assert_eq!(value("wsbroker_handshake_seconds_count "), 1.0);
    for name in ["wsbroker_forwarded_total ", "wsbroker_migrations_total "] {
        assert_eq!(value(name), 0.0);
    }
}

#[tokio::test]
async fn admin_needs_the_token_as_bearer_or_basic_password() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "").await;
    let (status, headers, _) = http(node.admin, "GET", "/admin/sessions", &[], b"")
        .await
        .expect("reply");
    assert_eq!(status, 401);
    assert_eq!(
        headers.get("www-authenticate").map(String::as_str),
        Some("Basic realm=\"wsbroker\"")
    );
    let wrong = http(
        node.admin,
        "GET",
        "/admin/sessions",
        &[("Authorization", "Bearer nope")],
        b"",
    )
    .await;
    assert_eq!(wrong.map(|r| r.0), Some(401));
    // "anyone:t0ken" in base64.
    let basic = http(
        node.admin,
        "GET",
        "/admin/",
        &[("Authorization", "Basic YW55b25lOnQwa2Vu")],
        b"",
    )
    .await
    .expect("reply");
    assert_eq!(basic.0, 200);
    assert!(String::from_utf8_lossy(&basic.2).contains("<title>wsbroker status</title>"));
    assert_eq!(admin_json(node.admin, "/admin/sessions").await.0, 200);
    assert_eq!(
        http(node.admin, "POST", "/admin/drain", &[], b"")
            .await
            .map(|r| r.0),
        Some(401)
    );
}

#[tokio::test]
async fn admin_auth_schemes_are_case_insensitive() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "").await;
    // "anyone:t0ken" in base64.
    for auth in ["bearer t0ken", "BEARER t0ken", "basic YW55b25lOnQwa2Vu"] {
        let reply = http(
            node.admin,
            "GET",
            "/admin/sessions",
            &[("Authorization", auth)],
            b"",
        )
        .await;
        assert_eq!(reply.map(|r| r.0), Some(200), "{auth}");
    }
    let wrong = http(
        node.admin,
        "GET",
        "/admin/sessions",
        &[("Authorization", "bearer nope")],
        b"",
    )
    .await;
    assert_eq!(wrong.map(|r| r.0), Some(401));
}

#[tokio::test]
async fn admin_answers_head_and_names_the_allowed_methods() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "").await;
    for path in ["/health", "/metrics"] {
        let (status, headers, body) = http(node.admin, "HEAD", path, &[], b"")
            .await
            .expect("reply");
        assert_eq!(status, 200, "HEAD {path}");
        assert!(body.is_empty(), "HEAD {path} has no body");
        assert!(headers.contains_key("content-type"), "HEAD {path}");
    }
    let auth = ("Authorization", "Bearer t0ken");
    for (method, path, allow) in [
        ("POST", "/metrics", "GET, HEAD"),
        ("GET", "/admin/drain", "POST"),
        ("PUT", "/admin/sessions/x", "GET, HEAD, DELETE"),
        ("DELETE", "/admin/cluster", "GET, HEAD"),
    ] {
        let (status, headers, _) = http(node.admin, method, path, &[auth], b"")
            .await
            .expect("reply");
        assert_eq!(status, 405, "{method} {path}");
        assert_eq!(
            headers.get("allow").map(String::as_str),
            Some(allow),
            "{method} {path}"
        );
    }
    assert_eq!(
        http(node.admin, "GET", "/admin/nothing", &[auth], b"")
            .await
            .map(|r| r.0),
        Some(404)
    );
}

#[tokio::test]
async fn metrics_are_prometheus_text_unless_openmetrics_is_asked_for() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "").await;
    let (_, headers, body) = http(node.admin, "GET", "/metrics", &[], b"")
        .await
        .expect("metrics");
    let text = String::from_utf8(body).expect("utf8");
    assert_eq!(
        headers.get("content-type").map(String::as_str),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert!(
        text.contains("# TYPE wsbroker_upgrades_total counter"),
        "{text}"
    );
    assert!(!text.contains("# EOF"), "{text}");
    // text/plain preferred, or OpenMetrics refused: the classic format.
    for accept in [
        "application/openmetrics-text;q=0.3,text/plain;q=0.9",
        "application/openmetrics-text;q=0",
    ] {
        let (_, headers, _) = http(node.admin, "GET", "/metrics", &[("Accept", accept)], b"")
            .await
            .expect("metrics");
        assert_eq!(
            headers.get("content-type").map(String::as_str),
            Some("text/plain; version=0.0.4; charset=utf-8"),
            "{accept}"
        );
    }
    // What a Prometheus server sends.
    let accept = (
        "Accept",
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    );
    let (_, headers, body) = http(node.admin, "GET", "/metrics", &[accept], b"")
        .await
        .expect("metrics");
    let text = String::from_utf8(body).expect("utf8");
    assert_eq!(
        headers.get("content-type").map(String::as_str),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(text.contains("# TYPE wsbroker_upgrades counter"), "{text}");
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
}

#[tokio::test]
async fn sessions_api_lists_and_describes_sessions() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "").await;
    let mut ws = connect(&node.url("/?session=api-1")).await;
    echo(&mut ws, "x").await;
    let (status, list) = admin_json(node.admin, "/admin/sessions").await;
    assert_eq!(status, 200);
    let list = list.as_array().expect("array");
    assert_eq!(list.len(), 1);
    let s = &list[0];
    assert_eq!(s["id"], "api-1");
    assert_eq!(s["owner"], "test-node");
    assert_eq!(s["epoch"], 1);
    assert_eq!(s["upstream"], up.url());
    assert_eq!(s["state"], "attached");
    assert_eq!(s["clients"], 1);
    for t in ["created_at", "last_active_at"] {
        let v = s[t].as_str().expect("time");
        assert!(
            time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339).is_ok(),
            "{t} = {v}"
        );
    }
    let (status, one) = admin_json(node.admin, "/admin/sessions/api-1").await;
    assert_eq!((status, one["id"].as_str()), (200, Some("api-1")));
    assert_eq!(admin_json(node.admin, "/admin/sessions/nope").await.0, 404);
    let (_, other) = admin_json(node.admin, "/admin/sessions?node=other-node").await;
    assert_eq!(other.as_array().map(Vec::len), Some(0));
    let (_, mine) = admin_json(node.admin, "/admin/sessions?node=test-node").await;
    assert_eq!(mine.as_array().map(Vec::len), Some(1));
    let (status, cluster) = admin_json(node.admin, "/admin/cluster").await;
    assert_eq!(status, 200);
    assert_eq!(cluster["instances"][0]["id"], "test-node");
    assert_eq!(cluster["instances"][0]["sessions"], 1);
    assert_eq!(cluster["registry"]["kind"], "memory");
}

#[tokio::test]
async fn delete_ends_a_session_with_4002_and_1000() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "").await;
    let mut ws = connect(&node.url("/?session=del")).await;
    echo(&mut ws, "x").await;
    let auth = [("Authorization", "Bearer t0ken")];
    let (status, _, _) = http(node.admin, "DELETE", "/admin/sessions/del", &auth, b"")
        .await
        .expect("reply");
    assert_eq!(status, 200);
    let (code, reason) = expect_close(&mut ws, Duration::from_secs(5)).await;
    assert_eq!((code, reason.as_str()), (4002, "ended by operator"));
    eventually(
        Duration::from_secs(5),
        "upstream closed with 1000",
        || async { up.closes_for("del").first().map(|c| c.0) == Some(1000) },
    )
    .await;
    let (status, _, _) = http(node.admin, "DELETE", "/admin/sessions/del", &auth, b"")
        .await
        .expect("reply");
    assert_eq!(status, 404);
}

#[tokio::test]
async fn send_delivers_text_and_binary_messages() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "").await;
    let mut ws = connect(&node.url("/?session=push")).await;
    echo(&mut ws, "x").await;
    let text = [
        ("Authorization", "Bearer t0ken"),
        ("Content-Type", "text/plain"),
    ];
    let (status, _, _) = http(
        node.admin,
        "POST",
        "/admin/sessions/push/send",
        &text,
        b"hello from ops",
    )
    .await
    .expect("reply");
    assert_eq!(status, 202);
    assert_eq!(next_data(&mut ws).await, Message::text("hello from ops"));
    let bin = [
        ("Authorization", "Bearer t0ken"),
        ("Content-Type", "application/octet-stream"),
    ];
    let (status, _, _) = http(
        node.admin,
        "POST",
        "/admin/sessions/push/send",
        &bin,
        &[1, 2, 3],
    )
    .await
    .expect("reply");
    assert_eq!(status, 202);
    assert_eq!(next_data(&mut ws).await, Message::binary(vec![1u8, 2, 3]));
    let (status, _, _) = http(node.admin, "POST", "/admin/sessions/none/send", &text, b"x")
        .await
        .expect("reply");
    assert_eq!(status, 404);
    // The session goes on normally afterwards.
    ws.send(Message::text("y")).await.expect("send");
    assert_eq!(next_data(&mut ws).await, Message::text("y"));
}
