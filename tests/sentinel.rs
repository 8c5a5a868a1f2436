//! Following Sentinel failover with real processes: a primary, a replica,
//! three Sentinels, three wsbroker nodes and live client traffic. Every
//! scenario runs against Valkey and against Redis 7 (Debian's redis-server).

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::sentinel::*;
use common::valkey::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Scenarios run one at a time: each starts five servers and up to three
/// nodes, and failover timing suffers when they share two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn url(p: &BrokerProcess, sid: &str) -> String {
    format!("ws://{}/?session={sid}", p.public)
}

async fn start_nodes(
    setup: &SentinelSetup,
    up: &TestUpstream,
    n: usize,
    first_sentinels: &[String],
) -> Vec<BrokerProcess> {
    // A registry `url` that points nowhere proves the Sentinels are used.
    let extra = format!(
        "{}url = \"redis://127.0.0.1:1/0\"\n",
        setup.node_extra(first_sentinels)
    );
    let mut nodes = Vec::new();
    for i in 1..=n {
        let p = BrokerProcess::start(&[up.url()], &cluster_extra_no_url(&format!("n{i}"), &extra))
            .await;
        let public = p.public;
        eventually(
            Duration::from_secs(10),
            "node registered through the Sentinels",
            || async move { health(public).await.0 == 200 },
        )
        .await;
        nodes.push(p);
    }
    nodes
}

/// The cluster settings of `cluster_extra` with the `[valkey]` section given.
fn cluster_extra_no_url(id: &str, valkey_section: &str) -> String {
    format!(
        "[node]\nid = \"{id}\"\n[cluster]\nregistry = \"valkey\"\nsecret = \"test-secret\"\n\
         heartbeat_interval = \"{HEARTBEAT_MS}ms\"\nstale_ttl = \"{STALE_TTL_MS}ms\"\n\
         [upstream]\nconnect_timeout = \"250ms\"\n{valkey_section}"
    )
}

/// A client that echoes numbered messages without pause; counts what came
/// back in order and flags any gap, error or interruption.
struct Streamer {
    ok: Arc<AtomicU64>,
    broken: Arc<AtomicBool>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Streamer {
    async fn start(url: String) -> Streamer {
        let mut ws = connect(&url).await;
        let ok = Arc::new(AtomicU64::new(0));
        let broken = Arc::new(AtomicBool::new(false));
        let stop = tokio_util::sync::CancellationToken::new();
        let (o, b, s) = (ok.clone(), broken.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut i = 0u64;
            while !s.is_cancelled() {
                let msg = format!("seq {i}");
                if ws.send(Message::text(msg.clone())).await.is_err() {
                    b.store(true, Ordering::Relaxed);
                    return;
                }
                match tokio::time::timeout(Duration::from_secs(3), ws.next()).await {
                    Ok(Some(Ok(m))) if m == Message::text(msg) => {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        b.store(true, Ordering::Relaxed);
                        return;
                    }
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Streamer {
            ok,
            broken,
            stop,
            task,
        }
    }

    async fn finish(self) -> (u64, bool) {
        self.stop.cancel();
        let _ = self.task.await;
        (
            self.ok.load(Ordering::Relaxed),
            self.broken.load(Ordering::Relaxed),
        )
    }
}

/// Kills the primary and waits for the Sentinels to name another; returns
/// (old address, new address, time of the kill).
async fn fail_over(setup: &mut SentinelSetup) -> (String, String, Instant) {
    let old = setup.primary_addr().await.expect("a primary");
    let killed = Instant::now();
    setup.server_at(&old).expect("primary process").kill();
    let mut new = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while new.is_none() {
        if let Some(a) = setup.primary_addr().await.filter(|a| *a != old) {
            new = Some(a);
        }
        assert!(
            Instant::now() < deadline,
            "Sentinels never promoted the replica"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (old, new.expect("new primary"), killed)
}

async fn discovery_skips_bad_sentinels(bin: PathBuf) {
    let setup = SentinelSetup::start_with(bin).await;
    let up = TestUpstream::start().await;
    let (liar, liar_task) = lying_sentinel().await;
    let dead = format!("127.0.0.1:{}", free_port());
    let nodes = start_nodes(&setup, &up, 1, &[dead, liar]).await;
    let (_, h) = health(nodes[0].public).await;
    assert_eq!(
        h["registry"]["primary"],
        setup.primary_addr().await.expect("primary").as_str()
    );
    assert_eq!(h["registry"]["status"], "connected");
    let mut ws = connect(&url(&nodes[0], "d")).await;
    echo(&mut ws, "x").await;
    liar_task.abort();
}

async fn failover_keeps_every_session(bin: PathBuf) {
    let mut setup = SentinelSetup::start_with(bin).await;
    let up = TestUpstream::start().await;
    let nodes = start_nodes(&setup, &up, 3, &[]).await;
    // Sessions owned by each node, plus one reached through a hop.
    let mut streamers = Vec::new();
    for (i, p) in nodes.iter().enumerate() {
        streamers.push(Streamer::start(url(p, &format!("live{i}"))).await);
    }
    let mut forwarded = connect(&url(&nodes[0], "hopped")).await;
    echo(&mut forwarded, "owner n1").await;
    drop(forwarded);
    streamers.push(Streamer::start(url(&nodes[1], "hopped")).await);

    let old = setup.primary_addr().await.expect("a primary");
    let killed = Instant::now();
    setup.server_at(&old).expect("primary process").kill();
    // New sessions succeed again within down-after + failover time + 2 s
    // (with on_registry_down = "local" they never stop).
    let bound = Duration::from_millis(DOWN_AFTER_MS + FAILOVER_TIMEOUT_MS + 2000);
    let mut k = 0;
    loop {
        k += 1;
        if upgrade_status(&url(&nodes[k % 3], &format!("fresh{k}")), &[]).await == 101 {
            break;
        }
        assert!(
            killed.elapsed() < bound,
            "no new session within down-after + failover + 2 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "kill -9 of the primary to the first new session: {:?}",
        killed.elapsed()
    );
    let mut new = None;
    while new.is_none() {
        new = setup.primary_addr().await.filter(|a| *a != old);
        assert!(
            killed.elapsed() < bound,
            "Sentinels never promoted the replica"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let new = new.expect("new primary");
    let promoted = killed.elapsed();
    for p in &nodes {
        let public = p.public;
        let new = new.clone();
        eventually(
            Duration::from_secs(5),
            "every node uses the new primary",
            || {
                let new = new.clone();
                async move { health(public).await.1["registry"]["primary"] == new.as_str() }
            },
        )
        .await;
    }
    let followed = killed.elapsed();
    eprintln!(
        "Sentinels named the new primary after {promoted:?}; every node used it after {followed:?}"
    );
    assert!(
        followed < bound,
        "new primary in use within the bound: {followed:?}"
    );
    let k2 = k + 1;
    let mut ws = connect(&url(&nodes[k2 % 3], &format!("fresh{k2}"))).await;
    echo(&mut ws, "on the new primary").await;
    // Writes lost to asynchronous replication come back: every live
    // session is recorded on the new primary.
    let new_primary = setup.server_at(&new).expect("new primary");
    for sid in ["live0", "live1", "live2", "hopped"] {
        let v = new_primary.get(&format!("wsb:session:{sid}")).await;
        assert!(v.is_some(), "{sid} re-asserted on the new primary");
    }
    for s in streamers {
        let (ok, broken) = s.finish().await;
        assert!(!broken, "a live session was interrupted or lost a message");
        assert!(ok > 10, "traffic flowed ({ok} echoes)");
    }
    for sid in ["live0", "live1", "live2", "hopped"] {
        assert_eq!(up.max_open_for(sid), 1, "{sid} never had two owners");
    }
    for p in &nodes {
        let (_, _, body) = http(p.admin, "GET", "/metrics", &[], b"")
            .await
            .expect("metrics");
        let text = String::from_utf8_lossy(&body).to_string();
        assert!(
            text.contains("wsbroker_registry_failovers_total 1"),
            "failover counted:\n{text}"
        );
    }
}

async fn sentinels_down_degrade_without_interrupting(bin: PathBuf) {
    let mut setup = SentinelSetup::start_with(bin.clone()).await;
    let up = TestUpstream::start().await;
    let nodes = start_nodes(&setup, &up, 1, &[]).await;
    let mut ws = connect(&url(&nodes[0], "sd")).await;
    echo(&mut ws, "x").await;
    // One of three down: no effect.
    setup.sentinels[0].kill();
    assert_eq!(health(nodes[0].public).await.1["status"], "healthy");
    echo(&mut ws, "one sentinel down").await;
    let mut other = connect(&url(&nodes[0], "sd2")).await;
    echo(&mut other, "new session").await;
    // All down: live traffic continues, /health degraded.
    setup.sentinels[1].kill();
    setup.sentinels[2].kill();
    let public = nodes[0].public;
    eventually(
        Duration::from_secs(5),
        "/health degraded without Sentinels",
        || async move {
            let (status, h) = health(public).await;
            status == 200 && h["status"] == "degraded"
        },
    )
    .await;
    for i in 0..5 {
        echo(&mut ws, &format!("no sentinels {i}")).await;
    }
    // They return: healthy again.
    let primary_port = setup.servers[0].port;
    let ports: Vec<u16> = setup.sentinels.iter().map(|s| s.port).collect();
    setup.sentinels.clear();
    for port in ports {
        setup
            .sentinels
            .push(Sentinel::start(port, primary_port, &bin));
    }
    eventually(
        Duration::from_secs(10),
        "/health healthy once Sentinels return",
        || async move { health(public).await.1["status"] == "healthy" },
    )
    .await;
    echo(&mut ws, "back").await;
}

async fn three_failovers_back_to_back(bin: PathBuf) {
    let mut setup = SentinelSetup::start_with(bin.clone()).await;
    let up = TestUpstream::start().await;
    let nodes = start_nodes(&setup, &up, 3, &[]).await;
    let mut streamers = Vec::new();
    for (i, p) in nodes.iter().enumerate() {
        streamers.push(Streamer::start(url(p, &format!("bb{i}"))).await);
    }
    for round in 0..3 {
        let (old, new, _) = fail_over(&mut setup).await;
        setup.await_primary_settled(&new).await;
        // The old primary comes back, and the Sentinels make it a replica
        // of the new one.
        let old_port: u16 = old
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        setup.servers.retain(|v| v.port != old_port);
        let restarted = Valkey::start_with(old_port, &bin, &[]).await;
        setup.servers.push(restarted);
        for p in &nodes {
            let public = p.public;
            let new = new.clone();
            eventually(Duration::from_secs(10), "nodes follow the failover", || {
                let new = new.clone();
                async move { health(public).await.1["registry"]["primary"] == new.as_str() }
            })
            .await;
        }
        // The restarted server must be a replica in sync before the next round.
        let old_addr = old.clone();
        eventually(
            Duration::from_secs(30),
            "old primary re-joined as a replica",
            || {
                let a = old_addr.clone();
                async move {
                    let Ok(client) = redis::Client::open(format!("redis://{a}/")) else {
                        return false;
                    };
                    let Ok(mut c) = client.get_multiplexed_async_connection().await else {
                        return false;
                    };
                    let info: String = redis::cmd("INFO")
                        .arg("replication")
                        .query_async(&mut c)
                        .await
                        .unwrap_or_default();
                    info.contains("role:slave") && info.contains("master_link_status:up")
                }
            },
        )
        .await;
        setup.await_sentinels_agree().await;
        setup.await_primary_settled(&new).await;
        let mut ws = connect(&url(&nodes[round % 3], &format!("after{round}"))).await;
        echo(&mut ws, "works").await;
    }
    for s in streamers {
        let (ok, broken) = s.finish().await;
        assert!(!broken && ok > 10, "sessions survived three failovers");
    }
    let primary = setup.primary_addr().await.expect("primary");
    let server = setup.server_at(&primary).expect("primary server");
    for i in 0..3 {
        assert!(
            server.get(&format!("wsb:session:bb{i}")).await.is_some(),
            "bb{i} still recorded"
        );
        assert_eq!(up.max_open_for(&format!("bb{i}")), 1);
    }
}

async fn graceful_failover_is_followed(bin: PathBuf) {
    let setup = SentinelSetup::start_with(bin).await;
    let up = TestUpstream::start().await;
    let nodes = start_nodes(&setup, &up, 2, &[]).await;
    let streamer = Streamer::start(url(&nodes[0], "gf")).await;
    let old = setup.primary_addr().await.expect("primary");
    let mut c = redis::Client::open(format!("redis://{}/", setup.sentinel_addrs()[0]))
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("sentinel");
    let _: String = redis::cmd("SENTINEL")
        .arg("FAILOVER")
        .arg(MASTER)
        .query_async(&mut c)
        .await
        .expect("SENTINEL FAILOVER");
    let mut new = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while new.is_none() {
        new = setup.primary_addr().await.filter(|a| *a != old);
        assert!(Instant::now() < deadline, "no switch");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let new = new.expect("new");
    let switched = Instant::now();
    for p in &nodes {
        let public = p.public;
        let new = new.clone();
        eventually(
            Duration::from_secs(2),
            "new primary in use within 2 s of the switch",
            || {
                let new = new.clone();
                async move { health(public).await.1["registry"]["primary"] == new.as_str() }
            },
        )
        .await;
    }
    eprintln!(
        "graceful failover followed {:?} after the switch",
        switched.elapsed()
    );
    let mut ws = connect(&url(&nodes[1], "after-graceful")).await;
    echo(&mut ws, "x").await;
    let (ok, broken) = streamer.finish().await;
    assert!(!broken && ok > 0);
}

#[tokio::test]
async fn valkey_graceful_failover_is_followed() {
    let _one = ONE_AT_A_TIME.lock().await;
    graceful_failover_is_followed(server_binary()).await;
}

#[tokio::test]
async fn redis7_graceful_failover_is_followed() {
    let _one = ONE_AT_A_TIME.lock().await;
    graceful_failover_is_followed(redis_binary()).await;
}

#[tokio::test]
async fn valkey_discovery_skips_down_and_lying_sentinels() {
    let _one = ONE_AT_A_TIME.lock().await;
    discovery_skips_bad_sentinels(server_binary()).await;
}

#[tokio::test]
async fn valkey_failover_keeps_every_session() {
    let _one = ONE_AT_A_TIME.lock().await;
    failover_keeps_every_session(server_binary()).await;
}

#[tokio::test]
async fn valkey_sentinels_down_degrade_without_interrupting() {
    let _one = ONE_AT_A_TIME.lock().await;
    sentinels_down_degrade_without_interrupting(server_binary()).await;
}

#[tokio::test]
async fn valkey_three_failovers_back_to_back() {
    let _one = ONE_AT_A_TIME.lock().await;
    three_failovers_back_to_back(server_binary()).await;
}

#[tokio::test]
async fn redis7_discovery_skips_down_and_lying_sentinels() {
    let _one = ONE_AT_A_TIME.lock().await;
    discovery_skips_bad_sentinels(redis_binary()).await;
}

#[tokio::test]
async fn redis7_failover_keeps_every_session() {
    let _one = ONE_AT_A_TIME.lock().await;
    failover_keeps_every_session(redis_binary()).await;
}

#[tokio::test]
async fn redis7_sentinels_down_degrade_without_interrupting() {
    let _one = ONE_AT_A_TIME.lock().await;
    sentinels_down_degrade_without_interrupting(redis_binary()).await;
}

#[tokio::test]
async fn redis7_three_failovers_back_to_back() {
    let _one = ONE_AT_A_TIME.lock().await;
    three_failovers_back_to_back(redis_binary()).await;
}

/// A minimal RESP server: answers each command through `reply`.
async fn fake_server(
    reply: impl Fn(&str) -> Vec<u8> + Send + Sync + Clone + 'static,
) -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut buf: Vec<u8> = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // Answer every complete command in the buffer.
                    while let Some((cmd, used)) = parse_command(&buf) {
                        buf.drain(..used);
                        if s.write_all(&reply(&cmd)).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (addr, task)
}

/// The upper-cased command name and the length of one RESP array command.
fn parse_command(buf: &[u8]) -> Option<(String, usize)> {
    let line_end = |from: usize| {
        buf[from..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|i| from + i)
    };
    if buf.first() != Some(&b'*') {
        return None;
    }
    let e = line_end(0)?;
    let n: usize = std::str::from_utf8(&buf[1..e]).ok()?.parse().ok()?;
    let mut pos = e + 2;
    let mut name = String::new();
    for i in 0..n {
        let e = line_end(pos)?;
        let len: usize = std::str::from_utf8(&buf[pos + 1..e]).ok()?.parse().ok()?;
        let start = e + 2;
        if buf.len() < start + len + 2 {
            return None;
        }
        if i == 0 {
            name = String::from_utf8_lossy(&buf[start..start + len]).to_ascii_uppercase();
        }
        pos = start + len + 2;
    }
    Some((name, pos))
}

#[tokio::test]
async fn a_readonly_reply_sends_the_node_back_to_the_sentinels() {
    // A "primary" that was demoted behind the Sentinels' back: it still
    // says it is a primary, but refuses writes.
    let (primary, primary_task) = fake_server(|cmd| match cmd {
        "ROLE" => b"*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n".to_vec(),
        "EVALSHA" | "EVAL" | "SET" | "SADD" => {
            b"-READONLY You can't write against a read only replica.\r\n".to_vec()
        }
        "PING" => b"+PONG\r\n".to_vec(),
        _ => b"+OK\r\n".to_vec(),
    })
    .await;
    let asked = Arc::new(AtomicU64::new(0));
    let (h, p) = primary.rsplit_once(':').expect("addr");
    let answer = format!("*2\r\n${}\r\n{h}\r\n${}\r\n{p}\r\n", h.len(), p.len()).into_bytes();
    let counter = asked.clone();
    let (sentinel, sentinel_task) = fake_server(move |cmd| {
        if cmd == "SENTINEL" {
            counter.fetch_add(1, Ordering::Relaxed);
            answer.clone()
        } else {
            b"+OK\r\n".to_vec()
        }
    })
    .await;
    let text = format!(
        "[node]\nid = \"ro\"\nlisten = \"127.0.0.1:0\"\n[upstream]\nservers = [\"ws://127.0.0.1:9\"]\n\
         [cluster]\nregistry = \"valkey\"\nsecret = \"s\"\nheartbeat_interval = \"100ms\"\nstale_ttl = \"500ms\"\n\
         [valkey]\nsentinels = [\"{sentinel}\"]\n"
    );
    let config = wsbroker::config::Config::parse(&text, &|_| None).expect("config");
    let reg = wsbroker::control::registry::ValkeyRegistry::new(&config).expect("registry");
    assert!(reg.heartbeat().await.is_err(), "the write is refused");
    assert_eq!(asked.load(Ordering::Relaxed), 1);
    assert_eq!(reg.primary(), primary);
    let first = reg.generation();
    // The READONLY reply dropped the connection: the next call asks the
    // Sentinels again instead of writing to the demoted server.
    let _ = reg.heartbeat().await;
    assert_eq!(
        asked.load(Ordering::Relaxed),
        2,
        "re-asked the Sentinels after READONLY"
    );
    assert_eq!(reg.generation(), first + 1, "a new connection was opened");
    primary_task.abort();
    sentinel_task.abort();
}
