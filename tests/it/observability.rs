//! What an operator's tools see: `/metrics` parses as Prometheus text and its counters follow
//! what happened; `/readyz` turns 503 while the LISTEN connection is down and 200 again after.

use std::time::Duration;

use prometheus_parse::{Sample, Scrape, Value};
use serde_json::json;

use crate::support::{TestApp, WsClient, product, spawn_app, wait_until};

async fn scrape(app: &TestApp) -> Vec<Sample> {
    let response = app
        .http
        .get(format!("{}/metrics", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
        "{:?}",
        response.headers()
    );
    let text = response.text().await.unwrap();
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let scrape = Scrape::parse(lines.iter().cloned().map(Ok)).unwrap();
    // The parser skips lines it cannot read; every sample line must have become a sample (a
    // histogram's buckets fold into one sample per label set; `_sum` and `_count` stay apart).
    let sample_lines = lines
        .iter()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter(|line| !line.contains("_bucket{"))
        .count();
    let plain_samples = scrape
        .samples
        .iter()
        .filter(|sample| !matches!(sample.value, Value::Histogram(_) | Value::Summary(_)))
        .count();
    assert_eq!(sample_lines, plain_samples, "unparsed lines in:\n{text}");
    scrape.samples
}

/// The sample of `metric` with (at least) these labels; fails the test if there is none.
fn sample<'a>(samples: &'a [Sample], metric: &str, labels: &[(&str, &str)]) -> &'a Sample {
    samples
        .iter()
        .find(|sample| {
            sample.metric == metric
                && labels
                    .iter()
                    .all(|(key, value)| sample.labels.get(key) == Some(value))
        })
        .unwrap_or_else(|| panic!("no {metric}{labels:?} in {samples:#?}"))
}

fn value(samples: &[Sample], metric: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = sample(samples, metric, labels);
    match &sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        Value::Histogram(buckets) => buckets.last().map_or(0.0, |bucket| bucket.count),
        Value::Summary(_) => panic!("{metric} is a summary"),
    }
}

/// Observations in a histogram (its +Inf bucket).
fn observations(samples: &[Sample], metric: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = sample(samples, metric, labels);
    let Value::Histogram(buckets) = &sample.value else {
        panic!("{metric} is not a histogram: {sample:?}")
    };
    buckets
        .iter()
        .find(|bucket| bucket.less_than.is_infinite())
        .map_or(0.0, |bucket| bucket.count)
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_counters_follow_events() {
    let app = spawn_app().await;
    let before = scrape(&app).await;
    assert_eq!(value(&before, "rowcast_sessions", &[]), 0.0);
    assert_eq!(value(&before, "rowcast_listener_connected", &[]), 1.0);
    assert_eq!(
        value(
            &before,
            "rowcast_messages_delivered_total",
            &[("transport", "websocket")]
        ),
        0.0
    );

    let id = app.create_product(product("Metered")).await["productId"]
        .as_i64()
        .unwrap();
    let mut client = WsClient::connect(&app.ws_url).await;
    client.subscribe(&[id]).await;
    for units in 1..=3 {
        app.patch_product(id, json!({"unitsAvailable": units}))
            .await;
        client.next_change().await;
    }
    let mut resumer = WsClient::connect(&app.ws_url).await;
    resumer
        .send_json(&json!({"command": "subscribe", "productIDs": [id], "since": 0}))
        .await;
    resumer.next_json().await;
    for _ in 0..4 {
        resumer.next_change().await;
    }
    let missing = app
        .http
        .get(format!("{}/products/999999", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    let after = scrape(&app).await;
    assert_eq!(value(&after, "rowcast_sessions", &[]), 2.0);
    assert_eq!(value(&after, "rowcast_subscriptions", &[]), 2.0);
    assert_eq!(value(&after, "rowcast_products_with_subscribers", &[]), 1.0);
    assert_eq!(value(&after, "rowcast_changes_published_total", &[]), 4.0);
    assert_eq!(
        value(
            &after,
            "rowcast_changes_received_total",
            &[("source", "notification")]
        ),
        4.0
    );
    // Subscriber 1: ack + 3 changes; subscriber 2: ack + 4 replayed changes.
    assert_eq!(
        value(
            &after,
            "rowcast_messages_delivered_total",
            &[("transport", "websocket")]
        ),
        9.0
    );
    assert!(
        value(
            &after,
            "rowcast_bytes_sent_total",
            &[("transport", "websocket")]
        ) > 400.0
    );
    assert_eq!(
        value(
            &after,
            "rowcast_subscription_starts_total",
            &[("kind", "live")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "rowcast_subscription_starts_total",
            &[("kind", "resume")]
        ),
        1.0
    );
    assert_eq!(value(&after, "rowcast_last_seq", &[]), 4.0);
    assert_eq!(
        value(
            &after,
            "rowcast_queue_overflows_total",
            &[("policy", "disconnect")]
        ),
        0.0
    );
    assert!(observations(&after, "rowcast_dispatch_lag_seconds", &[]) >= 4.0);
    assert_eq!(
        observations(
            &after,
            "rowcast_http_request_duration_seconds",
            &[
                ("route", "/products/:id"),
                ("method", "PATCH"),
                ("status", "200")
            ]
        ),
        3.0
    );
    assert_eq!(
        observations(
            &after,
            "rowcast_http_request_duration_seconds",
            &[
                ("route", "/products/:id"),
                ("method", "GET"),
                ("status", "404")
            ]
        ),
        1.0
    );
    assert_eq!(
        observations(
            &after,
            "rowcast_http_request_duration_seconds",
            &[
                ("route", "/products"),
                ("method", "POST"),
                ("status", "201")
            ]
        ),
        1.0
    );
}

async fn readyz(app: &TestApp) -> (u16, serde_json::Value) {
    let response = app
        .http
        .get(format!("{}/readyz", app.base_url))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn readyz_is_503_while_the_listen_connection_is_down_and_200_after() {
    let app = spawn_app().await;
    assert_eq!(
        readyz(&app).await,
        (200, json!({"status": "ready", "reasons": []}))
    );

    // The listener reconnects after ~100 ms; poll faster than that after each kill.
    let mut seen_down = None;
    for _ in 0..5 {
        assert_eq!(crate::support::terminate_listener(&app.pool).await, 1);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while tokio::time::Instant::now() < deadline {
            let (status, body) = readyz(&app).await;
            if status == 503 {
                seen_down = Some(body);
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if seen_down.is_some() {
            break;
        }
        app.wait_for_listener().await;
    }
    let body = seen_down.expect("/readyz answered 503 while LISTEN was down");
    assert_eq!(body["status"], "unavailable");
    assert!(
        body["reasons"][0].as_str().unwrap().contains("LISTEN"),
        "{body}"
    );

    wait_until(Duration::from_secs(10), "/readyz recovering", || async {
        readyz(&app).await.0 == 200
    })
    .await;
    assert!(app.stats().await["listener"]["reconnects"].as_u64() >= Some(1));
    // Liveness never depended on it.
    let health = app
        .http
        .get(format!("{}/healthz", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn readyz_names_unapplied_migrations() {
    let app = spawn_app().await;
    sqlx::query("UPDATE _sqlx_migrations SET success = false WHERE version = 3")
        .execute(&app.pool)
        .await
        .unwrap();
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["reasons"][0]
            .as_str()
            .unwrap()
            .starts_with("migrations not applied: 3 "),
        "{body}"
    );
}
