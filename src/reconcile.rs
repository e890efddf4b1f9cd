//! The full reconcile: compare both sides completely, page by page, and enqueue ordinary
//! events for whatever differs (the workers then fix it with the usual retries). This catches
//! what no event reported: a webhook FusionAuth could not deliver, a hand edit in FusionAuth.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use crate::db::event::{insert_events, Direction, EntityKind, NewEvent};
use crate::sync::membership::{actual_members, desired_members, diff};
use crate::sync::user::{desired_from_fusionauth, desired_user};
use crate::worker::{organizations, SyncContext, SyncError};

#[derive(Clone, Copy, Debug)]
pub struct ReconcileOptions {
    pub users: bool,
    pub orgs: bool,
    pub dry_run: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ReconcileReport {
    pub users_checked: u64,
    pub users_missing_in_fusionauth: Vec<String>,
    pub users_missing_in_database: Vec<String>,
    pub users_differing: Vec<String>,
    pub users_unmappable: Vec<String>,
    pub organizations_checked: u64,
    pub groups_missing: Vec<String>,
    pub groups_differing: Vec<String>,
    pub groups_without_organization: Vec<String>,
    pub organizations_with_member_drift: Vec<String>,
    pub members_missing: u64,
    pub members_stray: u64,
    pub members_differing: u64,
    pub enqueued: u64,
}

impl ReconcileReport {
    pub fn drift(&self) -> usize {
        self.users_missing_in_fusionauth.len()
            + self.users_missing_in_database.len()
            + self.users_differing.len()
            + self.groups_missing.len()
            + self.groups_differing.len()
            + self.groups_without_organization.len()
            + self.organizations_with_member_drift.len()
    }
}

/// Lists shown in a report are capped; the counts are not.
const LIST_CAP: usize = 1000;

fn note(list: &mut Vec<String>, key: &str) {
    if list.len() < LIST_CAP {
        list.push(key.to_string());
    }
}

fn event(kind: EntityKind, key: &str, direction: Direction) -> NewEvent {
    NewEvent {
        source: "reconcile".into(),
        kind,
        key: key.to_string(),
        direction,
        op: "reconcile".into(),
        payload: Some(json!({ "force": true })),
        dedup_key: None,
    }
}

pub async fn run(ctx: &SyncContext, opts: ReconcileOptions) -> Result<ReconcileReport, SyncError> {
    let mut report = ReconcileReport::default();
    if opts.users {
        users(ctx, opts, &mut report).await?;
    }
    if opts.orgs && ctx.tables.organizations.is_some() {
        orgs(ctx, opts, &mut report).await?;
    }
    Ok(report)
}

async fn enqueue(
    ctx: &SyncContext,
    opts: ReconcileOptions,
    report: &mut ReconcileReport,
    events: Vec<NewEvent>,
) -> Result<(), SyncError> {
    if opts.dry_run || events.is_empty() {
        return Ok(());
    }
    report.enqueued += insert_events(&ctx.pool, &events).await?.len() as u64;
    Ok(())
}

async fn users(
    ctx: &SyncContext,
    opts: ReconcileOptions,
    report: &mut ReconcileReport,
) -> Result<(), SyncError> {
    let fields = &ctx.tables.user_fields;
    let page = ctx.cfg.reconcile.page_size;
    // Database → FusionAuth: every row, a page at a time, against a search by ids.
    let mut after: Option<String> = None;
    loop {
        let rows = ctx
            .tables
            .users_page(&ctx.pool, after.as_deref(), page)
            .await?;
        if rows.is_empty() {
            break;
        }
        after = rows.last().map(|(k, _)| k.clone());
        let ids: Vec<Uuid> = rows
            .iter()
            .filter_map(|(k, _)| Uuid::parse_str(k).ok())
            .collect();
        let found: HashMap<String, Value> = ctx
            .fa
            .users_by_ids(&ids)
            .await?
            .into_iter()
            .filter_map(|u| {
                u.get("id")
                    .and_then(Value::as_str)
                    .map(|id| (id.to_ascii_lowercase(), u.clone()))
            })
            .collect();
        let mut events = Vec::new();
        for (key, row) in &rows {
            report.users_checked += 1;
            let Ok(desired) = desired_user(row, fields) else {
                note(&mut report.users_unmappable, key);
                continue;
            };
            match found.get(key) {
                None => {
                    note(&mut report.users_missing_in_fusionauth, key);
                    events.push(event(EntityKind::User, key, Direction::ToFusionAuth));
                }
                Some(u) if desired_from_fusionauth(u, fields) != desired => {
                    note(&mut report.users_differing, key);
                    events.push(event(EntityKind::User, key, Direction::ToFusionAuth));
                }
                Some(_) => {}
            }
        }
        enqueue(ctx, opts, report, events).await?;
        if rows.len() < page {
            break;
        }
    }
    // FusionAuth → database: active FusionAuth users with no row (e.g. a sign-up whose webhook
    // was lost).
    let mut start = 0u64;
    let mut next: Option<String> = None;
    loop {
        let result = ctx.fa.search_users(start, page, next.as_deref()).await?;
        let n = result.items.len();
        if n == 0 {
            break;
        }
        let keys: Vec<String> = result
            .items
            .iter()
            .filter(|u| u.get("active").and_then(Value::as_bool).unwrap_or(true))
            .filter_map(|u| {
                u.get("id")
                    .and_then(Value::as_str)
                    .map(str::to_ascii_lowercase)
            })
            .collect();
        let present: HashSet<String> = ctx
            .tables
            .users_by_ids(&ctx.pool, &keys)
            .await?
            .into_keys()
            .collect();
        let mut events = Vec::new();
        for key in keys.iter().filter(|k| !present.contains(*k)) {
            note(&mut report.users_missing_in_database, key);
            events.push(event(EntityKind::User, key, Direction::ToDatabase));
        }
        enqueue(ctx, opts, report, events).await?;
        start += n as u64;
        next = result.next_results;
        if n < page || start >= result.total {
            break;
        }
    }
    Ok(())
}

async fn orgs(
    ctx: &SyncContext,
    opts: ReconcileOptions,
    report: &mut ReconcileReport,
) -> Result<(), SyncError> {
    let page = ctx.cfg.reconcile.page_size;
    let groups: HashMap<String, Value> = ctx
        .fa
        .list_groups()
        .await?
        .into_iter()
        .filter_map(|g| {
            g.get("id")
                .and_then(Value::as_str)
                .map(|id| (id.to_ascii_lowercase(), g.clone()))
        })
        .collect();
    let mut seen = HashSet::new();
    let m = &ctx.cfg.memberships;
    let mut after: Option<String> = None;
    loop {
        let rows = ctx
            .tables
            .organizations_page(&ctx.pool, after.as_deref(), page)
            .await?;
        if rows.is_empty() {
            break;
        }
        after = rows.last().map(|(k, _)| k.clone());
        let mut events = Vec::new();
        for (key, row) in &rows {
            report.organizations_checked += 1;
            seen.insert(key.clone());
            let Ok(gid) = Uuid::parse_str(key) else {
                continue;
            };
            let Ok(desired) = organizations::desired(ctx, &gid, row) else {
                continue;
            };
            match groups.get(key) {
                None => {
                    note(&mut report.groups_missing, key);
                    events.push(event(
                        EntityKind::Organization,
                        key,
                        Direction::ToFusionAuth,
                    ));
                    if ctx.tables.members.is_some() {
                        events.push(event(EntityKind::Membership, key, Direction::ToFusionAuth));
                    }
                    continue;
                }
                Some(g) if !desired.matches(g) => {
                    note(&mut report.groups_differing, key);
                    events.push(event(
                        EntityKind::Organization,
                        key,
                        Direction::ToFusionAuth,
                    ));
                }
                Some(_) => {}
            }
            if ctx.tables.members.is_some() {
                let member_rows = ctx.tables.members_of(&ctx.pool, key).await?;
                let want = desired_members(
                    &member_rows,
                    &m.user_column,
                    ctx.tables.member_role_column.as_deref(),
                    &ctx.tables.member_data_columns,
                );
                let have = actual_members(&ctx.fa.group_members(&gid, page).await?);
                let d = diff(&want, &have);
                if !d.is_empty() {
                    report.members_missing += d.add.len() as u64;
                    report.members_stray += d.remove.len() as u64;
                    report.members_differing += d.change.len() as u64;
                    note(&mut report.organizations_with_member_drift, key);
                    events.push(event(EntityKind::Membership, key, Direction::ToFusionAuth));
                }
            }
        }
        enqueue(ctx, opts, report, events).await?;
        if rows.len() < page {
            break;
        }
    }
    // Groups fusionsync made (they carry data.organizationId) whose organization is gone.
    let mut events = Vec::new();
    for (id, g) in &groups {
        let managed = g
            .get("data")
            .and_then(|d| d.get("organizationId"))
            .is_some();
        if managed && !seen.contains(id) {
            note(&mut report.groups_without_organization, id);
            events.push(event(EntityKind::Organization, id, Direction::ToFusionAuth));
        }
    }
    enqueue(ctx, opts, report, events).await?;
    Ok(())
}

/// The daemon's periodic reconcile: only one instance runs it at a time (advisory lock).
pub async fn periodic(
    ctx: std::sync::Arc<SyncContext>,
    every: Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut conn = match ctx.pool.acquire().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "periodic reconcile skipped: no database connection");
                continue;
            }
        };
        let locked: bool = match sqlx::query_scalar(
            "select pg_try_advisory_lock(hashtext('fusionsync.reconcile'))",
        )
        .fetch_one(&mut *conn)
        .await
        {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "periodic reconcile skipped");
                continue;
            }
        };
        if !locked {
            info!("periodic reconcile skipped: another instance is running it");
            continue;
        }
        let opts = ReconcileOptions {
            users: true,
            orgs: true,
            dry_run: false,
        };
        match run(&ctx, opts).await {
            Ok(r) => info!(
                drift = r.drift(),
                enqueued = r.enqueued,
                "periodic reconcile finished"
            ),
            Err(e) => warn!(error = %e, "periodic reconcile failed"),
        }
        let _ = sqlx::query("select pg_advisory_unlock(hashtext('fusionsync.reconcile'))")
            .execute(&mut *conn)
            .await;
    }
}
