//! Organizations → FusionAuth groups, memberships → group members.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::*;

async fn org(db: &TestDb, id: Uuid, name: &str) {
    sqlx::query("insert into organizations (id, name, slug) values ($1, $2, $3)")
        .bind(id)
        .bind(name)
        .bind(name.to_lowercase().replace(' ', "-"))
        .execute(&db.pool)
        .await
        .unwrap();
}

async fn member(db: &TestDb, org: Uuid, user: Uuid, role: &str) {
    sqlx::query(
        "insert into organization_members (organization_id, user_id, role) values ($1, $2, $3)",
    )
    .bind(org)
    .bind(user)
    .bind(role)
    .execute(&db.pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn an_organization_becomes_a_group_that_follows_renames_and_deletion() {
    let app = TestApp::spawn().await;
    let id = Uuid::new_v4();
    org(&app.db, id, "Acme").await;
    eventually(Duration::from_secs(10), "the group", || async {
        app.fa.group(&id).is_some()
    })
    .await;
    let g = app.fa.group(&id).unwrap();
    assert_eq!(g["name"], "Acme");
    assert_eq!(g["data"]["organizationId"], id.to_string());
    assert_eq!(g["data"]["slug"], "acme");
    app.db
        .exec(&format!(
            "update organizations set name = 'Acme Corp' where id = '{id}'"
        ))
        .await;
    eventually(Duration::from_secs(10), "the rename", || async {
        app.fa.group(&id).is_some_and(|g| g["name"] == "Acme Corp")
    })
    .await;
    app.db
        .exec(&format!("delete from organizations where id = '{id}'"))
        .await;
    eventually(Duration::from_secs(10), "the deletion", || async {
        app.fa.group(&id).is_none()
    })
    .await;
    app.settle().await;
    assert_eq!(app.db.events_in("failed").await, 0);
    app.finish().await;
}

#[tokio::test]
async fn members_are_added_changed_and_removed_with_their_role() {
    let app = TestApp::spawn().await;
    let o = Uuid::new_v4();
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    org(&app.db, o, "Members Inc").await;
    app.db.insert_user(a, "a@example.com").await;
    app.db.insert_user(b, "b@example.com").await;
    member(&app.db, o, a, "admin").await;
    member(&app.db, o, b, "member").await;
    eventually(Duration::from_secs(10), "two members", || async {
        app.fa.members(&o).len() == 2
    })
    .await;
    assert_eq!(app.fa.members(&o)[&a.to_string()], json!({"role": "admin"}));
    app.db
        .exec(&format!(
            "update organization_members set role = 'owner' where user_id = '{b}'"
        ))
        .await;
    eventually(Duration::from_secs(10), "the role change", || async {
        app.fa.members(&o).get(&b.to_string()) == Some(&json!({"role": "owner"}))
    })
    .await;
    app.db
        .exec(&format!(
            "delete from organization_members where user_id = '{a}'"
        ))
        .await;
    eventually(Duration::from_secs(10), "the removal", || async {
        app.fa.members(&o).len() == 1
    })
    .await;
    app.settle().await;
    assert_eq!(app.db.events_in("failed").await, 0);
    // Deleting the organization removes its group, and with it the memberships.
    app.db
        .exec(&format!("delete from organizations where id = '{o}'"))
        .await;
    eventually(Duration::from_secs(10), "group gone", || async {
        app.fa.group(&o).is_none()
    })
    .await;
    assert!(app.fa.members(&o).is_empty());
    app.settle().await;
    assert_eq!(app.db.events_in("failed").await, 0);
    app.finish().await;
}

#[tokio::test]
async fn a_membership_event_before_its_user_and_organization_still_converges() {
    let app = TestApp::spawn_with(|env| {
        env.insert("FUSIONSYNC__WORKER__ENABLED".into(), "false".into());
    })
    .await;
    let (o, u) = (Uuid::new_v4(), Uuid::new_v4());
    org(&app.db, o, "Early Birds").await;
    app.db.insert_user(u, "early@example.com").await;
    member(&app.db, o, u, "admin").await;
    // Lose the user and organization events: only the membership event is left.
    app.db
        .exec("delete from fusionsync.event where entity_kind <> 'membership'")
        .await;
    let worker = app.worker().await;
    app.drain(&worker).await;
    assert!(app.fa.group(&o).is_some(), "the group was created inline");
    assert!(app.fa.user(&u).is_some(), "the user was created inline");
    assert_eq!(app.fa.members(&o)[&u.to_string()], json!({"role": "admin"}));
    assert_eq!(app.db.events_in("failed").await, 0);
    app.finish().await;
}

#[tokio::test]
async fn a_group_name_collision_fails_naming_both_organizations_while_others_continue() {
    let app = TestApp::spawn().await;
    let (first, second, third) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    org(&app.db, first, "Same Name").await;
    eventually(Duration::from_secs(10), "first group", || async {
        app.fa.group(&first).is_some()
    })
    .await;
    // slug is unique in the table, the name is not
    sqlx::query("insert into organizations (id, name, slug) values ($1, 'Same Name', 'same-2')")
        .bind(second)
        .execute(&app.db.pool)
        .await
        .unwrap();
    org(&app.db, third, "Other").await;
    app.settle().await;
    assert!(app.fa.group(&third).is_some());
    assert!(app.fa.group(&second).is_none());
    let err: String = sqlx::query_scalar(
        "select last_error from fusionsync.event where entity_key = $1 and state = 'failed'",
    )
    .bind(second.to_string())
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert!(
        err.contains(&second.to_string()) && err.contains(&format!("organization {first}")),
        "{err}"
    );
    assert!(err.contains("group_name_template"), "{err}");
    app.finish().await;

    // The documented way out: a template that includes the id.
    let app = TestApp::spawn_with(|env| {
        env.insert(
            "FUSIONSYNC__ORGANIZATIONS__GROUP_NAME_TEMPLATE".into(),
            "{name} ({id})".into(),
        );
    })
    .await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    org(&app.db, a, "Twin").await;
    sqlx::query("insert into organizations (id, name, slug) values ($1, 'Twin', 'twin-2')")
        .bind(b)
        .execute(&app.db.pool)
        .await
        .unwrap();
    app.settle().await;
    assert_eq!(app.fa.group(&b).unwrap()["name"], format!("Twin ({b})"));
    assert_eq!(app.db.events_in("failed").await, 0);
    app.finish().await;
}

#[tokio::test]
async fn a_member_added_by_hand_in_fusionauth_is_removed_in_database_mode() {
    let app = TestApp::spawn().await;
    let o = Uuid::new_v4();
    let (u, stranger) = (Uuid::new_v4(), Uuid::new_v4());
    org(&app.db, o, "Strict").await;
    app.db.insert_user(u, "member@example.com").await;
    app.db.insert_user(stranger, "stranger@example.com").await;
    member(&app.db, o, u, "member").await;
    eventually(Duration::from_secs(10), "member", || async {
        app.fa.members(&o).len() == 1
    })
    .await;
    app.settle().await;
    app.fa
        .insert_member(&o, &stranger, json!({"role": "admin"}));
    let mut ev = fixture("fusionauth/events/group-member-add.json");
    ev["event"]["group"]["id"] = json!(o.to_string());
    ev["event"]["members"][0]["userId"] = json!(stranger.to_string());
    assert_eq!(app.post_webhook(&ev).await.status(), 200);
    eventually(
        Duration::from_secs(10),
        "the stray member removed",
        || async { !app.fa.members(&o).contains_key(&stranger.to_string()) },
    )
    .await;
    assert_eq!(app.fa.members(&o).len(), 1);
    assert_eq!(
        app.db
            .count("select count(*) from organization_members")
            .await,
        1
    );
    app.finish().await;
}

#[tokio::test]
async fn a_member_added_by_hand_in_fusionauth_is_imported_in_two_way_mode() {
    let app = TestApp::spawn_with(|env| {
        env.insert("FUSIONSYNC__MEMBERSHIPS__MODE".into(), "two_way".into());
    })
    .await;
    let o = Uuid::new_v4();
    let (u, newcomer) = (Uuid::new_v4(), Uuid::new_v4());
    org(&app.db, o, "Open").await;
    app.db.insert_user(u, "m1@example.com").await;
    app.db.insert_user(newcomer, "m2@example.com").await;
    member(&app.db, o, u, "member").await;
    eventually(Duration::from_secs(10), "member", || async {
        app.fa.members(&o).len() == 1
    })
    .await;
    app.settle().await;
    app.fa.clear_log();
    app.fa
        .insert_member(&o, &newcomer, json!({"role": "admin"}));
    let mut ev = fixture("fusionauth/events/group-member-add.json");
    ev["event"]["id"] = json!(Uuid::new_v4().to_string());
    ev["event"]["group"]["id"] = json!(o.to_string());
    assert_eq!(app.post_webhook(&ev).await.status(), 200);
    eventually(Duration::from_secs(10), "the member imported", || async {
        app.db.count(&format!("select count(*) from organization_members where user_id = '{newcomer}' and role = 'admin'")).await == 1
    })
    .await;
    app.settle().await;
    assert!(
        app.fa.writes().is_empty(),
        "importing caused no FusionAuth write: {:?}",
        app.fa.writes()
    );
    assert_eq!(app.fa.members(&o).len(), 2);
    app.finish().await;
}

#[tokio::test]
async fn three_hundred_users_in_twenty_orgs_with_random_churn_converge_exactly() {
    let app = TestApp::spawn().await;
    let seed: u64 = std::env::var("CHURN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261204);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let users: Vec<Uuid> = (0..300).map(|_| Uuid::new_v4()).collect();
    let orgs: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
    for (i, u) in users.iter().enumerate() {
        app.db
            .insert_user(*u, &format!("churn{i}@example.com"))
            .await;
    }
    for (i, o) in orgs.iter().enumerate() {
        org(&app.db, *o, &format!("Org {i}")).await;
    }
    let roles = ["member", "admin", "owner"];
    for _ in 0..1500 {
        let o = orgs[rng.gen_range(0..orgs.len())];
        let u = users[rng.gen_range(0..users.len())];
        match rng.gen_range(0..3) {
            0 => {
                sqlx::query(
                    "insert into organization_members values ($1, $2, $3) on conflict do nothing",
                )
                .bind(o)
                .bind(u)
                .bind(roles[rng.gen_range(0..3)])
                .execute(&app.db.pool)
                .await
                .unwrap();
            }
            1 => {
                sqlx::query("update organization_members set role = $3 where organization_id = $1 and user_id = $2")
                    .bind(o).bind(u).bind(roles[rng.gen_range(0..3)]).execute(&app.db.pool).await.unwrap();
            }
            _ => {
                sqlx::query(
                    "delete from organization_members where organization_id = $1 and user_id = $2",
                )
                .bind(o)
                .bind(u)
                .execute(&app.db.pool)
                .await
                .unwrap();
            }
        }
    }
    app.settle().await;
    let rows: Vec<(Uuid, Uuid, String)> =
        sqlx::query_as("select organization_id, user_id, role from organization_members")
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    let mut want: BTreeMap<Uuid, BTreeMap<String, Value>> =
        orgs.iter().map(|o| (*o, BTreeMap::new())).collect();
    for (o, u, r) in rows {
        want.get_mut(&o)
            .unwrap()
            .insert(u.to_string(), json!({"role": r}));
    }
    for (o, members) in &want {
        assert_eq!(&app.fa.members(o), members, "org {o} (seed {seed})");
    }
    let fa_users: BTreeSet<Uuid> = app.fa.data().users.keys().copied().collect();
    assert_eq!(fa_users, users.iter().copied().collect::<BTreeSet<_>>());
    assert_eq!(app.db.events_in("failed").await, 0, "seed {seed}");
    assert_eq!(app.fa.max_creates(), 1);
    app.finish().await;
}
