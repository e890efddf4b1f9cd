//! Database → FusionAuth user sync (the core issue).

use std::time::Duration;

use serde_json::json;
use uuid::Uuid;

use crate::fake_fusionauth::FakeFusionAuth;
use crate::helpers::*;

#[tokio::test]
async fn an_inserted_row_becomes_a_fusionauth_user_with_the_same_id() {
    let app = TestApp::spawn().await;
    let id = Uuid::new_v4();
    sqlx::query("insert into users (id, email, username, first_name, last_name, data) values ($1, 'ada@example.com', 'ada', 'Ada', 'Lovelace', '{\"plan\": \"pro\"}')")
        .bind(id)
        .execute(&app.db.pool)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the user in FusionAuth",
        || async { app.fa.user(&id).is_some() },
    )
    .await;
    let u = app.fa.user(&id).unwrap();
    assert_eq!(u["email"], "ada@example.com");
    assert_eq!(u["username"], "ada");
    assert_eq!(u["firstName"], "Ada");
    assert_eq!(u["lastName"], "Lovelace");
    assert_eq!(u["data"], json!({"plan": "pro"}));
    let create = app
        .fa
        .writes()
        .into_iter()
        .find(|r| r.method == "POST")
        .unwrap();
    assert_eq!(create.path, format!("/api/user/{id}"));
    assert_eq!(
        create.body["sendSetPasswordEmail"], true,
        "default: FusionAuth emails a set-password link"
    );
    app.settle().await;
    assert_eq!(app.db.events_in("done").await, 1);
    app.finish().await;
}

#[tokio::test]
async fn updates_deactivation_reactivation_and_deletes_propagate() {
    let app = TestApp::spawn().await;
    let id = Uuid::new_v4();
    app.db.insert_user(id, "grace@example.com").await;
    eventually(Duration::from_secs(10), "create", || async {
        app.fa.user(&id).is_some()
    })
    .await;

    app.db
        .exec(&format!(
            "update users set first_name = 'Grace', email = 'grace@navy.mil' where id = '{id}'"
        ))
        .await;
    eventually(Duration::from_secs(10), "update", || async {
        app.fa
            .user(&id)
            .is_some_and(|u| u["firstName"] == "Grace" && u["email"] == "grace@navy.mil")
    })
    .await;

    app.db
        .exec(&format!(
            "update users set active = false where id = '{id}'"
        ))
        .await;
    eventually(Duration::from_secs(10), "deactivate", || async {
        app.fa.user(&id).is_some_and(|u| u["active"] == false)
    })
    .await;
    app.settle().await;
    let last = app.fa.writes().last().cloned().unwrap();
    assert_eq!(
        (last.method.as_str(), last.query.as_str()),
        ("DELETE", ""),
        "deactivation is DELETE without hardDelete"
    );

    // A change while inactive: FusionAuth refuses updates of deactivated users, so
    // fusionsync reactivates, updates and deactivates again.
    app.db
        .exec(&format!(
            "update users set last_name = 'Hopper' where id = '{id}'"
        ))
        .await;
    eventually(Duration::from_secs(10), "update while inactive", || async {
        app.fa
            .user(&id)
            .is_some_and(|u| u["lastName"] == "Hopper" && u["active"] == false)
    })
    .await;

    app.db
        .exec(&format!("update users set active = true where id = '{id}'"))
        .await;
    eventually(Duration::from_secs(10), "reactivate", || async {
        app.fa.user(&id).is_some_and(|u| u["active"] == true)
    })
    .await;

    app.db
        .exec(&format!("delete from users where id = '{id}'"))
        .await;
    eventually(
        Duration::from_secs(10),
        "delete = deactivate by default",
        || async { app.fa.user(&id).is_some_and(|u| u["active"] == false) },
    )
    .await;
    app.settle().await;
    assert_eq!(app.db.events_in("failed").await, 0);
    assert_eq!(app.fa.max_creates(), 1);
    app.finish().await;
}

#[tokio::test]
async fn hard_delete_policy_removes_the_user() {
    let app = TestApp::spawn_with(|env| {
        env.insert(
            "FUSIONSYNC__FUSIONAUTH__DELETE_POLICY".into(),
            "hard_delete".into(),
        );
    })
    .await;
    let id = Uuid::new_v4();
    app.db.insert_user(id, "gone@example.com").await;
    eventually(Duration::from_secs(10), "create", || async {
        app.fa.user(&id).is_some()
    })
    .await;
    app.db
        .exec(&format!("delete from users where id = '{id}'"))
        .await;
    eventually(Duration::from_secs(10), "hard delete", || async {
        app.fa.user(&id).is_none()
    })
    .await;
    assert!(app
        .fa
        .writes()
        .iter()
        .any(|r| r.method == "DELETE" && r.query == "hardDelete=true"));
    app.finish().await;
}

#[tokio::test]
async fn an_update_that_changes_nothing_mapped_makes_no_call() {
    let app = TestApp::spawn().await;
    let id = Uuid::new_v4();
    app.db.insert_user(id, "same@example.com").await;
    eventually(Duration::from_secs(10), "create", || async {
        app.fa.user(&id).is_some()
    })
    .await;
    app.settle().await;
    app.fa.clear_log();
    // updated_at is not mapped; first_name is set to what it already is
    app.db.exec(&format!("update users set updated_at = now() + interval '1 day', first_name = 'First' where id = '{id}'")).await;
    app.settle().await;
    assert_eq!(
        app.db.events_in("done").await,
        2,
        "the change was seen and processed"
    );
    assert!(
        app.fa.log().is_empty(),
        "no FusionAuth call at all: {:?}",
        app.fa.log()
    );
    app.finish().await;
}

#[tokio::test]
async fn a_duplicate_email_fails_with_fusionauths_message_while_others_keep_syncing() {
    let app = TestApp::spawn().await;
    // Someone already has this email in FusionAuth (case-insensitive uniqueness).
    app.fa.insert_user(json!({"email": "Taken@Example.com"}));
    let bad = Uuid::new_v4();
    app.db.insert_user(bad, "taken@example.com").await;
    let good: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    for (i, g) in good.iter().enumerate() {
        app.db.insert_user(*g, &format!("ok{i}@example.com")).await;
    }
    app.settle().await;
    for g in &good {
        assert!(app.fa.user(g).is_some());
    }
    assert!(app.fa.user(&bad).is_none());
    let (state, err, attempts): (String, String, i32) = sqlx::query_as(
        "select state, last_error, attempts from fusionsync.event where entity_key = $1",
    )
    .bind(bad.to_string())
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(state, "failed");
    assert_eq!(attempts, 1, "a permanent error is not retried");
    assert!(err.contains("[duplicate]user.email"), "{err}");
    assert!(
        err.contains("A User with email = [taken@example.com] already exists."),
        "{err}"
    );
    app.finish().await;
}

#[tokio::test]
async fn fusionauth_answering_503_for_a_stretch_ends_with_everything_synced_and_nothing_failed() {
    let app = TestApp::spawn().await;
    app.fa.set_unavailable(true);
    let ids: Vec<Uuid> = (0..30).map(|_| Uuid::new_v4()).collect();
    for (i, id) in ids.iter().enumerate() {
        app.db.insert_user(*id, &format!("u{i}@example.com")).await;
    }
    // Long enough for several retry rounds and the circuit breaker to open.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = app.fa.log().len();
    app.fa.set_unavailable(false);
    app.settle().await;
    for id in &ids {
        assert!(app.fa.user(id).is_some());
    }
    assert_eq!(app.db.events_in("failed").await, 0);
    assert_eq!(app.fa.max_creates(), 1);
    // The breaker kept the outage from costing every event its attempts.
    assert!(during < 30 * 12, "{during} requests during the outage");
    let max_attempts: i32 = sqlx::query_scalar("select max(attempts) from fusionsync.event")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert!(max_attempts < 12, "attempts were not burnt: {max_attempts}");
    app.finish().await;
}

#[tokio::test]
async fn events_written_while_no_worker_runs_are_synced_when_one_starts() {
    let db = TestDb::new().await;
    let fa = FakeFusionAuth::start().await;
    // Install the triggers without running a worker, then write rows.
    let mut env = base_env(&db.url, &fa.url());
    env.insert("FUSIONSYNC__WORKER__POLL_INTERVAL".into(), "1h".into());
    let cfg = config(&env);
    let pool = fusionsync::app::prepare_database(&cfg).await.unwrap();
    fusionsync::app::prepare_tables(&pool, &cfg).await.unwrap();
    let ids: Vec<Uuid> = (0..10).map(|_| Uuid::new_v4()).collect();
    for (i, id) in ids.iter().enumerate() {
        db.insert_user(*id, &format!("early{i}@example.com")).await;
    }
    assert_eq!(db.events_in("pending").await, 10);
    // The poll interval is an hour and the notifications were sent before anyone listened:
    // only the start-up claim can pick these up.
    let app = TestApp::spawn_on(db, fa, |e| *e = env.clone()).await;
    app.settle().await;
    for id in &ids {
        assert!(app.fa.user(id).is_some());
    }
    app.finish().await;
}

#[tokio::test]
async fn two_workers_on_500_users_never_touch_one_user_concurrently() {
    let db = TestDb::new().await;
    let fa = FakeFusionAuth::start().await;
    fa.set_latency(Duration::from_millis(1), Duration::from_millis(3));
    let mut app1 = TestApp::spawn_on(db, fa, |_| {}).await;
    // A second daemon (its own worker id, pool and claim loop) on the same database.
    let cancel2 = tokio_util::sync::CancellationToken::new();
    let second = fusionsync::app::start(config(&app1.env), cancel2.clone())
        .await
        .unwrap();
    let ids: Vec<Uuid> = (0..500).map(|_| Uuid::new_v4()).collect();
    // Every user changes several times, in separate transactions, to create contention.
    for (i, id) in ids.iter().enumerate() {
        app1.db.insert_user(*id, &format!("c{i}@example.com")).await;
    }
    for round in 0..3 {
        sqlx::query("update users set first_name = $1")
            .bind(format!("round{round}"))
            .execute(&app1.db.pool)
            .await
            .unwrap();
        for id in ids.iter().step_by(7) {
            sqlx::query("update users set last_name = $2 where id = $1")
                .bind(id)
                .bind(format!("r{round}"))
                .execute(&app1.db.pool)
                .await
                .unwrap();
        }
    }
    app1.settle().await;
    cancel2.cancel();
    let _ = second.done.await;
    assert!(
        app1.fa.overlaps().is_empty(),
        "concurrent requests for one entity: {:?}",
        app1.fa.overlaps()
    );
    for id in &ids {
        let u = app1.fa.user(id).unwrap();
        assert_eq!(u["firstName"], "round2");
    }
    assert_eq!(app1.fa.max_creates(), 1, "no user created twice");
    assert_eq!(app1.db.events_in("failed").await, 0);
    let workers: i64 = app1
        .db
        .count(
            "select count(distinct locked_by) from fusionsync.entity where locked_by is not null",
        )
        .await;
    assert_eq!(workers, 0, "every lease released");
    app1.stop().await;
    app1.finish().await;
}

#[tokio::test]
async fn the_listen_connection_recovers_after_pg_terminate_backend() {
    // With an hour-long poll, only LISTEN can deliver changes quickly.
    let app = TestApp::spawn_with(|env| {
        env.insert("FUSIONSYNC__WORKER__POLL_INTERVAL".into(), "1h".into());
    })
    .await;
    let first = Uuid::new_v4();
    app.db.insert_user(first, "before@example.com").await;
    eventually(Duration::from_secs(5), "sync via LISTEN", || async {
        app.fa.user(&first).is_some()
    })
    .await;

    let killed: i64 = app
        .db
        .count(&format!(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity where datname = '{}' and query ilike 'listen%'",
            app.db.name
        ))
        .await;
    assert_eq!(killed, 1, "exactly one LISTEN connection");
    // Written while the listener is reconnecting: picked up by the poll after reconnecting.
    let during = Uuid::new_v4();
    app.db.insert_user(during, "during@example.com").await;
    eventually(Duration::from_secs(10), "a new LISTEN connection", || async {
        app.db
            .count(&format!("select count(*) from pg_stat_activity where datname = '{}' and query ilike 'listen%'", app.db.name))
            .await
            == 1
    })
    .await;
    eventually(
        Duration::from_secs(5),
        "the row written during the outage",
        || async { app.fa.user(&during).is_some() },
    )
    .await;
    let after = Uuid::new_v4();
    app.db.insert_user(after, "after@example.com").await;
    eventually(
        Duration::from_secs(5),
        "sync via the new LISTEN",
        || async { app.fa.user(&after).is_some() },
    )
    .await;
    app.finish().await;
}

#[tokio::test]
async fn a_worker_killed_mid_batch_loses_nothing_and_creates_nothing_twice() {
    let db = TestDb::new().await;
    let fa = FakeFusionAuth::start().await;
    // Slow FusionAuth so the kill lands while requests are in flight.
    fa.set_latency(Duration::from_millis(20), Duration::from_millis(10));
    let mut env = base_env(&db.url, &fa.url());
    // A short lease so the killed worker's claims come back quickly.
    env.insert("FUSIONSYNC__WORKER__LEASE".into(), "5s".into());
    env.insert(
        "FUSIONSYNC__FUSIONAUTH__REQUEST_TIMEOUT".into(),
        "2s".into(),
    );
    let mut d1 = Daemon::start(&env, free_port()).await;
    let ids: Vec<Uuid> = (0..300).map(|_| Uuid::new_v4()).collect();
    let mut tx = db.pool.begin().await.unwrap();
    for (i, id) in ids.iter().enumerate() {
        sqlx::query("insert into users (id, email) values ($1, $2)")
            .bind(id)
            .bind(format!("k{i}@example.com"))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    eventually(Duration::from_secs(20), "some progress", || async {
        fa.data().users.len() >= 20
    })
    .await;
    d1.kill().await;
    let processing = db.events_in("processing").await;
    assert!(fa.data().users.len() < 300, "killed before the end");
    let mut d2 = Daemon::start(&env, free_port()).await;
    eventually(
        Duration::from_secs(60),
        "everything synced after restart",
        || async {
            db.count("select count(*) from fusionsync.event where state <> 'done'")
                .await
                == 0
        },
    )
    .await;
    assert_eq!(fa.data().users.len(), 300);
    assert_eq!(fa.max_creates(), 1, "no user was created twice");
    assert!(
        processing > 0 || fa.data().users.len() == 300,
        "the kill left claimed events behind"
    );
    let status = d2.terminate().await;
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    assert_eq!(db.events_in("processing").await, 0);
    db.drop_db().await;
}

#[tokio::test]
async fn bad_config_exits_non_zero_with_a_message_naming_the_key() {
    let out = std::process::Command::new(binary())
        .arg("run")
        .env_clear()
        .env("DATABASE_URL", admin_url())
        .env("FUSIONAUTH_URL", "http://127.0.0.1:1")
        .env("FUSIONAUTH_API_KEY", "k")
        .env("FUSIONSYNC__WORKER__CONCURRENCY", "many")
        .env("FUSIONSYNC__RETRY__MAX", "forever")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("worker.concurrency"), "{err}");
    assert!(err.contains("FUSIONSYNC__WORKER__CONCURRENCY"), "{err}");
    assert!(err.contains("retry.max"), "{err}");
    assert!(!err.contains("\"k\""));

    let out = std::process::Command::new(binary())
        .arg("run")
        .env_clear()
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("database.url") && err.contains("fusionauth.api_key"),
        "{err}"
    );
}

#[tokio::test]
async fn a_configured_application_gets_a_registration_with_default_roles() {
    let app_id = Uuid::new_v4();
    let app = TestApp::spawn_with(|env| {
        env.insert(
            "FUSIONSYNC__FUSIONAUTH__APPLICATION_ID".into(),
            app_id.to_string(),
        );
        env.insert(
            "FUSIONSYNC__FUSIONAUTH__DEFAULT_ROLES".into(),
            "user,viewer".into(),
        );
    })
    .await;
    let id = Uuid::new_v4();
    app.db.insert_user(id, "reg@example.com").await;
    eventually(Duration::from_secs(10), "the user", || async {
        app.fa.user(&id).is_some()
    })
    .await;
    let u = app.fa.user(&id).unwrap();
    assert_eq!(u["registrations"][0]["applicationId"], app_id.to_string());
    assert_eq!(u["registrations"][0]["roles"], json!(["user", "viewer"]));
    assert_eq!(
        app.fa.writes().len(),
        1,
        "user and registration in one call"
    );
    app.finish().await;
}

#[tokio::test]
async fn a_user_created_by_hand_in_fusionauth_is_updated_not_duplicated() {
    let app = TestApp::spawn().await;
    let id = Uuid::new_v4();
    app.fa
        .insert_user(json!({"id": id.to_string(), "email": "old@example.com"}));
    app.db.insert_user(id, "new@example.com").await;
    eventually(
        Duration::from_secs(10),
        "update of the existing user",
        || async {
            app.fa
                .user(&id)
                .is_some_and(|u| u["email"] == "new@example.com")
        },
    )
    .await;
    app.settle().await;
    assert_eq!(app.db.events_in("failed").await, 0);
    app.finish().await;
}

#[tokio::test]
async fn an_app_with_only_a_minimal_users_table_runs_on_defaults() {
    // No organizations, no memberships, no username or data columns: what is not there is
    // left out (with a warning), the rest syncs.
    let db = TestDb::with_schema("create table users (id uuid primary key, email text, first_name text, last_name text, active boolean)").await;
    let fa = FakeFusionAuth::start().await;
    let app = TestApp::spawn_on(db, fa, |_| {}).await;
    let id = Uuid::new_v4();
    app.db.insert_user(id, "minimal@example.com").await;
    eventually(Duration::from_secs(10), "the user", || async {
        app.fa.user(&id).is_some()
    })
    .await;
    app.settle().await;
    assert_eq!(app.db.events_in("failed").await, 0);
    app.finish().await;

    // A table or column named in the config must exist.
    let db = TestDb::with_schema("create table users (id uuid primary key, email text)").await;
    let mut env = base_env(&db.url, "http://127.0.0.1:1");
    env.insert(
        "FUSIONSYNC__ORGANIZATIONS__TABLE".into(),
        "public.teams".into(),
    );
    env.insert(
        "FUSIONSYNC__USERS__COLUMNS__FIRSTNAME".into(),
        "given_name".into(),
    );
    let err = match fusionsync::app::start(config(&env), tokio_util::sync::CancellationToken::new())
        .await
    {
        Ok(_) => panic!("must refuse"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("organizations.table") && err.contains("public.teams"),
        "{err}"
    );
    assert!(
        err.contains("users.columns.firstName") && err.contains("given_name"),
        "{err}"
    );
    db.drop_db().await;
}
