//! Reconciling one user, level-triggered: read both sides' current state and make the target
//! agree with the fewest FusionAuth calls.

use rand::distributions::{Alphanumeric, DistString};
use serde_json::{json, Value};
use tracing::{debug, info};
use uuid::Uuid;

use super::{parse_uuid, SyncContext, SyncError};
use crate::config::{DeletePolicy, FusionAuthDeletePolicy, NewUserPassword};
use crate::db::event::{self, ClaimedEntity, Direction, EntityKind};
use crate::sync::user::{
    columns_from_fusionauth, desired_from_fusionauth, desired_user, parse_fingerprint, DesiredUser,
};
use crate::sync::DELETED;

/// `row`: the prefetched row (`Some(None)` = known absent), or `None` to read it here.
pub async fn reconcile(
    ctx: &SyncContext,
    entity: &ClaimedEntity,
    row: Option<Option<Value>>,
) -> Result<Option<String>, SyncError> {
    let id = parse_uuid(&entity.key, "user")?;
    let mut fp = entity.fingerprint.clone();
    let mut row = row;
    if entity.has(Direction::ToDatabase) {
        fp = to_database(ctx, entity, &id, fp).await?;
        row = None;
    }
    if entity.has(Direction::ToFusionAuth) {
        let row = match row {
            Some(r) => r,
            None => ctx.tables.user_by_id(&ctx.pool, &entity.key).await?,
        };
        let force = entity.forced(Direction::ToFusionAuth);
        fp = Some(to_fusionauth(ctx, &id, row.as_ref(), fp.as_deref(), force).await?);
    }
    Ok(fp)
}

/// Makes FusionAuth's user `id` agree with the users-table row (or its absence). Returns the
/// fingerprint of the state both sides now share.
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
        let hard = ctx.cfg.fusionauth.delete_policy == DeletePolicy::HardDelete;
        let existed = ctx.fa.delete_user(id, hard).await?;
        info!(user = %id, hard, existed, "user row deleted: removed from FusionAuth");
        return Ok(DELETED.into());
    };
    let desired = desired_user(row, &ctx.tables.user_fields)
        .map_err(|e| SyncError::Permanent(format!("user {id}: {e}")))?;
    let fp = desired.fingerprint();
    if !force && stored == Some(fp.as_str()) {
        debug!(user = %id, "already in agreement: no FusionAuth call");
        return Ok(fp);
    }
    let prev = stored.and_then(parse_fingerprint);
    match prev {
        _ if force => converge_by_reading(ctx, id, &desired).await?,
        None => create(ctx, id, &desired).await?,
        Some(prev) => {
            let fields_changed = prev.fields_hash != desired.fields_hash();
            if !update_known(ctx, id, &desired, prev.active, fields_changed).await? {
                // FusionAuth was not in the state we last left it in: look and fix.
                converge_by_reading(ctx, id, &desired).await?;
            }
        }
    }
    Ok(fp)
}

/// Updates a user whose last synced state we know. Returns false when FusionAuth surprised
/// us (user gone, or deactivated behind our back), so the caller reads and converges.
async fn update_known(
    ctx: &SyncContext,
    id: &Uuid,
    desired: &DesiredUser,
    was_active: bool,
    fields_changed: bool,
) -> Result<bool, SyncError> {
    if desired.active && !was_active && !ctx.fa.reactivate_user(id).await? {
        return Ok(false);
    }
    let needs_patch = fields_changed || (!desired.active && !was_active);
    if needs_patch {
        if !desired.active && !was_active && !ctx.fa.reactivate_user(id).await? {
            return Ok(false);
        }
        match ctx.fa.patch_user(id, &desired.patch_body()).await {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            // FusionAuth refuses to update a deactivated user (400 on field userId).
            Err(e)
                if e.status() == Some(400) && e.errors().is_some_and(|x| x.has_field("userId")) =>
            {
                return Ok(false)
            }
            Err(e) => return Err(e.into()),
        }
    }
    if !desired.active && (was_active || needs_patch) && !ctx.fa.delete_user(id, false).await? {
        return Ok(false);
    }
    Ok(true)
}

/// Reads the FusionAuth user and changes what differs (or creates it).
async fn converge_by_reading(
    ctx: &SyncContext,
    id: &Uuid,
    desired: &DesiredUser,
) -> Result<(), SyncError> {
    let Some(current) = ctx.fa.get_user(id).await? else {
        return create(ctx, id, desired).await;
    };
    let actual = desired_from_fusionauth(&current, &ctx.tables.user_fields);
    if actual.fields != desired.fields {
        if !actual.active {
            ctx.fa.reactivate_user(id).await?;
        }
        if !ctx.fa.patch_user(id, &desired.patch_body()).await? {
            return create(ctx, id, desired).await;
        }
        if !desired.active {
            ctx.fa.delete_user(id, false).await?;
        }
    } else if actual.active != desired.active {
        if desired.active {
            ctx.fa.reactivate_user(id).await?;
        } else {
            ctx.fa.delete_user(id, false).await?;
        }
    }
    Ok(())
}

/// Creates the user with the same id (plus a registration when an application is
/// configured). A create that finds the id taken becomes an update.
async fn create(ctx: &SyncContext, id: &Uuid, desired: &DesiredUser) -> Result<(), SyncError> {
    let settings = &ctx.cfg.fusionauth;
    let (password, send_email) = match settings.new_user_password {
        NewUserPassword::SendSetPasswordEmail => (None, true),
        NewUserPassword::None => (None, false),
        NewUserPassword::Random => (
            Some(Alphanumeric.sample_string(&mut rand::thread_rng(), 40)),
            false,
        ),
    };
    let registration = settings
        .application_id
        .map(|app| json!({ "applicationId": app, "roles": settings.default_roles }));
    let body = desired.create_body(password.as_deref());
    match ctx
        .fa
        .create_user(id, &body, registration.as_ref(), send_email)
        .await
    {
        Ok(()) => {
            info!(user = %id, "created in FusionAuth");
            if !desired.active {
                ctx.fa.delete_user(id, false).await?;
            }
            Ok(())
        }
        Err(e) if e.has_code("[duplicate]userId") => {
            debug!(user = %id, "already exists in FusionAuth: updating instead");
            Box::pin(converge_existing(ctx, id, desired)).await
        }
        Err(e) => Err(e.into()),
    }
}

/// The user exists (create said so): converge without trying to create again.
async fn converge_existing(
    ctx: &SyncContext,
    id: &Uuid,
    desired: &DesiredUser,
) -> Result<(), SyncError> {
    match ctx.fa.get_user(id).await? {
        Some(_) => converge_by_reading(ctx, id, desired).await,
        None => Err(SyncError::retry(format!(
            "FusionAuth says user {id} exists but cannot read it yet"
        ))),
    }
}

/// Makes the users-table row agree with FusionAuth's user `id` (a FusionAuth webhook said it
/// changed). When the row has a change of its own that FusionAuth has not seen yet, the
/// database wins and the row is left alone: its own event pushes it to FusionAuth.
pub async fn to_database(
    ctx: &SyncContext,
    entity: &ClaimedEntity,
    id: &Uuid,
    stored: Option<String>,
) -> Result<Option<String>, SyncError> {
    let fields = &ctx.tables.user_fields;
    let key = entity.key.as_str();
    let row = ctx.tables.user_by_id(&ctx.pool, key).await?;
    let row_fp = row.as_ref().map(|r| {
        desired_user(r, fields)
            .map(|d| d.fingerprint())
            .unwrap_or_default()
    });
    let database_changed = entity.has(Direction::ToFusionAuth)
        || event::has_pending(&ctx.pool, EntityKind::User, key, Direction::ToFusionAuth).await?
        || match (&row_fp, stored.as_deref()) {
            (Some(r), Some(s)) => s != DELETED && r != s,
            (None, Some(s)) => s != DELETED,
            _ => false,
        };

    match ctx.fa.get_user(id).await? {
        Some(user) => {
            let fa = desired_from_fusionauth(&user, fields);
            let fa_fp = fa.fingerprint();
            if row_fp.as_deref() == Some(fa_fp.as_str()) {
                return Ok(Some(fa_fp));
            }
            if row.is_none() && stored.as_deref() == Some(DELETED) && !fa.active {
                // We deleted the row and deactivated the user: that is agreement.
                return Ok(stored);
            }
            if database_changed {
                info!(user = %id, "user changed on both sides: the database wins");
                return Ok(stored);
            }
            let cols = columns_from_fusionauth(&user, fields);
            let changed = ctx.tables.upsert_user(&ctx.pool, key, &cols).await?;
            info!(user = %id, changed, "wrote FusionAuth's user into the users table");
            let written = ctx.tables.user_by_id(&ctx.pool, key).await?;
            Ok(Some(
                written
                    .as_ref()
                    .and_then(|r| desired_user(r, fields).ok())
                    .map(|d| d.fingerprint())
                    .unwrap_or(fa_fp),
            ))
        }
        None => {
            let deleting = entity.has_op(|op| op.starts_with("user.delete"));
            if !deleting {
                // user.create is sent before FusionAuth commits: the user may not be readable yet.
                return Err(SyncError::retry(format!(
                    "FusionAuth has no user {id} (yet); user.create is sent before FusionAuth commits, so this is retried"
                )));
            }
            if row.is_none() {
                return Ok(Some(DELETED.into()));
            }
            if database_changed {
                info!(user = %id, "user deleted in FusionAuth but changed in the database: the database wins");
                return Ok(stored);
            }
            match ctx.cfg.users.on_fusionauth_delete {
                FusionAuthDeletePolicy::Delete => {
                    ctx.tables.delete_user(&ctx.pool, key).await?;
                    info!(user = %id, "deleted in FusionAuth: row deleted");
                    Ok(Some(DELETED.into()))
                }
                FusionAuthDeletePolicy::Deactivate => {
                    let Some(active_col) = fields
                        .iter()
                        .find(|(f, _)| f == "active")
                        .map(|(_, c)| c.clone())
                    else {
                        return Err(SyncError::Permanent(
                            "users.on_fusionauth_delete = deactivate needs users.columns.active to be mapped".into(),
                        ));
                    };
                    let mut cols = serde_json::Map::new();
                    cols.insert(active_col, Value::Bool(false));
                    ctx.tables.upsert_user(&ctx.pool, key, &cols).await?;
                    info!(user = %id, "deleted in FusionAuth: row marked inactive");
                    let written = ctx.tables.user_by_id(&ctx.pool, key).await?;
                    Ok(written
                        .as_ref()
                        .and_then(|r| desired_user(r, fields).ok())
                        .map(|d| d.fingerprint()))
                }
            }
        }
    }
}

/// Makes sure a user exists in FusionAuth as its row says (used before adding it to a group).
/// Returns false when there is no row for it.
pub async fn ensure_in_fusionauth(
    ctx: &SyncContext,
    key: &str,
    row: Option<&Value>,
    stored: Option<&str>,
) -> Result<bool, SyncError> {
    let Some(row) = row else {
        return Ok(false);
    };
    let id = parse_uuid(key, "user")?;
    let desired = desired_user(row, &ctx.tables.user_fields)
        .map_err(|e| SyncError::Permanent(format!("member user {id}: {e}")))?;
    if stored == Some(desired.fingerprint().as_str()) {
        return Ok(true);
    }
    let fp = to_fusionauth(ctx, &id, Some(row), stored, false).await?;
    crate::db::entity::set_fingerprint(&ctx.pool, EntityKind::User, key, &fp).await?;
    Ok(true)
}
