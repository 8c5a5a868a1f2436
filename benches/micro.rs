//! Micro-benchmarks of the hot pieces: frame-header tracking over relayed
//! bytes, session-key extraction from an upgrade request, and signing and
//! checking the node-to-node hop header.
//!
//! Run: `cargo bench --bench micro` (`-- --quick` for a short smoke).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hyper::Request;

use wsbroker::config::SessionKey;
use wsbroker::proxy::frame::{encode_frame, Event, FrameScanner, OP_BINARY, OP_TEXT};
use wsbroker::proxy::hop::HopKeys;
use wsbroker::proxy::session_id;

fn frames(c: &mut Criterion) {
    // 64 small masked client messages, as one read delivers them.
    let small: Vec<u8> = (0..64)
        .flat_map(|i| encode_frame(OP_TEXT, format!("message {i}").as_bytes(), true))
        .collect();
    // One 64 KiB read inside a 1 MiB unmasked upstream message.
    let big_header = encode_frame(OP_BINARY, &vec![7u8; 1 << 20], false);
    let big = &big_header[..64 * 1024];

    let mut g = c.benchmark_group("frame_scan");
    g.throughput(Throughput::Bytes(small.len() as u64));
    g.bench_function("64_small_masked_messages", |b| {
        let mut events: Vec<Event> = Vec::new();
        b.iter(|| {
            let mut s = FrameScanner::new(true, 1 << 20);
            events.clear();
            black_box(s.scan(black_box(&small), &mut events).ok());
        })
    });
    g.throughput(Throughput::Bytes(big.len() as u64));
    g.bench_function("64k_read_of_a_large_message", |b| {
        let mut events: Vec<Event> = Vec::new();
        b.iter(|| {
            let mut s = FrameScanner::new(false, 16 << 20);
            events.clear();
            black_box(s.scan(black_box(big), &mut events).ok());
        })
    });
    g.finish();
}

fn session_keys(c: &mut Criterion) {
    let req =
        Request::get("/chat/room-7?user=alice&session=3f2a9c1e-77b4-4c55-9d0e-0a1b2c3d4e5f&v=2")
            .header("host", "broker.example")
            .header(
                "cookie",
                "theme=dark; wsb_session=3f2a9c1e-77b4-4c55-9d0e-0a1b2c3d4e5f; lang=en",
            )
            .header("x-session-id", "3f2a9c1e-77b4-4c55-9d0e-0a1b2c3d4e5f")
            .body(())
            .map(|r| r.into_parts().0);
    let Ok(parts) = req else {
        panic!("the benchmark's request is well-formed");
    };
    let mut g = c.benchmark_group("session_key");
    for (name, key) in [
        ("query", SessionKey::Query("session".into())),
        ("header", SessionKey::Header("x-session-id".into())),
        ("cookie", SessionKey::Cookie("wsb_session".into())),
        ("path", SessionKey::Path(2)),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let id = session_id::find(black_box(&key), black_box(&parts));
                black_box(id.map(session_id::validate))
            })
        });
    }
    g.finish();
}

fn hop(c: &mut Criterion) {
    let keys = HopKeys::new("a cluster secret of reasonable length");
    let target = "/chat?session=3f2a9c1e-77b4-4c55-9d0e-0a1b2c3d4e5f";
    let sid = "3f2a9c1e-77b4-4c55-9d0e-0a1b2c3d4e5f";
    let mut g = c.benchmark_group("hop");
    g.bench_function("sign", |b| {
        b.iter(|| black_box(keys.sign("node-a", "192.0.2.7", false, sid, target)))
    });
    g.bench_function("sign_and_verify", |b| {
        b.iter(|| {
            let h = keys.sign("node-a", "192.0.2.7", false, sid, target);
            black_box(keys.verify(&h, sid, target, Duration::from_secs(5)).is_ok())
        })
    });
    g.finish();
}

criterion_group!(benches, frames, session_keys, hop);
criterion_main!(benches);
