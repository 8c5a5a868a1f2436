//! Backpressure: a peer that stops reading does not make the node buffer
//! without bound, in either direction. Measured on a real wsbroker process:
//! its RSS, and how far the flooding side gets before it is held back.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::AsyncWriteExt;

const MIB: u64 = 1 << 20;
/// Far more than every socket buffer on the path together.
const FLOOD: u64 = 512 * MIB;

#[tokio::test]
async fn a_client_that_stops_reading_holds_the_upstream_back() {
    let up = TestUpstream::start().await;
    let p = BrokerProcess::start(&[up.url()], "").await;
    let (mut s, _) = raw_upgrade(p.public, "/?session=slow-reader").await;
    let before = p.rss_kib();
    raw_send_text(&mut s, &format!("flood {} 65536", FLOOD / 65536)).await;
    // The client never reads again.
    let sent = plateau(|| up.flooded.load(Ordering::Relaxed)).await;
    let growth_kib = p.rss_kib().saturating_sub(before);
    eprintln!(
        "upstream got {} MiB out before stalling; node RSS grew {growth_kib} KiB",
        sent / MIB
    );
    assert!(
        sent < 64 * MIB,
        "upstream was held back: it sent {} MiB",
        sent / MIB
    );
    assert!(growth_kib < 16 * 1024, "node RSS grew {growth_kib} KiB");
    drop(s);
}

#[tokio::test]
async fn an_upstream_that_stops_reading_holds_the_client_back() {
    let up = TestUpstream::start().await;
    let p = BrokerProcess::start(&[up.url()], "").await;
    let (mut s, _) = raw_upgrade(p.public, "/?session=slow-upstream").await;
    raw_send_text(&mut s, "stall").await;
    let before = p.rss_kib();
    let written = Arc::new(AtomicU64::new(0));
    let w = written.clone();
    let writer = tokio::spawn(async move {
        let frame = wsbroker::proxy::frame::encode_frame(
            wsbroker::proxy::frame::OP_BINARY,
            &vec![1u8; 65536],
            true,
        );
        while w.load(Ordering::Relaxed) < FLOOD {
            if s.write_all(&frame).await.is_err() {
                return;
            }
            w.fetch_add(frame.len() as u64, Ordering::Relaxed);
        }
    });
    let sent = plateau(|| written.load(Ordering::Relaxed)).await;
    let growth_kib = p.rss_kib().saturating_sub(before);
    eprintln!(
        "client got {} MiB out before stalling; node RSS grew {growth_kib} KiB",
        sent / MIB
    );
    assert!(
        sent < 64 * MIB,
        "client was held back: it wrote {} MiB",
        sent / MIB
    );
    assert!(growth_kib < 16 * 1024, "node RSS grew {growth_kib} KiB");
    writer.abort();
}

#[tokio::test]
async fn a_session_blocked_on_a_stalled_client_ends_at_the_drain_deadline() {
    let up = TestUpstream::start().await;
    let mut node = TestNode::start(&[up.url()], "[node]\ndrain_timeout = \"1s\"\n").await;
    let broker = node.broker().clone();
    // A client that never reads: the session's writes to it stall.
    let (mut s, _) = raw_upgrade(node.public, "/?session=stuck").await;
    raw_send_text(&mut s, "flood 2000 65536").await;
    plateau(|| up.flooded.load(Ordering::Relaxed)).await;
    let started = tokio::time::Instant::now();
    node.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_millis(1900),
        "shutdown took {:?}",
        started.elapsed()
    );
    assert!(
        broker.sessions.is_empty(),
        "the stalled session ended with the node"
    );
    drop(s);
}
