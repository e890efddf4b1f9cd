//! Reconciling one organization ↔ its FusionAuth group (same id).

use serde_json::Value;
use tracing::{debug, info};
use uuid::Uuid;

use super::{parse_uuid, SyncContext, SyncError};
use crate::db::event::ClaimedEntity;
use crate::db::event::Direction;
use crate::fusionauth::FusionAuthError;
use crate::sync::organization::{desired_group, DesiredGroup};
use crate::sync::DELETED;

pub async fn reconcile(
    ctx: &SyncContext,
    entity: &ClaimedEntity,
) -> Result<Option<String>, SyncError> {
    let id = parse_uuid(&entity.key, "organization")?;
    let row = ctx.tables.organization(&ctx.pool, &entity.key).await?;
    let force = entity.forced(Direction::ToFusionAuth);
    let fp = to_fusionauth(ctx, &id, row.as_ref(), entity.fingerprint.as_deref(), force).await?;
    Ok(Some(fp))
}

pub fn desired(ctx: &SyncContext, id: &Uuid, row: &Value) -> Result<DesiredGroup, SyncError> {
    let o = &ctx.cfg.organizations;
    desired_group(
        &id.to_string(),
        row,
        &o.name_column,
        &ctx.tables.org_data_columns,
        &o.group_name_template,
    )
    .map_err(|e| SyncError::Permanent(e.to_string()))
}

pub async fn to_fusionauth(
    ctx: &SyncContext,
    id: &Uuid,
    row: Option<&Value>,
    stored: Option<&str>,
    force: bool,
) -> Result<String, SyncError> {
    let Some(row) = row else {
        if !force && stored == Some(DELETED) {
            return Ok(DELETED.into());
        }
        let existed = ctx.fa.delete_group(id).await?;
        info!(organization = %id, existed, "organization deleted: group removed from FusionAuth");
        return Ok(DELETED.into());
    };
    let desired = desired(ctx, id, row)?;
    let fp = desired.fingerprint();
    if !force && stored == Some(fp.as_str()) {
        debug!(organization = %id, "group already in agreement");
        return Ok(fp);
    }
    let known = stored.is_some_and(|s| s != DELETED);
    let result = if force {
        match ctx.fa.get_group(id).await? {
            Some(g) if desired.matches(&g) => Ok(()),
            Some(_) => save(ctx, id, &desired, false).await,
            None => save(ctx, id, &desired, true).await,
        }
    } else {
        save(ctx, id, &desired, !known).await
    };
    match result {
        Ok(()) => Ok(fp),
        Err(e) if e.has_code("[duplicate]group.name") => Err(collision(ctx, id, &desired).await),
        Err(e) => Err(e.into()),
    }
}

/// Creates or updates; an update of a missing group creates it, a create of an existing id
/// updates it.
async fn save(
    ctx: &SyncContext,
    id: &Uuid,
    desired: &DesiredGroup,
    create: bool,
) -> Result<(), FusionAuthError> {
    let body = desired.body();
    if create {
        match ctx.fa.save_group(id, &body, true).await {
            Ok(_) => {
                info!(organization = %id, name = %desired.name, "group created in FusionAuth");
                Ok(())
            }
            Err(e) if e.has_code("[duplicate]groupId") => {
                ctx.fa.save_group(id, &body, false).await.map(|_| ())
            }
            Err(e) => Err(e),
        }
    } else if ctx.fa.save_group(id, &body, false).await? {
        info!(organization = %id, name = %desired.name, "group updated in FusionAuth");
        Ok(())
    } else {
        ctx.fa.save_group(id, &body, true).await.map(|_| ())
    }
}

/// A permanent error that names both organizations of a group-name collision.
async fn collision(ctx: &SyncContext, id: &Uuid, desired: &DesiredGroup) -> SyncError {
    let other = match ctx.fa.list_groups().await {
        Ok(groups) => groups
            .into_iter()
            .find(|g| {
                g.get("name").and_then(Value::as_str) == Some(desired.name.as_str())
                    && g.get("id").and_then(Value::as_str) != Some(id.to_string().as_str())
            })
            .and_then(|g| g.get("id").and_then(Value::as_str).map(str::to_string)),
        Err(_) => None,
    };
    let who = match &other {
        Some(gid) => match ctx.tables.organization(&ctx.pool, gid).await {
            Ok(Some(_)) => format!("organization {gid}"),
            _ => format!("FusionAuth group {gid} (not an organization in the table)"),
        },
        None => "another FusionAuth group".to_string(),
    };
    SyncError::Permanent(format!(
        "organization {id} cannot become FusionAuth group '{}': that name is already used by {who}. \
         Group names are unique per tenant: rename one of them, or set organizations.group_name_template \
         (e.g. \"{{name}} ({{id}})\") and replay this event",
        desired.name
    ))
}
