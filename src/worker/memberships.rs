//! Reconciling the members of one organization's group as a set.

use std::collections::BTreeSet;

use tracing::{info, warn};
use uuid::Uuid;

use super::{organizations, parse_uuid, users, SyncContext, SyncError};
use crate::config::MembershipMode;
use crate::db::entity;
use crate::db::event::{self, ClaimedEntity, Direction, EntityKind};
use crate::fusionauth::Member;
use crate::sync::membership::{
    actual_members, columns_from_member, desired_members, diff, fingerprint, MemberSet,
};
use crate::sync::DELETED;

pub async fn reconcile(
    ctx: &SyncContext,
    entity: &ClaimedEntity,
) -> Result<Option<String>, SyncError> {
    let gid = parse_uuid(&entity.key, "organization")?;
    let mut fp = entity.fingerprint.clone();
    if entity.has(Direction::ToDatabase) && ctx.cfg.memberships.mode == MembershipMode::TwoWay {
        fp = to_database(ctx, entity, &gid, fp).await?;
    }
    if entity.has(Direction::ToFusionAuth) {
        let force = entity.forced(Direction::ToFusionAuth);
        fp = Some(to_fusionauth(ctx, &entity.key, &gid, fp.as_deref(), force).await?);
    }
    Ok(fp)
}

fn desired_from_rows(ctx: &SyncContext, rows: &[serde_json::Value]) -> MemberSet {
    let m = &ctx.cfg.memberships;
    desired_members(
        rows,
        &m.user_column,
        ctx.tables.member_role_column.as_deref(),
        &ctx.tables.member_data_columns,
    )
}

pub async fn to_fusionauth(
    ctx: &SyncContext,
    org_key: &str,
    gid: &Uuid,
    stored: Option<&str>,
    force: bool,
) -> Result<String, SyncError> {
    let Some(org) = ctx.tables.organization(&ctx.pool, org_key).await? else {
        // No organization: its group is (being) deleted, which removes the members with it.
        return Ok(DELETED.into());
    };
    let rows = ctx.tables.members_of(&ctx.pool, org_key).await?;
    let mut desired = desired_from_rows(ctx, &rows);
    let fp = fingerprint(&desired);
    if !force && stored == Some(fp.as_str()) {
        return Ok(fp);
    }

    // The group and every member's user must exist first, whatever order events came in.
    let org_fp = entity::fingerprint(&ctx.pool, EntityKind::Organization, org_key).await?;
    let want_org_fp = organizations::desired(ctx, gid, &org)?.fingerprint();
    if org_fp.as_deref() != Some(want_org_fp.as_str()) {
        let new_fp =
            organizations::to_fusionauth(ctx, gid, Some(&org), org_fp.as_deref(), false).await?;
        entity::set_fingerprint(&ctx.pool, EntityKind::Organization, org_key, &new_fp).await?;
    }
    let user_keys: Vec<String> = desired.keys().cloned().collect();
    let user_rows = ctx
        .tables
        .users_by_ids(&ctx.pool, &valid_uuids(&user_keys))
        .await?;
    let user_fps = entity::fingerprints(&ctx.pool, EntityKind::User, &user_keys).await?;
    let mut missing = Vec::new();
    for key in &user_keys {
        let row = user_rows.get(key);
        let ok = users::ensure_in_fusionauth(ctx, key, row, user_fps.get(key).map(String::as_str))
            .await?;
        if !ok {
            missing.push(key.clone());
        }
    }
    for key in &missing {
        warn!(organization = %org_key, user = %key, "membership names a user with no row in the users table; not added");
        desired.remove(key);
    }

    let actual = actual_members(
        &ctx.fa
            .group_members(gid, ctx.cfg.reconcile.page_size)
            .await?,
    );
    let d = diff(&desired, &actual);
    if d.is_empty() {
        return Ok(fp);
    }
    if !d.remove.is_empty() {
        info!(organization = %org_key, members = ?d.remove, "removing group members that are not in the membership table");
    }
    let mut remove: Vec<String> = d.remove.clone();
    remove.extend(d.change.iter().map(|m| m.user_id.clone()));
    let mut add: Vec<Member> = d.add.clone();
    add.extend(d.change.iter().cloned());
    let applied = async {
        ctx.fa.remove_members(gid, &remove).await?;
        ctx.fa.add_members(gid, &add).await
    }
    .await;
    match applied {
        Ok(()) => {}
        // The group is gone: the organization was deleted meanwhile (then there is nothing to
        // do), or someone deleted the group by hand (create it again, then redo the set).
        Err(e) if e.status() == Some(400) && e.has_code("[invalid]members") => {
            let Some(org) = ctx.tables.organization(&ctx.pool, org_key).await? else {
                return Ok(DELETED.into());
            };
            let new_fp = organizations::to_fusionauth(ctx, gid, Some(&org), None, true).await?;
            entity::set_fingerprint(&ctx.pool, EntityKind::Organization, org_key, &new_fp).await?;
            return Err(SyncError::retry(format!(
                "the group was missing in FusionAuth ({e}); recreated, the member set is read again"
            )));
        }
        // A member's user is not in FusionAuth: deleted there by hand, or deleted from the table
        // while this set was being reconciled. Make each of those users agree with its row
        // (creating or removing it), then read the whole set again on the next attempt.
        Err(e) if e.status() == Some(400) && e.has_code("[invalid]userId") => {
            let keys: Vec<String> = add.iter().map(|m| m.user_id.clone()).collect();
            let rows = ctx
                .tables
                .users_by_ids(&ctx.pool, &valid_uuids(&keys))
                .await?;
            for key in &keys {
                let uid = parse_uuid(key, "user")?;
                let fp = users::to_fusionauth(ctx, &uid, rows.get(key), None, true).await?;
                entity::set_fingerprint(&ctx.pool, EntityKind::User, key, &fp).await?;
            }
            return Err(SyncError::retry(format!(
                "a member's user was missing in FusionAuth ({e}); users reconciled, the member set is read again"
            )));
        }
        Err(e) => return Err(e.into()),
    }
    info!(organization = %org_key, added = d.add.len(), changed = d.change.len(), removed = d.remove.len(), "group members in agreement");
    Ok(fp)
}

/// Two-way mode: write FusionAuth's member set into the membership table, unless the table
/// changed since the last sync (then the database wins).
async fn to_database(
    ctx: &SyncContext,
    entity: &ClaimedEntity,
    gid: &Uuid,
    stored: Option<String>,
) -> Result<Option<String>, SyncError> {
    let org_key = entity.key.as_str();
    if ctx.tables.organization(&ctx.pool, org_key).await?.is_none() {
        return Ok(stored);
    }
    let rows = ctx.tables.members_of(&ctx.pool, org_key).await?;
    let table = desired_from_rows(ctx, &rows);
    let table_fp = fingerprint(&table);
    let actual = actual_members(
        &ctx.fa
            .group_members(gid, ctx.cfg.reconcile.page_size)
            .await?,
    );
    if fingerprint(&actual) == table_fp {
        return Ok(Some(table_fp));
    }
    let database_changed = entity.has(Direction::ToFusionAuth)
        || event::has_pending(
            &ctx.pool,
            EntityKind::Membership,
            org_key,
            Direction::ToFusionAuth,
        )
        .await?
        || stored
            .as_deref()
            .is_some_and(|s| s != table_fp && s != DELETED);
    if database_changed {
        info!(organization = %org_key, "members changed on both sides: the database wins");
        return Ok(stored);
    }
    // Only import members whose user exists in the table.
    let ids: Vec<String> = actual.keys().cloned().collect();
    let known: BTreeSet<String> = ctx
        .tables
        .users_by_ids(&ctx.pool, &valid_uuids(&ids))
        .await?
        .into_keys()
        .collect();
    let remove: Vec<String> = table
        .keys()
        .filter(|u| !actual.contains_key(*u))
        .cloned()
        .collect();
    let upsert: Vec<(String, serde_json::Map<String, serde_json::Value>)> = actual
        .iter()
        .filter(|(u, data)| known.contains(*u) && table.get(*u) != Some(*data))
        .map(|(u, data)| {
            (
                u.clone(),
                columns_from_member(
                    data,
                    ctx.tables.member_role_column.as_deref(),
                    &ctx.tables.member_data_columns,
                ),
            )
        })
        .collect();
    ctx.tables
        .write_members(&ctx.pool, org_key, &remove, &upsert)
        .await?;
    info!(organization = %org_key, imported = upsert.len(), removed = remove.len(), "wrote FusionAuth's group members into the membership table");
    let rows = ctx.tables.members_of(&ctx.pool, org_key).await?;
    Ok(Some(fingerprint(&desired_from_rows(ctx, &rows))))
}

fn valid_uuids(keys: &[String]) -> Vec<String> {
    keys.iter()
        .filter(|k| Uuid::parse_str(k).is_ok())
        .cloned()
        .collect()
}
