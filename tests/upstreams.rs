//! The upstream pool: balancing policies, active health probes, the
//! circuit breaker, 502 when nothing can take a session, and preference
//! for the session's previous upstream.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Which upstream each of `n` new sessions landed on.
async fn spread(
    node: &TestNode,
    ups: &[TestUpstream],
    prefix: &str,
    n: usize,
) -> (Vec<usize>, Vec<Ws>) {
    let mut clients = Vec::new();
    for i in 0..n {
        let mut ws = connect(&node.url(&format!("/?session={prefix}{i}"))).await;
        echo(&mut ws, "x").await;
        clients.push(ws);
    }
    let counts = ups
        .iter()
        .map(|u| {
            u.handshakes()
                .iter()
                .filter(|h| {
                    h.header("x-session-id")
                        .is_some_and(|s| s.starts_with(prefix))
                })
                .count()
        })
        .collect();
    (counts, clients)
}

async fn three() -> Vec<TestUpstream> {
    vec![
        TestUpstream::start().await,
        TestUpstream::start().await,
        TestUpstream::start().await,
    ]
}

#[tokio::test]
async fn round_robin_spreads_evenly() {
    let ups = three().await;
    let urls: Vec<String> = ups.iter().map(TestUpstream::url).collect();
    let node = TestNode::start(&urls, "[upstream]\nbalance = \"round_robin\"\n").await;
    let (counts, _clients) = spread(&node, &ups, "rr", 9).await;
    assert_eq!(counts, vec![3, 3, 3]);
}

#[tokio::test]
async fn round_robin_shares_a_down_upstreams_turns_evenly() {
    let ups = vec![
        TestUpstream::start().await,
        TestUpstream::start().await,
        TestUpstream::start().await,
    ];
    let down_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let down = TestUpstream::serve(down_listener);
    let down_url = down.url();
    // The down upstream sits second in the list.
    let urls = vec![ups[0].url(), down_url.clone(), ups[1].url(), ups[2].url()];
    let node = TestNode::start(&urls, "[upstream]\nbalance = \"round_robin\"\n").await;
    drop(down); // the port now refuses connections
    eventually(Duration::from_secs(5), "probe marks it down", || async {
        health(node.public).await.1["upstreams"][1]["healthy"] == false
    })
    .await;
    let (counts, _clients) = spread(&node, &ups, "rd", 12).await;
    assert_eq!(counts, vec![4, 4, 4], "{down_url} down");
}

#[tokio::test]
async fn a_creation_whose_client_left_mid_way_still_ends_cleanly() {
    // An upstream that accepts and never answers: creation takes the whole
    // connect_timeout.
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let silent_url = format!("ws://{}", silent.local_addr().expect("addr"));
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let node = TestNode::start(&[silent_url], "[upstream]\nconnect_timeout = \"1s\"\n").await;
    // Through hyper's path (a request before the upgrade on one
    // connection), where a client that leaves drops the request.
    let mut s = tokio::net::TcpStream::connect(node.public)
        .await
        .expect("connect");
    s.write_all(b"GET /live HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let (head, body) = raw_read_head(&mut s, Duration::from_secs(5)).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The rest of the body, "live\n".
    let mut rest = vec![0u8; 5usize.saturating_sub(body.len())];
    s.read_exact(&mut rest).await.expect("body");
    s.write_all(upgrade_request("/?session=left", "a").as_bytes())
        .await
        .expect("write");
    let broker = node.broker().clone();
    eventually(
        Duration::from_secs(5),
        "the session is being created",
        || async { broker.creating.contains_key("left") },
    )
    .await;
    drop(s);
    // The creation runs to its end (the dial times out) and releases the
    // claim: nothing is left registered for the id.
    eventually(Duration::from_secs(5), "the creation is over", || async {
        broker.creating.is_empty()
    })
    .await;
    let wsbroker::control::registry::Registry::Memory(claims) = &broker.registry else {
        panic!("memory registry");
    };
    eventually(
        Duration::from_secs(5),
        "no claim left for the id",
        || async { claims.is_empty() },
    )
    .await;
    assert!(broker.sessions.is_empty());
    holder.abort();
}

#[tokio::test]
async fn least_conn_fills_the_emptiest_upstream() {
    let ups = three().await;
    let urls: Vec<String> = ups.iter().map(TestUpstream::url).collect();
    let node = TestNode::start(&urls, "[upstream]\nbalance = \"least_conn\"\n").await;
    let (counts, mut clients) = spread(&node, &ups, "lc", 6).await;
    assert_eq!(counts, vec![2, 2, 2]);
    // End both sessions on the first upstream: the next two go there.
    let on_first: Vec<String> = ups[0]
        .handshakes()
        .iter()
        .filter_map(|h| h.header("x-session-id").map(str::to_string))
        .collect();
    for id in &on_first {
        let i: usize = id.trim_start_matches("lc").parse().expect("index");
        clients[i].close(None).await.expect("close");
        let _ = expect_close(&mut clients[i], Duration::from_secs(5)).await;
    }
    eventually(
        Duration::from_secs(5),
        "sessions on the first upstream ended",
        || async { node.broker().upstreams.status()[0].sessions == 0 },
    )
    .await;
    let (counts, _more) = spread(&node, &ups, "lz", 2).await;
    assert_eq!(counts, vec![2, 0, 0]);
}

#[tokio::test]
async fn hash_keeps_a_session_id_on_one_upstream() {
    let ups = three().await;
    let urls: Vec<String> = ups.iter().map(TestUpstream::url).collect();
    let node = TestNode::start(&urls, "[upstream]\nbalance = \"hash\"\n").await;
    let mut first_home: HashMap<String, usize> = HashMap::new();
    for round in 0..2 {
        for i in 0..6 {
            let id = format!("h{i}");
            let mut ws = connect(&node.url(&format!("/?session={id}"))).await;
            echo(&mut ws, "x").await;
            ws.close(None).await.expect("close");
            let _ = expect_close(&mut ws, Duration::from_secs(5)).await;
            let home = ups
                .iter()
                .position(|u| u.connections_for(&id) == round + 1)
                .expect("landed on one upstream");
            assert_eq!(
                *first_home.entry(id.clone()).or_insert(home),
                home,
                "{id} moved"
            );
        }
    }
    let used: std::collections::HashSet<_> = first_home.values().collect();
    assert!(
        used.len() >= 2,
        "hash spreads ids over upstreams: {first_home:?}"
    );
}

#[tokio::test]
async fn health_probes_take_a_dead_upstream_out_and_back() {
    let good = TestUpstream::start().await;
    let flaky_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let flaky_addr = flaky_listener.local_addr().expect("addr");
    let flaky = TestUpstream::serve(flaky_listener);
    let node = TestNode::start(
        &[good.url(), flaky.url()],
        "[upstream]\nbalance = \"round_robin\"\n",
    )
    .await;
    let flaky_url = flaky.url();
    drop(flaky); // stops accepting: the port now refuses connections
    eventually(
        Duration::from_secs(5),
        "probe marks the upstream unhealthy",
        || async {
            let (_, h) = health(node.public).await;
            h["upstreams"][1]["healthy"] == false && h["upstreams"][1]["url"] == flaky_url.as_str()
        },
    )
    .await;
    for i in 0..4 {
        let mut ws = connect(&node.url(&format!("/?session=p{i}"))).await;
        echo(&mut ws, "x").await;
    }
    assert_eq!(
        good.handshakes().len(),
        4,
        "every new session went to the healthy upstream"
    );
    let revived = TestUpstream::serve(TcpListener::bind(flaky_addr).await.expect("rebind"));
    eventually(
        Duration::from_secs(5),
        "probe marks it healthy again",
        || async { health(node.public).await.1["upstreams"][1]["healthy"] == true },
    )
    .await;
    for i in 0..4 {
        let mut ws = connect(&node.url(&format!("/?session=q{i}"))).await;
        echo(&mut ws, "x").await;
    }
    assert!(
        !revived.handshakes().is_empty(),
        "the revived upstream takes sessions again"
    );
}

/// Accepts TCP and answers every upgrade with `reply` (the connection
/// then stays open until the node closes it).
async fn canned_upstream(reply: &'static [u8]) -> (String, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("ws://{}", l.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(reply).await;
                let _ = s.read(&mut buf).await;
            });
        }
    });
    (url, task)
}

/// Answers every upgrade with 500: alive for the probe, failing for
/// sessions.
async fn failing_upstream() -> (String, tokio::task::JoinHandle<()>) {
    canned_upstream(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n").await
}

#[tokio::test]
async fn breaker_opens_after_consecutive_failures_then_502() {
    let (url, task) = failing_upstream().await;
    let node = TestNode::start(
        &[url],
        "[upstream]\nbreaker_failures = 3\nbreaker_cooldown = \"300ms\"\n",
    )
    .await;
    for i in 0..3 {
        assert_eq!(
            upgrade_status(&node.url(&format!("/?session=b{i}")), &[]).await,
            502
        );
    }
    let (_, h) = health(node.public).await;
    assert_eq!(h["upstreams"][0]["circuit"], "open");
    assert_eq!(h["status"], "degraded", "no upstream can take sessions");
    assert_eq!(upgrade_status(&node.url("/?session=b9"), &[]).await, 502);
    eventually(
        Duration::from_secs(5),
        "circuit half-opens after the cooldown",
        || async { health(node.public).await.1["upstreams"][0]["circuit"] == "half_open" },
    )
    .await;
    task.abort();
}

/// With `bad` first in round-robin order, every session still reaches
/// the working upstream.
async fn sessions_skip_to_the_working_upstream(bad: String) {
    let good = TestUpstream::start().await;
    let node = TestNode::start(
        &[bad, good.url()],
        "[upstream]\nbalance = \"round_robin\"\n",
    )
    .await;
    for i in 0..4 {
        let mut ws = connect(&node.url(&format!("/?session=f{i}"))).await;
        echo(&mut ws, "x").await;
    }
    assert_eq!(good.handshakes().len(), 4);
}

#[tokio::test]
async fn a_failing_upstream_is_skipped_for_a_working_one() {
    let (bad, task) = failing_upstream().await;
    sessions_skip_to_the_working_upstream(bad).await;
    task.abort();
}

/// An upstream address where nothing listens: the connect is refused and
/// the session goes to the next upstream.
#[tokio::test]
async fn a_refused_upstream_is_skipped_for_a_working_one() {
    sessions_skip_to_the_working_upstream(format!("ws://127.0.0.1:{}", free_port())).await;
}

/// An upstream named by host name (resolved when connecting) works like
/// one given by address.
#[tokio::test]
async fn an_upstream_named_by_host_name_is_reached() {
    let up = TestUpstream::start().await;
    let named = format!("ws://localhost:{}", up.addr.port());
    let node = TestNode::start(&[named], "").await;
    let mut ws = connect(&node.url("/?session=named")).await;
    echo(&mut ws, "by name").await;
    assert_eq!(up.handshakes().len(), 1);
}

/// An upstream whose 101 carries the wrong `Sec-WebSocket-Accept` did not
/// do the WebSocket handshake: the client gets 502, not that 101.
#[tokio::test]
async fn an_upstream_with_a_wrong_accept_is_refused() {
    let (url, task) = canned_upstream(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n").await;
    let node = TestNode::start(&[url], "").await;
    assert_eq!(
        upgrade_status(&node.url("/?session=bad-accept"), &[]).await,
        502
    );
    task.abort();
}
