//! The real binary: drain on SIGTERM, SIGINT and POST /admin/drain;
//! `wsbroker check`; `wsbroker demo`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Opens `n` sessions, starts a drain with `trigger`, and checks the
/// contract: 503 at once, clients closed with 1012 spread over at most half
/// of drain_timeout, the upstream told 1001, the process gone in time.
async fn drain_with(trigger: impl FnOnce(&BrokerProcess), n: usize) {
    let up = TestUpstream::start().await;
    let mut p = BrokerProcess::start(&[up.url()], "[node]\ndrain_timeout = \"3s\"\n").await;
    let mut clients = Vec::new();
    for i in 0..n {
        let mut ws = connect(&format!("ws://{}/?session=d{i}", p.public)).await;
        echo(&mut ws, "x").await;
        clients.push(ws);
    }
    let started = Instant::now();
    trigger(&p);
    eventually(
        Duration::from_secs(1),
        "/health says 503 draining",
        || async {
            match http(p.public, "GET", "/health", &[], b"").await {
                Some((503, _, body)) => String::from_utf8_lossy(&body).contains("\"draining\""),
                _ => false,
            }
        },
    )
    .await;
    assert_eq!(
        upgrade_status(&format!("ws://{}/?session=new-during-drain", p.public), &[]).await,
        503,
        "no new sessions while draining"
    );
    let mut arrivals = Vec::new();
    for ws in clients.iter_mut() {
        let (code, reason) = expect_close(ws, Duration::from_secs(4)).await;
        assert_eq!((code, reason.as_str()), (1012, "service restart"));
        arrivals.push(started.elapsed());
    }
    let status = p.wait_exit(Duration::from_secs(5)).await;
    assert!(status.success(), "clean exit: {status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3) + Duration::from_millis(1500),
        "exit by drain_timeout"
    );
    let last = arrivals.iter().max().copied().unwrap_or_default();
    assert!(
        last <= Duration::from_millis(1500 + 700),
        "all closed within the jitter window (half of 3 s): {last:?}"
    );
    for i in 0..n {
        assert_eq!(
            up.closes_for(&format!("d{i}")).first().map(|c| c.0),
            Some(1001),
            "upstream of d{i} told 1001"
        );
    }
}

#[tokio::test]
async fn sigterm_drains_with_jittered_1012() {
    let n = 16;
    let up = TestUpstream::start().await;
    let mut p = BrokerProcess::start(&[up.url()], "[node]\ndrain_timeout = \"3s\"\n").await;
    let mut clients = Vec::new();
    for i in 0..n {
        let mut ws = connect(&format!("ws://{}/?session=j{i}", p.public)).await;
        echo(&mut ws, "x").await;
        clients.push(ws);
    }
    let started = Instant::now();
    p.signal("TERM");
    // Read every client concurrently so arrival times are exact.
    let waits = clients.into_iter().map(|mut ws| async move {
        let (code, _) = expect_close(&mut ws, Duration::from_secs(4)).await;
        (code, started.elapsed())
    });
    let results = futures_util::future::join_all(waits).await;
    assert!(results.iter().all(|(code, _)| *code == 1012));
    let first = results.iter().map(|r| r.1).min().unwrap_or_default();
    let last = results.iter().map(|r| r.1).max().unwrap_or_default();
    assert!(
        last - first >= Duration::from_millis(300),
        "closes are spread out: first {first:?}, last {last:?}"
    );
    assert!(
        last <= Duration::from_millis(2200),
        "within half of drain_timeout (plus slack): {last:?}"
    );
    assert!(p.wait_exit(Duration::from_secs(5)).await.success());
}

#[tokio::test]
async fn sigterm_drain_follows_the_contract() {
    drain_with(|p| p.signal("TERM"), 4).await;
}

#[tokio::test]
async fn sigint_drain_follows_the_contract() {
    drain_with(|p| p.signal("INT"), 3).await;
}

#[tokio::test]
async fn admin_drain_follows_the_contract() {
    drain_with(
        |p| {
            let admin = p.admin;
            // Fire the request from a thread: the trigger is synchronous.
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("rt");
                let r = rt.block_on(http(
                    admin,
                    "POST",
                    "/admin/drain",
                    &[("Authorization", "Bearer t0ken")],
                    b"",
                ));
                assert_eq!(r.map(|r| r.0), Some(202));
            })
            .join()
            .expect("drain request");
        },
        3,
    )
    .await;
}

#[tokio::test]
async fn drain_timeout_bounds_the_exit_even_with_busy_clients() {
    let up = TestUpstream::start().await;
    let mut p = BrokerProcess::start(&[up.url()], "[node]\ndrain_timeout = \"1s\"\n").await;
    // A client that never reads: its close cannot be delivered promptly.
    let (mut s, _) = raw_upgrade(p.public, "/?session=stuck").await;
    raw_send_text(&mut s, "flood 2000 65536").await;
    // Once the flood stalls, the session is blocked writing to the client.
    plateau(|| up.flooded.load(std::sync::atomic::Ordering::Relaxed)).await;
    let started = Instant::now();
    p.signal("TERM");
    p.wait_exit(Duration::from_secs(10)).await;
    // drain_timeout, then at most the bounded wait for closing tasks.
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "exit bounded by drain_timeout: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn check_prints_the_effective_config_or_names_every_bad_key() {
    let dir = std::env::temp_dir().join(format!("wsbroker-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[upstream]\nservers = [\"ws://127.0.0.1:9001\"]\n[cluster]\nsecret = \"hunter2\"\n",
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_wsbroker"))
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("resume_grace = \"30s\""), "{text}");
    assert!(
        !text.contains("hunter2") && text.contains("<redacted>"),
        "{text}"
    );

    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[node]\nlisten = \"nope\"\ncolour = \"red\"\n[session]\nattach = \"sometimes\"\n",
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_wsbroker"))
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "node.listen",
        "node.colour",
        "session.attach",
        "upstream.servers",
    ] {
        assert!(err.contains(key), "{key} not named in:\n{err}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_wsbroker"))
        .args(["check", "--config"])
        .arg(&good)
        .env("WSBROKER_SESSION_ATTACH", "shared")
        .output()
        .expect("run");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("attach = \"shared\""),
        "environment override applies"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn check_and_run_name_the_key_of_a_missing_or_unusable_file() {
    let dir = std::env::temp_dir().join(format!("wsbroker-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let not_pem = dir.join("not.pem");
    std::fs::write(&not_pem, "no certificate here\n").expect("write");
    let missing = dir.join("missing.pem");
    let config = dir.join("files.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n\
             [upstream]\nservers = [\"wss://127.0.0.1:9001\"]\nca_file = \"{}\"\n\
             [log]\nlevel = \"loud\"\n",
            missing.display(),
            not_pem.display(),
            not_pem.display()
        ),
    )
    .expect("write");
    for command in ["check", "run"] {
        let out = Command::new(env!("CARGO_BIN_EXE_wsbroker"))
            .args([command, "--config"])
            .arg(&config)
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(1), "{command}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("tls.cert") && err.contains("missing.pem"),
            "{command}: {err}"
        );
        assert!(
            err.contains("upstream.ca_file") && err.contains("no PEM certificate"),
            "{command}: {err}"
        );
        // Every problem in one run: the key's own, and one of another kind.
        assert!(
            err.contains("tls.key") && err.contains("no PEM private key"),
            "{command}: {err}"
        );
        assert!(err.contains("log.level"), "{command}: {err}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn demo_runs_with_nothing_else() {
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsbroker"))
        .args(["demo", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn demo");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut banner = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !banner.iter().any(|l: &String| l.contains("Ctrl-C")) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        banner.push(rx.recv_timeout(left).expect("demo prints its banner"));
    }
    let first_url = banner
        .iter()
        .find(|l| l.contains("ws://"))
        .expect("a ws:// URL");
    let url = first_url
        .split_whitespace()
        .find(|w| w.starts_with("ws://"))
        .expect("url")
        .to_string();
    assert!(
        banner.iter().any(|l| l.contains("/health"))
            && banner.iter().any(|l| l.contains("/admin/"))
    );
    let mut ws = connect(&url).await;
    echo(&mut ws, "hello demo").await;
    let chat = format!("ws://127.0.0.1:{port}/chat?session=");
    let mut alice = connect(&format!("{chat}alice")).await;
    let mut bob = connect(&format!("{chat}bob")).await;
    // The chat room may not have both members yet: retry until bob hears alice.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        alice.send(Message::text("hi bob")).await.expect("send");
        if let Ok(Some(Ok(m))) = tokio::time::timeout(
            Duration::from_millis(200),
            futures_util::StreamExt::next(&mut bob),
        )
        .await
        {
            assert_eq!(m, Message::text("hi bob"));
            break;
        }
        assert!(Instant::now() < deadline, "chat relays between clients");
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("wait").is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "demo exits on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The CPUs in a `Cpus_allowed_list` ("0-1,4").
fn parse_cpu_list(list: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().expect("cpu"), b.parse().expect("cpu"));
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().expect("cpu")),
        }
    }
    cpus
}

/// The allowed CPUs of each thread of `pid` whose name starts with `prefix`.
fn thread_cpus(pid: u32, prefix: &str) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        if let Some(l) = status.lines().find(|l| l.starts_with("Cpus_allowed_list:")) {
            out.push(parse_cpu_list(&l["Cpus_allowed_list:".len()..]));
        }
    }
    out
}

#[tokio::test]
async fn workers_are_pinned_to_cpus_only_when_asked() {
    let up = TestUpstream::start().await;
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let allowed = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(parse_cpu_list)
        .expect("Cpus_allowed_list");
    let two = [("TOKIO_WORKER_THREADS", "2")];

    let mut free = BrokerProcess::start_with_env(&[up.url()], "", &two).await;
    let workers = thread_cpus(free.pid(), "tokio-rt");
    assert!(workers.len() >= 2, "two workers, got {workers:?}");
    assert!(
        workers.iter().all(|cpus| *cpus == allowed),
        "unpinned by default: every worker may run on {allowed:?}, got {workers:?}"
    );
    free.signal("KILL");
    free.wait_exit(Duration::from_secs(5)).await;

    let pin = [("TOKIO_WORKER_THREADS", "2"), ("WSBROKER_PIN_WORKERS", "1")];
    let mut pinned = BrokerProcess::start_with_env(&[up.url()], "", &pin).await;
    let workers = thread_cpus(pinned.pid(), "tokio-rt");
    if allowed.len() >= 2 {
        // Blocking-pool threads (same name) stay unpinned; the two workers
        // take the first two allowed CPUs, one each.
        let mut got: Vec<usize> = workers
            .iter()
            .filter(|cpus| cpus.len() == 1)
            .map(|cpus| cpus[0])
            .collect();
        got.sort_unstable();
        assert_eq!(
            got,
            vec![allowed[0], allowed[1]],
            "each worker pinned to a CPU of its own: {workers:?}"
        );
    } else {
        assert!(workers.iter().all(|cpus| *cpus == allowed), "{workers:?}");
    }
    pinned.signal("KILL");
    pinned.wait_exit(Duration::from_secs(5)).await;
}
