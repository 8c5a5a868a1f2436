//! wsbroker: a WebSocket session-broker reverse proxy.
//!
//! # Layout
//!
//! - [`config`]: the TOML file, its defaults, environment overrides.
//! - [`proxy`] — the data path: listener → handshake → route → session
//!   relay (driver + client readers), frame tracking, upstream dialling.
//! - [`control`] — the control path: registry, upstream pool (balancing,
//!   health, breaker), health report, admin API, drain, metrics.
//! - [`broker`]: the node state both paths share.
//! - [`server`]: start a node, run it, drain it.
//! - [`runtime`]: the worker threads, pinned to CPUs when each has its own.
//! - [`demo`]: the built-in demo upstream behind `wsbroker demo`.

pub mod broker;
pub mod clock;
pub mod config;
pub mod control;
pub mod decimal;
pub mod demo;
pub mod logging;
pub mod proxy;
pub mod runtime;
pub mod server;
pub mod tls;
