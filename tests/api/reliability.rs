//! Reliability: hostile input, rows FusionAuth refuses, scale-out, graceful shutdown.

use std::time::Duration;

use serde_json::{json, Value};
use sqlx::Connection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use crate::fake_fusionauth::FakeFusionAuth;
use crate::helpers::*;

fn hasura_body(id: &str) -> Value {
    json!({
        "id": Uuid::new_v4(), "created_at": "2025-09-13T12:21:08.552674",
        "trigger": {"name": "t"}, "table": {"schema": "public", "name": "users"},
        "event": {"op": "INSERT", "data": {"old": null, "new": {"id": id}}, "session_variables": null}
    })
}

#[tokio::test]
async fn hostile_requests_get_a_clear_4xx_json_error_and_change_nothing() {
    let app = TestApp::spawn().await;
    let hasura = app.url("/hasura/events");
    let webhook = app.url("/fusionauth/webhook");
    let deep = format!("{}1{}", "[".repeat(5000), "]".repeat(5000));
    let good = hasura_body(&Uuid::new_v4().to_string());
    let good_raw = good.to_string();
    let cases: Vec<(&str, &str, Vec<u8>, &str, u16)> = vec![
        (
            "truncated JSON",
            &hasura,
            good_raw.as_bytes()[..good_raw.len() / 2].to_vec(),
            "application/json",
            400,
        ),
        (
            "deeply nested JSON",
            &hasura,
            deep.clone().into_bytes(),
            "application/json",
            400,
        ),
        (
            "duplicated keys",
            &hasura,
            br#"{"id":"a","id":"b"}"#.to_vec(),
            "application/json",
            400,
        ),
        (
            "JSON array",
            &hasura,
            b"[]".to_vec(),
            "application/json",
            400,
        ),
        (
            "JSON string",
            &hasura,
            b"\"hi\"".to_vec(),
            "application/json",
            400,
        ),
        (
            "huge id",
            &hasura,
            hasura_body(&"x".repeat(100_000)).to_string().into_bytes(),
            "application/json",
            400,
        ),
        (
            "unicode and quotes in the id",
            &hasura,
            hasura_body("ünï'\"; --").to_string().into_bytes(),
            "application/json",
            400,
        ),
        (
            "invalid UTF-8",
            &hasura,
            vec![b'{', 0xff, 0xfe, b'}'],
            "application/json",
            400,
        ),
        (
            "form content type",
            &hasura,
            good_raw.clone().into_bytes(),
            "application/x-www-form-urlencoded",
            415,
        ),
        (
            "webhook: deeply nested",
            &webhook,
            deep.into_bytes(),
            "application/json",
            401,
        ),
    ];
    for (name, url, body, ct, status) in cases {
        let mut req = app.http.post(url).header("content-type", ct).body(body);
        if url.ends_with("/hasura/events") {
            req = req.header("X-Fusionsync-Secret", HASURA_SECRET);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{name}");
        let b: Value = resp
            .json()
            .await
            .unwrap_or_else(|e| panic!("{name}: not a JSON error: {e}"));
        assert!(
            b["error"].is_string() && b["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}: {b}"
        );
    }
    // Signed hostile bodies reach the parser.
    for (name, body) in [
        (
            "webhook: unknown type with no id",
            json!({"event": {"type": "x"}}),
        ),
        (
            "webhook: user id with SQL",
            json!({"event": {"type": "user.update", "id": "1", "user": {"id": "'; drop table users; --"}}}),
        ),
        (
            "webhook: event not an object",
            json!({"event": "user.create"}),
        ),
    ] {
        let resp = app.post_webhook(&body).await;
        assert_eq!(resp.status(), 400, "{name}");
    }
    // Wrong method, unknown path.
    let wrong_method = app.http.get(&hasura).send().await.unwrap();
    assert_eq!(wrong_method.status(), 405);
    let b: Value = wrong_method.json().await.unwrap();
    assert_eq!(b["error"], "method_not_allowed");
    assert_eq!(
        app.http
            .post(app.url("/admin"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        app.db.count("select count(*) from fusionsync.event").await,
        0,
        "nothing recorded"
    );
    // The process is still fine.
    assert_eq!(
        app.http
            .get(app.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    app.finish().await;
}

#[tokio::test]
async fn a_replayed_signature_is_a_duplicate_and_cannot_carry_another_body() {
    let app = TestApp::spawn_with(|env| {
        env.insert("FUSIONSYNC__WORKER__ENABLED".into(), "false".into());
    })
    .await;
    let body = json!({"event": {"type": "user.update", "id": Uuid::new_v4(), "user": {"id": Uuid::new_v4()}}});
    let raw = serde_json::to_vec(&body).unwrap();
    let sig = sign_webhook(&raw, WEBHOOK_SECRET);
    let send = |b: Vec<u8>| {
        app.http
            .post(app.url("/fusionauth/webhook"))
            .header("content-type", "application/json")
            .header("X-FusionAuth-Signature-JWT", sig.clone())
            .body(b)
            .send()
    };
    assert_eq!(send(raw.clone()).await.unwrap().status(), 200);
    let again: Value = send(raw.clone()).await.unwrap().json().await.unwrap();
    assert_eq!(again["status"], "duplicate");
    let mut other = body.clone();
    other["event"]["user"]["id"] = json!(Uuid::new_v4());
    assert_eq!(
        send(serde_json::to_vec(&other).unwrap())
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        app.db.count("select count(*) from fusionsync.event").await,
        1
    );
    app.finish().await;
}

#[tokio::test]
async fn a_body_that_arrives_too_slowly_gets_408() {
    let app = TestApp::spawn_with(|env| {
        env.insert("FUSIONSYNC__HTTP__REQUEST_TIMEOUT".into(), "500ms".into());
    })
    .await;
    let mut s = tokio::net::TcpStream::connect(app.addr.unwrap())
        .await
        .unwrap();
    let head = format!(
        "POST /hasura/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Fusionsync-Secret: {HASURA_SECRET}\r\nContent-Length: 1000\r\n\r\n{{\"id\":"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("answered in time")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    app.finish().await;
}

#[tokio::test]
async fn rows_fusionauth_would_refuse_fail_once_with_a_reason_and_are_not_retried() {
    let app = TestApp::spawn().await;
    let cases = [
        ("not an email", "not an email address FusionAuth accepts"),
        ("long@example.com", "at most 191"),
    ];
    let bad_email = Uuid::new_v4();
    app.db.insert_user(bad_email, cases[0].0).await;
    let long_name = Uuid::new_v4();
    sqlx::query("insert into users (id, email, first_name) values ($1, $2, $3)")
        .bind(long_name)
        .bind(cases[1].0)
        .bind("n".repeat(500))
        .execute(&app.db.pool)
        .await
        .unwrap();
    let nameless = Uuid::new_v4();
    sqlx::query("insert into users (id) values ($1)")
        .bind(nameless)
        .execute(&app.db.pool)
        .await
        .unwrap();
    let fine = Uuid::new_v4();
    sqlx::query(
        "insert into users (id, email, first_name) values ($1, 'Ünïcödé+tag@exämple.com', $2)",
    )
    .bind(fine)
    .bind("O'Brien \"; drop table users; -- 名前 🎉")
    .execute(&app.db.pool)
    .await
    .unwrap();
    app.settle().await;
    for (id, reason) in [
        (bad_email, cases[0].1),
        (long_name, cases[1].1),
        (nameless, "neither an email nor a username"),
    ] {
        let (state, attempts, err): (String, i32, String) = sqlx::query_as(
            "select state, attempts, last_error from fusionsync.event where entity_key = $1",
        )
        .bind(id.to_string())
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
        assert_eq!((state.as_str(), attempts), ("failed", 1), "{reason}");
        assert!(err.contains(reason), "{err}");
    }
    assert_eq!(
        app.fa.user(&fine).unwrap()["firstName"],
        "O'Brien \"; drop table users; -- 名前 🎉"
    );
    assert_eq!(
        app.db.count("select count(*) from users").await,
        4,
        "nothing was dropped"
    );
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_drain_20000_events_with_no_entity_processed_concurrently_or_after_done() {
    let db = TestDb::new().await;
    let fa = FakeFusionAuth::start().await;
    fa.set_latency(Duration::ZERO, Duration::from_micros(300));
    // Flag any event that changes after it was done.
    db.exec(
        "create table done_violations (event_id bigint, new_state text);
         create function flag_done_change() returns trigger language plpgsql as $$
         begin insert into done_violations values (old.id, new.state); return new; end $$;",
    )
    .await;
    let app = TestApp::spawn_on(db, fa, |_| {}).await;
    app.db
        .exec(
            "create trigger flag_done_change before update on fusionsync.event
         for each row when (old.state = 'done') execute function flag_done_change()",
        )
        .await;
    let mut others = Vec::new();
    for _ in 0..3 {
        let cancel = tokio_util::sync::CancellationToken::new();
        let r = fusionsync::app::start(config(&app.env), cancel.clone())
            .await
            .unwrap();
        others.push((cancel, r));
    }
    // 10,000 users in one statement, then every one of them updated: 20,000 events.
    app.db.exec("insert into users (id, email) select gen_random_uuid(), 'scale' || g || '@example.com' from generate_series(1, 10000) g").await;
    app.db.exec("update users set first_name = 'Scaled'").await;
    eventually(
        Duration::from_secs(300),
        "20,000 events drained",
        || async {
            app.db
                .count("select count(*) from fusionsync.event where state <> 'done'")
                .await
                == 0
        },
    )
    .await;
    assert_eq!(
        app.db.count("select count(*) from fusionsync.event").await,
        20_000
    );
    assert_eq!(
        app.db.count("select count(*) from done_violations").await,
        0,
        "an event changed after it was done"
    );
    assert!(
        app.fa.overlaps().is_empty(),
        "concurrent requests for one entity: {:?}",
        &app.fa.overlaps()[..app.fa.overlaps().len().min(5)]
    );
    assert_eq!(app.fa.data().users.len(), 10_000);
    assert!(app
        .fa
        .data()
        .users
        .values()
        .all(|u| u["firstName"] == "Scaled"));
    assert_eq!(app.fa.max_creates(), 1);
    for (c, r) in others {
        c.cancel();
        let _ = r.done.await;
    }
    app.finish().await;
}

#[tokio::test]
async fn sigterm_during_a_burst_finishes_or_releases_every_claimed_event() {
    let db = TestDb::new().await;
    let fa = FakeFusionAuth::start().await;
    fa.set_latency(Duration::from_millis(30), Duration::from_millis(10));
    let mut env = base_env(&db.url, &fa.url());
    env.insert("FUSIONSYNC__WORKER__SHUTDOWN_TIMEOUT".into(), "3s".into());
    let mut d = Daemon::start(&env, free_port()).await;
    db.exec("insert into users (id, email) select gen_random_uuid(), 'burst' || g || '@example.com' from generate_series(1, 600) g").await;
    eventually(Duration::from_secs(20), "the burst under way", || async {
        fa.data().users.len() >= 30
    })
    .await;
    let started = std::time::Instant::now();
    let status = d.terminate().await;
    let took = started.elapsed();
    assert!(status.success(), "exit 0 on SIGTERM: {status:?}");
    assert!(
        took < Duration::from_secs(10),
        "stopped within the shutdown timeout: {took:?}"
    );
    assert_eq!(
        db.events_in("processing").await,
        0,
        "nothing left processing"
    );
    assert_eq!(
        db.count("select count(*) from fusionsync.entity where locked_by is not null")
            .await,
        0,
        "every lease released"
    );
    let synced = fa.data().users.len() as i64;
    assert!(synced < 600, "stopped mid-burst");
    assert_eq!(
        db.events_in("done").await,
        synced,
        "every finished user is recorded done, the rest pending"
    );
    // The next instance picks the rest up at once (no lease to wait for).
    let mut d2 = Daemon::start(&env, free_port()).await;
    eventually(Duration::from_secs(60), "the rest synced", || async {
        db.events_in("done").await == 600
    })
    .await;
    assert_eq!(fa.max_creates(), 1);
    assert!(d2.terminate().await.success());
    db.drop_db().await;
}

#[tokio::test]
async fn the_documented_least_privilege_role_is_enough_to_run_the_daemon() {
    let db = TestDb::new().await;
    let fa = FakeFusionAuth::start().await;
    // The owner migrates and installs the triggers once.
    let owner_env = base_env(&db.url, &fa.url());
    let cfg = config(&owner_env);
    let pool = fusionsync::app::prepare_database(&cfg).await.unwrap();
    fusionsync::app::prepare_tables(&pool, &cfg).await.unwrap();
    pool.close().await;
    // The GRANTs from docs/security.md, verbatim.
    let doc = std::fs::read_to_string(format!("{}/docs/security.md", env!("CARGO_MANIFEST_DIR")))
        .unwrap();
    let start = doc.find("create role fusionsync login").unwrap();
    let end = start + doc[start..].find("```").unwrap();
    let role = format!(
        "fusionsync_lp_{}",
        &Uuid::new_v4().simple().to_string()[..8]
    );
    let grants = doc[start..end]
        .replace("role fusionsync", &format!("role {role}"))
        .replace("to fusionsync;", &format!("to {role};"))
        .replace("'…'", "'pw'");
    db.exec(&grants).await;
    let mut url = reqwest::Url::parse(&db.url).unwrap();
    url.set_username(&role).unwrap();
    let app = TestApp::spawn_on(db, fa, |env| {
        env.insert("DATABASE_URL".into(), url.to_string());
        env.insert(
            "FUSIONSYNC__DATABASE__MIGRATE_ON_START".into(),
            "false".into(),
        );
    })
    .await;
    let id = Uuid::new_v4();
    app.db.insert_user(id, "least@example.com").await;
    eventually(
        Duration::from_secs(10),
        "sync as the restricted role",
        || async { app.fa.user(&id).is_some() },
    )
    .await;
    let signup = app
        .fa
        .insert_user(json!({"email": "lp-signup@example.com"}));
    let resp = app.post_webhook(&json!({"event": {"type": "user.create.complete", "id": Uuid::new_v4(), "user": {"id": signup}}})).await;
    assert_eq!(resp.status(), 200);
    eventually(
        Duration::from_secs(10),
        "the sign-up written as the restricted role",
        || async {
            app.db
                .count(&format!("select count(*) from users where id = '{signup}'"))
                .await
                == 1
        },
    )
    .await;
    app.settle().await;
    assert_eq!(app.db.events_in("failed").await, 0);
    app.finish().await;
    if let Ok(mut c) = sqlx::PgConnection::connect(&admin_url()).await {
        let _ = sqlx::query(&format!("drop role if exists {role}"))
            .execute(&mut c)
            .await;
    }
}
