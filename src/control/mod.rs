//! The control path: what the node knows and decides about itself, its
//! upstreams and its peers, apart from moving bytes.
//!
//! - `lifecycle`: starting → running → draining.
//! - `registry`: session ownership (memory, or Valkey for clusters).
//! - `membership`: register, heartbeat, collect dead nodes, fencing.
//! - `upstreams`: balancing, health probes, circuit breakers.
//! - `health`: the `/health` report.
//! - `admin`: the admin listener (metrics, sessions API, status page).
//! - `sessions_api`: session operations from any node (the backplane).
//! - `drain`: graceful shutdown.
//! - `metrics`: every exported metric.

pub mod admin;
pub mod drain;
pub mod health;
pub mod lifecycle;
pub mod membership;
pub mod metrics;
pub mod registry;
pub mod sessions_api;
pub mod upstreams;
