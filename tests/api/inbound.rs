//! Inbound HTTP: Hasura event triggers, FusionAuth webhooks, health and metrics.

use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;

use crate::fake_fusionauth::FakeFusionAuth;
use crate::helpers::*;

/// A Hasura event for a users row, in the documented v2 shape.
fn hasura_user_event(op: &str, id: Uuid, email: &str) -> Value {
    let row = json!({"id": id.to_string(), "email": email, "first_name": "Hasura", "active": true});
    let (old, new) = match op {
        "INSERT" | "MANUAL" => (Value::Null, row),
        "DELETE" => (row, Value::Null),
        _ => (row.clone(), row),
    };
    let mut ev = fixture("hasura/insert_docs_v2.json");
    ev["id"] = json!(Uuid::new_v4().to_string());
    ev["created_at"] = json!("2025-09-13T12:21:08.552674");
    ev["event"]["op"] = json!(op);
    ev["event"]["data"] = json!({"old": old, "new": new});
    ev["delivery_info"] = json!({"current_retry": 0, "max_retries": 3});
    ev
}

/// Hasura as the only source: no Postgres trigger.
async fn hasura_only() -> TestApp {
    TestApp::spawn_with(|env| {
        env.insert(
            "FUSIONSYNC__SOURCES__POSTGRES_TRIGGERS".into(),
            "false".into(),
        );
    })
    .await
}

#[tokio::test]
async fn a_hasura_insert_event_syncs_the_row_to_fusionauth() {
    let app = hasura_only().await;
    let id = Uuid::new_v4();
    app.db.insert_user(id, "h@example.com").await;
    assert_eq!(
        app.db.count("select count(*) from fusionsync.event").await,
        0,
        "trigger is off"
    );
    let resp = app
        .post_hasura(&hasura_user_event("INSERT", id, "h@example.com"))
        .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], "recorded");
    eventually(Duration::from_secs(10), "the user", || async {
        app.fa.user(&id).is_some()
    })
    .await;
    // The row is the truth, not the event's copy of it.
    assert_eq!(app.fa.user(&id).unwrap()["firstName"], "First");
    app.finish().await;
}

#[tokio::test]
async fn every_hasura_op_and_both_body_versions_are_recorded() {
    // A table whose id is text, so the documented bodies (id "42", id 1) are valid rows.
    let db = TestDb::with_schema("create table users (id text primary key, email text, username text, first_name text, last_name text, active boolean, data jsonb)").await;
    let fa = FakeFusionAuth::start().await;
    let app = TestApp::spawn_on(db, fa, |env| {
        env.insert(
            "FUSIONSYNC__SOURCES__POSTGRES_TRIGGERS".into(),
            "false".into(),
        );
        env.insert("FUSIONSYNC__ORGANIZATIONS__ENABLED".into(), "false".into());
        env.insert("FUSIONSYNC__MEMBERSHIPS__ENABLED".into(), "false".into());
        env.insert("FUSIONSYNC__WORKER__ENABLED".into(), "false".into());
    })
    .await;
    for name in [
        "insert_docs_v1.json",
        "insert_docs_v2.json",
        "invocation_log_wrapped.json",
    ] {
        let resp = app.post_hasura(&fixture(&format!("hasura/{name}"))).await;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(status, 200, "{name}: {body}");
    }
    // v1 and v2 examples share an id: the second is a duplicate delivery.
    assert_eq!(
        app.db
            .count("select count(*) from fusionsync.event where source = 'hasura'")
            .await,
        2
    );
    for op in ["UPDATE", "DELETE", "MANUAL"] {
        let mut ev = fixture("hasura/insert_docs_v1.json");
        ev["id"] = json!(Uuid::new_v4().to_string());
        ev["event"]["op"] = json!(op);
        ev["event"]["session_variables"] = Value::Null;
        ev["event"]["trace_context"] = json!({"trace_id": 123, "span_id": 456});
        if op == "DELETE" {
            ev["event"]["data"] = json!({"old": {"id": "42"}, "new": null});
        }
        let resp = app.post_hasura(&ev).await;
        assert_eq!(resp.status(), 200, "{op}");
    }
    let ops: Vec<String> = sqlx::query_scalar("select op from fusionsync.event order by id")
        .fetch_all(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(ops, vec!["INSERT", "INSERT", "UPDATE", "DELETE", "MANUAL"]);
    app.finish().await;
}

#[tokio::test]
async fn a_duplicate_hasura_delivery_is_recorded_once() {
    let app = hasura_only().await;
    let id = Uuid::new_v4();
    app.db.insert_user(id, "dup@example.com").await;
    let ev = hasura_user_event("INSERT", id, "dup@example.com");
    for _ in 0..3 {
        assert_eq!(app.post_hasura(&ev).await.status(), 200);
    }
    assert_eq!(
        app.db.count("select count(*) from fusionsync.event").await,
        1
    );
    app.settle().await;
    assert_eq!(app.fa.max_creates(), 1);
    app.finish().await;
}

#[tokio::test]
async fn bad_hasura_requests_get_their_status_and_change_nothing() {
    let app = hasura_only().await;
    let id = Uuid::new_v4();
    let good = hasura_user_event("INSERT", id, "x@example.com");
    let url = app.url("/hasura/events");
    let c = &app.http;
    let mut cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        ("no secret", c.post(&url).json(&good), 401, "unauthorized"),
        (
            "wrong secret",
            c.post(&url)
                .header("X-Fusionsync-Secret", "nope")
                .json(&good),
            401,
            "unauthorized",
        ),
        (
            "not JSON",
            c.post(&url)
                .header("X-Fusionsync-Secret", HASURA_SECRET)
                .header("content-type", "application/json")
                .body("{not json"),
            400,
            "invalid_request",
        ),
        (
            "empty body",
            c.post(&url)
                .header("X-Fusionsync-Secret", HASURA_SECRET)
                .header("content-type", "application/json")
                .body(""),
            400,
            "invalid_request",
        ),
        (
            "wrong content type",
            c.post(&url)
                .header("X-Fusionsync-Secret", HASURA_SECRET)
                .header("content-type", "text/plain")
                .body(good.to_string()),
            415,
            "unsupported_media_type",
        ),
        (
            "huge body",
            c.post(&url)
                .header("X-Fusionsync-Secret", HASURA_SECRET)
                .header("content-type", "application/json")
                .body(format!("{{\"pad\": \"{}\"}}", "x".repeat(2 * 1024 * 1024))),
            413,
            "payload_too_large",
        ),
    ];
    let mut variants: Vec<(&str, Value, u16, &str)> = Vec::new();
    let mut v = good.clone();
    v["event"]["op"] = json!("TRUNCATE");
    variants.push(("unknown op", v, 400, "event.op"));
    let mut v = good.clone();
    v.as_object_mut().unwrap().remove("table");
    variants.push(("missing table", v, 400, "table"));
    let mut v = good.clone();
    v["event"]["data"]["new"] = json!("a string");
    variants.push(("row of the wrong type", v, 400, "event.data.new"));
    let mut v = good.clone();
    v["event"]["data"]["new"]["id"] = json!("42'; drop table users; --");
    variants.push(("non-uuid id", v, 400, "event.data.new.id"));
    let mut v = good.clone();
    v["event"]["data"]["new"]["id"] = json!({"nested": true});
    variants.push(("id of the wrong type", v, 400, "event.data.new.id"));
    let mut v = good.clone();
    v["table"]["name"] = json!("invoices");
    variants.push(("unknown table", v, 422, "unknown_table"));
    for (name, body, status, expect) in &variants {
        cases.push((
            name,
            c.post(&url)
                .header("X-Fusionsync-Secret", HASURA_SECRET)
                .json(body),
            *status,
            expect,
        ));
    }
    for (name, req, status, expect) in cases {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{name}");
        let body: Value = resp
            .json()
            .await
            .unwrap_or_else(|e| panic!("{name}: JSON error body expected: {e}"));
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}: {body}"
        );
        let text = body.to_string();
        assert!(text.contains(expect), "{name}: {body}");
    }
    assert_eq!(
        app.db.count("select count(*) from fusionsync.event").await,
        0,
        "nothing recorded"
    );
    assert_eq!(app.db.count("select count(*) from users").await, 0);
    app.finish().await;
}

#[tokio::test]
async fn every_documented_fusionauth_event_is_accepted_and_deduplicated() {
    let app = TestApp::spawn_with(|env| {
        env.insert("FUSIONSYNC__WORKER__ENABLED".into(), "false".into());
    })
    .await;
    let names = [
        "user-create.json",
        "user-create-complete.json",
        "user-update.json",
        "user-update-complete.json",
        "user-delete.json",
        "user-delete-complete.json",
        "user-deactivate.json",
        "user-registration-create.json",
        "group-member-add.json",
        "group-member-add-complete.json",
        "group-member-remove.json",
    ];
    for name in names {
        let ev = fixture(&format!("fusionauth/events/{name}"));
        let resp = app.post_webhook(&ev).await;
        assert_eq!(resp.status(), 200, "{name}");
        // FusionAuth does not retry, but a proxy might: the same delivery again is a no-op.
        let again: Value = app.post_webhook(&ev).await.json().await.unwrap();
        assert_eq!(again["status"], "duplicate", "{name}");
    }
    assert_eq!(
        app.db
            .count("select count(*) from fusionsync.event where source = 'fusionauth'")
            .await,
        names.len() as i64
    );
    let ignored: Value = app
        .post_webhook(&json!({"event": {"type": "jwt.refresh-token.revoke", "id": "x"}}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(ignored["status"], "ignored");
    app.finish().await;
}

#[tokio::test]
async fn bad_webhooks_get_401_or_400_and_change_nothing() {
    let app = TestApp::spawn().await;
    let ev = fixture("fusionauth/events/user-create.json");
    let raw = serde_json::to_vec(&ev).unwrap();
    let url = app.url("/fusionauth/webhook");
    let c = &app.http;
    let sig = sign_webhook(&raw, WEBHOOK_SECRET);
    let other_body = serde_json::to_vec(
        &json!({"event": {"type": "user.delete", "id": "1", "user": {"id": Uuid::new_v4()}}}),
    )
    .unwrap();
    let expired = {
        let claims = json!({"request_body_sha256": fusionsync::http::signature::body_sha256(&raw), "exp": chrono::Utc::now().timestamp() - 3600});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(WEBHOOK_SECRET.as_bytes()),
        )
        .unwrap()
    };
    let cases: Vec<(&str, reqwest::RequestBuilder, u16)> = vec![
        ("no signature", c.post(&url).body(raw.clone()), 401),
        (
            "signed with another key",
            c.post(&url)
                .header("X-FusionAuth-Signature-JWT", sign_webhook(&raw, "other"))
                .body(raw.clone()),
            401,
        ),
        (
            "body swapped under a valid signature",
            c.post(&url)
                .header("X-FusionAuth-Signature-JWT", &sig)
                .body(other_body),
            401,
        ),
        (
            "expired signature",
            c.post(&url)
                .header("X-FusionAuth-Signature-JWT", expired)
                .body(raw.clone()),
            401,
        ),
        (
            "garbled signature",
            c.post(&url)
                .header("X-FusionAuth-Signature-JWT", "a.b.c")
                .body(raw.clone()),
            401,
        ),
    ];
    for (name, req, status) in cases {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{name}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "unauthorized", "{name}: {body}");
    }
    let bodies: Vec<(&str, Value, &str)> = vec![
        (
            "missing type",
            json!({"event": {"id": "1", "user": {"id": Uuid::new_v4()}}}),
            "event.type",
        ),
        (
            "type of the wrong type",
            json!({"event": {"type": 7, "id": "1"}}),
            "event.type",
        ),
        (
            "missing user",
            json!({"event": {"type": "user.create", "id": "1"}}),
            "event.user.id",
        ),
        (
            "non-uuid user id",
            json!({"event": {"type": "user.create", "id": "1", "user": {"id": "1 or 1=1"}}}),
            "event.user.id",
        ),
        ("not an object", json!([1, 2, 3]), "JSON object"),
    ];
    for (name, body, expect) in bodies {
        let resp = app.post_webhook(&body).await;
        assert_eq!(resp.status(), 400, "{name}");
        let b: Value = resp.json().await.unwrap();
        assert!(b.to_string().contains(expect), "{name}: {b}");
    }
    assert_eq!(
        app.db.count("select count(*) from fusionsync.event").await,
        0
    );
    app.finish().await;
}

#[tokio::test]
async fn webhooks_without_configured_authentication_are_refused_unless_explicitly_allowed() {
    let app = TestApp::spawn_with(|env| {
        env.remove("FUSIONSYNC__WEBHOOK__HMAC_SECRET");
    })
    .await;
    let ev = fixture("fusionauth/events/user-create.json");
    let resp = app
        .http
        .post(app.url("/fusionauth/webhook"))
        .json(&ev)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("allow_unauthenticated"));
    app.finish().await;

    let app = TestApp::spawn_with(|env| {
        env.remove("FUSIONSYNC__WEBHOOK__HMAC_SECRET");
        env.insert(
            "FUSIONSYNC__WEBHOOK__HEADER_NAME".into(),
            "X-Webhook-Token".into(),
        );
        env.insert("FUSIONSYNC__WEBHOOK__HEADER_VALUE".into(), "tok".into());
        env.insert("FUSIONSYNC__WORKER__ENABLED".into(), "false".into());
    })
    .await;
    let url = app.url("/fusionauth/webhook");
    assert_eq!(
        app.http.post(&url).json(&ev).send().await.unwrap().status(),
        401
    );
    assert_eq!(
        app.http
            .post(&url)
            .header("X-Webhook-Token", "tok")
            .json(&ev)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    app.finish().await;
}

#[tokio::test]
async fn a_fusionauth_sign_up_flows_into_the_users_table_without_echo() {
    let app = TestApp::spawn().await;
    let id = app.fa.insert_user(json!({"email": "signup@example.com", "firstName": "Sign", "lastName": "Up", "data": {"source": "hosted"}}));
    let mut ev = fixture("fusionauth/events/user-create-complete.json");
    ev["event"]["id"] = json!(Uuid::new_v4().to_string());
    ev["event"]["user"]["id"] = json!(id.to_string());
    assert_eq!(app.post_webhook(&ev).await.status(), 200);
    eventually(Duration::from_secs(10), "the row", || async {
        app.db
            .count(&format!("select count(*) from users where id = '{id}'"))
            .await
            == 1
    })
    .await;
    let (email, first, data): (String, String, Value) =
        sqlx::query_as("select email, first_name, data from users where id = $1")
            .bind(id)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(
        (email.as_str(), first.as_str()),
        ("signup@example.com", "Sign")
    );
    assert_eq!(data, json!({"source": "hosted"}));
    app.settle().await;
    // The trigger skipped fusionsync's own write: nothing went back to FusionAuth.
    assert!(app.fa.writes().is_empty(), "echo: {:?}", app.fa.writes());
    assert_eq!(
        app.db
            .count("select count(*) from fusionsync.event where source = 'postgres'")
            .await,
        0
    );

    // A Hasura event for that same write (Hasura does not know who wrote it) is a no-op too.
    let hev = hasura_user_event("INSERT", id, "signup@example.com");
    assert_eq!(app.post_hasura(&hev).await.status(), 200);
    app.settle().await;
    assert!(
        app.fa.writes().is_empty(),
        "echo via Hasura: {:?}",
        app.fa.writes()
    );

    // A change in FusionAuth flows in; deactivation too; deletion removes the row.
    app.fa.data().users.get_mut(&id).unwrap()["lastName"] = json!("Changed");
    let mut up = fixture("fusionauth/events/user-update-complete.json");
    up["event"]["user"]["id"] = json!(id.to_string());
    app.post_webhook(&up).await;
    eventually(Duration::from_secs(10), "the update", || async {
        app.db
            .count(&format!(
                "select count(*) from users where id = '{id}' and last_name = 'Changed'"
            ))
            .await
            == 1
    })
    .await;
    app.fa.data().users.get_mut(&id).unwrap()["active"] = json!(false);
    let mut de = fixture("fusionauth/events/user-deactivate.json");
    de["event"]["user"]["id"] = json!(id.to_string());
    app.post_webhook(&de).await;
    eventually(Duration::from_secs(10), "the deactivation", || async {
        app.db
            .count(&format!(
                "select count(*) from users where id = '{id}' and not active"
            ))
            .await
            == 1
    })
    .await;
    app.fa.data().users.remove(&id);
    let mut del = fixture("fusionauth/events/user-delete-complete.json");
    del["event"]["user"]["id"] = json!(id.to_string());
    app.post_webhook(&del).await;
    eventually(Duration::from_secs(10), "the deletion", || async {
        app.db
            .count(&format!("select count(*) from users where id = '{id}'"))
            .await
            == 0
    })
    .await;
    app.settle().await;
    assert!(
        app.fa.writes().is_empty(),
        "no write was caused by FusionAuth's own webhooks: {:?}",
        app.fa.writes()
    );
    assert_eq!(app.db.events_in("failed").await, 0);
    app.finish().await;
}

#[tokio::test]
async fn user_create_before_fusionauth_commits_is_retried_not_failed() {
    let app = TestApp::spawn().await;
    let id = Uuid::new_v4();
    let mut ev = fixture("fusionauth/events/user-create.json");
    ev["event"]["user"]["id"] = json!(id.to_string());
    app.post_webhook(&ev).await;
    // FusionAuth has not committed the user yet: the first reads are 404.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(app.db.count("select count(*) from users").await, 0);
    app.fa
        .insert_user(json!({"id": id.to_string(), "email": "late@example.com"}));
    eventually(Duration::from_secs(10), "the row", || async {
        app.db.count("select count(*) from users").await == 1
    })
    .await;
    app.settle().await;
    assert_eq!(app.db.events_in("failed").await, 0);
    app.finish().await;
}

#[tokio::test]
async fn a_database_change_not_yet_pushed_wins_over_a_stale_webhook() {
    let app = TestApp::spawn().await;
    let id = Uuid::new_v4();
    app.db.insert_user(id, "both@example.com").await;
    eventually(Duration::from_secs(10), "create", || async {
        app.fa.user(&id).is_some()
    })
    .await;
    app.settle().await;
    // FusionAuth is down; the row changes; an old webhook arrives for the user.
    app.fa.set_unavailable(true);
    app.db
        .exec(&format!(
            "update users set first_name = 'FromDb' where id = '{id}'"
        ))
        .await;
    let mut up = fixture("fusionauth/events/user-update.json");
    up["event"]["user"]["id"] = json!(id.to_string());
    app.post_webhook(&up).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.fa.set_unavailable(false);
    eventually(
        Duration::from_secs(15),
        "the database's change in FusionAuth",
        || async { app.fa.user(&id).is_some_and(|u| u["firstName"] == "FromDb") },
    )
    .await;
    app.settle().await;
    let first: String = sqlx::query_scalar("select first_name from users where id = $1")
        .bind(id)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(first, "FromDb");
    app.finish().await;
}

#[tokio::test]
async fn both_sources_on_at_once_sync_each_change_once() {
    let app = TestApp::spawn().await;
    let id = Uuid::new_v4();
    app.db.insert_user(id, "twice@example.com").await;
    assert_eq!(
        app.post_hasura(&hasura_user_event("INSERT", id, "twice@example.com"))
            .await
            .status(),
        200
    );
    app.settle().await;
    assert_eq!(
        app.db.count("select count(*) from fusionsync.event").await,
        2,
        "one event per source"
    );
    assert_eq!(
        app.fa.writes().len(),
        1,
        "one FusionAuth write: {:?}",
        app.fa.writes()
    );
    app.finish().await;
}

#[tokio::test]
async fn the_database_going_away_gives_503_and_the_same_request_succeeds_once_it_is_back() {
    let db = TestDb::new().await;
    let fa = FakeFusionAuth::start().await;
    let proxy = DbProxy::start(&db.url).await;
    let proxied = proxy.url_for(&db.url);
    let app = TestApp::spawn_on(db, fa, |env| {
        env.insert("DATABASE_URL".into(), proxied.clone());
        env.insert("FUSIONSYNC__DATABASE__ACQUIRE_TIMEOUT".into(), "1s".into());
        env.insert(
            "FUSIONSYNC__SOURCES__POSTGRES_TRIGGERS".into(),
            "false".into(),
        );
    })
    .await;
    let id = Uuid::new_v4();
    app.db.insert_user(id, "outage@example.com").await;
    let ev = hasura_user_event("INSERT", id, "outage@example.com");
    proxy.set_down(true);
    let resp = app.post_hasura(&ev).await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().get("retry-after").is_some());
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "database_unavailable");
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    proxy.set_down(false);
    eventually(
        Duration::from_secs(15),
        "the retried request to succeed",
        || async { app.post_hasura(&ev).await.status() == 200 },
    )
    .await;
    eventually(Duration::from_secs(15), "the user", || async {
        app.fa.user(&id).is_some()
    })
    .await;
    app.finish().await;
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let app = TestApp::spawn().await;
    let h = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(h.status(), 200);
    eventually(Duration::from_secs(5), "ready", || async {
        app.http
            .get(app.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status()
            == 200
    })
    .await;
    let id = Uuid::new_v4();
    app.db.insert_user(id, "m@example.com").await;
    eventually(Duration::from_secs(10), "sync", || async {
        app.fa.user(&id).is_some()
    })
    .await;
    app.settle().await;
    let text = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "fusionsync_events_processed_total{kind=\"user\",outcome=\"done\"} 1",
        "fusionsync_queue_depth{state=\"done\"} 1",
        "fusionsync_fusionauth_requests_total{endpoint=\"/api/user/{id}\",method=\"POST\",status=\"200\"} 1",
        "fusionsync_event_latency_seconds_count 1",
        "fusionsync_circuit_breaker_state",
        "fusionsync_oldest_pending_age_seconds",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    let nf = app.http.get(app.url("/nope")).send().await.unwrap();
    assert_eq!(nf.status(), 404);
    app.finish().await;
}

/// A webhook signed with an RSA key from FusionAuth's Key Master, verified through the JWKS.
fn sign_rs256(body: &[u8], kid: &str) -> String {
    let pem = std::fs::read(format!(
        "{}/tests/fixtures/keys/webhook-test-rsa.pem",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let claims = json!({"request_body_sha256": fusionsync::http::signature::body_sha256(body), "iat": chrono::Utc::now().timestamp()});
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn rsa_signed_webhooks_are_verified_through_the_jwks_together_with_basic_auth() {
    let fa = FakeFusionAuth::start().await;
    let jwks = format!("{}/.well-known/jwks.json", fa.url());
    let db = TestDb::new().await;
    let app = TestApp::spawn_on(db, fa, |env| {
        env.remove("FUSIONSYNC__WEBHOOK__HMAC_SECRET");
        env.insert("FUSIONSYNC__WEBHOOK__JWKS_URL".into(), jwks.clone());
        env.insert(
            "FUSIONSYNC__WEBHOOK__BASIC_USERNAME".into(),
            "fusionauth".into(),
        );
        env.insert("FUSIONSYNC__WEBHOOK__BASIC_PASSWORD".into(), "pa:ss".into());
        env.insert("FUSIONSYNC__WORKER__ENABLED".into(), "false".into());
    })
    .await;
    let url = app.url("/fusionauth/webhook");
    let body = json!({"event": {"type": "user.update", "id": Uuid::new_v4(), "user": {"id": Uuid::new_v4()}}});
    let raw = serde_json::to_vec(&body).unwrap();
    let post = |sig: String, auth: Option<(&str, &str)>, raw: Vec<u8>| {
        let mut r = app
            .http
            .post(&url)
            .header("content-type", "application/json")
            .header("X-FusionAuth-Signature-JWT", sig)
            .body(raw);
        if let Some((u, p)) = auth {
            r = r.basic_auth(u, Some(p));
        }
        r.send()
    };
    let good = sign_rs256(&raw, "webhook-test-key");
    assert_eq!(
        post(good.clone(), None, raw.clone())
            .await
            .unwrap()
            .status(),
        401,
        "basic auth is also required"
    );
    assert_eq!(
        post(good.clone(), Some(("fusionauth", "wrong")), raw.clone())
            .await
            .unwrap()
            .status(),
        401
    );
    let unknown_kid = post(
        sign_rs256(&raw, "other-key"),
        Some(("fusionauth", "pa:ss")),
        raw.clone(),
    )
    .await
    .unwrap();
    assert_eq!(unknown_kid.status(), 401);
    let b: Value = unknown_kid.json().await.unwrap();
    assert!(b["message"].as_str().unwrap().contains("other-key"), "{b}");
    let forged = sign_webhook(&raw, "guess"); // HS256 with no HMAC key configured
    assert_eq!(
        post(forged, Some(("fusionauth", "pa:ss")), raw.clone())
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        post(good, Some(("fusionauth", "pa:ss")), raw.clone())
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        app.db.count("select count(*) from fusionsync.event").await,
        1
    );
    app.finish().await;
}
