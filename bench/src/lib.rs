//! rowcast-bench: a load and latency tool for rowcast and for any server that speaks
//! its public protocol (REST `/products` + WebSocket `/websocket`).
//!
//! Data flow of one measurement, and the module that owns each step:
//!
//! ```text
//! target (which servers, their pids) ──► rest (writer: PUT/POST, stamps send time into productName)
//!                                          │
//!                                server under test (REST → Postgres → trigger → listener → sessions)
//!                                          │
//! ws (one task per client: connect, subscribe, read) ──► record (per-connection counters + latencies)
//!                                          │
//! scenario::* (drives one scenario, samples procstat) ──► stats (percentiles) ──► report (JSON) + svg (plot)
//! ```
//!
//! `clock`, `proto`, `fdlimit`, `procstat`, `progress` and `tls` are leaves that import nothing
//! of ours (`tls`: rustls client and server configurations for `https`/`wss` targets). The floor
//! server (`src/bin/floor-server.rs`) reuses `proto`, `fdlimit` and `tls`.

pub mod clock;
pub mod fdlimit;
pub mod procstat;
pub mod progress;
pub mod proto;
pub mod record;
pub mod report;
pub mod rest;
pub mod scenario;
pub mod stats;
pub mod svg;
pub mod target;
pub mod tls;
pub mod ws;
