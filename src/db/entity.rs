//! `fusionsync.entity`: the fingerprint of the last state both sides agreed on, per entity.
//! (The entity leases in the same table are taken and released by [`crate::db::event`].)

use sqlx::PgPool;

use crate::db::event::EntityKind;

pub async fn fingerprint(
    pool: &PgPool,
    kind: EntityKind,
    key: &str,
) -> Result<Option<String>, sqlx::Error> {
    let fp: Option<Option<String>> = sqlx::query_scalar(
        "select fingerprint from fusionsync.entity where entity_kind = $1 and entity_key = $2",
    )
    .bind(kind.as_str())
    .bind(key)
    .fetch_optional(pool)
    .await?;
    Ok(fp.flatten())
}

pub async fn fingerprints(
    pool: &PgPool,
    kind: EntityKind,
    keys: &[String],
) -> Result<std::collections::HashMap<String, String>, sqlx::Error> {
    let rows: Vec<(String, Option<String>)> = sqlx::query_as(
        "select entity_key, fingerprint from fusionsync.entity
          where entity_kind = $1 and entity_key = any($2)",
    )
    .bind(kind.as_str())
    .bind(keys)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(k, f)| f.map(|f| (k, f)))
        .collect())
}

/// Stores a fingerprint outside a claim (an entity reconciled inline, e.g. the user of a
/// membership). Leaves any lease alone.
pub async fn set_fingerprint(
    pool: &PgPool,
    kind: EntityKind,
    key: &str,
    fingerprint: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into fusionsync.entity (entity_kind, entity_key, fingerprint, synced_at)
         values ($1, $2, $3, now())
         on conflict (entity_kind, entity_key) do update
            set fingerprint = excluded.fingerprint, synced_at = now()",
    )
    .bind(kind.as_str())
    .bind(key)
    .bind(fingerprint)
    .execute(pool)
    .await?;
    Ok(())
}
