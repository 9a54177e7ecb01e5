//! rowcast pushes committed Postgres row changes to browsers over WebSockets.
//!
//! Data flows one way, and the modules are listed in that order:
//!
//! ```text
//! REST client ─▶ api ─▶ db ─▶ Postgres ─▶ trigger (pg_notify 'product_change')
//!                                             │
//!           browser ◀─ session ◀─ distributor ◀─ listener
//! ```
//!
//! Commands flow the other way only from sessions to the distributor (subscribe, unsubscribe,
//! disconnect). `app` wires the pieces; `main` parses the command line and runs it.

pub mod access;
pub mod api;
pub mod app;
pub mod config;
pub mod db;
pub mod distributor;
pub mod feed;
pub mod hardening;
pub mod health;
pub mod http_error;
pub mod listener;
pub mod memory;
pub mod metrics;
pub mod openapi;
pub mod product;
pub mod protocol;
pub mod retention;
pub mod serve;
pub mod session;
pub mod shutdown;
pub mod sse;
pub mod telemetry;
pub mod tls;
pub mod web;

pub use app::App;
pub use config::Config;
