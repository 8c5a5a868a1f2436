//! Proxying through one node: messages of every kind both ways, the
//! upstream handshake's headers, subprotocols, session-id sources, wss://.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use wsbroker::proxy::frame;

#[tokio::test]
async fn text_and_binary_messages_echo_through_the_node() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "").await;
    let mut ws = connect(&node.url("/echo?session=s1")).await;
    echo(&mut ws, "hello").await;
    let big = vec![7u8; 200_000];
    ws.send(Message::binary(big.clone())).await.expect("send");
    assert_eq!(next_data(&mut ws).await, Message::binary(big));
    assert_eq!(up.messages_for("s1").len(), 2);
}

#[tokio::test]
async fn upstream_handshake_carries_the_contract_headers() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "").await;
    let (mut ws, resp) = connect_with(
        &node.url("/room/7?session=abc&x=1"),
        &[
            ("Cookie", "theme=dark"),
            ("Authorization", "Bearer secret"),
            ("Origin", "https://app.example"),
            ("Sec-WebSocket-Protocol", "chat.v2, chat.v1"),
            ("X-Forwarded-For", "203.0.113.9"),
            ("X-Session-Epoch", "77"),
        ],
    )
    .await
    .expect("upgrade");
    echo(&mut ws, "x").await;
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok()),
        Some("chat.v2"),
        "the upstream's subprotocol choice reaches the client"
    );
    assert_eq!(
        resp.headers()
            .get("x-session-id")
            .and_then(|v| v.to_str().ok()),
        Some("abc")
    );
    let hs = up.handshakes().pop().expect("one handshake");
    assert_eq!(hs.path, "/room/7?session=abc&x=1");
    assert_eq!(hs.header("cookie"), Some("theme=dark"));
    assert_eq!(hs.header("authorization"), Some("Bearer secret"));
    assert_eq!(hs.header("origin"), Some("https://app.example"));
    assert_eq!(
        hs.header("sec-websocket-protocol"),
        Some("chat.v2, chat.v1")
    );
    assert_eq!(hs.header("x-forwarded-for"), Some("203.0.113.9, 127.0.0.1"));
    assert_eq!(hs.header("x-forwarded-proto"), Some("http"));
    assert_eq!(
        hs.header("x-forwarded-host"),
        Some(node.public.to_string().as_str())
    );
    assert_eq!(hs.header("x-session-id"), Some("abc"));
    assert_eq!(
        hs.header("x-session-epoch"),
        Some("1"),
        "a client cannot set the epoch"
    );
    assert_eq!(hs.header("sec-websocket-extensions"), None);
}

/// The client's key goes to the upstream as it came, and the client gets
/// the accept value RFC 6455 derives from it.
#[tokio::test]
async fn the_clients_key_reaches_the_upstream_and_its_accept_the_client() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "").await;
    let mut s = tokio::net::TcpStream::connect(node.public)
        .await
        .expect("connect");
    s.write_all(upgrade_request("/?session=keyed", &node.public.to_string()).as_bytes())
        .await
        .expect("write");
    let (head, _) = raw_read_head(&mut s, Duration::from_secs(5)).await;
    assert!(head.starts_with("HTTP/1.1 101"), "expected 101, got {head}");
    // RFC 6455 section 1.3's example key and its accept value.
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "wrong accept in {head}"
    );
    let hs = up.handshakes().pop().expect("one handshake");
    assert_eq!(
        hs.header("sec-websocket-key"),
        Some("dGhlIHNhbXBsZSBub25jZQ==")
    );
}

#[tokio::test]
async fn fragmented_messages_and_pings_are_relayed() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "").await;
    let (mut s, _) = raw_upgrade(node.public, "/?session=frag").await;
    // A text message in three fragments with a ping between two of them.
    let mut first = frame::encode_frame(frame::OP_TEXT, b"hel", true);
    first[0] &= 0x7f;
    let mut middle = frame::encode_frame(frame::OP_CONTINUATION, b"lo ", true);
    middle[0] &= 0x7f;
    let ping = frame::encode_frame(frame::OP_PING, b"p1", true);
    let last = frame::encode_frame(frame::OP_CONTINUATION, b"world", true);
    for part in [&first, &middle, &ping, &last] {
        s.write_all(part).await.expect("write");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Expect the pong for p1 and the echo of the whole message.
    let mut got = Vec::new();
    let mut pong = false;
    let mut text = None;
    while text.is_none() || !pong {
        let mut chunk = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("reply")
            .expect("read");
        assert!(n > 0);
        got.extend_from_slice(&chunk[..n]);
        while let Some(h) = frame::parse_header(&got) {
            let len = h.header_len + h.payload_len as usize;
            if got.len() < len {
                break;
            }
            let payload = frame::frame_payload(&got[..len]);
            match h.opcode {
                frame::OP_PONG => {
                    assert_eq!(payload, b"p1");
                    pong = true;
                }
                frame::OP_TEXT => text = Some(String::from_utf8(payload).expect("utf8")),
                _ => {}
            }
            got.drain(..len);
        }
    }
    assert_eq!(text.as_deref(), Some("hello world"));
    assert_eq!(up.messages_for("frag"), vec![Message::text("hello world")]);
}

#[tokio::test]
async fn close_codes_pass_through_both_ways() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "").await;

    let mut ws = connect(&node.url("/?session=c1")).await;
    echo(&mut ws, "hi").await;
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4100),
        reason: "bye now".into(),
    }))
    .await
    .expect("close");
    eventually(
        Duration::from_secs(5),
        "upstream sees the client's close",
        || async { up.closes_for("c1") == vec![(4100, "bye now".to_string())] },
    )
    .await;

    let mut ws = connect(&node.url("/?session=c2")).await;
    ws.send(Message::text("close 4200 see you later"))
        .await
        .expect("send");
    let (code, reason) = expect_close(&mut ws, Duration::from_secs(5)).await;
    assert_eq!((code, reason.as_str()), (4200, "see you later"));
    eventually(Duration::from_secs(5), "session c2 gone", || async {
        node.broker().sessions.get("c2").is_none()
    })
    .await;
}

/// Reads until the server ends the connection; true for a clean end of
/// stream (FIN), false for a reset.
async fn ends_cleanly(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout(within, s.read(&mut buf))
            .await
            .expect("the node closes the connection in time")
        {
            Ok(0) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
}

/// Once the close handshake is over (started by either side) the node
/// closes the TCP connection at once, with a FIN, not a reset.
#[tokio::test]
async fn the_connection_ends_cleanly_right_after_the_close_handshake() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "").await;
    // Well under the close linger (5 s) and the kick grace (2 s): only a
    // close right after the handshake ends the connection in time.
    let prompt = Duration::from_millis(1500);

    // The client closes first.
    let (mut s, rest) = raw_upgrade(node.public, "/?session=tcp-end-1").await;
    s.write_all(&frame::encode_close(4101, "client done", true))
        .await
        .expect("write");
    let (code, _) = raw_read_close(&mut s, rest, Duration::from_secs(5)).await;
    assert_eq!(code, 4101, "the upstream's answer passes through");
    assert!(
        ends_cleanly(&mut s, prompt).await,
        "client-started close ended with a reset"
    );

    // The upstream closes first; the client answers.
    let (mut s, rest) = raw_upgrade(node.public, "/?session=tcp-end-2").await;
    raw_send_text(&mut s, "close 4202 upstream done").await;
    let (code, reason) = raw_read_close(&mut s, rest, Duration::from_secs(5)).await;
    assert_eq!((code, reason.as_str()), (4202, "upstream done"));
    s.write_all(&frame::encode_close(4202, "", true))
        .await
        .expect("write");
    assert!(
        ends_cleanly(&mut s, prompt).await,
        "upstream-started close ended with a reset"
    );

    eventually(Duration::from_secs(5), "both sessions gone", || async {
        node.broker().sessions.get("tcp-end-1").is_none()
            && node.broker().sessions.get("tcp-end-2").is_none()
    })
    .await;
}

#[tokio::test]
async fn session_id_from_header_cookie_and_path() {
    let up = TestUpstream::start().await;
    for (key, path, headers, want) in [
        (
            "header:X-Sid",
            "/",
            vec![("X-Sid", "from-header")],
            "from-header",
        ),
        (
            "cookie:sid",
            "/",
            vec![("Cookie", "a=b; sid=from-cookie")],
            "from-cookie",
        ),
        ("path:2", "/rooms/from-path/ws", vec![], "from-path"),
    ] {
        let node = TestNode::start(&[up.url()], &format!("[session]\nkey = \"{key}\"\n")).await;
        let (mut ws, resp) = connect_with(&node.url(path), &headers)
            .await
            .expect("upgrade");
        echo(&mut ws, "x").await;
        assert_eq!(
            resp.headers()
                .get("x-session-id")
                .and_then(|v| v.to_str().ok()),
            Some(want),
            "{key}"
        );
        assert!(
            node.broker().sessions.get(want).is_some(),
            "{key}: session {want} exists"
        );
    }
}

#[tokio::test]
async fn missing_ids_are_minted_and_returned() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "").await;
    let (mut ws, resp) = connect_with(&node.url("/"), &[]).await.expect("upgrade");
    let id = resp
        .headers()
        .get("x-session-id")
        .and_then(|v| v.to_str().ok())
        .expect("minted id")
        .to_string();
    assert_eq!(id.len(), 32);
    echo(&mut ws, "x").await;
    assert_eq!(up.handshakes()[0].header("x-session-id"), Some(id.as_str()));

    let node = TestNode::start(&[up.url()], "[session]\nkey = \"cookie:sid\"\n").await;
    let (_ws, resp) = connect_with(&node.url("/"), &[]).await.expect("upgrade");
    let id = resp
        .headers()
        .get("x-session-id")
        .and_then(|v| v.to_str().ok())
        .expect("minted id")
        .to_string();
    let cookie = resp
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .expect("set-cookie");
    assert_eq!(cookie, format!("sid={id}; Path=/; HttpOnly; SameSite=Lax"));
}

#[tokio::test]
async fn wss_on_the_public_listener() {
    let up = TestUpstream::start().await;
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    let dir = std::env::temp_dir().join(format!("wsbroker-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).expect("write cert");
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).expect("write key");
    let node = TestNode::start(
        &[up.url()],
        &format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n[session]\nkey = \"cookie:sid\"\n",
            cert_path.display(),
            key_path.display()
        ),
    )
    .await;

    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).expect("root");
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(node.public)
        .await
        .expect("connect");
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect("localhost".try_into().expect("name"), tcp)
        .await
        .expect("TLS handshake");
    let (mut ws, resp) =
        tokio_tungstenite::client_async(format!("wss://localhost:{}/", node.public.port()), tls)
            .await
            .expect("upgrade over TLS");
    ws.send(Message::text("secure")).await.expect("send");
    let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("reply")
        .expect("open")
        .expect("msg");
    assert_eq!(got, Message::text("secure"));
    let cookie = resp
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .expect("set-cookie");
    assert!(cookie.ends_with("; Secure"), "{cookie}");
    assert_eq!(
        up.handshakes()[0].header("x-forwarded-proto"),
        Some("https")
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn messages_the_upstream_starts_reach_the_client_in_order() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "").await;
    let mut ws = connect(&node.url("/?session=g")).await;
    ws.send(Message::text("later 0 3")).await.expect("send");
    for i in 0..3 {
        assert_eq!(next_data(&mut ws).await, Message::text(format!("msg-{i}")));
    }
}

#[tokio::test]
async fn frames_sent_right_behind_the_upgrade_request_are_relayed() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "").await;
    let mut s = tokio::net::TcpStream::connect(node.public)
        .await
        .expect("connect");
    // The request head and a first message in one write: the message
    // arrives before the client has seen its 101.
    let mut bytes = upgrade_request("/?session=eager", "x").into_bytes();
    bytes.extend(frame::encode_frame(frame::OP_TEXT, b"early", true));
    s.write_all(&bytes).await.expect("write");
    let (head, rest) = raw_read_head(&mut s, Duration::from_secs(5)).await;
    assert!(
        head.starts_with("HTTP/1.1 101"),
        "expected a 101, got {head}"
    );
    let echoed = raw_read_payload(&mut s, rest, Duration::from_secs(5)).await;
    assert_eq!(echoed, b"early");
    assert_eq!(up.messages_for("eager"), vec![Message::text("early")]);
}

#[tokio::test]
async fn a_refused_upgrade_is_answered_and_the_connection_closed() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "").await;
    let mut s = tokio::net::TcpStream::connect(node.public)
        .await
        .expect("connect");
    s.write_all(b"GET /?session=bad HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n\r\n")
        .await
        .expect("write");
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all))
        .await
        .expect("closed within 5 s")
        .expect("read");
    let text = String::from_utf8_lossy(&all).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 400"), "got {text}");
    assert!(text.contains("connection: close"), "got {text}");
    assert!(
        text.contains("sec-websocket-key"),
        "the reason names the key: {text}"
    );
}

#[tokio::test]
async fn an_upgrade_after_a_plain_request_on_the_same_connection_works() {
    // The first request goes to hyper (plain HTTP, kept alive); the upgrade
    // that follows on the same connection is answered through hyper too.
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "").await;
    let mut s = tokio::net::TcpStream::connect(node.public)
        .await
        .expect("connect");
    s.write_all(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let (head, mut body) = raw_read_head(&mut s, Duration::from_secs(5)).await;
    assert!(head.starts_with("HTTP/1.1 200"), "got {head}");
    // The whole body ("live\n") before the next request.
    while body.len() < 5 {
        let mut chunk = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("the /live body in time")
            .expect("read");
        assert!(n > 0, "closed after /live");
        body.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(body, b"live\n");
    s.write_all(upgrade_request("/?session=kept", "x").as_bytes())
        .await
        .expect("write");
    let (head, rest) = raw_read_head(&mut s, Duration::from_secs(5)).await;
    assert!(
        head.starts_with("HTTP/1.1 101"),
        "expected a 101, got {head}"
    );
    raw_send_text(&mut s, "after live").await;
    let echoed = raw_read_payload(&mut s, rest, Duration::from_secs(5)).await;
    assert_eq!(echoed, b"after live");
}

#[tokio::test]
async fn utf8_header_values_reach_the_upstream_as_sent() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "").await;
    let mut s = tokio::net::TcpStream::connect(node.public)
        .await
        .expect("connect");
    let request = upgrade_request("/?session=utf8", "a")
        .replace("\r\n\r\n", "\r\nCookie: a=1; name=Jos\u{e9}\r\n\r\n");
    s.write_all(request.as_bytes()).await.expect("write");
    let (head, _) = raw_read_head(&mut s, Duration::from_secs(5)).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let up = &up;
    eventually(
        Duration::from_secs(5),
        "the upstream's handshake logged",
        || async move {
            up.handshakes()
                .iter()
                .any(|h| h.header("x-session-id") == Some("utf8"))
        },
    )
    .await;
    let hs = up.handshakes();
    let hs = hs
        .iter()
        .find(|h| h.header("x-session-id") == Some("utf8"))
        .expect("upstream handshake");
    assert_eq!(hs.header("cookie"), Some("a=1; name=Jos\u{e9}"));
}
