//! Parsing of flags: defaults as documented, bad values named with their flag.

use super::*;

fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("rowcast").chain(args.iter().copied()))
}

#[test]
fn defaults_parse_and_match_the_documented_values() {
    let cli = parse(&[]).unwrap();
    assert!(cli.command.is_none());
    assert_eq!(cli.config.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!(cli.config.heartbeat.interval, Duration::from_secs(30));
    assert_eq!(cli.config.limits.max_frame_bytes, 256 * 1024);
    assert_eq!(cli.config.hardening.write_timeout, Duration::from_secs(30));
    assert_eq!(cli.config.db_max_connections, 16);
    assert_eq!(
        cli.config.history.connections,
        crate::config::default_db_history_connections()
    );
    assert!((1..=4).contains(&cli.config.history.connections));
    assert_eq!(cli.config.history.queue, 256);
    assert_eq!(cli.config.history.acquire_timeout, Duration::from_secs(5));
}

#[test]
fn history_pool_settings_are_checked_with_the_flag_named() {
    let cli = parse(&[
        "--db-history-connections",
        "1",
        "--db-history-queue",
        "2",
        "--db-history-acquire-timeout",
        "250ms",
    ])
    .unwrap();
    assert_eq!(cli.config.history.connections, 1);
    assert_eq!(cli.config.history.queue, 2);
    assert_eq!(
        cli.config.history.acquire_timeout,
        Duration::from_millis(250)
    );
    for (flag, bad, says) in [
        ("--db-history-connections", "0", "0 is not in 1..=10000"),
        ("--db-history-queue", "0", "at least 1"),
        ("--db-history-queue", "many", "not a whole number"),
        ("--db-history-acquire-timeout", "0s", "greater than zero"),
    ] {
        let err = parse(&[flag, bad]).unwrap_err().to_string();
        assert!(err.contains(flag) && err.contains(says), "{err}");
    }
}

#[test]
fn durations_accept_units_and_refuse_nonsense() {
    assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
    assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
    assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
    assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
    for bad in ["", "0s", "fast", "5 parsecs", "-1s"] {
        assert!(parse_duration(bad).is_err(), "{bad}");
    }
}

#[test]
fn bad_values_are_reported_with_the_flag_name() {
    let err = parse(&["--outbox-capacity", "0"]).unwrap_err().to_string();
    assert!(
        err.contains("--outbox-capacity") && err.contains("at least 1"),
        "{err}"
    );
    // No "0 = off": a write without a deadline is what lets a reader that stopped hold its
    // connection forever.
    let err = parse(&["--write-timeout", "0s"]).unwrap_err().to_string();
    assert!(
        err.contains("--write-timeout") && err.contains("greater than zero"),
        "{err}"
    );
    let err = parse(&["--listen", "localhost"]).unwrap_err().to_string();
    assert!(err.contains("--listen"), "{err}");
    assert!(parse(&["migrate"]).unwrap().command.is_some());
}

#[test]
fn transport_defaults_keep_plain_http_only_and_exempt_loopback() {
    let cli = parse(&[]).unwrap();
    assert!(!cli.config.tls.enabled());
    assert_eq!(cli.config.tls.listen.to_string(), DEFAULT_TLS_LISTEN);
    assert!(cli.config.access.api_token.is_none());
    let exempt = &cli.config.hardening.per_ip_limit_exempt;
    assert!(
        exempt
            .iter()
            .any(|net| net.contains("127.0.0.9".parse().unwrap()))
    );
    assert!(
        exempt
            .iter()
            .any(|net| net.contains("::1".parse().unwrap()))
    );
    assert!(
        !exempt
            .iter()
            .any(|net| net.contains("10.0.0.1".parse().unwrap()))
    );
    let none = parse(&["--per-ip-limit-exempt"]).unwrap();
    assert!(none.config.hardening.per_ip_limit_exempt.is_empty());
    let token = parse(&["--api-token", "0123456789abcdef"]).unwrap();
    assert_eq!(
        format!("{:?}", token.config.access.api_token),
        "Some(Secret(..))"
    );
}

#[test]
fn the_source_defaults_to_notify_and_replication_has_its_command() {
    let cli = parse(&[]).unwrap();
    assert_eq!(cli.config.source.source, Source::Notify);
    assert_eq!(cli.config.source.replication_name, None);
    let cli = parse(&["--source", "replication", "--replication-name", "edge_1"]).unwrap();
    assert_eq!(cli.config.source.source, Source::Replication);
    assert_eq!(
        cli.config.source.replication_name.as_deref(),
        Some("edge_1")
    );
    let err = parse(&["--source", "wal"]).unwrap_err().to_string();
    assert!(err.contains("--source"), "{err}");
    let cli = parse(&["replication", "drop"]).unwrap();
    assert!(matches!(
        cli.command,
        Some(Command::Replication(ReplicationCommand::Drop))
    ));
}
