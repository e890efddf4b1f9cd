//! `fusionsync.event`: recording events, claiming them with a lease, and recording outcomes.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgPool, Row};

use crate::db::CHANNEL;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EntityKind {
    User,
    Organization,
    Membership,
}

impl EntityKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntityKind::User => "user",
            EntityKind::Organization => "organization",
            EntityKind::Membership => "membership",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "user" => Some(EntityKind::User),
            "organization" => Some(EntityKind::Organization),
            "membership" => Some(EntityKind::Membership),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    ToFusionAuth,
    ToDatabase,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::ToFusionAuth => "to_fusionauth",
            Direction::ToDatabase => "to_database",
        }
    }
}

/// An event to record.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    pub source: String,
    pub kind: EntityKind,
    pub key: String,
    pub direction: Direction,
    pub op: String,
    pub payload: Option<Value>,
    pub dedup_key: Option<String>,
}

/// Records events in one statement and one durable commit, and wakes the workers. Returns the
/// dedup key of each event that was new (`None` for events without one, which are always new);
/// an event whose dedup key is already recorded is skipped, which makes redelivery a no-op.
pub async fn insert_events(
    pool: &PgPool,
    events: &[NewEvent],
) -> Result<Vec<Option<String>>, sqlx::Error> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let column = |f: fn(&NewEvent) -> Option<String>| events.iter().map(f).collect::<Vec<_>>();
    let mut tx = pool.begin().await?;
    let inserted: Vec<Option<String>> = sqlx::query_scalar(
        "insert into fusionsync.event
             (source, entity_kind, entity_key, direction, op, payload, dedup_key)
         select s, k, key, d, o, nullif(p, 'null'::jsonb), dk
         from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[], $7::text[])
              as t(s, k, key, d, o, p, dk)
         on conflict (dedup_key) where dedup_key is not null do nothing
         returning dedup_key",
    )
    .bind(column(|e| Some(e.source.clone())))
    .bind(column(|e| Some(e.kind.as_str().to_string())))
    .bind(column(|e| Some(e.key.clone())))
    .bind(column(|e| Some(e.direction.as_str().to_string())))
    .bind(column(|e| Some(e.op.clone())))
    .bind(events.iter().map(|e| e.payload.clone().unwrap_or(Value::Null)).collect::<Vec<_>>())
    .bind(column(|e| e.dedup_key.clone()))
    .fetch_all(&mut *tx)
    .await?;
    if !inserted.is_empty() {
        notify(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(inserted)
}

pub async fn notify<'e, E: sqlx::PgExecutor<'e>>(executor: E) -> Result<(), sqlx::Error> {
    sqlx::query("select pg_notify($1, '')")
        .bind(CHANNEL)
        .execute(executor)
        .await?;
    Ok(())
}

/// One claimed event.
#[derive(Clone, Debug)]
pub struct ClaimedEvent {
    pub id: i64,
    pub source: String,
    pub direction: Direction,
    pub op: String,
    pub payload: Option<Value>,
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
}

/// All due events of one entity, claimed together (coalesced) under one entity lease.
#[derive(Clone, Debug)]
pub struct ClaimedEntity {
    pub kind: EntityKind,
    pub key: String,
    /// The fingerprint of the state both sides last agreed on.
    pub fingerprint: Option<String>,
    pub events: Vec<ClaimedEvent>,
}

impl ClaimedEntity {
    pub fn attempts(&self) -> i32 {
        self.events.iter().map(|e| e.attempts).max().unwrap_or(0)
    }
    pub fn ids(&self) -> Vec<i64> {
        self.events.iter().map(|e| e.id).collect()
    }
    pub fn has(&self, direction: Direction) -> bool {
        self.events.iter().any(|e| e.direction == direction)
    }
    /// Ask for a full comparison instead of trusting the fingerprint (reconcile, webhooks that
    /// say FusionAuth was changed by hand).
    pub fn forced(&self, direction: Direction) -> bool {
        self.events.iter().any(|e| {
            e.direction == direction
                && e.payload
                    .as_ref()
                    .and_then(|p| p.get("force"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false)
        })
    }
    pub fn has_op(&self, pred: impl Fn(&str) -> bool) -> bool {
        self.events.iter().any(|e| pred(&e.op))
    }
}

/// Puts events whose lease ran out (their worker died) back to pending.
pub async fn release_expired_leases(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let n = sqlx::query(
        "update fusionsync.event
            set state = 'pending', locked_by = null, locked_until = null, updated_at = now()
          where state = 'processing' and locked_until < now()",
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(n)
}

/// Claims up to `limit` entities with due events, in one statement (one round trip, its own
/// transaction): lock candidate events (`FOR UPDATE SKIP LOCKED`), take the entity leases, and
/// mark the candidates of the leased entities as processing. Several events of one entity among
/// the candidates are coalesced into one run; later ones find the entity in agreement.
pub async fn claim(
    pool: &PgPool,
    worker_id: &str,
    limit: usize,
    lease: Duration,
) -> Result<Vec<ClaimedEntity>, sqlx::Error> {
    let rows = sqlx::query(
        "with cand as (
            select id, entity_kind, entity_key from fusionsync.event
             where state = 'pending' and next_attempt_at <= now()
             order by next_attempt_at, id
             limit $1
             for update skip locked),
         wanted as (
            select distinct entity_kind, entity_key from cand
             order by entity_kind, entity_key
             limit $2),
         -- The upsert waits for a concurrent claimer of the same entity and then sees its
         -- lease, so one entity is never held twice; sorted order rules out deadlocks.
         leased as (
            insert into fusionsync.entity as en (entity_kind, entity_key, locked_by, locked_until)
            select entity_kind, entity_key, $3, now() + make_interval(secs => $4::float8 / 1000)
              from wanted order by entity_kind, entity_key
            on conflict (entity_kind, entity_key) do update
               set locked_by = excluded.locked_by, locked_until = excluded.locked_until
             where en.locked_until < now()
            returning en.entity_kind, en.entity_key, en.fingerprint),
         claimed as (
            update fusionsync.event e
               set state = 'processing', locked_by = $3,
                   locked_until = now() + make_interval(secs => $4::float8 / 1000),
                   attempts = e.attempts + 1, updated_at = now()
              from cand c join leased l using (entity_kind, entity_key)
             where e.id = c.id
            returning e.id, e.entity_kind, e.entity_key, e.source, e.direction, e.op, e.payload,
                      e.attempts, e.created_at)
         select l.entity_kind, l.entity_key, l.fingerprint,
                c.id, c.source, c.direction, c.op, c.payload, c.attempts, c.created_at
           from leased l left join claimed c using (entity_kind, entity_key)
          order by l.entity_kind, l.entity_key, c.id",
    )
    .bind((limit.saturating_mul(2)) as i64)
    .bind(limit as i64)
    .bind(worker_id)
    .bind(lease.as_millis() as i64)
    .fetch_all(pool)
    .await?;

    let mut entities: Vec<ClaimedEntity> = Vec::new();
    for r in rows {
        let kind = EntityKind::parse(r.get::<&str, _>(0)).unwrap_or(EntityKind::User);
        let key: String = r.get(1);
        let same = entities
            .last()
            .is_some_and(|e| e.kind == kind && e.key == key);
        if !same {
            entities.push(ClaimedEntity {
                kind,
                key,
                fingerprint: r.get(2),
                events: Vec::new(),
            });
        }
        let Some(id) = r.get::<Option<i64>, _>(3) else {
            continue;
        };
        let direction: String = r.get(5);
        if let Some(e) = entities.last_mut() {
            e.events.push(ClaimedEvent {
                id,
                source: r.get(4),
                direction: if direction == "to_database" {
                    Direction::ToDatabase
                } else {
                    Direction::ToFusionAuth
                },
                op: r.get(6),
                payload: r.get(7),
                attempts: r.get(8),
                created_at: r.get(9),
            });
        }
    }
    // An entity leased without events (they were taken meanwhile) gives its lease back.
    let (empty, full): (Vec<_>, Vec<_>) = entities.into_iter().partition(|e| e.events.is_empty());
    if !empty.is_empty() {
        release_leases(pool, worker_id, &empty).await?;
    }
    Ok(full)
}

/// What happened to one claimed entity.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// In agreement; the new fingerprint (None keeps the stored one).
    Done { fingerprint: Option<String> },
    /// Try again at the given delay.
    Retry {
        error: String,
        delay: Duration,
        count_attempt: bool,
    },
    /// Dead: kept as failed with the error.
    Failed { error: String },
}

/// Records the outcomes of a set of entities in a few statements, then releases their leases.
/// Only events still leased by this worker are touched (a lease that ran out belongs to
/// whoever claimed the events next).
pub async fn complete(
    pool: &PgPool,
    worker_id: &str,
    results: &[(ClaimedEntity, Outcome)],
) -> Result<(), sqlx::Error> {
    let mut done_ids = Vec::new();
    let mut fp_kinds = Vec::new();
    let mut fp_keys = Vec::new();
    let mut fps: Vec<Option<String>> = Vec::new();
    let mut retry_ids = Vec::new();
    let mut retry_delays = Vec::new();
    let mut retry_errors = Vec::new();
    let mut retry_counts = Vec::new();
    let mut failed_ids = Vec::new();
    let mut failed_errors = Vec::new();
    for (entity, outcome) in results {
        fp_kinds.push(entity.kind.as_str().to_string());
        fp_keys.push(entity.key.clone());
        fps.push(match outcome {
            Outcome::Done { fingerprint } => fingerprint.clone(),
            _ => None,
        });
        match outcome {
            Outcome::Done { .. } => done_ids.extend(entity.ids()),
            Outcome::Retry {
                error,
                delay,
                count_attempt,
            } => {
                for id in entity.ids() {
                    retry_ids.push(id);
                    retry_delays.push(delay.as_millis() as i64);
                    retry_errors.push(error.clone());
                    retry_counts.push(*count_attempt);
                }
            }
            Outcome::Failed { error } => {
                for id in entity.ids() {
                    failed_ids.push(id);
                    failed_errors.push(error.clone());
                }
            }
        }
    }
    sqlx::query(
        "with done as (
            update fusionsync.event
               set state = 'done', processed_at = now(), updated_at = now(),
                   locked_by = null, locked_until = null, last_error = null
             where id = any($1) and state = 'processing' and locked_by = $2
            returning id),
         retried as (
            update fusionsync.event e
               set state = 'pending', locked_by = null, locked_until = null, updated_at = now(),
                   next_attempt_at = now() + make_interval(secs => t.ms::float8 / 1000),
                   last_error = t.err,
                   attempts = case when t.counts then e.attempts else greatest(e.attempts - 1, 0) end
              from unnest($3::bigint[], $4::bigint[], $5::text[], $6::bool[]) as t(id, ms, err, counts)
             where e.id = t.id and e.state = 'processing' and e.locked_by = $2
            returning e.id),
         failed as (
            update fusionsync.event e
               set state = 'failed', locked_by = null, locked_until = null, updated_at = now(),
                   last_error = t.err
              from unnest($7::bigint[], $8::text[]) as t(id, err)
             where e.id = t.id and e.state = 'processing' and e.locked_by = $2
            returning e.id, e.attempts, e.last_error),
         history as (
            insert into fusionsync.event_history (event_id, action, state, attempts, last_error)
            select id, 'failed', 'failed', attempts, last_error from failed),
         -- store the new fingerprints and give the leases back
         released as (
            update fusionsync.entity en
               set locked_by = null, locked_until = '-infinity',
                   fingerprint = coalesce(t.fp, en.fingerprint),
                   synced_at = case when t.fp is null then en.synced_at else now() end
              from unnest($9::text[], $10::text[], $11::text[]) as t(k, key, fp)
             where en.entity_kind = t.k and en.entity_key = t.key and en.locked_by = $2
            returning 1)
         select (select count(*) from done), (select count(*) from retried),
                (select count(*) from failed), (select count(*) from released)",
    )
    .bind(&done_ids)
    .bind(worker_id)
    .bind(&retry_ids)
    .bind(&retry_delays)
    .bind(&retry_errors)
    .bind(&retry_counts)
    .bind(&failed_ids)
    .bind(&failed_errors)
    .bind(&fp_kinds)
    .bind(&fp_keys)
    .bind(&fps)
    .execute(pool)
    .await?;
    Ok(())
}

/// Gives entity leases back without recording an outcome (leased, but nothing to do).
async fn release_leases(
    pool: &PgPool,
    worker_id: &str,
    entities: &[ClaimedEntity],
) -> Result<(), sqlx::Error> {
    let kinds: Vec<&str> = entities.iter().map(|e| e.kind.as_str()).collect();
    let keys: Vec<&str> = entities.iter().map(|e| e.key.as_str()).collect();
    sqlx::query(
        "update fusionsync.entity en set locked_by = null, locked_until = '-infinity'
           from unnest($1::text[], $2::text[]) as t(k, key)
          where en.entity_kind = t.k and en.entity_key = t.key and en.locked_by = $3",
    )
    .bind(&kinds)
    .bind(&keys)
    .bind(worker_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Releases everything this worker still holds (after a clean stop).
pub async fn release_worker(pool: &PgPool, worker_id: &str) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let n = sqlx::query(
        "update fusionsync.event
            set state = 'pending', locked_by = null, locked_until = null, updated_at = now(),
                attempts = greatest(attempts - 1, 0)
          where state = 'processing' and locked_by = $1",
    )
    .bind(worker_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query(
        "update fusionsync.entity set locked_by = null, locked_until = '-infinity'
          where locked_by = $1",
    )
    .bind(worker_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(n)
}

/// Deletes done events processed before `older_than` ago, at most `batch` of them.
pub async fn prune_done(
    pool: &PgPool,
    older_than: Duration,
    batch: i64,
) -> Result<u64, sqlx::Error> {
    let n = sqlx::query(
        "delete from fusionsync.event where id in (
            select id from fusionsync.event
             where state = 'done'
               and processed_at < now() - make_interval(secs => $1::float8)
             limit $2)",
    )
    .bind(older_than.as_secs_f64())
    .bind(batch)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(n)
}

pub async fn count_prunable(pool: &PgPool, older_than: Duration) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "select count(*) from fusionsync.event
          where state = 'done' and processed_at < now() - make_interval(secs => $1::float8)",
    )
    .bind(older_than.as_secs_f64())
    .fetch_one(pool)
    .await
}

/// Whether the entity has events of the given direction still waiting (a change on that side
/// that has not been applied yet).
pub async fn has_pending(
    pool: &PgPool,
    kind: EntityKind,
    key: &str,
    direction: Direction,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "select exists (select 1 from fusionsync.event
                         where entity_kind = $1 and entity_key = $2 and direction = $3
                           and state = 'pending')",
    )
    .bind(kind.as_str())
    .bind(key)
    .bind(direction.as_str())
    .fetch_one(pool)
    .await
}
