//! Integration tests, grouped by what a user can observe. One binary: one link step, shared
//! helpers compiled once.

// Items here are `pub` for sibling test modules; the crate itself is never a library.
#![allow(unreachable_pub)]
// A failed unwrap in a test is a failed test, with its location: what a test should do.
#![allow(clippy::unwrap_used)]

mod access;
mod acme;
mod bad_input;
mod browser;
mod budgets;
mod dashboard;
mod delivery;
mod fanout;
mod faults;
mod hosts;
mod integrity;
mod isolation;
mod listener_recovery;
mod observability;
mod pg_tls;
mod ordering;
mod presence;
mod process;
mod proxy;
mod products_api;
mod replication;
mod slow_client;
mod subscriptions;
mod whole_catalog;
mod support;
mod tls;
mod write_deadline;
