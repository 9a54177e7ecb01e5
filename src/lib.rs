//! rowcast pushes committed Postgres row changes to browsers over WebSockets and SSE.
//!
//! Data flows one way, and the modules below are declared in that order:
//!
//! ```text
//! REST client ─▶ api ─▶ db ─▶ Postgres ─▶ trigger (changelog row + pg_notify hint)
//!                                   │           or, with --source replication:
//!                                   └─ WAL ─▶ replication (elected reader: changelog rows
//!                                             │            in batches + one hint each;
//!                                             │            its own listener is handed them)
//!                                          listener   reads the changelog when woken
//!                                             │
//!                                        distributor  who wants which product; outboxes
//!                                             │
//!                                   feed ─▶ session (WebSocket) / sse ─▶ browser
//! ```
//!
//! Commands flow the other way only from sessions to the distributor (subscribe, unsubscribe,
//! disconnect). `retention` prunes the changelog on a schedule; `presence` shares watcher counts
//! with the other instances through PostgreSQL and hands them to the distributor. Around that path: `config` (flags), `http_error` (the one error shape),
//! `access` and `hardening` (who may do what, and how much), `serve`, `tls` and `acme` (connections and their certificates),
//! `health` and `metrics` (what operators see), `openapi` and `web` (documents and pages),
//! `memory`, `shutdown` and `telemetry`. `app` wires them; `main` runs it.

// The path of a change, in order.
pub mod product;
pub mod api;
pub mod db;
pub mod replication;
pub mod retention;
pub mod listener;
pub mod distributor;
pub mod protocol;
pub mod feed;
pub mod session;
pub mod sse;
pub mod presence;

// Around the path.
pub mod config;
pub mod http_error;
pub mod access;
pub mod hardening;
pub mod serve;
pub mod tls;
pub mod acme;
pub mod health;
pub mod metrics;
pub mod openapi;
pub mod web;
pub mod memory;
pub mod shutdown;
pub mod telemetry;

// Wiring.
pub mod app;

pub use app::App;
pub use config::Config;
