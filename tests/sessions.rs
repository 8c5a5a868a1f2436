//! Sessions: attach modes, resume after an abrupt drop, grace expiry,
//! buffer overflow, closes, idle timeout, upstream loss.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

async fn session_gone(node: &TestNode, id: &str) {
    eventually(
        Duration::from_secs(5),
        &format!("session {id} ended"),
        || async { node.broker().sessions.get(id).is_none() },
    )
    .await;
}

async fn upstream_closed_with(up: &TestUpstream, id: &str, code: u16) {
    eventually(
        Duration::from_secs(5),
        &format!("upstream closed with {code}"),
        || async { up.closes_for(id).first().map(|c| c.0) == Some(code) },
    )
    .await;
}

#[tokio::test]
async fn takeover_replaces_the_old_client_with_4001() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "").await;
    let mut first = connect(&node.url("/?session=t")).await;
    echo(&mut first, "one").await;
    let mut second = connect(&node.url("/?session=t")).await;
    let (code, reason) = expect_close(&mut first, Duration::from_secs(5)).await;
    assert_eq!((code, reason.as_str()), (4001, "session taken over"));
    echo(&mut second, "two").await;
    assert_eq!(
        up.connections_for("t"),
        1,
        "the upstream connection is kept"
    );
}

#[tokio::test]
async fn shared_clients_all_receive_and_all_send() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "[session]\nattach = \"shared\"\n").await;
    let mut a = connect(&node.url("/?session=sh")).await;
    echo(&mut a, "ready").await;
    let mut b = connect(&node.url("/?session=sh")).await;
    eventually(Duration::from_secs(5), "two clients attached", || async {
        node.broker().sessions.get("sh").map(|s| s.clients()) == Some(2)
    })
    .await;
    a.send(Message::text("later 0 3")).await.expect("send");
    for i in 0..3 {
        let want = Message::text(format!("msg-{i}"));
        assert_eq!(next_data(&mut a).await, want);
        assert_eq!(next_data(&mut b).await, want);
    }
    b.send(Message::text("from-b")).await.expect("send");
    assert_eq!(next_data(&mut a).await, Message::text("from-b"));
    assert_eq!(next_data(&mut b).await, Message::text("from-b"));
    assert_eq!(up.connections_for("sh"), 1);
    // One shared client leaving does not end the session for the other.
    a.close(None).await.expect("close");
    drop(a);
    echo(&mut b, "still here").await;
}

/// An upstream that takes `delay` before answering each WebSocket
/// handshake (then echoes nothing, holding the connection open); counts
/// the handshakes it completes (health probes only connect).
async fn slow_upstream(delay: Duration) -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("ws://{}", l.local_addr().expect("addr"));
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if let Ok(mut ws) = tokio_tungstenite::accept_async(s).await {
                    seen.fetch_add(1, Ordering::SeqCst);
                    while let Some(Ok(_)) = ws.next().await {}
                }
            });
        }
    });
    (url, count, task)
}

/// Upgrades for one new session id arriving together: one of them
/// creates the session, the others wait for it (woken as soon as it is
/// there, not at their timeout) and join it; the upstream sees one
/// connection.
#[tokio::test]
async fn simultaneous_upgrades_for_a_new_id_create_one_session() {
    // The upstream's slow handshake keeps the first creation open while
    // the other upgrades arrive.
    let delay = Duration::from_millis(300);
    let (up, handshakes, task) = slow_upstream(delay).await;
    let node = TestNode::start(
        &[up],
        "[session]\nattach = \"shared\"\n[upstream]\nconnect_timeout = \"4s\"\n",
    )
    .await;
    let url = node.url("/?session=together");
    let started = tokio::time::Instant::now();
    let clients = futures_util::future::join_all((0..8).map(|_| connect(&url))).await;
    let took = started.elapsed();
    assert_eq!(clients.len(), 8);
    assert!(took >= delay, "the upgrades did not wait for the upstream");
    // A waiter not woken would sit out its timeout (connect_timeout + 1 s).
    assert!(took < Duration::from_secs(3), "upgrades took {took:?}");
    assert_eq!(handshakes.load(Ordering::SeqCst), 1);
    assert_eq!(
        node.broker().sessions.get("together").map(|s| s.clients()),
        Some(8)
    );
    task.abort();
}

#[tokio::test]
async fn exclusive_refuses_a_second_client_with_409() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "[session]\nattach = \"exclusive\"\n").await;
    let mut a = connect(&node.url("/?session=ex")).await;
    echo(&mut a, "x").await;
    assert_eq!(upgrade_status(&node.url("/?session=ex"), &[]).await, 409);
    echo(&mut a, "still served").await;
}

#[tokio::test]
async fn resume_after_an_abrupt_drop_replays_buffered_messages_in_order() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "[session]\nresume_grace = \"10s\"\n").await;
    let mut ws = connect(&node.url("/?session=r")).await;
    echo(&mut ws, "before").await;
    ws.send(Message::text("later 200 5")).await.expect("send");
    drop(ws); // TCP closed without a Close frame
    let session = node.broker().sessions.get("r").expect("session kept");
    eventually(Duration::from_secs(5), "five messages buffered", || async {
        session.buffered.load(std::sync::atomic::Ordering::Relaxed) == 5 * 7
    })
    .await;
    assert_eq!(session.info("x").state, "detached");
    let mut back = connect(&node.url("/?session=r")).await;
    for i in 0..5 {
        assert_eq!(
            next_data(&mut back).await,
            Message::text(format!("msg-{i}"))
        );
    }
    echo(&mut back, "after").await;
    assert_eq!(up.connections_for("r"), 1, "the same upstream connection");
}

#[tokio::test]
async fn grace_expiry_ends_the_session_with_1001_upstream() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "[session]\nresume_grace = \"300ms\"\n").await;
    let mut ws = connect(&node.url("/?session=g")).await;
    echo(&mut ws, "x").await;
    drop(ws);
    session_gone(&node, "g").await;
    upstream_closed_with(&up, "g", 1001).await;
}

#[tokio::test]
async fn buffer_overflow_ends_the_session_with_1001_upstream() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(
        &[up.url()],
        "[session]\nresume_grace = \"30s\"\nresume_buffer = \"1KiB\"\n",
    )
    .await;
    let mut ws = connect(&node.url("/?session=o")).await;
    echo(&mut ws, "x").await;
    ws.send(Message::text("later 100 400")).await.expect("send");
    drop(ws);
    session_gone(&node, "o").await;
    upstream_closed_with(&up, "o", 1001).await;
}

#[tokio::test]
async fn a_client_close_ends_the_session_at_once() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "[session]\nresume_grace = \"30s\"\n").await;
    let mut ws = connect(&node.url("/?session=cc")).await;
    echo(&mut ws, "x").await;
    ws.close(None).await.expect("close");
    let _ = expect_close(&mut ws, Duration::from_secs(5)).await;
    session_gone(&node, "cc").await;
    assert_eq!(
        up.closes_for("cc").first().map(|c| c.0),
        Some(1005),
        "a Close without a code passes through as such"
    );
    // A new connection with the same id is a new session.
    let mut again = connect(&node.url("/?session=cc")).await;
    echo(&mut again, "y").await;
    assert_eq!(up.connections_for("cc"), 2);
}

#[tokio::test]
async fn idle_sessions_are_closed_with_1001_both_ways() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "[session]\nidle_timeout = \"400ms\"\n").await;
    let mut ws = connect(&node.url("/?session=idle")).await;
    echo(&mut ws, "x").await;
    let (code, _) = expect_close(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(code, 1001);
    upstream_closed_with(&up, "idle", 1001).await;
}

#[tokio::test]
async fn losing_the_upstream_without_a_close_gives_clients_1014() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "").await;
    // A raw client: some client libraries still refuse code 1014.
    let (mut s, pending) = raw_upgrade(node.public, "/?session=lost").await;
    raw_send_text(&mut s, "drop").await;
    let (code, reason) = raw_read_close(&mut s, pending, Duration::from_secs(5)).await;
    assert_eq!((code, reason.as_str()), (1014, "upstream connection lost"));
    session_gone(&node, "lost").await;
}

#[tokio::test]
async fn a_client_that_vanishes_before_its_101_leaves_no_session_behind() {
    use tokio::io::AsyncWriteExt;
    let up = TestUpstream::start().await;
    let node = TestNode::start(
        &[up.url()],
        "[session]\nresume_grace = \"300ms\"\n[limits]\nhandshake_timeout = \"500ms\"\n",
    )
    .await;
    let addr = node.public;
    // The request, then a reset at once: the session is created (upstream
    // opened) while its client is already gone.
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = upgrade_request("/?session=vanished", &addr.to_string());
    s.write_all(req.as_bytes()).await.expect("write");
    // A zero linger resets the connection on drop at once (nothing to
    // block on, which is what the deprecation warns about).
    #[allow(deprecated)]
    s.set_linger(Some(Duration::ZERO)).expect("linger");
    drop(s);
    eventually(
        Duration::from_secs(5),
        "the upstream was opened for the session",
        || async { up.connections_for("vanished") == 1 },
    )
    .await;
    // No client ever attaches: the session waits out its first-attach
    // window (handshake timeout + resume grace), then ends both ways.
    session_gone(&node, "vanished").await;
    upstream_closed_with(&up, "vanished", 1001).await;
    eventually(
        Duration::from_secs(5),
        "no upstream connection left open",
        || async { up.open_for("vanished") == 0 },
    )
    .await;
}

#[tokio::test]
async fn a_client_dropping_inside_a_fragmented_message_leaves_the_upstream_none_of_it() {
    use tokio::io::AsyncWriteExt;
    use wsbroker::proxy::frame::{encode_frame, OP_TEXT};
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "[session]\nresume_grace = \"30s\"\n").await;
    let (mut s, _) = raw_upgrade(node.public, "/?session=frag").await;
    // The first fragment of a two-fragment message, then the end.
    let mut first = encode_frame(OP_TEXT, b"first half", true);
    first[0] &= 0x7f;
    s.write_all(&first).await.expect("write");
    s.flush().await.expect("flush");
    drop(s);
    upstream_closed_with(&up, "frag", 1001).await;
    assert_eq!(
        node.broker().metrics.bytes.upstream.get(),
        0,
        "not one byte of the message went upstream"
    );
    let log = up.log.lock().expect("log");
    assert!(
        log.messages.iter().all(|(sid, _)| sid != "frag"),
        "no message upstream"
    );
    assert!(!log.aborted.contains(&"frag".to_string()), "a clean Close");
}

#[tokio::test]
async fn a_client_dropping_inside_a_frame_ends_the_session_with_1001_and_no_torn_bytes() {
    use tokio::io::AsyncWriteExt;
    use wsbroker::proxy::frame::{encode_frame, OP_TEXT};
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "[session]\nresume_grace = \"30s\"\n").await;
    let (mut s, _) = raw_upgrade(node.public, "/?session=torn").await;
    raw_send_text(&mut s, "whole").await;
    let received = || {
        up.log
            .lock()
            .expect("log")
            .messages
            .iter()
            .filter(|(sid, _)| sid == "torn")
            .map(|(_, m)| m.clone())
            .collect::<Vec<_>>()
    };
    eventually(
        Duration::from_secs(5),
        "the first message arrived",
        || async { received().len() == 1 },
    )
    .await;
    // Half of a second message's only frame, then the connection ends.
    let frame = encode_frame(OP_TEXT, &[b'x'; 100], true);
    s.write_all(&frame[..50]).await.expect("write");
    s.flush().await.expect("flush");
    drop(s);
    // Not resumable (the client was inside a message): the upstream gets a
    // proper Close 1001, and not one byte of the torn frame before it.
    upstream_closed_with(&up, "torn", 1001).await;
    assert_eq!(received(), vec![Message::text("whole")]);
    assert!(!up
        .log
        .lock()
        .expect("log")
        .aborted
        .contains(&"torn".to_string()));
}

#[tokio::test]
async fn admin_sends_to_a_detached_session_count_against_its_resume_buffer() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(
        &[up.url()],
        "[session]\nresume_grace = \"30s\"\nresume_buffer = \"1KiB\"\n",
    )
    .await;
    let mut ws = connect(&node.url("/?session=sent")).await;
    echo(&mut ws, "x").await;
    drop(ws);
    eventually(Duration::from_secs(5), "detached", || async {
        node.broker()
            .sessions
            .get("sent")
            .is_some_and(|s| s.clients() == 0)
    })
    .await;
    let body = vec![b'a'; 600];
    let auth = ("Authorization", "Bearer t0ken");
    for _ in 0..2 {
        let r = http(
            node.admin,
            "POST",
            "/admin/sessions/sent/send",
            &[auth],
            &body,
        )
        .await;
        assert!(matches!(r.map(|r| r.0), Some(202) | Some(404)));
    }
    // Two 600-byte messages exceed the 1 KiB buffer: the session ends.
    session_gone(&node, "sent").await;
    upstream_closed_with(&up, "sent", 1001).await;
}

#[tokio::test]
async fn a_reconnect_right_after_a_client_close_starts_a_new_session() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "").await;
    let mut ws = connect(&node.url("/?session=again")).await;
    echo(&mut ws, "x").await;
    // The upstream stops reading: the old session's closing handshake
    // waits for it.
    ws.send(Message::text("stall")).await.expect("send");
    ws.close(None).await.expect("close");
    // Ended by the Close at once, though its handshake is still under way.
    session_gone(&node, "again").await;
    let mut next = connect(&node.url("/?session=again")).await;
    echo(&mut next, "new").await;
    let epochs = up.epochs_for("again");
    assert_eq!(
        epochs,
        vec!["1", "1"],
        "a new session, not a re-established one"
    );
}

#[tokio::test]
async fn a_session_ended_by_the_operator_frees_its_id_before_its_upstream_has_closed() {
    let up = TestUpstream::start().await;
    let node = TestNode::start(&[up.url()], "").await;
    let mut ws = connect(&node.url("/?session=del")).await;
    echo(&mut ws, "x").await;
    // The upstream stops reading: it will not answer the Close.
    ws.send(Message::text("stall")).await.expect("send");
    let auth = ("Authorization", "Bearer t0ken");
    let r = http(node.admin, "DELETE", "/admin/sessions/del", &[auth], b"").await;
    assert_eq!(r.map(|r| r.0), Some(200));
    session_gone(&node, "del").await;
    let mut next = connect(&node.url("/?session=del")).await;
    echo(&mut next, "new").await;
    let epochs = up.epochs_for("del");
    assert_eq!(
        epochs,
        vec!["1", "1"],
        "a new session, not a re-established one"
    );
}
