//! wsbroker against nginx and HAProxy (each set up as the WebSocket reverse
//! proxy its documentation describes) and against no proxy at all, with the
//! same clients, interleaved in rounds within one run.
//!
//! Run: `cargo bench --bench compare` (installs nginx and haproxy with
//! apt-get when missing; `-- --quick` for a seconds-long smoke). Prints one
//! table and writes `target/compare.json`.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use common::{free_port, proc_stat, Proc};

struct Settings {
    rounds: usize,
    rtt_clients: usize,
    rtt_messages: usize,
    tp_clients: usize,
    tp_messages: usize,
    tp_in_flight: usize,
    handshakes: usize,
    idle: usize,
}

/// A proxy under test.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    /// Processes whose CPU and memory count (nginx: master + workers).
    pids: Box<dyn Fn() -> Vec<u32>>,
    _procs: Vec<Proc>,
}

fn children_of(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        out.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    out
}

fn cpu_and_rss(pids: &[u32]) -> (f64, u64) {
    pids.iter()
        .map(|p| proc_stat(*p))
        .fold((0.0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

fn ensure_installed(bin: &str, package: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin"] {
        let p = Path::new(dir).join(bin);
        if p.exists() {
            return p;
        }
    }
    eprintln!("installing {package} with apt-get");
    let _ = Command::new("apt-get").args(["update", "-qq"]).status();
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends", package])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "could not install {package}");
    Path::new("/usr/sbin").join(bin)
}

fn start_wsbroker(dir: &Path, app: SocketAddr) -> Target {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let path = dir.join("wsbroker.toml");
    std::fs::write(
        &path,
        format!("[node]\nid = \"bench\"\nlisten = \"{addr}\"\n[upstream]\nservers = [\"ws://{app}\"]\n[log]\nlevel = \"error\"\n"),
    )
    .expect("config");
    let child = Command::new(env!("CARGO_BIN_EXE_wsbroker"))
        .args(["run", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .spawn()
        .expect("wsbroker");
    let pid = child.id();
    Target {
        name: "wsbroker",
        addr,
        pids: Box::new(move || vec![pid]),
        _procs: vec![Proc(child)],
    }
}

fn start_nginx(dir: &Path, app: SocketAddr) -> Target {
    let bin = ensure_installed("nginx", "nginx-light");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log error;\nworker_rlimit_nofile 20000;\n\
             events {{ worker_connections 19000; }}\n\
             http {{\n  access_log off;\n  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}\n\
               upstream app {{ server {app}; }}\n\
               server {{\n    listen {addr};\n    location / {{\n      proxy_pass http://app;\n      proxy_http_version 1.1;\n\
                     proxy_set_header Upgrade $http_upgrade;\n      proxy_set_header Connection $connection_upgrade;\n\
                     proxy_set_header Host $host;\n      proxy_read_timeout 1h;\n      proxy_send_timeout 1h;\n    }}\n  }}\n}}\n",
            d = dir.display()
        ),
    )
    .expect("nginx.conf");
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(dir)
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx");
    let pid = child.id();
    Target {
        name: "nginx",
        addr,
        pids: Box::new(move || children_of(pid)),
        _procs: vec![Proc(child)],
    }
}

fn start_haproxy(dir: &Path, app: SocketAddr) -> Target {
    let bin = ensure_installed("haproxy", "haproxy");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let conf = dir.join("haproxy.cfg");
    std::fs::write(
        &conf,
        format!(
            "global\n  maxconn 9000\n  nbthread 2\n\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n  timeout tunnel 1h\n\n\
             frontend fe\n  bind {addr}\n  default_backend be\n\nbackend be\n  server app {app}\n"
        ),
    )
    .expect("haproxy.cfg");
    let child = Command::new(bin)
        .arg("-f")
        .arg(&conf)
        .arg("-db")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("haproxy");
    let pid = child.id();
    Target {
        name: "haproxy",
        addr,
        pids: Box::new(move || vec![pid]),
        _procs: vec![Proc(child)],
    }
}

async fn connect(addr: SocketAddr, sid: &str) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    tokio_tungstenite::client_async(format!("ws://{addr}/?session={sid}"), stream)
        .await
        .expect("upgrade")
        .0
}

async fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "{addr} never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Default, Clone, serde::Serialize)]
struct Row {
    rtt_msgs_per_s: f64,
    rtt_p50_us: f64,
    rtt_p99_us: f64,
    tp_msgs_per_s: f64,
    tp_mb_per_s: f64,
    new_sessions_per_s: f64,
    cpu_us_per_msg: f64,
    cpu_us_per_session: f64,
    idle_kib_per_session: f64,
}

/// Many connections, each sending one small message and awaiting its echo.
async fn round_trip(addr: SocketAddr, s: &Settings, tag: &str) -> (f64, Vec<Duration>) {
    let started = Instant::now();
    let tasks: Vec<_> = (0..s.rtt_clients)
        .map(|c| {
            let sid = format!("rt-{tag}-{c}");
            let n = s.rtt_messages;
            tokio::spawn(async move {
                let mut ws = connect(addr, &sid).await;
                let mut lat = Vec::with_capacity(n);
                for i in 0..n {
                    let t = Instant::now();
                    ws.send(Message::text(format!("m{i}"))).await.expect("send");
                    let _ = ws.next().await.expect("echo").expect("message");
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client"));
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    all.sort();
    (rate, all)
}

/// Pipelined 1 KiB messages, several in flight per connection.
async fn throughput(addr: SocketAddr, s: &Settings, tag: &str) -> f64 {
    let started = Instant::now();
    let tasks: Vec<_> = (0..s.tp_clients)
        .map(|c| {
            let sid = format!("tp-{tag}-{c}");
            let (n, window) = (s.tp_messages, s.tp_in_flight);
            tokio::spawn(async move {
                let ws = connect(addr, &sid).await;
                let (mut tx, mut rx) = ws.split();
                let sem = Arc::new(tokio::sync::Semaphore::new(window));
                let s2 = sem.clone();
                let sender = tokio::spawn(async move {
                    let payload = vec![7u8; 1024];
                    for _ in 0..n {
                        s2.acquire().await.expect("permit").forget();
                        tx.send(Message::binary(payload.clone()))
                            .await
                            .expect("send");
                    }
                    tx
                });
                for _ in 0..n {
                    let _ = rx.next().await.expect("echo").expect("message");
                    sem.add_permits(1);
                }
                let _ = sender.await;
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("client");
    }
    (s.tp_clients * s.tp_messages) as f64 / started.elapsed().as_secs_f64()
}

/// New sessions per second, 16 in parallel.
async fn new_sessions(addr: SocketAddr, s: &Settings, tag: &str) -> f64 {
    let parallel = 16;
    let per = s.handshakes / parallel;
    let started = Instant::now();
    let tasks: Vec<_> = (0..parallel)
        .map(|w| {
            let tag = tag.to_string();
            tokio::spawn(async move {
                for i in 0..per {
                    let mut ws = connect(addr, &format!("hs-{tag}-{w}-{i}")).await;
                    let _ = ws.close(None).await;
                    while let Some(Ok(_)) = ws.next().await {}
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("worker");
    }
    (per * parallel) as f64 / started.elapsed().as_secs_f64()
}

async fn measure(t: &Target, s: &Settings, round: usize) -> Row {
    let pids = (t.pids)();
    let tag = format!("{}-{round}", t.name);
    let (cpu0, _) = cpu_and_rss(&pids);
    let (rtt_rate, lat) = round_trip(t.addr, s, &tag).await;
    let tp = throughput(t.addr, s, &tag).await;
    let (cpu1, _) = cpu_and_rss(&pids);
    let msgs = (s.rtt_clients * s.rtt_messages + s.tp_clients * s.tp_messages) as f64;
    let hs = new_sessions(t.addr, s, &tag).await;
    let (cpu2, _) = cpu_and_rss(&pids);
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1e6;
    Row {
        rtt_msgs_per_s: rtt_rate,
        rtt_p50_us: pct(0.50),
        rtt_p99_us: pct(0.99),
        tp_msgs_per_s: tp,
        tp_mb_per_s: tp * 1024.0 / 1e6,
        new_sessions_per_s: hs,
        cpu_us_per_msg: (cpu1 - cpu0) * 1e6 / msgs,
        cpu_us_per_session: (cpu2 - cpu1) * 1e6 / (s.handshakes / 16 * 16) as f64,
        idle_kib_per_session: 0.0,
    }
}

async fn idle_memory(t: &Target, n: usize) -> f64 {
    let pids = (t.pids)();
    let (_, before) = cpu_and_rss(&pids);
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let mut ws = connect(t.addr, &format!("idle-{}-{i}", t.name)).await;
        ws.send(Message::text("hi")).await.expect("send");
        let _ = ws.next().await;
        held.push(ws);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, after) = cpu_and_rss(&(t.pids)());
    drop(held);
    after.saturating_sub(before) as f64 / n as f64
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let s = if quick {
        Settings {
            rounds: 1,
            rtt_clients: 8,
            rtt_messages: 50,
            tp_clients: 4,
            tp_messages: 200,
            tp_in_flight: 8,
            handshakes: 64,
            idle: 100,
        }
    } else {
        Settings {
            rounds: 3,
            rtt_clients: 64,
            rtt_messages: 300,
            tp_clients: 16,
            tp_messages: 3000,
            tp_in_flight: 8,
            handshakes: 2000,
            idle: 5000,
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(s));
}

async fn run(s: Settings) {
    let dir = std::env::temp_dir().join(format!("wsbroker-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let stop = CancellationToken::new();
    let app_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let app = app_listener.local_addr().expect("addr");
    tokio::spawn(wsbroker::demo::serve_app(app_listener, stop.clone()));
    let direct = Target {
        name: "direct",
        addr: app,
        pids: Box::new(Vec::new),
        _procs: Vec::new(),
    };
    let targets = vec![
        direct,
        start_wsbroker(&dir, app),
        start_nginx(&dir, app),
        start_haproxy(&dir, app),
    ];
    for t in &targets {
        wait_listening(t.addr).await;
    }
    let mut rows: Vec<Vec<Row>> = vec![Vec::new(); targets.len()];
    for round in 0..s.rounds {
        for (i, t) in targets.iter().enumerate() {
            rows[i].push(measure(t, &s, round).await);
        }
    }
    let mut results = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        let pick = |f: fn(&Row) -> f64| median(&mut rows[i].iter().map(f).collect::<Vec<_>>());
        let mut row = Row {
            rtt_msgs_per_s: pick(|r| r.rtt_msgs_per_s),
            rtt_p50_us: pick(|r| r.rtt_p50_us),
            rtt_p99_us: pick(|r| r.rtt_p99_us),
            tp_msgs_per_s: pick(|r| r.tp_msgs_per_s),
            tp_mb_per_s: pick(|r| r.tp_mb_per_s),
            new_sessions_per_s: pick(|r| r.new_sessions_per_s),
            cpu_us_per_msg: pick(|r| r.cpu_us_per_msg),
            cpu_us_per_session: pick(|r| r.cpu_us_per_session),
            idle_kib_per_session: 0.0,
        };
        if t.name != "direct" {
            row.idle_kib_per_session = idle_memory(t, s.idle).await;
        }
        results.push((t.name, row));
    }
    println!(
        "{:<10} {:>12} {:>9} {:>9} {:>12} {:>8} {:>11} {:>10} {:>11} {:>10}",
        "target",
        "rtt msg/s",
        "p50 us",
        "p99 us",
        "tp msg/s",
        "MB/s",
        "sessions/s",
        "cpu us/msg",
        "cpu us/sess",
        "idle KiB"
    );
    for (name, r) in &results {
        println!(
            "{:<10} {:>12.0} {:>9.1} {:>9.1} {:>12.0} {:>8.1} {:>11.0} {:>10.2} {:>11.1} {:>10.1}",
            name,
            r.rtt_msgs_per_s,
            r.rtt_p50_us,
            r.rtt_p99_us,
            r.tp_msgs_per_s,
            r.tp_mb_per_s,
            r.new_sessions_per_s,
            r.cpu_us_per_msg,
            r.cpu_us_per_session,
            r.idle_kib_per_session
        );
    }
    let find = |n: &str| {
        results
            .iter()
            .find(|(name, _)| *name == n)
            .map(|(_, r)| r.clone())
            .unwrap_or_default()
    };
    let (w, ng, hp) = (find("wsbroker"), find("nginx"), find("haproxy"));
    println!("\nratios (wsbroker / other):");
    println!(
        "  round-trip msg/s vs nginx   {:.2}   p99 vs nginx {:.2}",
        w.rtt_msgs_per_s / ng.rtt_msgs_per_s,
        w.rtt_p99_us / ng.rtt_p99_us
    );
    println!(
        "  throughput msg/s vs haproxy {:.2}",
        w.tp_msgs_per_s / hp.tp_msgs_per_s
    );
    println!(
        "  cpu per message vs haproxy  {:.2}   cpu per session vs nginx {:.2}",
        w.cpu_us_per_msg / hp.cpu_us_per_msg,
        w.cpu_us_per_session / ng.cpu_us_per_session
    );
    println!(
        "  idle memory vs haproxy      {:.2}",
        w.idle_kib_per_session / hp.idle_kib_per_session
    );
    let json: Vec<_> = results
        .iter()
        .map(|(n, r)| serde_json::json!({"target": n, "result": r}))
        .collect();
    let _ = std::fs::write(
        "target/compare.json",
        serde_json::to_string_pretty(&json).unwrap_or_default(),
    );
    // nginx's workers outlive a killed master: end every process we started.
    for t in &targets {
        for pid in (t.pids)() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
    stop.cancel();
    let _ = std::fs::remove_dir_all(&dir);
}
