//! Queries behind the admin commands: replay, status, event history, prune.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Row};

/// Which failed events a replay takes. Every filter is optional and they combine with AND.
#[derive(Clone, Debug, Default)]
pub struct ReplayFilter {
    pub ids: Vec<i64>,
    pub entity: Option<(String, String)>,
    pub source: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub error_contains: Option<String>,
    pub limit: Option<i64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct EventSummary {
    pub id: i64,
    pub source: String,
    pub entity_kind: String,
    pub entity_key: String,
    pub direction: String,
    pub op: String,
    pub state: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const SUMMARY_COLUMNS: &str = "id, source, entity_kind, entity_key, direction, op, state, attempts, last_error, created_at, updated_at";

fn summary(r: &sqlx::postgres::PgRow) -> EventSummary {
    EventSummary {
        id: r.get("id"),
        source: r.get("source"),
        entity_kind: r.get("entity_kind"),
        entity_key: r.get("entity_key"),
        direction: r.get("direction"),
        op: r.get("op"),
        state: r.get("state"),
        attempts: r.get("attempts"),
        last_error: r.get("last_error"),
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
    }
}

const FILTER: &str = "state = 'failed'
    and (cardinality($1::bigint[]) = 0 or id = any($1))
    and ($2::text is null or entity_kind = $2)
    and ($3::text is null or entity_key = $3)
    and ($4::text is null or source = $4)
    and ($5::timestamptz is null or created_at >= $5)
    and ($6::timestamptz is null or created_at <= $6)
    and ($7::text is null or position(lower($7) in lower(coalesce(last_error, ''))) > 0)";

/// The failed events a replay with this filter would take (dry run).
pub async fn failed_matching(
    pool: &PgPool,
    f: &ReplayFilter,
) -> Result<Vec<EventSummary>, sqlx::Error> {
    let sql = format!(
        "select {SUMMARY_COLUMNS} from fusionsync.event where {FILTER} order by id limit $8"
    );
    let rows = bind_filter(sqlx::query(&sql), f)
        .bind(f.limit.unwrap_or(i64::MAX))
        .fetch_all(pool)
        .await?;
    Ok(rows.iter().map(summary).collect())
}

fn bind_filter<'q>(
    q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    f: &'q ReplayFilter,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    q.bind(&f.ids)
        .bind(f.entity.as_ref().map(|e| e.0.clone()))
        .bind(f.entity.as_ref().map(|e| e.1.clone()))
        .bind(f.source.clone())
        .bind(f.since)
        .bind(f.until)
        .bind(f.error_contains.clone())
}

/// Puts matching failed events back to pending (attempts reset; the error stays in the
/// history), wakes the workers, and returns the ids replayed. Nothing is deleted.
pub async fn replay(pool: &PgPool, f: &ReplayFilter) -> Result<Vec<i64>, sqlx::Error> {
    let sql = format!(
        "with sel as (
            select id, attempts, last_error from fusionsync.event
             where {FILTER} order by id limit $8 for update),
         hist as (
            insert into fusionsync.event_history (event_id, action, state, attempts, last_error)
            select id, 'replayed', 'failed', attempts, last_error from sel)
         update fusionsync.event e
            set state = 'pending', attempts = 0, next_attempt_at = now(), updated_at = now(),
                locked_by = null, locked_until = null
           from sel where e.id = sel.id
         returning e.id"
    );
    replay_ids(pool, f, &sql).await
}

async fn replay_ids(pool: &PgPool, f: &ReplayFilter, sql: &str) -> Result<Vec<i64>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let rows = bind_filter(sqlx::query(sql), f)
        .bind(f.limit.unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await?;
    let ids: Vec<i64> = rows.iter().map(|r| r.get::<i64, _>(0)).collect();
    if !ids.is_empty() {
        crate::db::event::notify(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(ids)
}

/// State of each of the given ids (None when there is no such event).
pub async fn states_of(
    pool: &PgPool,
    ids: &[i64],
) -> Result<Vec<(i64, Option<String>)>, sqlx::Error> {
    let rows: Vec<(i64, Option<String>)> = sqlx::query_as(
        "select i, e.state from unnest($1::bigint[]) as i
           left join fusionsync.event e on e.id = i order by i",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub by_state: Vec<StateCount>,
    pub oldest_pending_age_seconds: Option<f64>,
    pub done_last_hour: i64,
    pub failed: i64,
    pub recent_failures: Vec<EventSummary>,
}

#[derive(Clone, Debug, Serialize)]
pub struct StateCount {
    pub state: String,
    pub entity_kind: String,
    pub count: i64,
}

pub async fn status(pool: &PgPool, recent: i64) -> Result<Status, sqlx::Error> {
    let by_state: Vec<StateCount> = sqlx::query(
        "select state, entity_kind, count(*) from fusionsync.event
          group by state, entity_kind order by state, entity_kind",
    )
    .fetch_all(pool)
    .await?
    .iter()
    .map(|r| StateCount {
        state: r.get(0),
        entity_kind: r.get(1),
        count: r.get(2),
    })
    .collect();
    let oldest: Option<f64> = sqlx::query_scalar(
        "select extract(epoch from now() - min(created_at))::float8
           from fusionsync.event where state = 'pending'",
    )
    .fetch_one(pool)
    .await?;
    let done_last_hour: i64 = sqlx::query_scalar(
        "select count(*) from fusionsync.event
          where state = 'done' and processed_at > now() - interval '1 hour'",
    )
    .fetch_one(pool)
    .await?;
    let failed = by_state
        .iter()
        .filter(|s| s.state == "failed")
        .map(|s| s.count)
        .sum();
    let recent_failures = sqlx::query(&format!(
        "select {SUMMARY_COLUMNS} from fusionsync.event where state = 'failed'
          order by updated_at desc, id desc limit $1"
    ))
    .bind(recent)
    .fetch_all(pool)
    .await?
    .iter()
    .map(summary)
    .collect();
    Ok(Status {
        by_state,
        oldest_pending_age_seconds: oldest,
        done_last_hour,
        failed,
        recent_failures,
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct HistoryEntry {
    pub at: DateTime<Utc>,
    pub action: String,
    pub state: String,
    pub attempts: i32,
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct EventDetail {
    #[serde(flatten)]
    pub event: EventSummary,
    pub payload: Option<serde_json::Value>,
    pub dedup_key: Option<String>,
    pub next_attempt_at: DateTime<Utc>,
    pub processed_at: Option<DateTime<Utc>>,
    pub locked_by: Option<String>,
    pub history: Vec<HistoryEntry>,
}

pub async fn event_detail(pool: &PgPool, id: i64) -> Result<Option<EventDetail>, sqlx::Error> {
    let Some(r) = sqlx::query(&format!(
        "select {SUMMARY_COLUMNS}, payload, dedup_key, next_attempt_at, processed_at, locked_by
           from fusionsync.event where id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let history = sqlx::query(
        "select at, action, state, attempts, last_error from fusionsync.event_history
          where event_id = $1 order by at, id",
    )
    .bind(id)
    .fetch_all(pool)
    .await?
    .iter()
    .map(|h| HistoryEntry {
        at: h.get(0),
        action: h.get(1),
        state: h.get(2),
        attempts: h.get(3),
        last_error: h.get(4),
    })
    .collect();
    Ok(Some(EventDetail {
        event: summary(&r),
        payload: r.get("payload"),
        dedup_key: r.get("dedup_key"),
        next_attempt_at: r.get("next_attempt_at"),
        processed_at: r.get("processed_at"),
        locked_by: r.get("locked_by"),
        history,
    }))
}
