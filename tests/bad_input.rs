//! Every row of the bad-input table (contract §6), one test each. After
//! each, a session opened before the bad input still echoes: the node kept
//! serving and lost nothing that belonged to others.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// A node plus one healthy bystander session.
async fn setup(extra: &str) -> (TestUpstream, TestNode, Ws) {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], extra).await;
    let mut bystander = connect(&node.url("/?session=bystander")).await;
    echo(&mut bystander, "before").await;
    (up, node, bystander)
}

async fn still_serving(bystander: &mut Ws) {
    echo(bystander, "after").await;
}

/// Reads a raw HTTP response's status and body.
async fn raw_reply(s: &mut TcpStream) -> Option<(u16, String)> {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    parse_response(&buf)
        .map(|(status, _, body)| (status, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test]
async fn invalid_session_ids_get_400() {
    let (_up, node, mut by) = setup("").await;
    let long = "a".repeat(129);
    for bad in ["", long.as_str(), "no%20spaces", "semi;colon", "slash/x"] {
        let url = node.url(&format!("/?session={bad}"));
        assert_eq!(upgrade_status(&url, &[]).await, 400, "id {bad:?}");
    }
    still_serving(&mut by).await;
}

#[tokio::test]
async fn no_session_id_without_minting_gets_400() {
    let (_up, node, mut by) = setup("[session]\nmint = false\n").await;
    assert_eq!(upgrade_status(&node.url("/chat"), &[]).await, 400);
    still_serving(&mut by).await;
}

#[tokio::test]
async fn plain_requests_get_426_except_health_and_live() {
    let (_up, node, mut by) = setup("").await;
    let (status, headers, body) = http(node.public, "GET", "/anything", &[], b"")
        .await
        .expect("reply");
    assert_eq!(status, 426);
    assert_eq!(
        headers.get("upgrade").map(String::as_str),
        Some("websocket")
    );
    assert!(String::from_utf8_lossy(&body).contains("WebSocket"));
    assert_eq!(
        http(node.public, "GET", "/health", &[], b"")
            .await
            .map(|r| r.0),
        Some(200)
    );
    assert_eq!(
        http(node.public, "GET", "/live", &[], b"")
            .await
            .map(|r| r.0),
        Some(200)
    );
    let (status, headers, _) = http(node.public, "POST", "/health", &[], b"")
        .await
        .expect("reply");
    assert_eq!(status, 405);
    assert_eq!(headers.get("allow").map(String::as_str), Some("GET, HEAD"));
    still_serving(&mut by).await;
}

#[tokio::test]
async fn malformed_request_head_gets_400() {
    let (_up, node, mut by) = setup("").await;
    let mut s = TcpStream::connect(node.public).await.expect("connect");
    s.write_all(b"THIS IS NOT HTTP\r\n\x01\x02\r\n\r\n")
        .await
        .expect("write");
    let (status, body) = raw_reply(&mut s).await.expect("a reply");
    assert_eq!(status, 400);
    assert!(body.contains("malformed request head"), "{body:?}");
    let mut s = TcpStream::connect(node.public).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n")
        .await
        .expect("write");
    let (status, body) = raw_reply(&mut s).await.expect("a reply");
    assert_eq!(status, 400);
    assert!(body.contains("malformed request head"), "{body:?}");
    still_serving(&mut by).await;
}

#[tokio::test]
async fn oversized_request_head_gets_431() {
    let (_up, node, mut by) = setup("[limits]\nmax_header_bytes = \"8KiB\"\n").await;
    let mut s = TcpStream::connect(node.public).await.expect("connect");
    let big = "x".repeat(12 * 1024);
    let req = format!("GET /?session=big HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n");
    let _ = s.write_all(req.as_bytes()).await;
    let (status, body) = raw_reply(&mut s).await.expect("a reply");
    assert_eq!(status, 431);
    assert!(body.contains("max_header_bytes"), "{body:?}");
    still_serving(&mut by).await;
}

#[tokio::test]
async fn an_http_1_0_upgrade_gets_400() {
    let (up, node, mut by) = setup("").await;
    let mut s = TcpStream::connect(node.public).await.expect("connect");
    s.write_all(
        b"GET /?session=old HTTP/1.0\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .expect("write");
    let (status, body) = raw_reply(&mut s).await.expect("a reply");
    assert_eq!(status, 400);
    assert!(body.contains("HTTP/1.1"), "{body:?}");
    still_serving(&mut by).await;
    let opened = up.connections_for("old");
    assert_eq!(opened, 0, "no upstream connection for a refused upgrade");
}

#[tokio::test]
async fn incomplete_upgrade_is_dropped_after_handshake_timeout() {
    let (_up, node, mut by) = setup("[limits]\nhandshake_timeout = \"500ms\"\n").await;
    let started = tokio::time::Instant::now();
    let mut partial = TcpStream::connect(node.public).await.expect("connect");
    partial
        .write_all(b"GET /?session=slow HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n")
        .await
        .expect("write");
    let mut silent = TcpStream::connect(node.public).await.expect("connect");
    for s in [&mut partial, &mut silent] {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the node drops the connection")
            .unwrap_or(0);
        assert_eq!(n, 0, "dropped without a response");
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "dropped after {took:?}"
    );
    still_serving(&mut by).await;
}

#[tokio::test]
async fn connection_limit_gets_503() {
    // The bystander holds one of the two places.
    let (_up, node, mut by) = setup("[limits]\nmax_connections = 2\n").await;
    let mut second = connect(&node.url("/?session=two")).await;
    echo(&mut second, "x").await;
    assert_eq!(upgrade_status(&node.url("/?session=three"), &[]).await, 503);
    second.close(None).await.expect("close");
    let _ = expect_close(&mut second, Duration::from_secs(5)).await;
    eventually(Duration::from_secs(5), "a place frees up", || async {
        upgrade_status(&node.url("/?session=four"), &[]).await == 101
    })
    .await;
    still_serving(&mut by).await;
}

#[tokio::test]
async fn no_upstream_available_gets_502() {
    let (_up, _node, mut by) = setup("").await;
    let dead = format!("ws://127.0.0.1:{}", free_port());
    let node = TestNode::start(&[dead], "").await;
    assert_eq!(
        upgrade_status(&node.url("/?session=nowhere"), &[]).await,
        502
    );
    assert!(node.broker().sessions.get("nowhere").is_none());
    still_serving(&mut by).await;
}

#[tokio::test]
async fn forged_node_to_node_hop_gets_403() {
    let (_up, node, mut by) = setup("").await;
    let status = upgrade_status(
        &node.url("/?session=forged"),
        &[("X-Wsbroker-Hop", "node-b;1;deadbeef")],
    )
    .await;
    assert_eq!(status, 403);
    assert!(node.broker().sessions.get("forged").is_none());
    still_serving(&mut by).await;
}

#[tokio::test]
async fn client_message_over_the_limit_closes_it_with_1009() {
    let (up, node, mut by) = setup("[limits]\nmax_message_size = \"1KiB\"\n").await;
    let mut ws = connect(&node.url("/?session=big")).await;
    echo(&mut ws, "small").await;
    ws.send(Message::binary(vec![0u8; 2048]))
        .await
        .expect("send");
    let (code, _) = expect_close(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(code, 1009);
    eventually(
        Duration::from_secs(5),
        "upstream told the session ended",
        || async { up.closes_for("big").first().map(|c| c.0) == Some(1001) },
    )
    .await;
    assert_eq!(
        up.messages_for("big").len(),
        1,
        "no part of the big message went upstream"
    );
    still_serving(&mut by).await;
}

#[tokio::test]
async fn upstream_message_over_the_limit_closes_it_with_1009() {
    let (up, node, mut by) = setup("[limits]\nmax_message_size = \"1KiB\"\n").await;
    let (mut s, pending) = raw_upgrade(node.public, "/?session=bigdown").await;
    raw_send_text(&mut s, "flood 1 2048").await;
    let (code, _) = raw_read_close(&mut s, pending, Duration::from_secs(5)).await;
    assert_eq!(code, 1014, "the client learns its upstream misbehaved");
    eventually(
        Duration::from_secs(5),
        "the upstream is closed with 1009",
        || async { up.closes_for("bigdown").first().map(|c| c.0) == Some(1009) },
    )
    .await;
    still_serving(&mut by).await;
}

#[tokio::test]
async fn exclusive_session_already_attached_gets_409() {
    let (_up, node, mut by) = setup("[session]\nattach = \"exclusive\"\n").await;
    assert_eq!(
        upgrade_status(&node.url("/?session=bystander"), &[]).await,
        409
    );
    still_serving(&mut by).await;
}

#[tokio::test]
async fn a_frame_length_with_its_top_bit_set_gets_1002() {
    let (up, node, mut by) = setup("").await;
    let (mut s, rest) = raw_upgrade(node.public, "/?session=toplen").await;
    // A 64-bit length of 2^63 + 5 (RFC 6455: the top bit must be 0).
    let mut f = vec![0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 5, 1, 2, 3, 4];
    f.extend_from_slice(b"hello");
    s.write_all(&f).await.expect("write");
    let (code, reason) = raw_read_close(&mut s, rest, Duration::from_secs(5)).await;
    assert_eq!(code, 1002, "{reason}");
    let up = &up;
    eventually(
        Duration::from_secs(5),
        "the upstream closed with 1001",
        || async move { up.closes_for("toplen").first().map(|c| c.0) == Some(1001) },
    )
    .await;
    still_serving(&mut by).await;
}

#[tokio::test]
async fn an_upgrade_with_two_keys_or_a_body_gets_400() {
    let (up, node, mut by) = setup("").await;
    let base = upgrade_request("/?session=strict", "a");
    let requests = [
        base.replace(
            "\r\n\r\n",
            "\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n\r\n",
        ),
        base.replace("\r\n\r\n", "\r\nSec-WebSocket-Version: 8\r\n\r\n"),
        base.replace("\r\n\r\n", "\r\nContent-Length: 5\r\n\r\nhello"),
        base.replace(
            "\r\n\r\n",
            "\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
    ];
    for request in requests {
        let mut s = TcpStream::connect(node.public).await.expect("connect");
        s.write_all(request.as_bytes()).await.expect("write");
        let (status, body) = raw_reply(&mut s).await.expect("a reply");
        assert_eq!(status, 400, "{request}: {body}");
    }
    let opened = up.connections_for("strict");
    assert_eq!(opened, 0);
    still_serving(&mut by).await;
}
