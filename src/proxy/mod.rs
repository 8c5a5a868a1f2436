//! The data path: listener → handshake → route → session (driver and
//! client readers relaying frames).
//!
//! - `listener`, `conn_slot`: accept, TLS, connection limit, the request head (upgrades
//!   answered directly, everything else through hyper).
//! - `handshake`: request checks, `/health` and `/live`, the 101.
//! - `session_id`: where the session id comes from.
//! - `route`: the one decision — attach locally or create (or, in a
//!   cluster, forward).
//! - `forward`, `hop`: the signed one-hop forward to a session's owner.
//! - `upstream_dial`: the upstream WebSocket handshake; `upstream_addrs`:
//!   the addresses of upstreams named by host name.
//! - `session`, `driver`, `client_reader`: a live session and its relay;
//!   `kick`: telling its clients to leave.
//! - `frame`: frame-boundary tracking over raw bytes.
//! - `io`, `buffer`: the connections' read and write sides, and read
//!   buffers that exist only while data moves.

pub mod buffer;
pub mod client_reader;
pub mod conn_slot;
pub mod driver;
pub mod forward;
pub mod frame;
pub mod handshake;
pub mod hop;
pub mod io;
pub mod kick;
pub mod listener;
pub mod route;
pub mod session;
pub mod session_id;
pub mod upstream_addrs;
pub mod upstream_dial;
