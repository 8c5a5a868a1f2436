//! Cluster benchmark: new-session handshakes per second with the Valkey
//! registry versus the memory registry, the latency one forwarding hop adds
//! to an echo round trip, and the time from kill -9 of an owner to the
//! first successful reconnect of its session through another node.
//!
//! Run: `cargo bench --bench cluster` (needs a Valkey server: set
//! WSBROKER_VALKEY_BIN or run `scripts/find-valkey`; `-- --quick` for a smoke).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use common::{free_port, spawn_valkey, Proc};

const HEARTBEAT: &str = "200ms";
const STALE_TTL: &str = "1s";

fn start_node(dir: &Path, id: &str, app: SocketAddr, valkey: Option<u16>) -> (Proc, SocketAddr) {
    let public: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let cluster = match valkey {
        Some(port) => format!(
            "[cluster]\nregistry = \"valkey\"\nsecret = \"bench\"\nheartbeat_interval = \"{HEARTBEAT}\"\nstale_ttl = \"{STALE_TTL}\"\n[valkey]\nurl = \"redis://127.0.0.1:{port}/0\"\n"
        ),
        None => String::new(),
    };
    let text = format!(
        "[node]\nid = \"{id}\"\nlisten = \"{public}\"\n[upstream]\nservers = [\"ws://{app}\"]\nconnect_timeout = \"500ms\"\n[log]\nlevel = \"error\"\n{cluster}"
    );
    let path = dir.join(format!("{id}.toml"));
    std::fs::write(&path, text).expect("config");
    let child = Command::new(env!("CARGO_BIN_EXE_wsbroker"))
        .args(["run", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn wsbroker");
    (Proc(child), public)
}

async fn wait_healthy(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) = TcpStream::connect(addr).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = s
                .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf).await;
            if buf.starts_with(b"HTTP/1.1 200") {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "node at {addr} never became healthy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn connect(url: &str) -> Option<tokio_tungstenite::WebSocketStream<TcpStream>> {
    let addr = url
        .trim_start_matches("ws://")
        .split('/')
        .next()?
        .to_string();
    let stream = TcpStream::connect(addr).await.ok()?;
    stream.set_nodelay(true).ok()?;
    tokio_tungstenite::client_async(url, stream)
        .await
        .ok()
        .map(|(ws, _)| ws)
}

/// New sessions per second: `total` upgrades (each a new id), `parallel` at a time.
async fn handshakes(node: SocketAddr, prefix: &str, total: usize, parallel: usize) -> f64 {
    let started = Instant::now();
    let per = total / parallel;
    let tasks: Vec<_> = (0..parallel)
        .map(|w| {
            let prefix = prefix.to_string();
            tokio::spawn(async move {
                for i in 0..per {
                    let url = format!("ws://{node}/?session={prefix}-{w}-{i}");
                    let mut ws = connect(&url).await.expect("upgrade");
                    let _ = ws.close(None).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("worker");
    }
    (per * parallel) as f64 / started.elapsed().as_secs_f64()
}

async fn rtt_p50(url: &str, n: usize) -> Duration {
    let mut ws = connect(url).await.expect("upgrade");
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        ws.send(Message::text(format!("p{i}"))).await.expect("send");
        let _ = ws.next().await.expect("reply").expect("message");
        samples.push(t.elapsed());
    }
    samples.sort();
    samples[n / 2]
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(quick));
}

async fn run(quick: bool) {
    let (total, rtts, kills) = if quick {
        (200, 200, 2)
    } else {
        (3000, 3000, 10)
    };
    let dir = std::env::temp_dir().join(format!("wsbroker-cluster-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let stop = CancellationToken::new();
    let app_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let app = app_listener.local_addr().expect("addr");
    tokio::spawn(wsbroker::demo::serve_app(app_listener, stop.clone()));
    let (_valkey, vport) = spawn_valkey(&dir);
    let (_mem, mem_addr) = start_node(&dir, "mem", app, None);
    let (_a, a_addr) = start_node(&dir, "a", app, Some(vport));
    let (_b, b_addr) = start_node(&dir, "b", app, Some(vport));
    for addr in [mem_addr, a_addr, b_addr] {
        wait_healthy(addr).await;
    }

    let mem_hs = handshakes(mem_addr, "m", total, 16).await;
    let vk_hs = handshakes(a_addr, "v", total, 16).await;

    let direct = rtt_p50(&format!("ws://{app}/"), rtts).await;
    let mut owner_ws = connect(&format!("ws://{a_addr}/?session=hop"))
        .await
        .expect("owner");
    owner_ws.send(Message::text("x")).await.expect("send");
    let _ = owner_ws.next().await;
    drop(owner_ws);
    let on_owner = rtt_p50(&format!("ws://{a_addr}/?session=hop"), rtts).await;
    let via_hop = rtt_p50(&format!("ws://{b_addr}/?session=hop"), rtts).await;

    // kill -9 of an owner to the first successful reconnect through another node.
    let mut takeover = Vec::new();
    for k in 0..kills {
        let (mut victim, v_addr) = start_node(&dir, &format!("victim{k}"), app, Some(vport));
        wait_healthy(v_addr).await;
        let sid = format!("kill{k}");
        let mut ws = connect(&format!("ws://{v_addr}/?session={sid}"))
            .await
            .expect("on victim");
        ws.send(Message::text("x")).await.expect("send");
        let _ = ws.next().await;
        let killed = Instant::now();
        let _ = victim.0.kill();
        let _ = victim.0.wait();
        loop {
            if connect(&format!("ws://{b_addr}/?session={sid}"))
                .await
                .is_some()
            {
                break;
            }
            assert!(killed.elapsed() < Duration::from_secs(30), "no takeover");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        takeover.push(killed.elapsed());
    }

    println!("wsbroker cluster benchmark (heartbeat_interval {HEARTBEAT}, stale_ttl {STALE_TTL})");
    println!("new sessions/s, 16 in parallel:   memory {mem_hs:.0}/s   valkey {vk_hs:.0}/s   ratio valkey/memory {:.2}", vk_hs / mem_hs);
    println!(
        "echo p50: direct {:.1} us   on owner {:.1} us   via one hop {:.1} us   hop/owner {:.2}",
        direct.as_secs_f64() * 1e6,
        on_owner.as_secs_f64() * 1e6,
        via_hop.as_secs_f64() * 1e6,
        via_hop.as_secs_f64() / on_owner.as_secs_f64()
    );
    let med = median(takeover.clone());
    println!(
        "kill -9 to reconnect through another node: median {:.0} ms over {} runs (min {:.0}, max {:.0})",
        med.as_secs_f64() * 1e3,
        takeover.len(),
        takeover.iter().min().copied().unwrap_or_default().as_secs_f64() * 1e3,
        takeover.iter().max().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    stop.cancel();
    let _ = std::fs::remove_dir_all(&dir);
}
