//! Database access: the pool, migrations, and one module per table group. Queries only.

pub mod admin;
pub mod app;
pub mod entity;
pub mod event;

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::config::DatabaseSettings;

/// The channel the Postgres trigger and replays notify, and workers LISTEN on.
pub const CHANNEL: &str = "fusionsync_events";

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub fn connect_options(url: &str) -> Result<PgConnectOptions, sqlx::Error> {
    Ok(PgConnectOptions::from_str(url)?.application_name("fusionsync"))
}

/// A lazily connecting pool: start-up does not fail because the database is briefly away;
/// the first query says so instead.
pub fn pool(settings: &DatabaseSettings) -> Result<PgPool, sqlx::Error> {
    pool_with(settings, false)
}

/// The workers' pool: its commits do not wait for the WAL flush (`synchronous_commit = off`).
/// If the server crashes right after such a commit, a claim is lost (a lease nobody holds) or
/// an outcome is lost (the reconcile runs again) — harmless, since reconciling is idempotent,
/// and WAL order means a later durable commit implies these are durable too. Recording events
/// (the HTTP sources, the triggers in the app's own transactions) stays fully durable.
pub fn worker_pool(settings: &DatabaseSettings) -> Result<PgPool, sqlx::Error> {
    pool_with(settings, true)
}

fn pool_with(settings: &DatabaseSettings, relaxed: bool) -> Result<PgPool, sqlx::Error> {
    let mut options = connect_options(settings.url.expose())?;
    if relaxed {
        options = options.options([("synchronous_commit", "off")]);
    }
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .min_connections(0)
        .acquire_timeout(settings.acquire_timeout)
        .idle_timeout(Some(Duration::from_secs(300)))
        .connect_lazy_with(options))
}

/// Applies fusionsync's own migrations (schema `fusionsync`). Several instances may start at
/// once: sqlx takes an advisory lock around migrating.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// True when every migration this binary knows has been applied.
pub async fn migrations_applied(pool: &PgPool) -> Result<bool, sqlx::Error> {
    let exists: bool = sqlx::query_scalar(
        "select exists (select 1 from information_schema.tables
          where table_schema = 'public' and table_name = '_sqlx_migrations')",
    )
    .fetch_one(pool)
    .await?;
    if !exists {
        return Ok(false);
    }
    let applied: Vec<i64> =
        sqlx::query_scalar("select version from public._sqlx_migrations where success")
            .fetch_all(pool)
            .await?;
    Ok(MIGRATOR.iter().all(|m| applied.contains(&m.version)))
}

/// Whether an error means "the database is not reachable right now" (as opposed to a bad query).
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed
    ) || matches!(e, sqlx::Error::Database(d) if d.code().is_some_and(|c| c.starts_with("57P") || c.starts_with("08")))
}
