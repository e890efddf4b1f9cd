//! Convergence under faults: three real `fusionsync run` processes, a seeded random workload on
//! users, organizations and memberships through the Postgres trigger, the Hasura endpoint and
//! FusionAuth sign-ups, while the fake FusionAuth fails, slows down, drops connections and goes
//! away, one process is SIGKILLed and restarted, and every fusionsync database connection is
//! terminated. At the end both sides must agree exactly.
//!
//! Rerun a seed: `CHAOS_SEED=123 cargo nextest run chaos`; size: `CHAOS_OPS=5000`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::fake_fusionauth::FakeFusionAuth;
use crate::helpers::*;

const NAMES: &[&str] = &[
    "Ada",
    "Zoë",
    "O'Brien",
    "名前",
    "Robert'); DROP TABLE users;--",
    "José 🎉",
    "\"quoted\"",
    "back\\slash",
    "Ⅻ",
];

/// id, email, first_name, last_name, active
type UserRow = (Uuid, Option<String>, Option<String>, Option<String>, bool);

struct Sender {
    http: reqwest::Client,
    addr: std::net::SocketAddr,
}

impl Sender {
    /// Delivers like a sender that retries until it gets a 2xx (Hasura does).
    async fn deliver(&self, path: &str, body: &Value, headers: &[(&str, String)]) {
        let raw = serde_json::to_vec(body).unwrap();
        for _ in 0..200 {
            let mut req = self
                .http
                .post(format!("http://{}{path}", self.addr))
                .header("content-type", "application/json")
                .body(raw.clone());
            for (k, v) in headers {
                req = req.header(*k, v);
            }
            if let Ok(r) = req.send().await {
                if r.status().is_success() {
                    return;
                }
                assert!(
                    r.status().is_server_error(),
                    "{path} refused: {}",
                    r.status()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("could not deliver to {path}");
    }

    async fn hasura(&self, table: &str, op: &str, row: Value) {
        let (old, new) = if op == "DELETE" {
            (row, Value::Null)
        } else {
            (Value::Null, row)
        };
        let body = json!({
            "id": Uuid::new_v4(), "created_at": "2026-12-04T12:00:00.123456",
            "trigger": {"name": format!("fusionsync_{table}")}, "table": {"schema": "public", "name": table},
            "delivery_info": {"current_retry": 0, "max_retries": 10},
            "event": {"op": op, "data": {"old": old, "new": new}, "session_variables": null, "trace_context": null}
        });
        self.deliver(
            "/hasura/events",
            &body,
            &[("X-Fusionsync-Secret", HASURA_SECRET.to_string())],
        )
        .await;
    }

    async fn webhook(&self, body: &Value) {
        let raw = serde_json::to_vec(body).unwrap();
        let sig = sign_webhook(&raw, WEBHOOK_SECRET);
        self.deliver(
            "/fusionauth/webhook",
            body,
            &[("X-FusionAuth-Signature-JWT", sig)],
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_converge_exactly_under_faults_kills_and_connection_loss() {
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    let total_ops: usize = std::env::var("CHAOS_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    println!("chaos seed {seed} (rerun with CHAOS_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let db = TestDb::new().await;
    let fa = Arc::new(FakeFusionAuth::start().await);
    let mut env = base_env(&db.url, &fa.url());
    env.insert(
        "FUSIONSYNC__FUSIONAUTH__DELETE_POLICY".into(),
        "hard_delete".into(),
    );
    env.insert("FUSIONSYNC__WORKER__LEASE".into(), "4s".into());
    env.insert(
        "FUSIONSYNC__FUSIONAUTH__REQUEST_TIMEOUT".into(),
        "1s".into(),
    );
    env.insert(
        "FUSIONSYNC__RETRY__IN_ATTEMPT_MAX_ELAPSED".into(),
        "300ms".into(),
    );
    env.insert("FUSIONSYNC__RETRY__MAX".into(), "1s".into());
    let ports = [free_port(), free_port(), free_port()];
    let mut daemons = Vec::new();
    for p in ports {
        daemons.push(Daemon::start(&env, p).await);
    }
    let sender = Sender {
        http: reqwest::Client::new(),
        addr: daemons[0].addr.unwrap(),
    };

    // Background noise for the whole workload.
    fa.set_fail_per_mille(200);
    fa.set_drop_per_mille(15);
    fa.set_drop_after_per_mille(15);
    fa.set_latency(Duration::from_micros(500), Duration::from_millis(4));

    let mut users: Vec<Uuid> = Vec::new();
    let mut orgs: Vec<Uuid> = Vec::new();
    let mut members: BTreeSet<(Uuid, Uuid)> = BTreeSet::new();
    let mut counter = 0usize;
    let mut signups = 0usize;
    let mut hasura_posts = 0usize;
    let start = Instant::now();
    let mut killed_at = None;
    let mut outage_started = None;
    let mut terminated = 0i64;
    let pool = &db.pool;

    for i in 0..total_ops {
        // The fault schedule, by progress through the workload.
        if i == total_ops / 5 {
            daemons[1].kill().await;
            killed_at = Some(i);
        }
        if i == total_ops * 2 / 5 {
            daemons[1] = Daemon::start(&env, ports[1]).await;
        }
        if i == total_ops / 2 {
            fa.set_down(true);
            outage_started = Some(Instant::now());
        }
        if let Some(t) = outage_started {
            if t.elapsed() >= Duration::from_secs(10) && fa.state.faults.down.load(Ordering::SeqCst)
            {
                fa.set_down(false);
            }
        }
        if i == total_ops * 3 / 4 {
            terminated = db
                .count(&format!(
                    "select count(pg_terminate_backend(pid)) from pg_stat_activity where datname = '{}' and application_name = 'fusionsync'",
                    db.name
                ))
                .await;
        }

        counter += 1;
        let pick = rng.gen_range(0..100);
        let via_hasura = rng.gen_bool(0.3);
        match pick {
            0..=24 => {
                let id = Uuid::new_v4();
                let name = NAMES.choose(&mut rng).unwrap().to_string();
                sqlx::query("insert into users (id, email, first_name) values ($1, $2, $3)")
                    .bind(id)
                    .bind(format!("user{counter}@chaos.test"))
                    .bind(&name)
                    .execute(pool)
                    .await
                    .unwrap();
                users.push(id);
                if via_hasura {
                    sender
                        .hasura(
                            "users",
                            "INSERT",
                            json!({"id": id, "email": format!("user{counter}@chaos.test")}),
                        )
                        .await;
                    hasura_posts += 1;
                }
            }
            25..=44 if !users.is_empty() => {
                let id = *users.choose(&mut rng).unwrap();
                let name = format!(
                    "{} {}",
                    NAMES.choose(&mut rng).unwrap(),
                    rng.gen_range(0..1000)
                );
                sqlx::query("update users set first_name = $2, last_name = $3 where id = $1")
                    .bind(id)
                    .bind(&name)
                    .bind(format!("L{counter}"))
                    .execute(pool)
                    .await
                    .unwrap();
                if via_hasura {
                    sender.hasura("users", "UPDATE", json!({"id": id})).await;
                    hasura_posts += 1;
                }
            }
            45..=51 if !users.is_empty() => {
                let id = *users.choose(&mut rng).unwrap();
                sqlx::query("update users set active = not active where id = $1")
                    .bind(id)
                    .execute(pool)
                    .await
                    .unwrap();
            }
            52..=56 if users.len() > 10 => {
                let idx = rng.gen_range(0..users.len());
                let id = users.swap_remove(idx);
                sqlx::query("delete from users where id = $1")
                    .bind(id)
                    .execute(pool)
                    .await
                    .unwrap();
                members.retain(|(_, u)| *u != id);
                if via_hasura {
                    sender.hasura("users", "DELETE", json!({"id": id})).await;
                    hasura_posts += 1;
                }
            }
            57..=61 => {
                let id = Uuid::new_v4();
                sqlx::query("insert into organizations (id, name, slug) values ($1, $2, $3)")
                    .bind(id)
                    .bind(format!("Org {counter} {}", NAMES.choose(&mut rng).unwrap()))
                    .bind(format!("org-{counter}"))
                    .execute(pool)
                    .await
                    .unwrap();
                orgs.push(id);
                if via_hasura {
                    sender
                        .hasura("organizations", "INSERT", json!({"id": id}))
                        .await;
                    hasura_posts += 1;
                }
            }
            62..=65 if !orgs.is_empty() => {
                let id = *orgs.choose(&mut rng).unwrap();
                sqlx::query("update organizations set name = $2 where id = $1")
                    .bind(id)
                    .bind(format!("Renamed {counter}"))
                    .execute(pool)
                    .await
                    .unwrap();
            }
            66..=67 if orgs.len() > 3 => {
                let idx = rng.gen_range(0..orgs.len());
                let id = orgs.swap_remove(idx);
                sqlx::query("delete from organizations where id = $1")
                    .bind(id)
                    .execute(pool)
                    .await
                    .unwrap();
                members.retain(|(o, _)| *o != id);
            }
            68..=84 if !orgs.is_empty() && !users.is_empty() => {
                let o = *orgs.choose(&mut rng).unwrap();
                let u = *users.choose(&mut rng).unwrap();
                let role = ["member", "admin", "owner"].choose(&mut rng).unwrap();
                sqlx::query("insert into organization_members values ($1, $2, $3) on conflict (organization_id, user_id) do update set role = excluded.role").bind(o).bind(u).bind(role).execute(pool).await.unwrap();
                members.insert((o, u));
                if via_hasura {
                    sender
                        .hasura(
                            "organization_members",
                            "INSERT",
                            json!({"organization_id": o, "user_id": u, "role": role}),
                        )
                        .await;
                    hasura_posts += 1;
                }
            }
            85..=92 if !members.is_empty() => {
                let (o, u) = *members.iter().nth(rng.gen_range(0..members.len())).unwrap();
                sqlx::query(
                    "delete from organization_members where organization_id = $1 and user_id = $2",
                )
                .bind(o)
                .bind(u)
                .execute(pool)
                .await
                .unwrap();
                members.remove(&(o, u));
            }
            _ => {
                // A sign-up on FusionAuth's hosted pages, reported by webhook. The fake's state
                // is changed directly (it is FusionAuth's own write), faults or not.
                signups += 1;
                // (Not added to `users`: its row appears asynchronously.)
                let id = fa.insert_user(json!({"email": format!("signup{counter}@chaos.test"), "firstName": "Signed", "lastName": "Up"}));
                sender.webhook(&json!({"event": {"type": "user.create.complete", "id": Uuid::new_v4(), "user": {"id": id, "email": format!("signup{counter}@chaos.test")}}})).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(8)).await;
    }
    // If the workload was faster than the outage, finish it.
    if let Some(t) = outage_started {
        let left = Duration::from_secs(10).saturating_sub(t.elapsed());
        tokio::time::sleep(left).await;
    }
    fa.set_down(false);
    let workload_done = Instant::now();
    fa.set_fail_per_mille(0);
    fa.set_drop_per_mille(0);
    fa.set_drop_after_per_mille(0);

    eventually(Duration::from_secs(180), "every event done", || async {
        db.count("select count(*) from fusionsync.event where state in ('pending', 'processing')")
            .await
            == 0
    })
    .await;
    let converge = workload_done.elapsed();

    // ---- both sides agree exactly ----
    let failed: Vec<(i64, String, String, Option<String>)> = sqlx::query_as("select id, entity_kind, entity_key, last_error from fusionsync.event where state = 'failed'").fetch_all(pool).await.unwrap();
    assert!(failed.is_empty(), "failed events (seed {seed}): {failed:?}");
    let rows: Vec<UserRow> =
        sqlx::query_as("select id, email, first_name, last_name, active from users")
            .fetch_all(pool)
            .await
            .unwrap();
    let org_rows: BTreeMap<Uuid, String> =
        sqlx::query_as::<_, (Uuid, String)>("select id, name from organizations")
            .fetch_all(pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let member_rows: Vec<(Uuid, Uuid, String)> =
        sqlx::query_as("select organization_id, user_id, role from organization_members")
            .fetch_all(pool)
            .await
            .unwrap();
    {
        let data = fa.data();
        let fa_ids: BTreeSet<Uuid> = data.users.keys().copied().collect();
        let db_ids: BTreeSet<Uuid> = rows.iter().map(|r| r.0).collect();
        assert_eq!(fa_ids, db_ids, "user sets differ (seed {seed})");
        for (id, email, first, last, active) in &rows {
            let u = &data.users[id];
            assert_eq!(
                u.get("email").and_then(Value::as_str),
                email.as_deref(),
                "{id} (seed {seed})"
            );
            assert_eq!(
                u.get("firstName").and_then(Value::as_str),
                first.as_deref(),
                "{id} (seed {seed})"
            );
            assert_eq!(
                u.get("lastName").and_then(Value::as_str),
                last.as_deref(),
                "{id} (seed {seed})"
            );
            assert_eq!(u["active"], json!(active), "{id} (seed {seed})");
        }
        let groups: BTreeMap<Uuid, String> = data
            .groups
            .iter()
            .map(|(id, g)| (*id, g["name"].as_str().unwrap().to_string()))
            .collect();
        assert_eq!(groups, org_rows, "groups differ (seed {seed})");
        let want: BTreeSet<(String, String, String)> = member_rows
            .iter()
            .map(|(o, u, r)| (o.to_string(), u.to_string(), r.clone()))
            .collect();
        let have: BTreeSet<(String, String, String)> = data
            .members
            .iter()
            .flat_map(|(g, ms)| {
                ms.iter().map(move |m| {
                    (
                        g.to_string(),
                        m["userId"].as_str().unwrap().to_string(),
                        m["data"]["role"].as_str().unwrap_or("").to_string(),
                    )
                })
            })
            .collect();
        assert_eq!(have, want, "members differ (seed {seed})");
    }
    assert_eq!(
        fa.max_creates(),
        1,
        "something was created twice (seed {seed})"
    );

    // ---- figures ----
    let log = fa.log();
    let writes = log.iter().filter(|r| r.is_write()).count();
    let changes = total_ops;
    let f = &fa.state.faults;
    println!("chaos figures (seed {seed}):");
    println!("  operations            {total_ops} ({signups} FusionAuth sign-ups, {hasura_posts} also sent through the Hasura endpoint)");
    println!(
        "  processes             3 (one SIGKILLed at op {}, restarted)",
        killed_at.unwrap_or(0)
    );
    println!("  faults injected       {} errors (500/503), {} dropped connections, {} requests refused during a 10 s outage, {terminated} database connections terminated",
        f.injected_errors.load(Ordering::SeqCst), f.injected_drops.load(Ordering::SeqCst), f.refused_while_down.load(Ordering::SeqCst));
    println!(
        "  workload time         {:.1} s",
        (workload_done - start).as_secs_f64()
    );
    println!(
        "  converged after       {:.1} s (from the end of the workload)",
        converge.as_secs_f64()
    );
    println!(
        "  FusionAuth requests   {} total, {writes} writes = {:.2} writes per change",
        log.len(),
        writes as f64 / changes as f64
    );
    // Bound: a change costs at most 3 writes (reactivate + patch + deactivate of an inactive
    // user), plus the repeats that lost responses and retries cause. An echo loop would grow
    // without bound.
    assert!(
        writes <= 4 * changes,
        "{writes} FusionAuth writes for {changes} changes (seed {seed})"
    );

    for d in daemons.iter_mut() {
        let status = d.terminate().await;
        assert!(status.success(), "{status:?}");
    }
    assert_eq!(
        db.events_in("processing").await,
        0,
        "nothing left processing after clean stops"
    );
    db.drop_db().await;
}
