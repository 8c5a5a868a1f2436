//! wsbroker against nginx and HAProxy (each set up as the WebSocket reverse
//! proxy its documentation describes) and against no proxy at all, with the
//! same clients, interleaved in rounds within one run. Besides the single
//! node on the memory registry it drives a three-node cluster on Valkey:
//! new sessions on the registry, and the forwarding hop (client on a
//! non-owner node) against nginx placed in front of wsbroker.
//!
//! Run: `cargo bench --bench compare` (installs nginx and haproxy with
//! apt-get when missing, needs Valkey as `scripts/find-valkey` finds it;
//! `-- --quick` for a seconds-long smoke). Prints one table and writes
//! `target/compare.json`. `WSBROKER_BENCH_WRAP="valgrind --tool=callgrind"`
//! runs the single wsbroker node under a profiler;
//! `WSBROKER_BENCH_WORKERS=N` sets the wsbroker nodes' worker threads;
//! `-- --only wsbroker,nginx` measures only the targets named, and
//! `-- --phases messages,sessions,idle` only the phases named.
//! `WSBROKER_BENCH_SPLIT=1` prints, per phase and round, where the two
//! cores' time went (proxy, clients and upstream, idle) and the proxy's
//! context switches. `WSBROKER_BENCH_ALT_WRAP="env VAR=value"` adds a
//! second single node, `wsbroker-alt`, started through that wrapper, for
//! an A/B comparison within one run.

mod common;
#[path = "common/floor_relay.rs"]
mod floor_relay;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use common::{free_port, proc_stat, spawn_valkey, Proc};

struct Settings {
    rounds: usize,
    rtt_clients: usize,
    rtt_messages: usize,
    tp_clients: usize,
    tp_messages: usize,
    tp_in_flight: usize,
    handshakes: usize,
    parallel: usize,
    idle: usize,
}

/// What is measured on a target.
#[derive(Clone, Copy)]
struct Phases {
    messages: bool,
    sessions: bool,
    idle: bool,
}

const ALL: Phases = Phases {
    messages: true,
    sessions: true,
    idle: true,
};

/// A proxy (or proxy chain) under test.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    /// Sessions are first opened here, then used through `addr` (the
    /// forwarding hop: `owner` owns them, `addr` is another node).
    owner: Option<SocketAddr>,
    /// Processes whose CPU and memory count (nginx: master + workers).
    pids: Box<dyn Fn() -> Vec<u32>>,
    phases: Phases,
    _procs: Vec<Proc>,
}

impl Drop for Target {
    // nginx's workers outlive a killed master: end every process started.
    // nginx and HAProxy lead process groups of their own (see `own_group`),
    // so a worker forked while this runs goes too.
    fn drop(&mut self) {
        let mut own: Vec<String> = Vec::new();
        for p in &self._procs {
            let pid = p.0.id();
            if leads_its_group(pid) {
                own.push(format!("-{pid}"));
            }
            own.extend(children_of(pid).iter().map(u32::to_string));
        }
        for target in own {
            let _ = Command::new("kill")
                .args(["-9", "--", &target])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Whether `pid` leads its process group (one this benchmark created).
fn leads_its_group(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name: state, ppid, pgrp, ...
    let pgrp = stat
        .rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().nth(2))
        .and_then(|v| v.parse::<u32>().ok());
    pgrp == Some(pid)
}

/// Starts `cmd` leading a process group of its own.
fn own_group(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0)
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

/// CPU seconds and RSS (KiB) of `pids`. CPU comes from each thread's
/// `schedstat` (nanoseconds on the CPU) when the kernel has it, since
/// `/proc/PID/stat` counts in 10 ms ticks (1.7 µs per session over a
/// phase's 6,000 sessions); the threads measured live for the whole run.
fn cpu_and_rss(pids: &[u32]) -> (f64, u64) {
    pids.iter()
        .map(|p| {
            let (ticks, rss) = proc_stat(*p);
            (precise_cpu(*p).unwrap_or(ticks), rss)
        })
        .fold((0.0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

fn precise_cpu(pid: u32) -> Option<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        ns += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 / 1e9)
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

fn loopback() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().expect("addr")
}

/// A wsbroker node; `cluster` adds the `[cluster]`/`[valkey]` sections.
fn spawn_wsbroker(
    dir: &Path,
    id: &str,
    app: SocketAddr,
    cluster: &str,
    wrap: &str,
) -> (Proc, SocketAddr) {
    let addr = loopback();
    let path = dir.join(format!("{id}.toml"));
    std::fs::write(
        &path,
        format!("[node]\nid = \"{id}\"\nlisten = \"{addr}\"\n[upstream]\nservers = [\"ws://{app}\"]\n[log]\nlevel = \"error\"\n{cluster}"),
    )
    .expect("config");
    // `wrap`: the variable naming a wrapper command ("": none).
    let wrapper = match wrap {
        "" => String::new(),
        var => std::env::var(var).unwrap_or_default(),
    };
    let mut words = wrapper.split_whitespace();
    let mut cmd = match words.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(words).arg(env!("CARGO_BIN_EXE_wsbroker"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_wsbroker")),
    };
    if let Ok(n) = std::env::var("WSBROKER_BENCH_WORKERS") {
        cmd.env("TOKIO_WORKER_THREADS", n);
    }
    let child = cmd
        .args(["run", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .spawn()
        .expect("wsbroker");
    (Proc(child), addr)
}

fn start_wsbroker(dir: &Path, app: SocketAddr, name: &'static str, wrap: &str) -> Target {
    let (proc_, addr) = spawn_wsbroker(dir, name, app, "", wrap);
    let pid = proc_.0.id();
    Target {
        name,
        addr,
        owner: None,
        pids: Box::new(move || children_of(pid)),
        phases: ALL,
        _procs: vec![proc_],
    }
}

/// A Valkey server and three wsbroker nodes on it: the node `valkey`
/// (sessions created on it) and `hop` (client on node b, owner node a).
fn start_cluster(dir: &Path, app: SocketAddr) -> (Target, Target) {
    let (valkey, vport) = spawn_valkey(dir);
    let vpid = valkey.0.id();
    let cluster = format!(
        "[cluster]\nregistry = \"valkey\"\nsecret = \"bench-secret\"\nheartbeat_interval = \"500ms\"\nstale_ttl = \"3s\"\n[valkey]\nurl = \"redis://127.0.0.1:{vport}/0\"\n"
    );
    let (a, a_addr) = spawn_wsbroker(dir, "a", app, &cluster, "");
    let (b, b_addr) = spawn_wsbroker(dir, "b", app, &cluster, "");
    let (c, _) = spawn_wsbroker(dir, "c", app, &cluster, "");
    let (apid, bpid) = (a.0.id(), b.0.id());
    let on_registry = Target {
        name: "wsbroker-valkey",
        addr: a_addr,
        owner: None,
        pids: Box::new(move || vec![apid, vpid]),
        phases: Phases {
            messages: false,
            sessions: true,
            idle: false,
        },
        _procs: vec![valkey, a, c],
    };
    let hop = Target {
        name: "wsbroker-hop",
        addr: b_addr,
        owner: Some(a_addr),
        pids: Box::new(move || vec![apid, bpid]),
        phases: Phases {
            messages: true,
            sessions: false,
            idle: false,
        },
        _procs: vec![b],
    };
    (on_registry, hop)
}

fn start_nginx(dir: &Path, name: &'static str, upstream: SocketAddr, extra: Option<u32>) -> Target {
    let bin = ensure_installed("nginx", "nginx-light");
    let addr = loopback();
    let sub = dir.join(name);
    std::fs::create_dir_all(&sub).expect("nginx dir");
    let conf = sub.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log error;\nworker_rlimit_nofile 20000;\n\
             events {{ worker_connections 19000; }}\n\
             http {{\n  access_log off;\n  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}\n\
               upstream app {{ server {upstream}; }}\n\
               server {{\n    listen {addr};\n    location / {{\n      proxy_pass http://app;\n      proxy_http_version 1.1;\n\
                     proxy_set_header Upgrade $http_upgrade;\n      proxy_set_header Connection $connection_upgrade;\n\
                     proxy_set_header Host $host;\n      proxy_read_timeout 1h;\n      proxy_send_timeout 1h;\n    }}\n  }}\n}}\n",
            d = sub.display()
        ),
    )
    .expect("nginx.conf");
    let child = own_group(&mut Command::new(bin))
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(&sub)
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx");
    let pid = child.id();
    Target {
        name,
        addr,
        owner: None,
        pids: Box::new(move || {
            let mut p = children_of(pid);
            p.extend(extra);
            p
        }),
        phases: if extra.is_some() {
            Phases {
                messages: true,
                sessions: false,
                idle: false,
            }
        } else {
            ALL
        },
        _procs: vec![Proc(child)],
    }
}

fn start_haproxy(dir: &Path, app: SocketAddr) -> Target {
    let bin = ensure_installed("haproxy", "haproxy");
    let addr = loopback();
    let conf = dir.join("haproxy.cfg");
    std::fs::write(
        &conf,
        format!(
            "global\n  maxconn 9800\n  nbthread 2\n\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n  timeout tunnel 1h\n\n\
             frontend fe\n  bind {addr}\n  default_backend be\n\nbackend be\n  server app {app}\n"
        ),
    )
    .expect("haproxy.cfg");
    let child = own_group(&mut Command::new(bin))
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
        owner: None,
        pids: Box::new(move || vec![pid]),
        phases: ALL,
        _procs: vec![Proc(child)],
    }
}

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

async fn connect(addr: SocketAddr, sid: &str) -> Ws {
    let sid = sid.replace('+', "-");
    let stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    tokio_tungstenite::client_async(format!("ws://{addr}/?session={sid}"), stream)
        .await
        .expect("upgrade")
        .0
}

/// A session for `t`: on the hop target it is created on the owner first
/// (the client then drops without a Close, and resumes through `addr`).
async fn open(t: &Target, sid: &str) -> Ws {
    if let Some(owner) = t.owner {
        let mut first = connect(owner, sid).await;
        first.send(Message::text("own")).await.expect("send");
        let _ = first.next().await;
    }
    connect(t.addr, sid).await
}

async fn close(mut ws: Ws) {
    let _ = ws.close(None).await;
    while let Some(Ok(_)) = ws.next().await {}
}

async fn wait_ready(t: &Target) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let probe = format!("ready-{}-{}", t.name.replace('+', "-"), fastrand::u64(..));
    loop {
        let attempt = async {
            let stream = TcpStream::connect(t.addr).await.ok()?;
            tokio_tungstenite::client_async(format!("ws://{}/?session={probe}", t.addr), stream)
                .await
                .ok()
        };
        if let Ok(Some((ws, _))) = tokio::time::timeout(Duration::from_secs(2), attempt).await {
            close(ws).await;
            return;
        }
        if Instant::now() >= deadline {
            // Say which of its processes are gone (a port taken between
            // picking and binding it makes a process exit at once).
            let gone: Vec<u32> = (t.pids)()
                .into_iter()
                .filter(|p| {
                    // Gone, or a zombie not reaped yet.
                    std::fs::read_to_string(format!("/proc/{p}/stat"))
                        .map(|st| {
                            st.rsplit(')')
                                .next()
                                .unwrap_or("")
                                .trim_start()
                                .starts_with('Z')
                        })
                        .unwrap_or(true)
                })
                .collect();
            panic!(
                "{} never became ready at {}; processes exited: {gone:?}",
                t.name, t.addr
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
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
    reattach_per_s: f64,
    cpu_us_per_msg: f64,
    cpu_us_per_session: f64,
    idle_kib_per_session: f64,
}

/// Many connections, each sending one small message and awaiting its echo.
async fn round_trip(t: &Target, s: &Settings, tag: &str) -> (f64, Vec<Duration>) {
    let mut conns = Vec::with_capacity(s.rtt_clients);
    for c in 0..s.rtt_clients {
        conns.push(open(t, &format!("rt-{tag}-{c}")).await);
    }
    let started = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut ws| {
            let n = s.rtt_messages;
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(n);
                for i in 0..n {
                    let t = Instant::now();
                    ws.send(Message::text(format!("m{i}"))).await.expect("send");
                    let _ = ws.next().await.expect("echo").expect("message");
                    lat.push(t.elapsed());
                }
                (lat, ws)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut done = Vec::new();
    for task in tasks {
        let (lat, ws) = task.await.expect("client");
        all.extend(lat);
        done.push(ws);
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    for ws in done {
        close(ws).await;
    }
    all.sort();
    (rate, all)
}

/// Pipelined 1 KiB messages, several in flight per connection.
async fn throughput(t: &Target, s: &Settings, tag: &str) -> f64 {
    let mut conns = Vec::with_capacity(s.tp_clients);
    for c in 0..s.tp_clients {
        conns.push(open(t, &format!("tp-{tag}-{c}")).await);
    }
    let started = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|ws| {
            let (n, window) = (s.tp_messages, s.tp_in_flight);
            tokio::spawn(async move {
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
                let tx = sender.await.expect("sender");
                tx.reunite(rx).expect("halves of one stream")
            })
        })
        .collect();
    let mut done = Vec::new();
    for task in tasks {
        done.push(task.await.expect("client"));
    }
    let rate = (s.tp_clients * s.tp_messages) as f64 / started.elapsed().as_secs_f64();
    for ws in done {
        close(ws).await;
    }
    rate
}

/// Upgrades per second, `parallel` at a time. `reattach`: every worker
/// reuses one session id and drops its connection without a Close (the
/// session waits for it to resume); otherwise each upgrade is a new
/// session, closed normally.
async fn upgrades(t: &Target, s: &Settings, tag: &str, reattach: bool) -> f64 {
    let per = s.handshakes / s.parallel;
    let addr = t.addr;
    let started = Instant::now();
    let tasks: Vec<_> = (0..s.parallel)
        .map(|w| {
            let tag = tag.to_string();
            tokio::spawn(async move {
                for i in 0..per {
                    let sid = if reattach {
                        format!("re-{tag}-{w}")
                    } else {
                        format!("hs-{tag}-{w}-{i}")
                    };
                    let ws = connect(addr, &sid).await;
                    if reattach && i + 1 < per {
                        drop(ws);
                    } else {
                        close(ws).await;
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("worker");
    }
    (per * s.parallel) as f64 / started.elapsed().as_secs_f64()
}

async fn measure(t: &Target, s: &Settings, round: usize) -> Row {
    let pids = (t.pids)();
    let tag = format!("{}-{round}", t.name);
    let mut row = Row::default();
    if t.phases.messages {
        let (cpu0, _) = cpu_and_rss(&pids);
        let split = Split::now(&pids);
        let (rtt_rate, lat) = round_trip(t, s, &tag).await;
        split.print(t.name, "rtt", &pids, s.rtt_clients * s.rtt_messages);
        let split = Split::now(&pids);
        let tp = throughput(t, s, &tag).await;
        split.print(t.name, "tp", &pids, s.tp_clients * s.tp_messages);
        let (cpu1, _) = cpu_and_rss(&pids);
        let msgs = (s.rtt_clients * s.rtt_messages + s.tp_clients * s.tp_messages) as f64;
        let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1e6;
        row.rtt_msgs_per_s = rtt_rate;
        row.rtt_p50_us = pct(0.50);
        row.rtt_p99_us = pct(0.99);
        row.tp_msgs_per_s = tp;
        row.tp_mb_per_s = tp * 1024.0 / 1e6;
        row.cpu_us_per_msg = (cpu1 - cpu0) * 1e6 / msgs;
    }
    if t.phases.sessions {
        let (cpu0, _) = cpu_and_rss(&pids);
        let split = Split::now(&pids);
        row.new_sessions_per_s = upgrades(t, s, &tag, false).await;
        let units = s.handshakes / s.parallel * s.parallel;
        split.print(t.name, "new", &pids, units);
        let (cpu1, _) = cpu_and_rss(&pids);
        row.reattach_per_s = upgrades(t, s, &tag, true).await;
        row.cpu_us_per_session = (cpu1 - cpu0) * 1e6 / units as f64;
    }
    row
}

/// RSS growth of the proxy per idle proxied session (each has exchanged
/// one message), `n` sessions.
async fn idle_memory(t: &Target, n: usize) -> f64 {
    let (_, before) = cpu_and_rss(&(t.pids)());
    let parallel = 16;
    let tasks: Vec<_> = (0..parallel)
        .map(|w| {
            let (addr, name) = (t.addr, t.name);
            tokio::spawn(async move {
                let mut held = Vec::new();
                for i in (w..n).step_by(parallel) {
                    let mut ws = connect(addr, &format!("idle-{name}-{i}")).await;
                    ws.send(Message::text("hi")).await.expect("send");
                    let _ = ws.next().await;
                    held.push(ws);
                }
                held
            })
        })
        .collect();
    let mut held = Vec::with_capacity(n);
    for task in tasks {
        held.extend(task.await.expect("idle client"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, after) = cpu_and_rss(&(t.pids)());
    for ws in held {
        close(ws).await;
    }
    after.saturating_sub(before) as f64 / n as f64
}

/// Context switches (voluntary and not) of every thread of `pids`.
fn ctx_switches(pids: &[u32]) -> f64 {
    let mut n = 0.0;
    for p in pids {
        let Ok(threads) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in threads.flatten() {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            n += status
                .lines()
                .filter(|l| l.contains("ctxt_switches"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
                .sum::<f64>();
        }
    }
    n
}

/// Where the machine's time goes during a phase: the proxy's CPU, this
/// process's (clients and echo upstream), idle CPU, and the proxy's
/// context switches (printed per unit with `WSBROKER_BENCH_SPLIT=1`;
/// without it nothing is read).
struct Split(Option<Snapshot>);

struct Snapshot {
    proxy: f64,
    bench: f64,
    idle: f64,
    switches: f64,
    at: Instant,
}

impl Split {
    fn now(pids: &[u32]) -> Split {
        Split(std::env::var_os("WSBROKER_BENCH_SPLIT").map(|_| Snapshot::now(pids)))
    }

    /// Prints the phase since `self`, per unit (message or session).
    fn print(&self, name: &str, phase: &str, pids: &[u32], units: usize) {
        let Some(start) = &self.0 else {
            return;
        };
        let end = Snapshot::now(pids);
        let per = |a: f64, b: f64| (b - a) * 1e6 / units as f64;
        eprintln!(
            "{name:>16} {phase:>3}: proxy {:7.2} us, clients+upstream {:7.2} us, idle {:6.2} us, 2 cores x wall {:7.2} us, proxy context switches {:5.2} per unit",
            per(start.proxy, end.proxy),
            per(start.bench, end.bench),
            per(start.idle, end.idle),
            end.at.duration_since(start.at).as_secs_f64() * 2e6 / units as f64,
            (end.switches - start.switches) / units as f64,
        );
    }
}

impl Snapshot {
    fn now(pids: &[u32]) -> Snapshot {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let ticks: Vec<f64> = stat
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        // idle + iowait, in USER_HZ (100 per second) ticks.
        let idle = (ticks.get(3).unwrap_or(&0.0) + ticks.get(4).unwrap_or(&0.0)) / 100.0;
        Snapshot {
            proxy: cpu_and_rss(pids).0,
            bench: proc_stat(std::process::id()).0,
            idle,
            switches: ctx_switches(pids),
            at: Instant::now(),
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// Raises this process's open-file limit to its hard limit (children
/// inherit it): the idle run holds two descriptors per session here.
fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        lim.rlim_cur = lim.rlim_max;
        let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        lim.rlim_cur
    }
}

/// Set (to `LISTEN,UPSTREAM`) when this executable is started as the floor
/// relay.
const FLOOR_ENV: &str = "WSBROKER_BENCH_FLOOR";

/// The floor relay (see `floor_relay.rs`): this executable started again in
/// relay mode, as a process of its own so its CPU and memory are measured
/// like the other proxies'.
fn start_floor(app: SocketAddr) -> Target {
    let addr = loopback();
    let exe = std::env::current_exe().expect("own executable");
    let child = Command::new(exe)
        .env(FLOOR_ENV, format!("{addr},{app}"))
        .stdout(Stdio::null())
        .spawn()
        .expect("floor relay");
    let pid = child.id();
    Target {
        name: "floor",
        addr,
        owner: None,
        pids: Box::new(move || vec![pid]),
        phases: Phases {
            messages: true,
            sessions: true,
            idle: false,
        },
        _procs: vec![Proc(child)],
    }
}

fn main() {
    if let Ok(spec) = std::env::var(FLOOR_ENV) {
        let mut addrs = spec.split(',').map(|a| a.parse().expect("floor address"));
        let (listen, upstream) = (
            addrs.next().expect("listen"),
            addrs.next().expect("upstream"),
        );
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        floor_relay::run(listen, upstream, cpus);
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let fds = raise_fd_limit();
    // Each idle session holds two descriptors in the proxy (and two here):
    // the largest round number of sessions that fits the limit.
    let idle_max = ((fds.saturating_sub(400) / 2) / 500 * 500) as usize;
    let s = if quick {
        Settings {
            rounds: 1,
            rtt_clients: 8,
            rtt_messages: 50,
            tp_clients: 4,
            tp_messages: 200,
            tp_in_flight: 8,
            handshakes: 64,
            parallel: 16,
            idle: 100.min(idle_max),
        }
    } else {
        Settings {
            rounds: 5,
            rtt_clients: 64,
            rtt_messages: 300,
            tp_clients: 16,
            tp_messages: 3000,
            tp_in_flight: 8,
            handshakes: 6000,
            parallel: 16,
            idle: 10_000.min(idle_max),
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(s, fds));
}

async fn run(s: Settings, fds: u64) {
    let dir = std::env::temp_dir().join(format!("wsbroker-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let stop = CancellationToken::new();
    let app_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let app = app_listener.local_addr().expect("addr");
    tokio::spawn(wsbroker::demo::serve_app(app_listener, stop.clone()));
    let direct = Target {
        name: "direct",
        addr: app,
        owner: None,
        pids: Box::new(Vec::new),
        phases: Phases {
            messages: true,
            sessions: true,
            idle: false,
        },
        _procs: Vec::new(),
    };
    let single = start_wsbroker(&dir, app, "wsbroker", "WSBROKER_BENCH_WRAP");
    let (single_pid, single_addr) = (single._procs[0].0.id(), single.addr);
    let (on_registry, hop) = start_cluster(&dir, app);
    let mut targets = vec![
        direct,
        single,
        start_nginx(&dir, "nginx", app, None),
        start_haproxy(&dir, app),
        on_registry,
        start_nginx(&dir, "nginx+wsbroker", single_addr, Some(single_pid)),
        hop,
        start_floor(app),
    ];
    if std::env::var_os("WSBROKER_BENCH_ALT_WRAP").is_some() {
        targets.push(start_wsbroker(
            &dir,
            app,
            "wsbroker-alt",
            "WSBROKER_BENCH_ALT_WRAP",
        ));
    }
    let only: Option<Vec<String>> = std::env::args()
        .skip_while(|a| a != "--only")
        .nth(1)
        .map(|list| list.split(',').map(str::to_string).collect());
    let phases: Option<String> = std::env::args().skip_while(|a| a != "--phases").nth(1);
    // Targets left out stay up (unmeasured): nginx+wsbroker relays to the
    // single node, the hop to node a.
    let (targets, _left_out): (Vec<Target>, Vec<Target>) = targets
        .into_iter()
        .partition(|t| only.as_ref().is_none_or(|o| o.iter().any(|n| n == t.name)));
    let targets: Vec<Target> = targets
        .into_iter()
        .map(|mut t| {
            if let Some(p) = &phases {
                t.phases.messages &= p.contains("messages");
                t.phases.sessions &= p.contains("sessions");
                t.phases.idle &= p.contains("idle");
            }
            t
        })
        .collect();
    for t in &targets {
        wait_ready(t).await;
    }
    let mut rows: Vec<Vec<Row>> = vec![Vec::new(); targets.len()];
    // Each round starts one target further along, so no target always
    // runs first or always follows the same neighbour.
    for round in 0..s.rounds {
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            rows[i].push(measure(&targets[i], &s, round).await);
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
            reattach_per_s: pick(|r| r.reattach_per_s),
            cpu_us_per_msg: pick(|r| r.cpu_us_per_msg),
            cpu_us_per_session: pick(|r| r.cpu_us_per_session),
            idle_kib_per_session: 0.0,
        };
        if t.phases.idle {
            row.idle_kib_per_session = idle_memory(t, s.idle).await;
        }
        results.push((t.name, row));
    }
    print_table(&results, &s, fds);
    let json: Vec<_> = results
        .iter()
        .map(|(n, r)| serde_json::json!({"target": n, "result": r}))
        .collect();
    let _ = std::fs::write(
        "target/compare.json",
        serde_json::to_string_pretty(&json).unwrap_or_default(),
    );
    drop(targets);
    stop.cancel();
    let _ = std::fs::remove_dir_all(&dir);
}

fn print_table(results: &[(&str, Row)], s: &Settings, fds: u64) {
    let blank = |v: f64, prec: usize| {
        if v == 0.0 {
            "–".to_string()
        } else {
            format!("{v:.prec$}")
        }
    };
    println!(
        "\n| target | rtt msg/s | p50 us | p99 us | tp msg/s | MB/s | new sessions/s | re-attach/s | CPU us/msg | CPU us/session | idle KiB/session ({}) |",
        s.idle
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (name, r) in results {
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            blank(r.rtt_msgs_per_s, 0),
            blank(r.rtt_p50_us, 1),
            blank(r.rtt_p99_us, 1),
            blank(r.tp_msgs_per_s, 0),
            blank(r.tp_mb_per_s, 1),
            blank(r.new_sessions_per_s, 0),
            blank(r.reattach_per_s, 0),
            blank(r.cpu_us_per_msg, 2),
            blank(r.cpu_us_per_session, 1),
            blank(r.idle_kib_per_session, 1),
        );
    }
    let find = |n: &str| {
        results
            .iter()
            .find(|(name, _)| *name == n)
            .map(|(_, r)| r.clone())
            .unwrap_or_default()
    };
    let floor = find("floor");
    let (w, ng, hp, vk, hop, chain) = (
        find("wsbroker"),
        find("nginx"),
        find("haproxy"),
        find("wsbroker-valkey"),
        find("wsbroker-hop"),
        find("nginx+wsbroker"),
    );
    let check = |label: &str, ratio: f64, target: &str, met: bool| {
        if !ratio.is_finite() || ratio == 0.0 {
            // A target left out with --only.
            println!("  {label:<46}   n/a");
            return;
        }
        println!(
            "  {label:<46} {ratio:>5.2}   target {target:<6} {}",
            if met { "met" } else { "MISSED" }
        );
    };
    println!("\nratios in this run (open-file limit {fds}):");
    let r = w.rtt_msgs_per_s / ng.rtt_msgs_per_s;
    check("round-trip msg/s, wsbroker / nginx", r, ">= 1.1", r >= 1.1);
    let r = w.rtt_p99_us / ng.rtt_p99_us;
    check("round-trip p99, wsbroker / nginx", r, "<= 1", r <= 1.0);
    let r = w.tp_msgs_per_s / hp.tp_msgs_per_s;
    check(
        "throughput msg/s, wsbroker / haproxy",
        r,
        ">= 1.1",
        r >= 1.1,
    );
    let r = w.cpu_us_per_msg / hp.cpu_us_per_msg;
    check("CPU per message, wsbroker / haproxy", r, "< 1", r < 1.0);
    let r = w.cpu_us_per_session / ng.cpu_us_per_session;
    check("CPU per new session, wsbroker / nginx", r, "< 1", r < 1.0);
    let r = vk.new_sessions_per_s / ng.new_sessions_per_s;
    check(
        "new sessions/s, wsbroker-valkey / nginx",
        r,
        ">= 0.8",
        r >= 0.8,
    );
    let r = w.idle_kib_per_session / hp.idle_kib_per_session;
    check(
        "idle memory per session, wsbroker / haproxy",
        r,
        "<= 1",
        r <= 1.0,
    );
    let r = hop.rtt_msgs_per_s / chain.rtt_msgs_per_s;
    check(
        "hop round-trip msg/s, hop / nginx+wsbroker",
        r,
        ">= 0.9",
        r >= 0.9,
    );
    // The floor is a yardstick, not a target: how far the same figures go
    // for a relay that does nothing but copy bytes.
    let yardstick = |label: &str, ratio: f64| {
        if ratio.is_finite() && ratio > 0.0 {
            println!("  {label:<46} {ratio:>5.2}");
        }
    };
    println!("\nthe floor (bare epoll byte relay, nginx's process model) in this run:");
    yardstick(
        "round-trip msg/s, floor / nginx",
        floor.rtt_msgs_per_s / ng.rtt_msgs_per_s,
    );
    yardstick(
        "throughput msg/s, floor / haproxy",
        floor.tp_msgs_per_s / hp.tp_msgs_per_s,
    );
    yardstick(
        "CPU per message, floor / haproxy",
        floor.cpu_us_per_msg / hp.cpu_us_per_msg,
    );
    yardstick(
        "CPU per new session, floor / nginx",
        floor.cpu_us_per_session / ng.cpu_us_per_session,
    );
}
