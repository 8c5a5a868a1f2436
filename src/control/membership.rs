//! Cluster membership (Valkey registry only): register — waiting out a
//! live registration under the same id —, heartbeat every
//! `heartbeat_interval`, collect dead nodes, re-assert this node's
//! sessions after any lapse or reconnect (closing the copies another node
//! has won: fencing), and end detached sessions when the registry has been
//! out of reach for `stale_ttl`.

use std::sync::Arc;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::control::registry::valkey::Beat;
use crate::control::registry::ValkeyState;
use crate::proxy::session::{Cmd, EndReason};

/// Registers this node, then keeps its membership until `stop`.
pub async fn run(broker: Arc<Broker>, stop: CancellationToken) {
    let Some(state) = broker.registry.valkey() else {
        return;
    };
    // Follow Sentinel's +switch-master notices (a no-op without Sentinels).
    let watcher = broker.clone();
    let watch_stop = stop.clone();
    broker.tasks.spawn(async move {
        if let Some(v) = watcher.registry.valkey() {
            v.registry.watch_failovers(watch_stop).await;
        }
    });
    loop {
        if !join(&broker, state, &stop).await {
            return;
        }
        if !keep(&broker, state, &stop).await {
            return;
        }
        // Another live process holds this node's id: this process stops
        // acting under it (its sessions may have been taken over while it
        // was away) and registers again once that registration expires.
        tracing::error!(node = %broker.node_id, "another live process registered this node id; closing this process's sessions and waiting to register again");
        broker.lifecycle.set_starting();
        for s in broker.sessions.all() {
            s.try_send(Cmd::End {
                reason: &EndReason::MOVED,
                after: std::time::Duration::ZERO,
            });
        }
    }
}

/// Registers (waiting out a live registration under the same id), takes
/// charge of sessions a previous process under this id left in the
/// registry, and marks the node running. False when stopped first.
async fn join(broker: &Arc<Broker>, state: &ValkeyState, stop: &CancellationToken) -> bool {
    let reg = &state.registry;
    let hb = broker.config.cluster.heartbeat_interval;
    let mut warned = false;
    loop {
        match reg.register().await {
            Ok(true) => break,
            Ok(false) => {
                if !warned {
                    tracing::warn!(node = %broker.node_id, "node id is still registered by a live process; waiting for that registration to expire");
                    warned = true;
                }
            }
            Err(e) => tracing::warn!(node = %broker.node_id, error = %e, "cannot register yet"),
        }
        tokio::select! {
            _ = tokio::time::sleep(hb) => {}
            _ = stop.cancelled() => return false,
        }
    }
    tracing::info!(node = %broker.node_id, advertise = %reg.me.advertise, "registered");
    // Sessions an earlier process under this id recorded are orphans now
    // (survivors skip collecting an id that is registered again): released
    // with their epochs, as a dead node's are. Nothing is served yet, so
    // none of them is this process's.
    match reg.release_inherited().await {
        Ok(0) => {}
        Ok(n) => {
            tracing::info!(node = %broker.node_id, sessions = n, "released sessions an earlier process under this id left")
        }
        Err(e) => {
            tracing::warn!(node = %broker.node_id, error = %e, "could not release sessions an earlier process under this id left")
        }
    }
    state.beat_ok();
    broker.lifecycle.set_running();
    true
}

/// Heartbeats until `stop` (false) or until another live process holds
/// this node's id (true).
async fn keep(broker: &Arc<Broker>, state: &ValkeyState, stop: &CancellationToken) -> bool {
    let reg = &state.registry;
    let hb = broker.config.cluster.heartbeat_interval;
    let mut seen_generation = reg.generation();
    let mut last_ok = Instant::now();
    let mut ticks = tokio::time::interval(hb);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            // A Sentinel announced a new primary: beat now, on it.
            _ = reg.switched.notified() => {}
            _ = stop.cancelled() => return false,
        }
        let left = state.left.lock().await;
        if *left {
            return false;
        }
        let beat = reg.heartbeat().await;
        drop(left);
        match beat {
            Ok(beat) => {
                let generation = reg.generation();
                let reconnected = generation != seen_generation;
                seen_generation = generation;
                if reconnected {
                    // Give every node stale_ttl to re-register before any is
                    // declared gone.
                    state.hold_off();
                    tracing::info!(node = %broker.node_id, "registry reconnected; re-asserting sessions");
                }
                if beat == Beat::Conflict {
                    return true;
                }
                if beat == Beat::Lapsed || reconnected {
                    if beat == Beat::Lapsed {
                        tracing::warn!(node = %broker.node_id, "registration had lapsed; re-asserting sessions");
                    }
                    reassert(broker, state).await;
                }
                last_ok = Instant::now();
                state.beat_ok();
                refresh_members(broker, state).await;
            }
            Err(e) => {
                tracing::debug!(node = %broker.node_id, error = %e, "heartbeat failed");
                // Every beat while out of reach: a client that drops later
                // in the outage leaves a detached session too.
                if last_ok.elapsed() >= reg.stale_ttl() {
                    end_detached(broker);
                }
            }
        }
    }
}

/// Restates every local session; closes those another node has won.
async fn reassert(broker: &Arc<Broker>, state: &ValkeyState) {
    let sessions: Vec<(String, u64, String)> = broker
        .sessions
        .all()
        .iter()
        .map(|s| (s.id.to_string(), s.epoch, s.upstream.to_string()))
        .collect();
    match state.registry.assert_many(&sessions).await {
        Ok(lost) => {
            for sid in lost {
                if let Some(s) = broker.sessions.get(&sid) {
                    tracing::warn!(session = %sid, epoch = s.epoch, node = %broker.node_id, "session moved to another node; closing this copy");
                    s.try_send(Cmd::End {
                        reason: &EndReason::MOVED,
                        after: std::time::Duration::ZERO,
                    });
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not re-assert sessions"),
    }
}

/// Updates the member view and collects nodes whose registration expired.
async fn refresh_members(broker: &Arc<Broker>, state: &ValkeyState) {
    let Ok((members, dead)) = state.registry.members().await else {
        return;
    };
    broker.metrics.cluster_instances.set(members.len() as i64);
    *broker.members.lock().unwrap_or_else(|p| p.into_inner()) = members;
    if state.holding_off() {
        return;
    }
    for id in dead {
        if id == broker.node_id {
            continue;
        }
        match state.registry.collect(&id).await {
            Ok(n) if n > 0 => {
                tracing::info!(dead = %id, sessions = n, "collected a dead node's sessions")
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(dead = %id, error = %e, "could not collect a dead node"),
        }
    }
}

/// The registry has been out of reach for stale_ttl: another node may now
/// take over this node's sessions, so resumable ones end; sessions with
/// attached clients keep flowing.
fn end_detached(broker: &Arc<Broker>) {
    for s in broker.sessions.all() {
        // A session whose first client is still arriving is not detached.
        if s.clients_and_arriving() == 0 {
            s.try_send(Cmd::End {
                reason: &EndReason::REGISTRY_LOST,
                after: std::time::Duration::ZERO,
            });
        }
    }
}

/// Drain: deregister and release every session at once, keeping epochs,
/// so clients that reconnect elsewhere are re-homed without waiting.
pub async fn leave(broker: &Arc<Broker>) {
    let Some(state) = broker.registry.valkey() else {
        return;
    };
    let reg = &state.registry;
    let mut left = state.left.lock().await;
    *left = true;
    if let Err(e) = reg.deregister().await {
        tracing::warn!(error = %e, "could not deregister");
    }
    let sessions: Vec<(String, Option<u64>)> = broker
        .sessions
        .all()
        .iter()
        .map(|s| (s.id.to_string(), Some(s.epoch)))
        .collect();
    if let Err(e) = reg
        .release_many(&reg.me.id, &sessions, reg.release_ttl())
        .await
    {
        tracing::warn!(error = %e, "could not release sessions");
    }
}
