//! The registry's fast lane against a real valkey-server: deferred calls
//! (session ends) ride along with the next call's write, and go out on
//! their own when none comes.

mod common;

use std::time::Duration;

use common::valkey::Valkey;
use tokio::time::Instant;
use wsbroker::control::registry::lane::{Lane, LaneAuth, Reply};

const TIMEOUT: Duration = Duration::from_secs(20);

async fn open(valkey: &Valkey) -> Lane {
    let addr = valkey.addr();
    let host = addr.ip().to_string();
    Lane::open((&host, addr.port()), &LaneAuth::default(), 0, TIMEOUT)
        .await
        .expect("lane opens")
}

#[tokio::test]
async fn a_deferred_call_rides_along_with_the_next_call() {
    let valkey = Valkey::start().await;
    let lane = open(&valkey).await;
    let long = Duration::from_secs(10);
    let started = Instant::now();
    let deferred = lane.call_deferred(&[&[b"SET", b"ride", b"along"]], TIMEOUT, long);
    let plain = async {
        // The deferred command is queued before this call writes.
        tokio::task::yield_now().await;
        lane.call(&[&[b"GET", b"ride"]], TIMEOUT).await
    };
    let (deferred, plain) = tokio::join!(deferred, plain);
    assert_eq!(
        deferred.expect("deferred call answered"),
        vec![Reply::Status("OK".into())]
    );
    // Queued first, so written first: the GET sees the SET.
    assert_eq!(
        plain.expect("plain call answered"),
        vec![Reply::Bulk(b"along".to_vec())]
    );
    let took = started.elapsed();
    assert!(
        took < long / 2,
        "the deferred call waited for its own write ({took:?}) instead of riding along"
    );
}

#[tokio::test]
async fn a_deferred_call_alone_is_written_after_its_delay() {
    let valkey = Valkey::start().await;
    let lane = open(&valkey).await;
    let delay = Duration::from_millis(200);
    let started = Instant::now();
    let answer = lane
        .call_deferred(&[&[b"SET", b"alone", b"1"]], TIMEOUT, delay)
        .await;
    let took = started.elapsed();
    assert_eq!(
        answer.expect("deferred call answered"),
        vec![Reply::Status("OK".into())]
    );
    assert!(took >= delay, "written before its delay ({took:?})");
    assert!(took < TIMEOUT / 2, "not written after its delay ({took:?})");
    assert_eq!(valkey.get("alone").await.as_deref(), Some("1"));
}
