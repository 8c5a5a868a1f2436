//! Test harness: a scriptable upstream application, nodes started in
//! process (`server::start` on port 0) or as real processes, WebSocket and
//! raw HTTP clients, and polling with a deadline.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub mod sentinel;
pub mod valkey;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

pub type Ws = WebSocketStream<TcpStream>;

/// Polls `check` until it returns true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `value` stops growing (same reading for 1 s), at most 20 s.
pub async fn plateau(value: impl Fn() -> u64) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut last = value();
    let mut stable_since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = value();
        if now != last {
            last = now;
            stable_since = tokio::time::Instant::now();
        } else if stable_since.elapsed() >= Duration::from_secs(1) {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the flood never stalled: {now} bytes"
        );
    }
}

// ---------------------------------------------------------------- upstream

/// One upstream handshake as the application saw it.
#[derive(Debug, Clone)]
pub struct Handshake {
    pub path: String,
    pub headers: HashMap<String, String>,
}

impl Handshake {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// What the test upstream observed.
#[derive(Debug, Default)]
pub struct UpstreamLog {
    pub handshakes: Vec<Handshake>,
    /// Close frames received, by session id: (code, reason).
    pub closes: Vec<(String, u16, String)>,
    /// Connections that ended without a Close frame, by session id.
    pub aborted: Vec<String>,
    /// Data messages received, by session id.
    pub messages: Vec<(String, Message)>,
    /// Open connections per session id right now, and the most ever seen.
    pub open: HashMap<String, usize>,
    pub max_open: HashMap<String, usize>,
}

/// A scriptable upstream application. Every data message is echoed, except
/// text commands:
/// - `close CODE REASON`: the upstream closes with that code;
/// - `later MS N`: after MS milliseconds, send `msg-0` .. `msg-(N-1)`;
/// - `flood N SIZE`: send N binary messages of SIZE bytes;
/// - `stall`: stop reading (to test backpressure towards the upstream);
/// - `drop`: drop the TCP connection without a Close frame.
pub struct TestUpstream {
    pub addr: SocketAddr,
    pub log: Arc<Mutex<UpstreamLog>>,
    pub stop: CancellationToken,
    /// Bytes the upstream managed to hand to its socket in `flood`.
    pub flooded: Arc<std::sync::atomic::AtomicU64>,
}

impl TestUpstream {
    pub async fn start() -> TestUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        TestUpstream::serve(listener)
    }

    pub fn serve(listener: TcpListener) -> TestUpstream {
        let addr = listener.local_addr().expect("addr");
        let log = Arc::new(Mutex::new(UpstreamLog::default()));
        let stop = CancellationToken::new();
        let flooded = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (l2, s2, f2) = (log.clone(), stop.clone(), flooded.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = s2.cancelled() => return,
                    r = listener.accept() => match r { Ok(a) => a, Err(_) => return },
                };
                tokio::spawn(upstream_conn(stream, l2.clone(), s2.clone(), f2.clone()));
            }
        });
        TestUpstream {
            addr,
            log,
            stop,
            flooded,
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    pub fn handshakes(&self) -> Vec<Handshake> {
        self.log.lock().expect("log").handshakes.clone()
    }

    pub fn closes_for(&self, session: &str) -> Vec<(u16, String)> {
        let log = self.log.lock().expect("log");
        log.closes
            .iter()
            .filter(|c| c.0 == session)
            .map(|c| (c.1, c.2.clone()))
            .collect()
    }

    pub fn messages_for(&self, session: &str) -> Vec<Message> {
        let log = self.log.lock().expect("log");
        log.messages
            .iter()
            .filter(|m| m.0 == session)
            .map(|m| m.1.clone())
            .collect()
    }

    pub fn open_for(&self, session: &str) -> usize {
        *self
            .log
            .lock()
            .expect("log")
            .open
            .get(session)
            .unwrap_or(&0)
    }

    pub fn max_open_for(&self, session: &str) -> usize {
        *self
            .log
            .lock()
            .expect("log")
            .max_open
            .get(session)
            .unwrap_or(&0)
    }

    /// The `X-Session-Epoch` of each upstream connection of a session, in
    /// order.
    pub fn epochs_for(&self, session: &str) -> Vec<String> {
        self.handshakes()
            .iter()
            .filter(|h| h.header("x-session-id") == Some(session))
            .map(|h| h.header("x-session-epoch").unwrap_or("").to_string())
            .collect()
    }

    pub fn connections_for(&self, session: &str) -> usize {
        self.handshakes()
            .iter()
            .filter(|h| h.header("x-session-id") == Some(session))
            .count()
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn upstream_conn(
    stream: TcpStream,
    log: Arc<Mutex<UpstreamLog>>,
    stop: CancellationToken,
    flooded: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut seen: Option<Handshake> = None;
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, mut resp: Response| {
        let headers = req
            .headers()
            .iter()
            .map(|(k, v)| {
                let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                (k.as_str().to_string(), v)
            })
            .collect::<HashMap<_, _>>();
        if let Some(offered) = req
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
        {
            let first = offered.split(',').next().unwrap_or("").trim().to_string();
            resp.headers_mut().insert(
                "sec-websocket-protocol",
                first.parse().expect("header value"),
            );
        }
        seen = Some(Handshake {
            path: req.uri().to_string(),
            headers,
        });
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    let Some(hs) = seen else { return };
    let sid = hs.header("x-session-id").unwrap_or("").to_string();
    {
        let mut l = log.lock().expect("log");
        l.handshakes.push(hs);
        let open = l.open.entry(sid.clone()).or_default();
        *open += 1;
        let now = *open;
        let max = l.max_open.entry(sid.clone()).or_default();
        *max = (*max).max(now);
    }
    let finish = |log: &Arc<Mutex<UpstreamLog>>| {
        let mut l = log.lock().expect("log");
        if let Some(o) = l.open.get_mut(&sid) {
            *o = o.saturating_sub(1);
        }
    };
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => { finish(&log); return; }
            m = ws.next() => m,
        };
        match msg {
            Some(Ok(Message::Close(frame))) => {
                let (code, reason) = frame
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                log.lock()
                    .expect("log")
                    .closes
                    .push((sid.clone(), code, reason));
                // tungstenite answers the Close itself; drain until the end.
                while let Some(Ok(_)) = ws.next().await {}
                finish(&log);
                return;
            }
            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                log.lock()
                    .expect("log")
                    .messages
                    .push((sid.clone(), m.clone()));
                if let Message::Text(t) = &m {
                    let words: Vec<&str> = t.split(' ').collect();
                    match words.as_slice() {
                        ["close", code, reason @ ..] => {
                            let code: u16 = code.parse().unwrap_or(1000);
                            let _ = ws
                                .send(Message::Close(Some(CloseFrame {
                                    code: CloseCode::from(code),
                                    reason: reason.join(" ").into(),
                                })))
                                .await;
                            continue;
                        }
                        ["later", ms, n] => {
                            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0)))
                                .await;
                            for i in 0..n.parse::<usize>().unwrap_or(0) {
                                if ws.send(Message::text(format!("msg-{i}"))).await.is_err() {
                                    break;
                                }
                            }
                            continue;
                        }
                        ["flood", n, size] => {
                            let size: usize = size.parse().unwrap_or(1024);
                            let payload = vec![b'x'; size];
                            for _ in 0..n.parse::<usize>().unwrap_or(0) {
                                let sent = tokio::select! {
                                    r = ws.send(Message::binary(payload.clone())) => r.is_ok(),
                                    _ = stop.cancelled() => false,
                                };
                                if !sent {
                                    break;
                                }
                                flooded
                                    .fetch_add(size as u64, std::sync::atomic::Ordering::Relaxed);
                            }
                            continue;
                        }
                        ["stall"] => {
                            stop.cancelled().await;
                            finish(&log);
                            return;
                        }
                        ["drop"] => {
                            finish(&log);
                            return;
                        }
                        _ => {}
                    }
                }
                if ws.send(m).await.is_err() {
                    log.lock().expect("log").aborted.push(sid.clone());
                    finish(&log);
                    return;
                }
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => {
                log.lock().expect("log").aborted.push(sid.clone());
                finish(&log);
                return;
            }
        }
    }
}

// ---------------------------------------------------------------- nodes

/// A configuration for a node on loopback port 0 in front of `upstreams`,
/// with an admin listener (token "t0ken") and `extra` TOML appended to
/// the named sections (`[session]` lines etc. are merged by the caller).
pub fn config_text(upstreams: &[String], extra: &str) -> String {
    let servers = upstreams
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let mut text = format!(
        "[node]\nid = \"test-node\"\nlisten = \"127.0.0.1:0\"\ndrain_timeout = \"4s\"\n\
         [upstream]\nservers = [{servers}]\nhealth_interval = \"200ms\"\nconnect_timeout = \"1s\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"t0ken\"\n"
    );
    text.push_str(extra);
    text
}

/// Merges `[section]` blocks so `extra` may name a section the base has.
fn merged(text: &str) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut sections: HashMap<String, Vec<String>> = HashMap::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') && t.ends_with(']') {
            current = t.to_string();
            if !sections.contains_key(&current) {
                order.push(current.clone());
                sections.insert(current.clone(), Vec::new());
            }
        } else if !t.is_empty() {
            sections
                .entry(current.clone())
                .or_default()
                .push(t.to_string());
        }
    }
    let mut out = String::new();
    for s in order {
        out.push_str(&s);
        out.push('\n');
        // Later lines win over earlier ones for the same key.
        let mut seen: Vec<(String, String)> = Vec::new();
        for l in &sections[&s] {
            let key = l.split('=').next().unwrap_or("").trim().to_string();
            seen.retain(|(k, _)| *k != key);
            seen.push((key, l.clone()));
        }
        for (_, l) in seen {
            out.push_str(&l);
            out.push('\n');
        }
    }
    out
}

pub fn parse_config(upstreams: &[String], extra: &str) -> wsbroker::config::Config {
    let text = merged(&config_text(upstreams, extra));
    wsbroker::config::Config::parse(&text, &|_| None)
        .unwrap_or_else(|e| panic!("test config invalid: {e}\n{text}"))
}

/// A node running inside the test process.
pub struct TestNode {
    pub node: Option<wsbroker::server::Node>,
    pub public: SocketAddr,
    pub admin: SocketAddr,
}

impl TestNode {
    pub async fn start(upstreams: &[String], extra: &str) -> TestNode {
        let node = wsbroker::server::start(parse_config(upstreams, extra))
            .await
            .expect("node starts");
        let public = node.public_addr;
        let admin = node.admin_addr.expect("admin listener");
        TestNode {
            node: Some(node),
            public,
            admin,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.public, path)
    }

    pub fn broker(&self) -> &Arc<wsbroker::broker::Broker> {
        &self.node.as_ref().expect("running").broker
    }

    pub async fn shutdown(&mut self) {
        if let Some(n) = self.node.take() {
            n.shutdown().await;
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(n) = &self.node {
            n.broker.shutdown.cancel();
            n.broker.end_all_sessions();
        }
    }
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A real `wsbroker` process.
pub struct BrokerProcess {
    pub child: Child,
    pub public: SocketAddr,
    pub admin: SocketAddr,
    pub dir: PathBuf,
}

impl BrokerProcess {
    /// Starts `wsbroker run` with the test configuration plus `extra` and
    /// waits until it answers `/live`.
    pub async fn start(upstreams: &[String], extra: &str) -> BrokerProcess {
        BrokerProcess::start_with_env(upstreams, extra, &[]).await
    }

    /// [`start`](Self::start) with extra environment variables.
    ///
    /// Ports are picked free and then bound by the node, so another process
    /// can take one in between: a node that exits before answering is
    /// started again on new ports (three attempts in all).
    pub async fn start_with_env(
        upstreams: &[String],
        extra: &str,
        env: &[(&str, &str)],
    ) -> BrokerProcess {
        for attempt in 1..=3 {
            let mut p = BrokerProcess::spawn_with_env(upstreams, extra, env);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                if let Some(status) = p.child.try_wait().expect("try_wait") {
                    assert!(
                        attempt < 3,
                        "wsbroker exited at start three times: {status}"
                    );
                    eprintln!("wsbroker exited at start ({status}); again on new ports");
                    break;
                }
                // The answer must come from this child, not from a process
                // that holds the port it failed to bind (it then exits, and
                // is started again above).
                if matches!(
                    http(p.public, "GET", "/live", &[], b"").await,
                    Some((200, _, _))
                ) && p.child.try_wait().expect("try_wait").is_none()
                    && listens_on(p.pid(), p.public.port())
                    && listens_on(p.pid(), p.admin.port())
                {
                    return p;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "timed out waiting for: wsbroker answers /live"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn spawn_with_env(upstreams: &[String], extra: &str, env: &[(&str, &str)]) -> BrokerProcess {
        let public: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let extra =
            format!("[node]\nlisten = \"{public}\"\n[admin]\nlisten = \"{admin}\"\n{extra}");
        let text = merged(&config_text(upstreams, &extra));
        let dir = std::env::temp_dir().join(format!(
            "wsbroker-test-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("wsbroker.toml");
        std::fs::write(&path, text).expect("write config");
        let child = Command::new(env!("CARGO_BIN_EXE_wsbroker"))
            .args(["run", "--config"])
            .arg(&path)
            // `WSBROKER_TEST_LOG` (e.g. `info,wsbroker::proxy=debug`)
            // shows more of the nodes' logs when a test needs looking into.
            .env(
                "RUST_LOG",
                std::env::var("WSBROKER_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn wsbroker");
        BrokerProcess {
            child,
            public,
            admin,
            dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGSTOP, returning once every thread of the process has stopped.
    /// The kernel stops a process's threads one after another (the thread
    /// that takes the signal stops the others), so on a loaded machine a
    /// thread already running can still serve a request for a few
    /// milliseconds after `kill` returns.
    pub async fn freeze(&self) {
        self.signal("STOP");
        eventually(
            Duration::from_secs(5),
            "every thread of the node stopped",
            || async { self.all_threads_stopped() },
        )
        .await;
    }

    fn all_threads_stopped(&self) -> bool {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else {
            return false;
        };
        tasks.flatten().all(|task| {
            // The state follows the command name, which is in parentheses.
            std::fs::read_to_string(task.path().join("stat"))
                .ok()
                .and_then(|stat| {
                    let (_, rest) = stat.rsplit_once(") ")?;
                    Some(rest.starts_with('T') || rest.starts_with('t'))
                })
                .unwrap_or(false)
        })
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// Waits for the process to exit; returns its exit status.
    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "wsbroker did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Whether process `pid` holds a socket listening on 127.0.0.1:`port`
/// (from `/proc/net/tcp` and the process's descriptors).
fn listens_on(pid: u32, port: u16) -> bool {
    let local = format!("0100007F:{port:04X}");
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // Columns: sl, local, remote, state (0A = LISTEN), ..., inode.
            (cols.get(1) == Some(&local.as_str()) && cols.get(3) == Some(&"0A"))
                .then(|| cols.get(9).map(|i| format!("socket:[{i}]")))
                .flatten()
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .map(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
            .unwrap_or(false)
    })
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------- clients

/// Opens a WebSocket through `url` with extra request headers.
pub async fn connect_with(
    url: &str,
    headers: &[(&str, &str)],
) -> Result<
    (
        Ws,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
> {
    let mut req = url.into_client_request()?;
    for (k, v) in headers {
        req.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes())
                .expect("name"),
            v.parse().expect("value"),
        );
    }
    let host = req
        .uri()
        .authority()
        .expect("authority")
        .as_str()
        .to_string();
    let stream = TcpStream::connect(host)
        .await
        .map_err(tokio_tungstenite::tungstenite::Error::Io)?;
    tokio_tungstenite::client_async(req, stream).await
}

pub async fn connect(url: &str) -> Ws {
    connect_with(url, &[]).await.expect("upgrade succeeds").0
}

/// The HTTP status of a failed upgrade.
pub async fn upgrade_status(url: &str, headers: &[(&str, &str)]) -> u16 {
    match connect_with(url, headers).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("unexpected upgrade error: {e}"),
    }
}

/// The next data message, skipping pings/pongs, within 5 s.
pub async fn next_data(ws: &mut Ws) -> Message {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a message within 5 s")
            .expect("stream open")
            .expect("valid message");
        match m {
            Message::Ping(_) | Message::Pong(_) => continue,
            m => return m,
        }
    }
}

/// Reads until a Close frame arrives, then lets the client answer it and
/// the connection end; returns the code and reason.
pub async fn expect_close(ws: &mut Ws, within: Duration) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Err(_) => panic!("no Close frame within {within:?}"),
            Ok(Some(Ok(Message::Close(Some(f))))) => {
                return finish_close(ws, (u16::from(f.code), f.reason.to_string())).await
            }
            Ok(Some(Ok(Message::Close(None)))) => {
                return finish_close(ws, (1005, String::new())).await
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => panic!("connection failed before a Close frame: {e}"),
            Ok(None) => panic!("connection ended without a Close frame"),
        }
    }
}

/// Polling on after a Close sends the client's reply and reads to the end.
async fn finish_close(ws: &mut Ws, got: (u16, String)) -> (u16, String) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    got
}

/// Echo round trip of one text message.
pub async fn echo(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
    assert_eq!(next_data(ws).await, Message::text(text));
}

/// A minimal HTTP/1.1 request; returns status, headers (lowercase names)
/// and body. `None` when the connection fails or closes without a reply.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<(u16, HashMap<String, String>, Vec<u8>)> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    s.write_all(body).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    parse_response(&buf)
}

pub fn parse_response(buf: &[u8]) -> Option<(u16, HashMap<String, String>, Vec<u8>)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some((status, headers, buf[end + 4..].to_vec()))
}

/// GET a JSON document from the admin listener with the test token.
pub async fn admin_json(admin: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let (status, _, body) = http(
        admin,
        "GET",
        path,
        &[("Authorization", "Bearer t0ken")],
        b"",
    )
    .await
    .expect("admin answers");
    (
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

pub async fn health(addr: SocketAddr) -> (u16, serde_json::Value) {
    let (status, _, body) = http(addr, "GET", "/health", &[], b"")
        .await
        .expect("health answers");
    (
        status,
        serde_json::from_slice(&body).expect("health is JSON"),
    )
}

/// Sends a raw upgrade request head for `path` and returns the open socket
/// after a 101 (panics otherwise), plus any bytes read past the head.
pub async fn raw_upgrade(addr: SocketAddr, path: &str) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(upgrade_request(path, &addr.to_string()).as_bytes())
        .await
        .expect("write");
    let (head, rest) = raw_read_head(&mut s, Duration::from_secs(5)).await;
    assert!(head.starts_with("HTTP/1.1 101"), "expected 101, got {head}");
    (s, rest)
}

/// A WebSocket upgrade request head for `path`, as a raw client sends it.
pub fn upgrade_request(path: &str, host: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
}

/// Reads raw server frames from `s` (after `pending` bytes already read)
/// until a Close frame; returns its code and reason. For close codes some
/// client libraries refuse (1014).
pub async fn raw_read_close(
    s: &mut TcpStream,
    mut pending: Vec<u8>,
    within: Duration,
) -> (u16, String) {
    use wsbroker::proxy::frame;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        while let Some(h) = frame::parse_header(&pending) {
            let len = h.header_len + h.payload_len as usize;
            if pending.len() < len {
                break;
            }
            if h.opcode == frame::OP_CLOSE {
                return frame::parse_close(&frame::frame_payload(&pending[..len]));
            }
            pending.drain(..len);
        }
        let mut chunk = [0u8; 4096];
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let n = tokio::time::timeout(left, s.read(&mut chunk))
            .await
            .expect("a Close frame in time")
            .expect("read");
        assert!(n > 0, "connection ended without a Close frame");
        pending.extend_from_slice(&chunk[..n]);
    }
}

/// Reads a raw socket until a whole response head; returns the head and
/// the bytes read past it.
pub async fn raw_read_head(s: &mut TcpStream, within: Duration) -> (String, Vec<u8>) {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = Vec::new();
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            return (head, buf[end + 4..].to_vec());
        }
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .expect("a response head in time")
            .expect("read");
        assert!(n > 0, "closed before a response head");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads one whole server frame (after `pending` bytes already read) and
/// returns its payload.
pub async fn raw_read_payload(
    s: &mut TcpStream,
    mut pending: Vec<u8>,
    within: Duration,
) -> Vec<u8> {
    use wsbroker::proxy::frame;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(h) = frame::parse_header(&pending) {
            let len = h.header_len + h.payload_len as usize;
            if pending.len() >= len {
                return frame::frame_payload(&pending[..len]);
            }
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .expect("a frame in time")
            .expect("read");
        assert!(n > 0, "closed before a whole frame");
        pending.extend_from_slice(&chunk[..n]);
    }
}

/// Sends one masked text frame on a raw client socket.
pub async fn raw_send_text(s: &mut TcpStream, text: &str) {
    let f = wsbroker::proxy::frame::encode_frame(
        wsbroker::proxy::frame::OP_TEXT,
        text.as_bytes(),
        true,
    );
    s.write_all(&f).await.expect("write");
}
