//! The REST API as a client sees it: every endpoint, every error status, pagination edges.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{product, spawn_app};

async fn body(response: reqwest::Response) -> Value {
    response.json().await.expect("JSON body")
}

/// Asserts an error response's status, machine code, and that the message mentions `needle`.
async fn assert_error(response: reqwest::Response, status: StatusCode, code: &str, needle: &str) {
    assert_eq!(response.status(), status);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let body = body(response).await;
    assert_eq!(body["error"], code, "{body}");
    let message = body["message"].as_str().expect("message is text");
    assert!(
        message.contains(needle),
        "message {message:?} should mention {needle:?}"
    );
}

#[tokio::test]
async fn create_read_replace_patch_delete() {
    let app = spawn_app().await;
    let url = |path: &str| format!("{}{path}", app.base_url);

    let response = app
        .http
        .post(url("/products"))
        .json(&product("Anvil"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let created = body(response).await;
    let id = created["productId"].as_i64().unwrap();
    assert_eq!(location, format!("/products/{id}"));
    assert_eq!(
        created,
        json!({"productId": id, "manufacturer": "Acme", "pricePerUnit": "9.99", "unitsAvailable": 10, "productName": "Anvil"})
    );

    let fetched = body(app.http.get(url(&location)).send().await.unwrap()).await;
    assert_eq!(fetched, created);

    let replaced = app
        .http
        .put(url(&location))
        .json(&json!({"productId": id, "manufacturer": "Bolt Co", "pricePerUnit": "1", "unitsAvailable": 0, "productName": "Bolt"}))
        .send()
        .await
        .unwrap();
    assert_eq!(replaced.status(), StatusCode::OK);
    assert_eq!(body(replaced).await["manufacturer"], "Bolt Co");

    let patched = app
        .http
        .patch(url(&location))
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"unitsAvailable": 7}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), StatusCode::OK);
    let patched = body(patched).await;
    assert_eq!(patched["unitsAvailable"], 7);
    assert_eq!(patched["productName"], "Bolt", "untouched fields stay");

    let empty_patch = app
        .http
        .patch(url(&location))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(body(empty_patch).await, patched);

    let deleted = app.http.delete(url(&location)).send().await.unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let gone = app.http.get(url(&location)).send().await.unwrap();
    assert_error(gone, StatusCode::NOT_FOUND, "not_found", &id.to_string()).await;
    let again = app.http.delete(url(&location)).send().await.unwrap();
    assert_error(again, StatusCode::NOT_FOUND, "not_found", "does not exist").await;
}

#[tokio::test]
async fn chosen_ids_are_kept_and_conflicts_are_409() {
    let app = spawn_app().await;
    let url = format!("{}/products", app.base_url);
    let mut body_with_id = product("Chosen");
    body_with_id["productId"] = json!(5);
    let created = app
        .http
        .post(&url)
        .json(&body_with_id)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    assert_eq!(body(created).await["productId"], 5);

    let duplicate = app
        .http
        .post(&url)
        .json(&body_with_id)
        .send()
        .await
        .unwrap();
    assert_error(duplicate, StatusCode::CONFLICT, "conflict", "5").await;

    // Ids beyond what JavaScript keeps exact are refused, so nobody can push the id sequence
    // to its end and block creation for everyone.
    for huge in [9_007_199_254_740_992_i64, i64::MAX] {
        let mut body = product("Huge");
        body["productId"] = json!(huge);
        let refused = app.http.post(&url).json(&body).send().await.unwrap();
        assert_error(
            refused,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "9007199254740991",
        )
        .await;
    }

    // Generated ids continue past the chosen one instead of colliding with it.
    let mut zero = product("Zero means assign");
    zero["productId"] = json!(0);
    let assigned = body(app.http.post(&url).json(&zero).send().await.unwrap()).await;
    assert!(assigned["productId"].as_i64().unwrap() > 5, "{assigned}");
}

#[tokio::test]
async fn pagination_walks_every_product_once_in_id_order() {
    let app = spawn_app().await;
    for n in 0..25 {
        app.create_product(product(&format!("p{n}"))).await;
    }
    let mut seen = Vec::new();
    let mut next = Some(format!("{}/products?limit=10", app.base_url));
    let mut pages = 0;
    while let Some(url) = next.take() {
        let response = app.http.get(&url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        next = response.headers().get("link").map(|link| {
            let link = link.to_str().unwrap();
            let path = link.trim_start_matches('<').split('>').next().unwrap();
            assert!(link.ends_with("rel=\"next\""), "{link}");
            format!("{}{path}", app.base_url)
        });
        let page = body(response).await;
        seen.extend(
            page.as_array()
                .unwrap()
                .iter()
                .map(|p| p["productId"].as_i64().unwrap()),
        );
        pages += 1;
    }
    assert_eq!(
        pages, 3,
        "25 products at 10 per page, no trailing empty page"
    );
    assert_eq!(seen.len(), 25);
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "ascending ids: {seen:?}"
    );

    let default_page = body(
        app.http
            .get(format!("{}/products", app.base_url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        default_page.as_array().unwrap().len(),
        25,
        "default limit is 100"
    );
    let past_end = app
        .http
        .get(format!("{}/products?after={}", app.base_url, seen[24]))
        .send()
        .await
        .unwrap();
    assert!(past_end.headers().get("link").is_none());
    assert_eq!(body(past_end).await, json!([]));

    for (query, needle) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=abc", "limit"),
        ("after=-1", "after"),
        ("colour=red", "colour"),
    ] {
        let response = app
            .http
            .get(format!("{}/products?{query}", app.base_url))
            .send()
            .await
            .unwrap();
        assert_error(response, StatusCode::BAD_REQUEST, "invalid_query", needle).await;
    }
    let max = app
        .http
        .get(format!("{}/products?limit=1000", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(max.status(), StatusCode::OK);
}

#[tokio::test]
async fn bad_requests_get_the_right_status_and_a_message_naming_the_problem() {
    let app = spawn_app().await;
    let existing = app.create_product(product("Target")).await;
    let id = existing["productId"].as_i64().unwrap();
    let products = format!("{}/products", app.base_url);
    let one = format!("{products}/{id}");

    let malformed = app
        .http
        .post(&products)
        .header("content-type", "application/json")
        .body("{\"manufacturer\": ")
        .send()
        .await
        .unwrap();
    assert_error(malformed, StatusCode::BAD_REQUEST, "malformed_json", "EOF").await;

    let wrong_type = app
        .http
        .post(&products)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_error(
        wrong_type,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        "application/json",
    )
    .await;

    let huge = "x".repeat(2 * 1024 * 1024);
    let too_large = app
        .http
        .post(&products)
        .json(&json!({"manufacturer": huge, "pricePerUnit": "1", "unitsAvailable": 1, "productName": "n"}))
        .send()
        .await
        .unwrap();
    assert_error(
        too_large,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "larger",
    )
    .await;

    let cases = [
        (
            json!({"manufacturer": "", "pricePerUnit": "1", "unitsAvailable": 1, "productName": "n"}),
            "manufacturer",
        ),
        (
            json!({"manufacturer": "m", "pricePerUnit": "1", "unitsAvailable": 1, "productName": "  "}),
            "productName",
        ),
        (
            json!({"manufacturer": "m", "pricePerUnit": "1", "unitsAvailable": -1, "productName": "n"}),
            "unitsAvailable",
        ),
        (
            json!({"manufacturer": "m", "pricePerUnit": "1", "unitsAvailable": "many", "productName": "n"}),
            "unitsAvailable",
        ),
        (
            json!({"manufacturer": "m", "pricePerUnit": 1.5, "unitsAvailable": 1, "productName": "n"}),
            "pricePerUnit",
        ),
        (
            json!({"manufacturer": "m", "pricePerUnit": " ", "unitsAvailable": 1, "productName": "n"}),
            "pricePerUnit",
        ),
        (
            json!({"manufacturer": "m", "pricePerUnit": "1", "unitsAvailable": 1}),
            "productName",
        ),
        (
            json!({"manufacturer": "m", "pricePerUnit": "1", "unitsAvailable": 1, "productName": "n", "colour": "red"}),
            "colour",
        ),
        (json!([1, 2]), "JSON object"),
    ];
    for (bad, field) in cases {
        let response = app.http.post(&products).json(&bad).send().await.unwrap();
        assert_error(
            response,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            field,
        )
        .await;
    }

    let mut other_id = product("Mismatch");
    other_id["productId"] = json!(id + 1000);
    let put_mismatch = app.http.put(&one).json(&other_id).send().await.unwrap();
    assert_error(
        put_mismatch,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
        "productId",
    )
    .await;
    let patch_null = app
        .http
        .patch(&one)
        .json(&json!({"productName": null}))
        .send()
        .await
        .unwrap();
    assert_error(
        patch_null,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
        "productName",
    )
    .await;
    let patch_unknown = app
        .http
        .patch(&one)
        .json(&json!({"colour": "red"}))
        .send()
        .await
        .unwrap();
    assert_error(
        patch_unknown,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
        "colour",
    )
    .await;

    let put_missing = app
        .http
        .put(format!("{products}/999999"))
        .json(&product("x"))
        .send()
        .await
        .unwrap();
    assert_error(put_missing, StatusCode::NOT_FOUND, "not_found", "999999").await;
    let patch_missing = app
        .http
        .patch(format!("{products}/999999"))
        .json(&json!({"unitsAvailable": 1}))
        .send()
        .await
        .unwrap();
    assert_error(patch_missing, StatusCode::NOT_FOUND, "not_found", "999999").await;
    let bad_path = app
        .http
        .get(format!("{products}/abc"))
        .send()
        .await
        .unwrap();
    assert_error(
        bad_path,
        StatusCode::BAD_REQUEST,
        "invalid_product_id",
        "abc",
    )
    .await;
    let negative_path = app.http.get(format!("{products}/-3")).send().await.unwrap();
    assert_error(
        negative_path,
        StatusCode::BAD_REQUEST,
        "invalid_product_id",
        "-3",
    )
    .await;
    let zero_path = app.http.get(format!("{products}/0")).send().await.unwrap();
    assert_error(zero_path, StatusCode::NOT_FOUND, "not_found", "0").await;
    let no_route = app
        .http
        .get(format!("{}/nothing-here", app.base_url))
        .send()
        .await
        .unwrap();
    assert_error(no_route, StatusCode::NOT_FOUND, "not_found", "path").await;
    let wrong_method = app.http.delete(&products).send().await.unwrap();
    assert_error(
        wrong_method,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method",
    )
    .await;

    // None of the above changed the product.
    let after = body(app.http.get(&one).send().await.unwrap()).await;
    assert_eq!(after, existing);
}

#[tokio::test]
async fn the_original_services_request_works_as_written() {
    let app = spawn_app().await;
    // Verbatim from the Go service rowcast replaces: id 0 means "assign one", the price is text.
    let created = app
        .http
        .post(format!("{}/products", app.base_url))
        .header("content-type", "application/json")
        .body(r#"{"productId":0,"manufacturer":"Apple","pricePerUnit":"500EUR","unitsAvailable":6,"productName":"MacBook Pro"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let created = body(created).await;
    let id = created["productId"].as_i64().unwrap();
    assert!(id > 0);
    let read = body(
        app.http
            .get(format!("{}/products/{id}", app.base_url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        read,
        json!({"productId": id, "manufacturer": "Apple", "pricePerUnit": "500EUR", "unitsAvailable": 6, "productName": "MacBook Pro"})
    );
}

#[tokio::test]
async fn when_generated_ids_run_out_a_post_gets_a_json_error_and_commits_nothing() {
    let app = spawn_app().await;
    let max = 9_007_199_254_740_991_i64;
    let mut at_max = product("Last");
    at_max["productId"] = json!(max);
    let response = app
        .http
        .post(format!("{}/products", app.base_url))
        .json(&at_max)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let rows_before: i64 = sqlx::query_scalar("SELECT count(*) FROM products")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let response = app
        .http
        .post(format!("{}/products", app.base_url))
        .json(&product("One too many"))
        .send()
        .await
        .unwrap();
    assert_error(
        response,
        StatusCode::CONFLICT,
        "product_ids_exhausted",
        "choose a free productId",
    )
    .await;
    let rows_after: i64 = sqlx::query_scalar("SELECT count(*) FROM products")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(rows_after, rows_before, "nothing committed");
    // A chosen free id still works, and lists walk past the largest id without a 500.
    let mut chosen = product("Chosen");
    chosen["productId"] = json!(5);
    let response = app
        .http
        .post(format!("{}/products", app.base_url))
        .json(&chosen)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    for after in [0, 5, max - 1, max] {
        let list = app
            .http
            .get(format!("{}/products?after={after}", app.base_url))
            .send()
            .await
            .unwrap();
        assert_eq!(list.status(), StatusCode::OK, "after={after}");
    }
    // Even the database refuses ids the API could not serve.
    let refused = sqlx::query(
        "INSERT INTO products (product_id, manufacturer, price_per_unit, units_available, product_name)
         VALUES (9007199254740992, 'm', '1', 1, 'n')",
    )
    .execute(&app.pool)
    .await;
    assert!(
        refused.is_err(),
        "ids above 2^53-1 are refused by the table"
    );
}
