//! The admin CLI, run as the real binary: replay, status, events show, reconcile, prune.

use std::collections::BTreeMap;
use std::process::Output;
use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::*;

/// Runs the binary without blocking the runtime (the fake FusionAuth lives on it).
async fn cli(env: &BTreeMap<String, String>, args: &[&str]) -> Output {
    tokio::process::Command::new(binary())
        .args(args)
        .env_clear()
        .envs(env)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap()
}

/// Only what the database commands need.
fn db_env(app: &TestApp) -> BTreeMap<String, String> {
    [("DATABASE_URL".to_string(), app.db.url.clone())]
        .into_iter()
        .collect()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Makes `n` users whose create fails permanently (their email is taken in FusionAuth).
async fn failing_users(app: &TestApp, n: usize) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for i in 0..n {
        let email = format!("taken{i}@example.com");
        app.fa.insert_user(json!({"email": email}));
        let id = Uuid::new_v4();
        app.db.insert_user(id, &email).await;
        ids.push(id);
    }
    app.settle().await;
    assert_eq!(app.db.events_in("failed").await, n as i64);
    ids
}

/// Frees the taken emails so a replay can succeed.
fn free_emails(app: &TestApp) {
    app.fa
        .data()
        .users
        .retain(|_, u| !u["email"].as_str().unwrap_or("").starts_with("taken"));
}

#[tokio::test]
async fn replay_failed_flag_puts_every_failed_event_back_and_a_running_daemon_syncs_each_once() {
    let app = TestApp::spawn().await;
    let ids = failing_users(&app, 3).await;
    free_emails(&app);
    let out = cli(&db_env(&app), &["--replay-failed"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout(&out).contains("replayed 3 failed event(s)"),
        "{}",
        stdout(&out)
    );
    app.settle().await;
    for id in &ids {
        assert!(app.fa.user(id).is_some());
    }
    assert_eq!(app.db.events_in("failed").await, 0);
    assert_eq!(app.fa.max_creates(), 1, "each user created once");
    let creates = app
        .fa
        .writes()
        .iter()
        .filter(|r| r.method == "POST" && r.path.starts_with("/api/user/"))
        .count();
    assert_eq!(
        creates,
        3 + 3,
        "3 refused creates, then one create each after the replay"
    );
    // The error is kept in the history; the event says what happened.
    let out = cli(&db_env(&app), &["events", "show", "1", "--json"]).await;
    let detail: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(detail["state"], "done");
    let actions: Vec<&str> = detail["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, vec!["failed", "replayed"]);
    assert!(detail["history"][1]["last_error"]
        .as_str()
        .unwrap()
        .contains("[duplicate]user.email"));
    app.finish().await;
}

#[tokio::test]
async fn replay_filters_by_id_entity_time_and_error_and_dry_run_changes_nothing() {
    let app = TestApp::spawn_with(|env| {
        env.insert("FUSIONSYNC__WORKER__ENABLED".into(), "false".into());
    })
    .await;
    let worker = app.worker().await;
    for i in 0..4 {
        let email = format!("taken{i}@example.com");
        app.fa.insert_user(json!({"email": email}));
        app.db.insert_user(Uuid::new_v4(), &email).await;
    }
    app.drain(&worker).await;
    assert_eq!(app.db.events_in("failed").await, 4);
    let env = db_env(&app);
    let ids: Vec<(i64, String)> =
        sqlx::query_as("select id, entity_key from fusionsync.event order by id")
            .fetch_all(&app.db.pool)
            .await
            .unwrap();

    let out = cli(&env, &["replay", "--failed", "--dry-run"]).await;
    assert!(out.status.success());
    assert!(stdout(&out).contains("would replay 4"), "{}", stdout(&out));
    assert_eq!(
        app.db.events_in("failed").await,
        4,
        "dry run changes nothing"
    );

    let out = cli(&env, &["replay", "--id", &ids[0].0.to_string()]).await;
    assert!(stdout(&out).contains("replayed 1"), "{}", stdout(&out));
    let out = cli(&env, &["replay", "--entity", &format!("user:{}", ids[1].1)]).await;
    assert!(stdout(&out).contains("replayed 1"), "{}", stdout(&out));
    let out = cli(
        &env,
        &[
            "replay",
            "--failed",
            "--since",
            "1h",
            "--error-contains",
            "TAKEN2@",
        ],
    )
    .await;
    assert!(stdout(&out).contains("replayed 1"), "{}", stdout(&out));
    let out = cli(
        &env,
        &["replay", "--failed", "--until", "2000-01-01T00:00:00Z"],
    )
    .await;
    assert!(stdout(&out).contains("replayed 0"), "{}", stdout(&out));
    assert_eq!(app.db.events_in("failed").await, 1);
    assert_eq!(app.db.events_in("pending").await, 3);

    // An id that is not failed: said so, nothing changed, exit 1.
    let out = cli(
        &env,
        &[
            "replay",
            "--id",
            &ids[0].0.to_string(),
            "--id",
            &ids[3].0.to_string(),
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains(&format!("event {} is pending, not failed", ids[0].0)));
    assert_eq!(app.db.events_in("failed").await, 1);
    let out = cli(&env, &["replay", "--id", "999999"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("event 999999 does not exist"));

    let out = cli(&env, &["replay", "--entity", "nonsense"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("KIND:KEY"));
    app.finish().await;
}

#[tokio::test]
async fn status_reports_the_queue_and_its_exit_code_backs_an_alert() {
    let app = TestApp::spawn().await;
    let env = db_env(&app);
    let out = cli(&env, &["status"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "empty queue is healthy: {}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("status: healthy"));

    app.db.insert_user(Uuid::new_v4(), "fine@example.com").await;
    app.settle().await;
    let out = cli(&env, &["status", "--json"]).await;
    assert_eq!(out.status.code(), Some(0));
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["healthy"], true);
    assert_eq!(s["done_last_hour"], 1);

    failing_users(&app, 1).await;
    let out = cli(&env, &["status"]).await;
    assert_eq!(out.status.code(), Some(3));
    let text = stdout(&out);
    assert!(
        text.contains("FAILED EVENTS") && text.contains("[duplicate]user.email"),
        "{text}"
    );
    let out = cli(&env, &["status", "--max-failed", "5"]).await;
    assert_eq!(out.status.code(), Some(0));
    app.finish().await;
}

#[tokio::test]
async fn reconcile_finds_every_kind_of_drift_and_fixes_it_and_dry_run_changes_nothing() {
    let app = TestApp::spawn().await;
    let (missing_in_fa, differing, member_user, stray_user) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    for (id, email) in [
        (missing_in_fa, "m1@example.com"),
        (differing, "d@example.com"),
        (member_user, "mu@example.com"),
        (stray_user, "s@example.com"),
    ] {
        app.db.insert_user(id, email).await;
    }
    let (o1, o2) = (Uuid::new_v4(), Uuid::new_v4());
    app.db.exec(&format!("insert into organizations (id, name, slug) values ('{o1}', 'One', 'one'), ('{o2}', 'Two', 'two')")).await;
    app.db
        .exec(&format!(
            "insert into organization_members values ('{o1}', '{member_user}', 'member')"
        ))
        .await;
    app.settle().await;
    // Drift that no event reports: hand edits in FusionAuth and a lost sign-up webhook.
    app.fa.data().users.remove(&missing_in_fa);
    app.fa.data().users.get_mut(&differing).unwrap()["firstName"] = json!("Edited in FusionAuth");
    let signup = app
        .fa
        .insert_user(json!({"email": "lost-webhook@example.com"}));
    app.fa
        .insert_member(&o1, &stray_user, json!({"role": "admin"}));
    app.fa.data().groups.remove(&o2);
    app.fa.clear_log();
    let events_before = app.db.count("select count(*) from fusionsync.event").await;

    let mut env = db_env(&app);
    env.insert("FUSIONAUTH_URL".into(), app.fa.url());
    env.insert(
        "FUSIONAUTH_API_KEY".into(),
        crate::fake_fusionauth::API_KEY.into(),
    );
    let out = cli(&env, &["reconcile", "--dry-run", "--json"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        r["users_missing_in_fusionauth"],
        json!([missing_in_fa.to_string()])
    );
    assert_eq!(r["users_differing"], json!([differing.to_string()]));
    assert_eq!(r["users_missing_in_database"], json!([signup.to_string()]));
    assert_eq!(r["groups_missing"], json!([o2.to_string()]));
    assert_eq!(
        r["organizations_with_member_drift"],
        json!([o1.to_string()])
    );
    assert_eq!(r["members_stray"], 1);
    assert!(
        app.fa.writes().is_empty(),
        "dry run wrote to FusionAuth: {:?}",
        app.fa.writes()
    );
    assert_eq!(
        app.db.count("select count(*) from fusionsync.event").await,
        events_before,
        "dry run enqueued nothing"
    );
    let out = cli(&env, &["reconcile", "--dry-run", "--exit-code"]).await;
    assert_eq!(out.status.code(), Some(3));

    let out = cli(&env, &["reconcile"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout(&out).contains("enqueued"), "{}", stdout(&out));
    app.settle().await;
    assert!(app.fa.user(&missing_in_fa).is_some());
    assert_eq!(app.fa.user(&differing).unwrap()["firstName"], "First");
    assert_eq!(
        app.db
            .count(&format!("select count(*) from users where id = '{signup}'"))
            .await,
        1
    );
    assert!(app.fa.group(&o2).is_some());
    assert!(!app.fa.members(&o1).contains_key(&stray_user.to_string()));
    assert_eq!(app.db.events_in("failed").await, 0);
    let out = cli(&env, &["reconcile", "--dry-run", "--exit-code"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "no drift left: {}",
        stdout(&out)
    );
    app.finish().await;
}

#[tokio::test]
async fn prune_deletes_old_done_events_and_keeps_failed_ones() {
    let app = TestApp::spawn().await;
    app.db.insert_user(Uuid::new_v4(), "p@example.com").await;
    failing_users(&app, 1).await;
    app.db.exec("update fusionsync.event set processed_at = now() - interval '10 days', updated_at = now() - interval '10 days'").await;
    let env = db_env(&app);
    let out = cli(&env, &["prune", "--older-than", "7d", "--dry-run"]).await;
    assert!(stdout(&out).contains("would prune 1"), "{}", stdout(&out));
    assert_eq!(
        app.db.count("select count(*) from fusionsync.event").await,
        2
    );
    let out = cli(&env, &["prune", "--older-than", "7d"]).await;
    assert!(out.status.success());
    assert!(stdout(&out).contains("pruned 1"), "{}", stdout(&out));
    assert_eq!(app.db.events_in("done").await, 0);
    assert_eq!(app.db.events_in("failed").await, 1);
    let out = cli(&env, &["prune", "--older-than", "soon"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--older-than"));
    app.finish().await;
}

#[tokio::test]
async fn the_daemon_prunes_by_retention_but_never_failed_events() {
    let app = TestApp::spawn_with(|env| {
        env.insert("FUSIONSYNC__RETENTION__DONE_AFTER".into(), "1s".into());
        env.insert("FUSIONSYNC__RETENTION__INTERVAL".into(), "200ms".into());
    })
    .await;
    app.db.insert_user(Uuid::new_v4(), "r@example.com").await;
    failing_users(&app, 1).await;
    eventually(Duration::from_secs(10), "done events pruned", || async {
        app.db.events_in("done").await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(app.db.events_in("failed").await, 1);
    app.finish().await;
}

#[tokio::test]
async fn admin_commands_explain_what_is_missing() {
    let out = cli(&BTreeMap::new(), &["status"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("DATABASE_URL"));
    let out = cli(&BTreeMap::new(), &["--help"]).await;
    assert!(out.status.success());
    let help = stdout(&out);
    assert!(
        help.contains("--replay-failed") && help.contains("reconcile") && help.contains("Examples")
    );
    let out = cli(&BTreeMap::new(), &["replay", "--help"]).await;
    assert!(stdout(&out).contains("--dry-run") && stdout(&out).contains("Exit codes"));
    // a fresh database without fusionsync's tables
    let db = TestDb::new().await;
    let env: BTreeMap<String, String> = [("DATABASE_URL".to_string(), db.url.clone())]
        .into_iter()
        .collect();
    let out = cli(&env, &["status"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("fusionsync migrate"));
    let out = cli(&env, &["migrate"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&env, &["status"]).await;
    assert_eq!(out.status.code(), Some(0));
    db.drop_db().await;
}

#[tokio::test]
async fn the_daemon_reconciles_periodically_and_repairs_drift_no_event_reported() {
    let app = TestApp::spawn_with(|env| {
        env.insert("FUSIONSYNC__RECONCILE__INTERVAL".into(), "500ms".into());
    })
    .await;
    let id = Uuid::new_v4();
    app.db.insert_user(id, "periodic@example.com").await;
    eventually(Duration::from_secs(10), "create", || async {
        app.fa.user(&id).is_some()
    })
    .await;
    // Deleted in FusionAuth by hand, and no webhook tells fusionsync.
    app.fa.data().users.remove(&id);
    eventually(
        Duration::from_secs(15),
        "the periodic reconcile to recreate it",
        || async { app.fa.user(&id).is_some() },
    )
    .await;
    assert!(
        app.db
            .count("select count(*) from fusionsync.event where source = 'reconcile'")
            .await
            >= 1
    );
    app.finish().await;
}
