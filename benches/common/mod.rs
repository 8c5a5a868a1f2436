//! Helpers shared by the benchmarks: free ports, owned child processes,
//! and CPU/memory readings from /proc.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU time (user + system, seconds) and resident memory (KiB) of a
/// process, from /proc/PID/stat.
pub fn proc_stat(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let f = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    ((f(11) + f(12)) / 100.0, f(21) as u64 * 4)
}

/// The Valkey server binary: WSBROKER_VALKEY_BIN, or `scripts/find-valkey`.
pub fn valkey_binary() -> PathBuf {
    if let Ok(bin) = std::env::var("WSBROKER_VALKEY_BIN") {
        return PathBuf::from(bin);
    }
    let out = Command::new("scripts/find-valkey")
        .output()
        .expect("run scripts/find-valkey");
    assert!(
        out.status.success(),
        "no Valkey server: run scripts/find-valkey or set WSBROKER_VALKEY_BIN"
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A Valkey server on a free loopback port, without persistence, its files
/// in `dir`.
pub fn spawn_valkey(dir: &Path) -> (Proc, u16) {
    let port = free_port();
    let child = Command::new(valkey_binary())
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()
        .expect("valkey");
    (Proc(child), port)
}
