//! Load benchmark (single node): echo round trip through wsbroker versus
//! directly to the upstream, and RSS per idle proxied session.
//!
//! Run: `cargo bench --bench load` (add `-- --quick` for a seconds-long
//! smoke). Figures are ratios measured in one run on one machine.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

struct Settings {
    round_trips: usize,
    concurrent_clients: usize,
    messages_per_client: usize,
    idle_sessions: usize,
}

async fn connect(url: &str) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let addr = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    tokio_tungstenite::client_async(url, stream)
        .await
        .expect("upgrade")
        .0
}

/// Median and 99th percentile of sequential round trips on one connection.
async fn round_trips(url: &str, n: usize) -> (Duration, Duration) {
    let mut ws = connect(url).await;
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        ws.send(Message::text(format!("ping {i}")))
            .await
            .expect("send");
        let _ = ws.next().await.expect("reply").expect("message");
        samples.push(t.elapsed());
    }
    samples.sort();
    (samples[n / 2], samples[n * 99 / 100])
}

/// Messages per second with `clients` connections each doing `per` round trips.
async fn throughput(base: &str, clients: usize, per: usize) -> f64 {
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let url = format!("{base}/?session=tp{c}-{}", fastrand::u32(..));
            tokio::spawn(async move {
                let mut ws = connect(&url).await;
                for _ in 0..per {
                    ws.send(Message::binary(vec![0u8; 64])).await.expect("send");
                    let _ = ws.next().await.expect("reply").expect("message");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("client");
    }
    (clients * per) as f64 / started.elapsed().as_secs_f64()
}

fn start_node(app: SocketAddr) -> (Child, SocketAddr, std::path::PathBuf) {
    let public: SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .expect("addr");
    let dir = std::env::temp_dir().join(format!("wsbroker-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("bench.toml");
    let text = format!(
        "[node]\nid = \"bench\"\nlisten = \"{public}\"\n[upstream]\nservers = [\"ws://{app}\"]\n[log]\nlevel = \"warn\"\n"
    );
    std::fs::write(&path, text).expect("config");
    let child = Command::new(env!("CARGO_BIN_EXE_wsbroker"))
        .args(["run", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn wsbroker");
    (child, public, dir)
}

async fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "wsbroker did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let s = if quick {
        Settings {
            round_trips: 200,
            concurrent_clients: 8,
            messages_per_client: 50,
            idle_sessions: 100,
        }
    } else {
        Settings {
            round_trips: 5000,
            concurrent_clients: 64,
            messages_per_client: 500,
            idle_sessions: 1000,
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(s));
}

async fn run(s: Settings) {
    let stop = CancellationToken::new();
    let app_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let app = app_listener.local_addr().expect("addr");
    tokio::spawn(wsbroker::demo::serve_app(app_listener, stop.clone()));
    let (mut child, public, dir) = start_node(app);
    wait_listening(public).await;
    let direct = format!("ws://{app}");
    let broker = format!("ws://{public}");

    // Interleave direct and proxied runs so machine noise hits both alike.
    let (d_p50, d_p99) = round_trips(&format!("{direct}/"), s.round_trips).await;
    let (b_p50, b_p99) = round_trips(&format!("{broker}/?session=rtt"), s.round_trips).await;
    let d_tp = throughput(&direct, s.concurrent_clients, s.messages_per_client).await;
    let cpu_before = common::proc_stat(child.id()).0;
    let b_tp = throughput(&broker, s.concurrent_clients, s.messages_per_client).await;
    let cpu_per_msg_us = (common::proc_stat(child.id()).0 - cpu_before) * 1e6
        / (s.concurrent_clients * s.messages_per_client) as f64;

    let rss_before = common::proc_stat(child.id()).1;
    let mut idle = Vec::with_capacity(s.idle_sessions);
    for i in 0..s.idle_sessions {
        let mut ws = connect(&format!("{broker}/?session=idle{i}")).await;
        ws.send(Message::text("hello")).await.expect("send");
        let _ = ws.next().await;
        idle.push(ws);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_after = common::proc_stat(child.id()).1;
    let per_session = (rss_after.saturating_sub(rss_before)) as f64 / s.idle_sessions as f64;

    println!("wsbroker load benchmark (single node, memory registry)");
    println!(
        "{:<44} {:>14} {:>14} {:>8}",
        "", "direct", "wsbroker", "ratio"
    );
    println!(
        "{:<44} {:>11.1} us {:>11.1} us {:>8.2}",
        format!("echo round trip p50 ({} sequential)", s.round_trips),
        d_p50.as_secs_f64() * 1e6,
        b_p50.as_secs_f64() * 1e6,
        b_p50.as_secs_f64() / d_p50.as_secs_f64()
    );
    println!(
        "{:<44} {:>11.1} us {:>11.1} us {:>8.2}",
        "echo round trip p99",
        d_p99.as_secs_f64() * 1e6,
        b_p99.as_secs_f64() * 1e6,
        b_p99.as_secs_f64() / d_p99.as_secs_f64()
    );
    println!(
        "{:<44} {:>10.0} /s {:>10.0} /s {:>8.2}",
        format!("echo msgs/s ({} clients)", s.concurrent_clients),
        d_tp,
        b_tp,
        b_tp / d_tp
    );
    println!(
        "{:<44} {:>14} {:>11.2} us",
        "proxy CPU per echoed message", "", cpu_per_msg_us
    );
    println!(
        "{:<44} {:>14} {:>10.1} KiB",
        format!("RSS per idle proxied session ({})", s.idle_sessions),
        "",
        per_session
    );
    drop(idle);
    let _ = child.kill();
    let _ = child.wait();
    stop.cancel();
    let _ = std::fs::remove_dir_all(dir);
}
