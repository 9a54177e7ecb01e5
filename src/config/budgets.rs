//! Budgets: how much of the server all clients together, and one client address, may hold
//! (sessions, subscriptions), and how fast one session may send commands. Per-connection caps
//! (`--max-subscriptions`) live in `Limits`; these bound what many connections add up to, so
//! opening more sockets or HTTP/2 streams does not buy an attacker more.

use std::time::Duration;

use clap::Args;

use super::parse_positive;

/// Sessions (WebSockets and event streams, over HTTP/1.1 or as HTTP/2 streams) in all: the same
/// as the connection limit, so HTTP/2's 200 streams per connection cannot multiply what the
/// connection limit allows.
pub(super) const DEFAULT_MAX_SESSIONS: usize = 16_384;
/// Sessions per client address: as many as connections per address (a browser tab needs one).
pub(super) const DEFAULT_MAX_SESSIONS_PER_IP: usize = 1024;
/// Subscriptions in all. A subscription costs ~100 bytes in the distributor's two maps, so a
/// million is ~100 MB: far above real use (10 000 tabs × 100 products), far below what would
/// exhaust a small server.
pub(super) const DEFAULT_MAX_TOTAL_SUBSCRIPTIONS: usize = 1_000_000;
/// Subscriptions per client address: one fully subscribed connection's worth, so one host
/// cannot take more than a tenth of the server's budget.
pub(super) const DEFAULT_MAX_SUBSCRIPTIONS_PER_IP: usize = 100_000;
/// Commands one session may send per second on average. A page subscribes a handful of times;
/// 100/s lets an app re-subscribe on every navigation, while a flood reaches the distributor at
/// this pace, not at the pace of the network.
pub(super) const DEFAULT_COMMAND_RATE: u32 = 100;
/// Commands one session may send at once before the rate applies (page load bursts).
pub(super) const DEFAULT_COMMAND_BURST: u32 = 200;

/// Server-wide and per-address budgets. Per-address budgets spare `--per-ip-limit-exempt`
/// (loopback by default, where a local proxy carries everyone); the server-wide ones spare no one.
#[derive(Debug, Clone, Copy, Args)]
pub struct Budgets {
    /// WebSocket and event-stream sessions in all (HTTP/2 streams count one each); more are
    /// answered 503 `too_many_sessions`.
    #[arg(long, env = "ROWCAST_MAX_SESSIONS", default_value_t = DEFAULT_MAX_SESSIONS,
          value_parser = parse_positive)]
    pub max_sessions: usize,

    /// Sessions per client address; more are answered 429 `too_many_sessions_from_address`.
    #[arg(long, env = "ROWCAST_MAX_SESSIONS_PER_IP", default_value_t = DEFAULT_MAX_SESSIONS_PER_IP,
          value_parser = parse_positive)]
    pub max_sessions_per_ip: usize,

    /// Subscriptions in all sessions together; a subscribe past it is refused whole with
    /// `server_subscription_budget`.
    #[arg(long, env = "ROWCAST_MAX_TOTAL_SUBSCRIPTIONS",
          default_value_t = DEFAULT_MAX_TOTAL_SUBSCRIPTIONS, value_parser = parse_positive)]
    pub max_total_subscriptions: usize,

    /// Subscriptions of all sessions from one client address; a subscribe past it is refused
    /// whole with `address_subscription_budget`.
    #[arg(long, env = "ROWCAST_MAX_SUBSCRIPTIONS_PER_IP",
          default_value_t = DEFAULT_MAX_SUBSCRIPTIONS_PER_IP, value_parser = parse_positive)]
    pub max_subscriptions_per_ip: usize,

    /// Commands per second one session may send on average, each started KiB of a frame
    /// counting as one; faster senders are read more slowly (nothing is dropped).
    #[arg(long, env = "ROWCAST_COMMAND_RATE", default_value_t = DEFAULT_COMMAND_RATE,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub command_rate: u32,

    /// Commands one session may send in a burst before `--command-rate` applies.
    #[arg(long, env = "ROWCAST_COMMAND_BURST", default_value_t = DEFAULT_COMMAND_BURST,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub command_burst: u32,
}

impl Budgets {
    /// Time one command's share of the rate takes.
    pub fn command_interval(&self) -> Duration {
        Duration::from_secs(1) / self.command_rate
    }
}
