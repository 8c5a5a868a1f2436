//! Cluster mode with real valkey-server and real wsbroker processes:
//! membership, forwarding, hops, takeover, fencing, drain re-homing,
//! key collection, registry outage.

mod common;

use std::time::Duration;

use common::valkey::*;
use common::*;
use futures_util::SinkExt;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

fn url(p: &BrokerProcess, sid: &str) -> String {
    format!("ws://{}/?session={sid}", p.public)
}

/// The value of the first metrics line starting with `line_start`.
async fn metric_line(p: &BrokerProcess, line_start: &str) -> Option<f64> {
    let (_, _, body) = http(p.admin, "GET", "/metrics", &[], b"")
        .await
        .expect("metrics");
    String::from_utf8_lossy(&body)
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// SIGSTOPs the registry and waits until `node` reports it disconnected.
async fn pause_registry(valkey: &Valkey, node: &BrokerProcess) {
    valkey.signal("STOP");
    let public = node.public;
    eventually(
        Duration::from_secs(5),
        "/health says disconnected",
        || async move { health(public).await.1["registry"]["status"] == "disconnected" },
    )
    .await;
}

async fn metric(p: &BrokerProcess, name: &str) -> f64 {
    metric_line(p, name)
        .await
        .unwrap_or_else(|| panic!("{name} missing"))
}

#[tokio::test]
async fn membership_registers_heartbeats_and_deregisters_on_drain() {
    let valkey = Valkey::start().await;
    let up = TestUpstream::start().await;
    let nodes = start_cluster(3, &[up.url()], &valkey, "").await;
    let mut ws = connect(&url(&nodes[0], "m1")).await;
    echo(&mut ws, "x").await;
    for p in &nodes {
        let (status, h) = health(p.public).await;
        assert_eq!(status, 200);
        assert_eq!(h["registry"]["kind"], "valkey");
        assert_eq!(h["registry"]["status"], "connected");
        assert_eq!(h["registry"]["primary"], valkey.addr().to_string());
        assert_eq!(h["cluster"]["healthy_instances"], 3);
    }
    let public = nodes[1].public;
    eventually(
        Duration::from_secs(5),
        "total sessions counted cluster-wide",
        || async move {
            let h = health(public).await.1;
            h["cluster"]["total_sessions"] == 1 && h["cluster"]["local_sessions"] == 0
        },
    )
    .await;
    let (status, c) = admin_json(nodes[0].admin, "/admin/cluster").await;
    assert_eq!(status, 200);
    let instances = c["instances"].as_array().expect("instances");
    let mut ids: Vec<&str> = instances.iter().filter_map(|i| i["id"].as_str()).collect();
    ids.sort();
    assert_eq!(ids, vec!["n1", "n2", "n3"]);
    for i in instances {
        assert!(
            i["heartbeat_age_ms"].as_u64().expect("age") < STALE_TTL_MS,
            "{i}"
        );
        assert_eq!(i["healthy"], true);
        assert!(i["advertise"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")));
    }
    let mut nodes = nodes;
    let mut third = nodes.pop().expect("n3");
    third.signal("TERM");
    third.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(
        valkey.get("wsb:node:n3").await,
        None,
        "deregistered on drain, not left to expire"
    );
    let public = nodes[0].public;
    eventually(
        Duration::from_secs(2),
        "the others see two nodes",
        || async move { health(public).await.1["cluster"]["registered_instances"] == 2 },
    )
    .await;
}

#[tokio::test]
async fn an_upgrade_on_a_non_owner_is_forwarded_to_the_owner() {
    let valkey = Valkey::start().await;
    let up = TestUpstream::start().await;
    let nodes = start_cluster(3, &[up.url()], &valkey, "[session]\nattach = \"shared\"\n").await;
    let mut a = connect(&url(&nodes[0], "fw")).await;
    echo(&mut a, "on owner").await;
    let mut b = connect(&url(&nodes[1], "fw")).await;
    echo(&mut b, "via n2").await;
    let mut c = connect(&url(&nodes[2], "fw")).await;
    echo(&mut c, "via n3").await;
    assert_eq!(
        up.connections_for("fw"),
        1,
        "one upstream connection, on the owner"
    );
    assert_eq!(up.max_open_for("fw"), 1);
    assert_eq!(metric(&nodes[1], "wsbroker_forwarded_total").await, 1.0);
    assert_eq!(metric(&nodes[0], "wsbroker_forwarded_total").await, 0.0);
    let (_, s) = admin_json(nodes[0].admin, "/admin/sessions/fw").await;
    assert_eq!(
        (s["owner"].as_str(), s["clients"].as_u64()),
        (Some("n1"), Some(3))
    );
    // The forwarded client's address reaches the upstream, not the hop's.
    let hs = up.handshakes();
    assert_eq!(hs[0].header("x-forwarded-for"), Some("127.0.0.1"));
    // Only the owner lists the session: the non-owners' claims took back
    // the entry they add before they know the session exists.
    assert_eq!(
        valkey.keys("wsb:node-sessions:*").await,
        vec!["wsb:node-sessions:n1".to_string()]
    );
    assert_eq!(valkey.members("wsb:node-sessions:n1").await, vec!["fw"]);
}

/// A labelled series' value, 0 when the series was never touched.
async fn series(p: &BrokerProcess, line_start: &str) -> f64 {
    metric_line(p, line_start).await.unwrap_or(0.0)
}

#[tokio::test]
async fn a_forward_the_owner_refuses_is_passed_back_and_counted_once() {
    let valkey = Valkey::start().await;
    let up = TestUpstream::start().await;
    let nodes = start_cluster(
        2,
        &[up.url()],
        &valkey,
        "[session]\nattach = \"exclusive\"\n",
    )
    .await;
    let mut first = connect(&url(&nodes[0], "ex")).await;
    echo(&mut first, "held").await;
    assert_eq!(upgrade_status(&url(&nodes[1], "ex"), &[]).await, 409);
    let via = &nodes[1];
    assert_eq!(metric(via, "wsbroker_forwarded_total").await, 0.0);
    assert_eq!(
        series(via, "wsbroker_upgrades_total{result=\"forwarded\"}").await,
        0.0
    );
    assert_eq!(
        series(via, "wsbroker_upgrades_total{result=\"rejected\"}").await,
        1.0
    );
    // The one that gets through is counted as forwarded.
    drop(first);
    // Until the owner has seen the drop, the newcomer still gets 409.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut again = loop {
        if let Ok((ws, _)) = connect_with(&url(&nodes[1], "ex"), &[]).await {
            break ws;
        }
        assert!(
            Instant::now() < deadline,
            "the session never took a new client"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    echo(&mut again, "via n2").await;
    assert_eq!(metric(via, "wsbroker_forwarded_total").await, 1.0);
    assert_eq!(
        series(via, "wsbroker_upgrades_total{result=\"forwarded\"}").await,
        1.0
    );
}

#[tokio::test]
async fn forged_and_replayed_hops_get_403() {
    let valkey = Valkey::start().await;
    let up = TestUpstream::start().await;
    let nodes = start_cluster(1, &[up.url()], &valkey, "").await;
    let forged = wsbroker::proxy::hop::HopKeys::new("not-the-secret").sign(
        "n9",
        "10.0.0.1",
        false,
        "h1",
        "/?session=h1",
    );
    assert_eq!(
        upgrade_status(&url(&nodes[0], "h1"), &[("X-Wsbroker-Hop", &forged)]).await,
        403
    );
    let valid = wsbroker::proxy::hop::HopKeys::new("test-secret").sign(
        "n9",
        "10.0.0.1",
        false,
        "h2",
        "/?session=h2",
    );
    let (mut ws, _) = connect_with(&url(&nodes[0], "h2"), &[("X-Wsbroker-Hop", &valid)])
        .await
        .expect("a valid hop is served");
    echo(&mut ws, "x").await;
    assert_eq!(
        up.handshakes()[0].header("x-forwarded-for"),
        Some("10.0.0.1"),
        "the hop names the client"
    );
    assert_eq!(
        upgrade_status(&url(&nodes[0], "h2"), &[("X-Wsbroker-Hop", &valid)]).await,
        403,
        "replay"
    );
    // A hop bound to another session does not verify for this one.
    let other = wsbroker::proxy::hop::HopKeys::new("test-secret").sign(
        "n9",
        "10.0.0.1",
        false,
        "h3",
        "/?session=h3",
    );
    assert_eq!(
        upgrade_status(&url(&nodes[0], "h4"), &[("X-Wsbroker-Hop", &other)]).await,
        403
    );
}

#[tokio::test]
async fn a_session_released_by_a_dead_nodes_collection_counts_as_a_migration() {
    let valkey = Valkey::start().await;
    let up = TestUpstream::start().await;
    let mut nodes = start_cluster(2, &[up.url()], &valkey, "").await;
    let mut ws = connect(&url(&nodes[0], "rl")).await;
    echo(&mut ws, "x").await;
    // SIGKILL; n2 then collects the dead node's sessions: released, no owner.
    let _ = nodes[0].child.kill();
    eventually(
        Duration::from_secs(5),
        "the dead node's session is released",
        || async {
            valkey
                .get("wsb:session:rl")
                .await
                .is_some_and(|v| v.starts_with('|'))
        },
    )
    .await;
    let (mut back, _) = connect_with(&url(&nodes[1], "rl"), &[])
        .await
        .expect("taken up by n2");
    echo(&mut back, "on n2").await;
    assert_eq!(metric(&nodes[1], "wsbroker_migrations_total").await, 1.0);
}

#[tokio::test]
async fn a_dead_owners_session_is_taken_over_on_its_previous_upstream() {
    let valkey = Valkey::start().await;
    let ups = [TestUpstream::start().await, TestUpstream::start().await];
    let urls: Vec<String> = ups.iter().map(TestUpstream::url).collect();
    let mut nodes = start_cluster(2, &urls, &valkey, "").await;
    let mut ws = connect(&url(&nodes[0], "tk")).await;
    echo(&mut ws, "x").await;
    let home = ups
        .iter()
        .position(|u| u.connections_for("tk") == 1)
        .expect("on one upstream");
    let killed_at = Instant::now();
    let _ = nodes[0].child.kill(); // SIGKILL
    let target = url(&nodes[1], "tk");
    eventually(
        Duration::from_secs(5),
        "the session is taken over through n2",
        || {
            let target = target.clone();
            async move { upgrade_status(&target, &[]).await == 101 }
        },
    )
    .await;
    let took = killed_at.elapsed();
    let hs = ups[home].handshakes();
    assert_eq!(hs.len(), 2, "back on its previous upstream");
    assert_eq!(hs[1].header("x-session-epoch"), Some("2"));
    assert!(
        took < Duration::from_millis(STALE_TTL_MS * 4),
        "took {took:?}"
    );
    assert_eq!(metric(&nodes[1], "wsbroker_migrations_total").await, 1.0);
    assert!(ups.iter().all(|u| u.max_open_for("tk") <= 1));
}

#[tokio::test]
async fn an_unreachable_live_owner_gets_503_and_no_second_owner() {
    let valkey = Valkey::start().await;
    let up = TestUpstream::start().await;
    let nodes = start_cluster(2, &[up.url()], &valkey, "[node]\ndrain_timeout = \"1s\"\n").await;
    let mut ws = connect(&url(&nodes[0], "un")).await;
    echo(&mut ws, "x").await;
    nodes[0].freeze().await;
    // Still registered for up to stale_ttl: n2 forwards, n1 does not answer.
    let status = upgrade_status(&url(&nodes[1], "un"), &[]).await;
    nodes[0].signal("CONT");
    assert_eq!(status, 503);
    assert_eq!(up.connections_for("un"), 1, "no second owner was created");
}

#[tokio::test]
async fn a_frozen_owner_closes_its_copy_with_4003_after_takeover() {
    let valkey = Valkey::start().await;
    let up = TestUpstream::start().await;
    let nodes = start_cluster(2, &[up.url()], &valkey, "").await;
    let mut old = connect(&url(&nodes[0], "fz")).await;
    echo(&mut old, "x").await;
    nodes[0].freeze().await;
    // Past stale_ttl the session is n2's to take.
    let target = url(&nodes[1], "fz");
    let mut fresh = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    while fresh.is_none() {
        if let Ok((ws, _)) = connect_with(&target, &[]).await {
            fresh = Some(ws);
        } else {
            assert!(Instant::now() < deadline, "n2 never took the session over");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut fresh = fresh.expect("connected");
    echo(&mut fresh, "on n2").await;
    let resumed = Instant::now();
    nodes[0].signal("CONT");
    let (code, reason) = expect_close(&mut old, Duration::from_secs(5)).await;
    let took = resumed.elapsed();
    assert_eq!((code, reason.as_str()), (4003, "session moved"));
    assert!(
        took < Duration::from_millis(HEARTBEAT_MS * 5),
        "closed {took:?} after SIGCONT"
    );
    eventually(
        Duration::from_secs(5),
        "the stale upstream connection closed with 4003",
        || async { up.closes_for("fz").iter().any(|c| c.0 == 4003) && up.open_for("fz") == 1 },
    )
    .await;
    let hs = up.handshakes();
    assert_eq!(
        hs.last().and_then(|h| h.header("x-session-epoch")),
        Some("2")
    );
    echo(&mut fresh, "still fine").await;
}

#[tokio::test]
async fn drain_rehomes_sessions_at_once() {
    let valkey = Valkey::start().await;
    let up = TestUpstream::start().await;
    let mut nodes =
        start_cluster(2, &[up.url()], &valkey, "[node]\ndrain_timeout = \"2s\"\n").await;
    let mut ws = connect(&url(&nodes[0], "dr")).await;
    echo(&mut ws, "x").await;
    nodes[0].signal("TERM");
    let (code, _) = expect_close(&mut ws, Duration::from_secs(3)).await;
    assert_eq!(code, 1012);
    let started = Instant::now();
    let (mut back, _) = connect_with(&url(&nodes[1], "dr"), &[])
        .await
        .expect("re-homed without waiting for stale_ttl");
    assert!(
        started.elapsed() < Duration::from_millis(STALE_TTL_MS),
        "re-homed in {:?}",
        started.elapsed()
    );
    echo(&mut back, "y").await;
    assert_eq!(
        up.handshakes()
            .last()
            .and_then(|h| h.header("x-session-epoch")),
        Some("2")
    );
    nodes[0].wait_exit(Duration::from_secs(5)).await;
    assert!(up.max_open_for("dr") <= 1);
}

#[tokio::test]
async fn a_draining_node_sends_its_tunnelled_clients_away_and_the_owner_keeps_the_session() {
    let valkey = Valkey::start().await;
    let up = TestUpstream::start().await;
    let mut nodes = start_cluster(
        2,
        &[up.url()],
        &valkey,
        "[node]\ndrain_timeout = \"2s\"\n[session]\nattach = \"shared\"\n",
    )
    .await;
    let mut on_owner = connect(&url(&nodes[0], "tn")).await;
    echo(&mut on_owner, "a").await;
    let mut tunnelled = connect(&url(&nodes[1], "tn")).await;
    echo(&mut tunnelled, "b").await;
    // Shared: the upstream's echo reached both clients.
    assert_eq!(next_data(&mut on_owner).await, Message::text("b"));
    nodes[1].signal("TERM");
    let (code, reason) = expect_close(&mut tunnelled, Duration::from_secs(3)).await;
    assert_eq!((code, reason.as_str()), (1012, "service restart"));
    // The non-owner exits once its tunnel is gone, well within its
    // drain_timeout; the owner's session and upstream connection were
    // never touched.
    let draining = Instant::now();
    nodes[1].wait_exit(Duration::from_secs(5)).await;
    assert!(
        draining.elapsed() < Duration::from_millis(1500),
        "drained in {:?}",
        draining.elapsed()
    );
    echo(&mut on_owner, "still here").await;
    assert_eq!(up.connections_for("tn"), 1);
    assert!(up.closes_for("tn").is_empty(), "the upstream saw no Close");
    let mut back = connect(&url(&nodes[0], "tn")).await;
    echo(&mut back, "back").await;
    assert_eq!(up.connections_for("tn"), 1);
}

#[tokio::test]
async fn session_keys_are_removed_and_a_dead_nodes_are_collected() {
    let valkey = Valkey::start().await;
    let up = TestUpstream::start().await;
    let mut nodes = start_cluster(2, &[up.url()], &valkey, "").await;
    let mut clients = Vec::new();
    for i in 0..5 {
        let mut ws = connect(&url(&nodes[0], &format!("k{i}"))).await;
        echo(&mut ws, "x").await;
        clients.push(ws);
    }
    let mut mine = connect(&url(&nodes[1], "k-n2")).await;
    echo(&mut mine, "x").await;
    assert_eq!(valkey.keys("wsb:session:*").await.len(), 6);
    // A session that ends removes its key.
    mine.close(None).await.expect("close");
    let _ = expect_close(&mut mine, Duration::from_secs(5)).await;
    eventually(
        Duration::from_secs(5),
        "ended session's key removed",
        || async { valkey.keys("wsb:session:*").await.len() == 5 },
    )
    .await;
    // A dead node's keys are collected by the survivor within 2 x stale_ttl.
    let _ = nodes[0].child.kill();
    let killed = Instant::now();
    eventually(
        Duration::from_secs(5),
        "dead node's session keys collected",
        || async { valkey.keys("wsb:session:*").await.is_empty() },
    )
    .await;
    assert!(
        killed.elapsed() < Duration::from_millis(2 * STALE_TTL_MS + 300),
        "collected after {:?}",
        killed.elapsed()
    );
    assert_eq!(
        valkey.keys("wsb:node:*").await,
        vec!["wsb:node:n2".to_string()]
    );
    assert!(valkey.keys("wsb:node-sessions:*").await.is_empty());
    let mut c = valkey.conn().await;
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg("wsb:nodes")
        .query_async(&mut c)
        .await
        .expect("SMEMBERS");
    assert_eq!(members, vec!["n2".to_string()]);
    drop(clients);
}

/// Redis 7 has no DELIFEQ: there a session's end goes through the
/// script, and must remove the same keys.
#[tokio::test]
async fn session_keys_are_removed_on_redis_7_too() {
    let redis = Valkey::start_any(&redis_binary(), &[]).await;
    let up = TestUpstream::start().await;
    let nodes = start_cluster(1, &[up.url()], &redis, "").await;
    let mut ws = connect(&url(&nodes[0], "r7")).await;
    echo(&mut ws, "x").await;
    assert_eq!(
        redis.keys("wsb:session:*").await,
        vec!["wsb:session:r7".to_string()]
    );
    assert_eq!(redis.members("wsb:node-sessions:n1").await, vec!["r7"]);
    ws.close(None).await.expect("close");
    let _ = expect_close(&mut ws, Duration::from_secs(5)).await;
    eventually(
        Duration::from_secs(5),
        "ended session's key and set entry removed",
        || async {
            redis.keys("wsb:session:*").await.is_empty()
                && redis.members("wsb:node-sessions:n1").await.is_empty()
        },
    )
    .await;
    // The same id again is a new session at epoch 1.
    let mut again = connect(&url(&nodes[0], "r7")).await;
    echo(&mut again, "y").await;
    let hs = up.handshakes();
    assert_eq!(hs.len(), 2);
    assert_eq!(hs[1].header("x-session-epoch"), Some("1"));
}

#[tokio::test]
async fn a_registry_outage_interrupts_no_live_session() {
    let mut valkey = Valkey::start().await;
    let up = TestUpstream::start().await;
    let nodes = start_cluster(2, &[up.url()], &valkey, "").await;
    let reject = start_node(
        "n3",
        &[up.url()],
        &valkey,
        "[cluster]\non_registry_down = \"reject\"\n",
    )
    .await;
    let mut ws = connect(&url(&nodes[0], "live")).await;
    echo(&mut ws, "before").await;
    // A detached (resumable) session: its client dropped without a Close.
    let mut gone = connect(&url(&nodes[0], "det")).await;
    echo(&mut gone, "x").await;
    drop(gone);
    let n1 = nodes[0].admin;
    eventually(Duration::from_secs(5), "session detached", || async move {
        admin_json(n1, "/admin/sessions/det").await.1["state"] == "detached"
    })
    .await;
    let port = valkey.port;
    valkey.kill();
    let lost_at = Instant::now();
    for i in 0..10 {
        echo(&mut ws, &format!("during {i}")).await;
    }
    let public = nodes[0].public;
    eventually(
        Duration::from_secs(2),
        "/health turns degraded",
        || async move {
            let (status, h) = health(public).await;
            status == 200 && h["status"] == "degraded" && h["registry"]["status"] == "disconnected"
        },
    )
    .await;
    // Unable to renew for stale_ttl, the node ends its detached sessions
    // (another node may take them over); attached ones keep flowing.
    eventually(
        Duration::from_secs(5),
        "the detached session ended",
        || async {
            up.closes_for("det").first().map(|c| (c.0, c.1.clone()))
                == Some((1001, "registry unreachable".to_string()))
        },
    )
    .await;
    assert!(
        lost_at.elapsed() >= Duration::from_millis(STALE_TTL_MS - HEARTBEAT_MS),
        "not before stale_ttl"
    );
    echo(&mut ws, "still flowing").await;
    // local (default): new sessions are served here.
    let mut local = connect(&url(&nodes[1], "during-outage")).await;
    echo(&mut local, "served locally").await;
    // reject: 503.
    assert_eq!(upgrade_status(&url(&reject, "rejected"), &[]).await, 503);
    // The registry returns (empty): sessions are re-asserted.
    let valkey = Valkey::start_on(port).await;
    eventually(
        Duration::from_secs(5),
        "sessions re-asserted after the outage",
        || async {
            valkey
                .get("wsb:session:live")
                .await
                .is_some_and(|v| v.starts_with("n1|1|"))
                && valkey
                    .get("wsb:session:during-outage")
                    .await
                    .is_some_and(|v| v.starts_with("n2|1|"))
        },
    )
    .await;
    echo(&mut ws, "after").await;
    ws.send(Message::text("z")).await.expect("send");
    assert_eq!(next_data(&mut ws).await, Message::text("z"));
}

#[tokio::test]
async fn admin_calls_reach_the_owner_from_any_node() {
    let valkey = Valkey::start().await;
    let up = TestUpstream::start().await;
    let nodes = start_cluster(3, &[up.url()], &valkey, "").await;
    let mut ws = connect(&url(&nodes[0], "ad")).await;
    echo(&mut ws, "x").await;
    let mut other = connect(&url(&nodes[1], "ad2")).await;
    echo(&mut other, "x").await;

    let (status, s) = admin_json(nodes[2].admin, "/admin/sessions/ad").await;
    assert_eq!(status, 200);
    assert_eq!(
        (
            s["owner"].as_str(),
            s["clients"].as_u64(),
            s["epoch"].as_u64()
        ),
        (Some("n1"), Some(1), Some(1))
    );

    let public = nodes[1].public;
    eventually(Duration::from_secs(5), "members known", || async move {
        health(public).await.1["cluster"]["registered_instances"] == 3
    })
    .await;
    let (_, all) = admin_json(nodes[1].admin, "/admin/sessions").await;
    let mut ids: Vec<&str> = all
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    ids.sort();
    assert_eq!(ids, vec!["ad", "ad2"], "the cluster-wide list");
    let (_, only) = admin_json(nodes[2].admin, "/admin/sessions?node=n1").await;
    assert_eq!(only.as_array().map(|a| a.len()), Some(1));
    assert_eq!(only[0]["id"], "ad");

    let auth = [
        ("Authorization", "Bearer t0ken"),
        ("Content-Type", "text/plain"),
    ];
    let mut delays = Vec::new();
    for i in 0..5 {
        let started = Instant::now();
        let body = format!("push {i}");
        let (status, _, _) = http(
            nodes[1].admin,
            "POST",
            "/admin/sessions/ad/send",
            &auth,
            body.as_bytes(),
        )
        .await
        .expect("reply");
        assert_eq!(status, 202);
        assert_eq!(next_data(&mut ws).await, Message::text(body));
        delays.push(started.elapsed());
    }
    delays.sort();
    assert!(
        delays[2] < Duration::from_millis(100),
        "median delivery {:?}",
        delays[2]
    );

    let (status, _, _) = http(
        nodes[2].admin,
        "POST",
        "/admin/sessions/nope/send",
        &auth,
        b"x",
    )
    .await
    .expect("reply");
    assert_eq!(status, 404);
    let (status, _, _) = http(nodes[0].public, "GET", "/_wsbroker/sessions/ad", &[], b"")
        .await
        .expect("reply");
    assert_eq!(
        status, 426,
        "without a hop the internal path is a plain request like any other"
    );
    let (status, _, _) = http(
        nodes[0].public,
        "GET",
        "/_wsbroker/sessions/ad",
        &[("X-Wsbroker-Hop", "n9 1 2 forged")],
        b"",
    )
    .await
    .expect("reply");
    assert_eq!(status, 403, "the internal endpoint needs a signed hop");

    let (status, _, body) = http(nodes[2].admin, "DELETE", "/admin/sessions/ad", &auth, b"")
        .await
        .expect("reply");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let (code, reason) = expect_close(&mut ws, Duration::from_secs(5)).await;
    assert_eq!((code, reason.as_str()), (4002, "ended by operator"));
    eventually(
        Duration::from_secs(5),
        "upstream closed with 1000",
        || async { up.closes_for("ad").first().map(|c| c.0) == Some(1000) },
    )
    .await;
}

#[tokio::test]
async fn heartbeat_work_does_not_grow_with_owned_sessions() {
    let valkey = Valkey::start().await;
    let up = TestUpstream::start().await;
    let nodes = start_cluster(1, &[up.url()], &valkey, "").await;
    let mut clients = Vec::new();
    for i in 0..10 {
        let mut ws = connect(&url(&nodes[0], &format!("few{i}"))).await;
        echo(&mut ws, "x").await;
        clients.push(ws);
    }
    let mut c = valkey.conn().await;
    // Commands the registry serves over a window, nothing else running.
    async fn commands_over(c: &mut redis::aio::MultiplexedConnection, window: Duration) -> u64 {
        let read = |info: String| -> u64 {
            info.lines()
                .find_map(|l| l.strip_prefix("total_commands_processed:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let before = read(
            redis::cmd("INFO")
                .arg("stats")
                .query_async(c)
                .await
                .expect("INFO"),
        );
        tokio::time::sleep(window).await;
        let after = read(
            redis::cmd("INFO")
                .arg("stats")
                .query_async(c)
                .await
                .expect("INFO"),
        );
        after - before - 1
    }
    let window = Duration::from_millis(HEARTBEAT_MS * 20);
    let with_10 = commands_over(&mut c, window).await;
    // Give n1 100,000 more sessions in the registry (as its claims would).
    for chunk in 0..100 {
        let mut pipe = redis::pipe();
        for i in 0..1000 {
            let sid = format!("many{}", chunk * 1000 + i);
            pipe.cmd("SET")
                .arg(format!("wsb:session:{sid}"))
                .arg(format!("n1|1|{}", up.url()))
                .ignore();
            pipe.cmd("SADD")
                .arg("wsb:node-sessions:n1")
                .arg(&sid)
                .ignore();
        }
        pipe.query_async::<()>(&mut c).await.expect("populate");
    }
    let with_100k = commands_over(&mut c, window).await;
    eprintln!(
        "registry commands per {window:?}: {with_10} with 10 sessions, {with_100k} with 100,010"
    );
    assert!(with_10 > 0);
    let (lo, hi) = (with_10.min(with_100k) as f64, with_10.max(with_100k) as f64);
    assert!(
        hi / lo < 1.3,
        "heartbeat work grew: {with_10} -> {with_100k}"
    );
    let (_, h) = health(nodes[0].public).await;
    assert_eq!(
        h["cluster"]["total_sessions"], 100_010,
        "counted without reading the sessions"
    );
}

#[tokio::test]
async fn clients_spread_round_robin_always_reach_the_one_owner() {
    let valkey = Valkey::start().await;
    let up = TestUpstream::start().await;
    let nodes = start_cluster(3, &[up.url()], &valkey, "").await;
    // Like a load balancer without affinity: every (re)connect of every
    // session goes to the next node in turn.
    let mut turn = 0;
    for round in 0..3 {
        for s in 0..6 {
            let sid = format!("rr{s}");
            let mut ws = connect(&url(&nodes[turn % 3], &sid)).await;
            turn += 1;
            echo(&mut ws, &format!("round {round}")).await;
            ws.close(None).await.expect("close");
            let _ = expect_close(&mut ws, Duration::from_secs(5)).await;
        }
    }
    for s in 0..6 {
        let sid = format!("rr{s}");
        assert!(
            up.max_open_for(&sid) <= 1,
            "{sid} had two upstream connections at once"
        );
        assert_eq!(
            up.messages_for(&sid).len(),
            3,
            "{sid}: every round reached the upstream"
        );
    }
    eventually(
        Duration::from_secs(5),
        "no session key left once all ended",
        || async { valkey.keys("wsb:session:*").await.is_empty() },
    )
    .await;
}

#[tokio::test]
async fn a_second_process_with_a_live_id_waits_for_it_to_expire() {
    let valkey = Valkey::start().await;
    let up = TestUpstream::start().await;
    let mut first = start_node("twin", &[up.url()], &valkey, "").await;
    let registered = valkey.get("wsb:node:twin").await.expect("first registered");
    let second = BrokerProcess::start(&[up.url()], &cluster_extra("twin", &valkey, "")).await;
    // Well past stale_ttl the second is still waiting: the id is live.
    for _ in 0..10 {
        assert_eq!(
            health(second.public).await.0,
            503,
            "second process must not serve under a live id"
        );
        assert_eq!(
            valkey.get("wsb:node:twin").await.as_deref(),
            Some(registered.as_str())
        );
        tokio::time::sleep(Duration::from_millis(STALE_TTL_MS / 5)).await;
    }
    let _ = first.child.kill();
    let public = second.public;
    eventually(
        Duration::from_secs(5),
        "the second registers once the first's registration expired",
        || async move { health(public).await.0 == 200 },
    )
    .await;
    assert_ne!(
        valkey.get("wsb:node:twin").await.as_deref(),
        Some(registered.as_str())
    );
}

#[tokio::test]
async fn copies_served_locally_during_an_outage_are_settled_when_it_returns() {
    let mut valkey = Valkey::start().await;
    let up = TestUpstream::start().await;
    let nodes = start_cluster(2, &[up.url()], &valkey, "").await;
    let port = valkey.port;
    valkey.kill();
    // on_registry_down = "local": both nodes serve the same id, unaware.
    let mut a = connect(&url(&nodes[0], "split")).await;
    echo(&mut a, "on n1").await;
    let mut b = connect(&url(&nodes[1], "split")).await;
    echo(&mut b, "on n2").await;
    assert_eq!(
        up.open_for("split"),
        2,
        "two copies while the registry is away"
    );
    let _valkey = Valkey::start_on(port).await;
    // Re-assertion settles it: the first to record the session keeps it,
    // the other copy closes with 4003 on both sides.
    let (first, second) = tokio::join!(
        tokio::time::timeout(
            Duration::from_secs(5),
            futures_util::StreamExt::next(&mut a)
        ),
        tokio::time::timeout(
            Duration::from_secs(5),
            futures_util::StreamExt::next(&mut b)
        ),
    );
    let closed = |r: &Result<Option<Result<Message, _>>, _>| matches!(r, Ok(Some(Ok(Message::Close(Some(f))))) if u16::from(f.code) == 4003);
    assert!(
        closed(&first) != closed(&second),
        "exactly one copy closes with 4003: {first:?} / {second:?}"
    );
    eventually(
        Duration::from_secs(5),
        "one upstream connection left",
        || async { up.open_for("split") == 1 },
    )
    .await;
    assert!(up.closes_for("split").iter().any(|c| c.0 == 4003));
}

#[tokio::test]
async fn a_session_that_ends_while_the_registry_is_paused_leaves_no_key() {
    let valkey = Valkey::start().await;
    let up = TestUpstream::start().await;
    let node = start_node("n1", &[up.url()], &valkey, "").await;
    let mut ws = connect(&url(&node, "ends-in-outage")).await;
    echo(&mut ws, "x").await;
    let key = "wsb:session:ends-in-outage";
    assert!(valkey.get(key).await.is_some());
    // Well into the outage (the node has seen the registry fail), the
    // session ends.
    pause_registry(&valkey, &node).await;
    ws.close(None).await.expect("close");
    eventually(Duration::from_secs(5), "the session ended", || async {
        !up.closes_for("ends-in-outage").is_empty()
    })
    .await;
    // The outage goes on for ten registry operation timeouts (one
    // heartbeat each) past the end: the node's write of it times out.
    tokio::time::sleep(Duration::from_millis(10 * HEARTBEAT_MS)).await;
    valkey.signal("CONT");
    let valkey = &valkey;
    eventually(
        Duration::from_secs(5),
        "the ended session's key and set entry are gone",
        || async move {
            valkey.get(key).await.is_none()
                && valkey.members("wsb:node-sessions:n1").await.is_empty()
        },
    )
    .await;
}

#[tokio::test]
async fn a_process_restarted_under_the_same_id_releases_what_the_last_one_left() {
    let valkey = Valkey::start().await;
    let up = TestUpstream::start().await;
    let mut first = start_node("n1", &[up.url()], &valkey, "").await;
    let mut ws = connect(&url(&first, "inherited")).await;
    echo(&mut ws, "x").await;
    let key = "wsb:session:inherited";
    assert!(valkey
        .get(key)
        .await
        .is_some_and(|v| v.starts_with("n1|1|")));
    let _ = first.child.kill(); // SIGKILL
    let _ = first.child.wait();
    // The new process waits for the old registration to expire, then
    // registers; no survivor collects an id that is registered again.
    let second = start_node("n1", &[up.url()], &valkey, "").await;
    let valkey = &valkey;
    eventually(
        Duration::from_secs(5),
        "the old process's session is released (then expires)",
        || async move {
            valkey.get(key).await.is_none_or(|v| v.starts_with("|1|"))
                && valkey.members("wsb:node-sessions:n1").await.is_empty()
        },
    )
    .await;
    eventually(
        Duration::from_secs(5),
        "the released key expires",
        || async move { valkey.get(key).await.is_none() },
    )
    .await;
    drop(second);
}

#[tokio::test]
async fn a_client_dropping_late_in_a_registry_outage_ends_its_session_too() {
    let mut valkey = Valkey::start().await;
    let up = TestUpstream::start().await;
    let node = start_node("n1", &[up.url()], &valkey, "").await;
    let mut early = connect(&url(&node, "early")).await;
    echo(&mut early, "x").await;
    drop(early);
    let mut late = connect(&url(&node, "late")).await;
    echo(&mut late, "x").await;
    valkey.kill();
    let registry_lost = Some((1001, "registry unreachable".to_string()));
    // Past stale_ttl the node ends the sessions detached at that point.
    eventually(
        Duration::from_secs(5),
        "the early session ended",
        || async { up.closes_for("early").first().cloned() == registry_lost },
    )
    .await;
    // A client that drops later in the same outage: its session cannot
    // wait for a resume either (another node may take it over).
    drop(late);
    eventually(
        Duration::from_secs(3),
        "the late session ended within a few heartbeats",
        || async { up.closes_for("late").first().cloned() == registry_lost },
    )
    .await;
}

#[tokio::test]
async fn a_process_that_finds_its_id_taken_stops_serving_under_it() {
    let valkey = Valkey::start().await;
    let up = TestUpstream::start().await;
    let original = start_node("n1", &[up.url()], &valkey, "").await;
    let mut ws = connect(&url(&original, "dup")).await;
    echo(&mut ws, "x").await;
    // Frozen past stale_ttl, the original loses its registration to a
    // second process started under the same id.
    original.freeze().await;
    let mut second = start_node("n1", &[up.url()], &valkey, "").await;
    original.signal("CONT");
    // The original steps down: its sessions close as moved, it stops
    // taking sessions (starting) and does not register over the other.
    assert_eq!(expect_close(&mut ws, Duration::from_secs(5)).await.0, 4003);
    let public = original.public;
    eventually(
        Duration::from_secs(5),
        "the original is not serving",
        || async move {
            let (status, h) = health(public).await;
            status == 503 && h["status"] == "starting"
        },
    )
    .await;
    assert_eq!(upgrade_status(&url(&original, "other"), &[]).await, 503);
    assert_eq!(health(second.public).await.0, 200);
    // Once the other process is gone and its registration expired, the
    // original registers again and serves.
    let _ = second.child.kill(); // SIGKILL
    let _ = second.child.wait();
    eventually(
        Duration::from_secs(5),
        "the original registered again",
        || async move { health(public).await.0 == 200 },
    )
    .await;
    let mut again = connect(&url(&original, "after")).await;
    echo(&mut again, "y").await;
}

#[tokio::test]
async fn many_clients_joining_a_shared_session_through_another_node_all_get_in() {
    let valkey = Valkey::start().await;
    let up = TestUpstream::start().await;
    let nodes = start_cluster(2, &[up.url()], &valkey, "[session]\nattach = \"shared\"\n").await;
    let mut first = connect(&url(&nodes[0], "crowd")).await;
    echo(&mut first, "x").await;
    // Twenty at once through the node that does not own the session: each
    // is forwarded in turn, none refused as contended.
    let target = url(&nodes[1], "crowd");
    let attempts = (0..20).map(|_| {
        let target = target.clone();
        async move { upgrade_status(&target, &[]).await }
    });
    let statuses = futures_util::future::join_all(attempts).await;
    assert!(statuses.iter().all(|s| *s == 101), "{statuses:?}");
}

#[tokio::test]
async fn an_end_kept_from_an_outage_spares_a_session_back_under_its_id() {
    let valkey = Valkey::start().await;
    let up = TestUpstream::start().await;
    let node = start_node("n1", &[up.url()], &valkey, "").await;
    let mut ws = connect(&url(&node, "back")).await;
    echo(&mut ws, "x").await;
    pause_registry(&valkey, &node).await;
    // The session ends in the outage (its end is kept), and a client
    // comes back under the same id: served here, at epoch 1 again.
    ws.close(None).await.expect("close");
    eventually(Duration::from_secs(5), "the session ended", || async {
        !up.closes_for("back").is_empty()
    })
    .await;
    let mut again = connect(&url(&node, "back")).await;
    echo(&mut again, "y").await;
    valkey.signal("CONT");
    let valkey = &valkey;
    eventually(
        Duration::from_secs(5),
        "the live session re-asserted",
        || async move {
            valkey
                .get("wsb:session:back")
                .await
                .is_some_and(|v| v.starts_with("n1|1|"))
        },
    )
    .await;
    // The kept end is retried every heartbeat: over ten of them, it never
    // removes the live session's key.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(HEARTBEAT_MS)).await;
        assert!(
            valkey.get("wsb:session:back").await.is_some(),
            "the live session's key was removed"
        );
    }
    echo(&mut again, "still here").await;
}
