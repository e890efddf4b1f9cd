//! The workers: claim due entities from the queue (woken by LISTEN, backed by a poll tick),
//! reconcile each with no transaction open, record outcomes in bulk, retry durably.

pub mod breaker;
pub mod listener;
pub mod memberships;
pub mod organizations;
pub mod retry;
pub mod users;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};
use uuid::Uuid;

use crate::config::Config;
use crate::db::app::AppTables;
use crate::db::event::{self, ClaimedEntity, Direction, EntityKind, Outcome};
use crate::fusionauth::{FusionAuthClient, FusionAuthError};
use crate::metrics::Metrics;
use breaker::CircuitBreaker;
use retry::RetryPolicy;

/// Everything a reconcile needs.
pub struct SyncContext {
    pub pool: PgPool,
    pub fa: FusionAuthClient,
    pub cfg: Arc<Config>,
    pub tables: AppTables,
    pub metrics: Arc<Metrics>,
    pub breaker: CircuitBreaker,
    pub retry: RetryPolicy,
}

impl SyncContext {
    pub fn new(
        pool: PgPool,
        fa: FusionAuthClient,
        cfg: Arc<Config>,
        tables: AppTables,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            breaker: CircuitBreaker::new(cfg.worker.breaker_threshold, cfg.worker.breaker_cooldown),
            retry: RetryPolicy::new(&cfg.retry, cfg.worker.max_attempts),
            pool,
            fa,
            cfg,
            tables,
            metrics,
        }
    }
}

/// Why one reconcile did not finish.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{message}")]
    Retryable {
        message: String,
        retry_after: Option<Duration>,
        /// FusionAuth as a whole looks down (feeds the circuit breaker).
        unavailable: bool,
    },
    #[error("{0}")]
    Permanent(String),
}

impl SyncError {
    pub fn retry(message: impl Into<String>) -> Self {
        SyncError::Retryable {
            message: message.into(),
            retry_after: None,
            unavailable: false,
        }
    }
}

impl From<FusionAuthError> for SyncError {
    fn from(e: FusionAuthError) -> Self {
        if e.is_retryable() {
            SyncError::Retryable {
                retry_after: e.retry_after(),
                unavailable: e.is_unavailable(),
                message: e.to_string(),
            }
        } else {
            SyncError::Permanent(e.to_string())
        }
    }
}

impl From<sqlx::Error> for SyncError {
    fn from(e: sqlx::Error) -> Self {
        // Constraint and data errors from the app tables will not go away by retrying.
        if let sqlx::Error::Database(d) = &e {
            if d.code()
                .is_some_and(|c| c.starts_with("23") || c.starts_with("22") || c.starts_with("42"))
            {
                return SyncError::Permanent(format!("database refused the write: {d}"));
            }
        }
        SyncError::retry(format!("database error: {e}"))
    }
}

pub(crate) fn parse_uuid(key: &str, what: &str) -> Result<Uuid, SyncError> {
    Uuid::parse_str(key).map_err(|_| {
        SyncError::Permanent(format!(
            "{what} id '{key}' is not a UUID; FusionAuth ids are UUIDs and fusionsync uses the same id on both sides"
        ))
    })
}

/// What one call of [`Worker::process_next_batch`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    pub claimed: usize,
    pub done: usize,
    pub retried: usize,
    pub failed: usize,
    /// The circuit breaker kept the worker from claiming.
    pub paused: bool,
}

/// User rows read for a whole claim (the hot path: user changes going to FusionAuth); `None`
/// when there was nothing to read or the read failed (each reconcile then reads its own).
type Prefetched = Option<HashMap<String, Value>>;

/// Whether a claimed entity's row is read with the claim's batch read.
fn prefetchable(e: &ClaimedEntity) -> bool {
    e.kind == EntityKind::User && !e.has(Direction::ToDatabase) && Uuid::parse_str(&e.key).is_ok()
}

pub struct Worker {
    pub ctx: Arc<SyncContext>,
    pub id: String,
}

impl Worker {
    pub fn new(ctx: Arc<SyncContext>) -> Self {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "fusionsync".into());
        Self {
            ctx,
            id: format!(
                "{host}:{}:{}",
                std::process::id(),
                &Uuid::new_v4().to_string()[..8]
            ),
        }
    }

    /// Claims one batch, reconciles it (up to `worker.concurrency` at once) and records the
    /// outcomes. The daemon's loop pipelines the same steps; tests drive this directly.
    pub async fn process_next_batch(&self) -> Result<BatchOutcome, sqlx::Error> {
        let ctx = &self.ctx;
        let limit = ctx.breaker.claim_limit(ctx.cfg.worker.batch_size);
        if limit == 0 {
            return Ok(BatchOutcome {
                paused: true,
                ..Default::default()
            });
        }
        event::release_expired_leases(&ctx.pool).await?;
        let claimed = event::claim(&ctx.pool, &self.id, limit, ctx.cfg.worker.lease).await?;
        if claimed.is_empty() {
            ctx.breaker.on_other();
            return Ok(BatchOutcome::default());
        }
        let rows = prefetch(ctx, &claimed).await;
        let rows = Arc::new(rows);
        use futures_util::StreamExt;
        let results: Vec<(ClaimedEntity, Outcome)> = futures_util::stream::iter(claimed)
            .map(|entity| {
                let rows = rows.clone();
                async move {
                    let outcome = process_entity(ctx, &entity, &rows).await;
                    (entity, outcome)
                }
            })
            .buffer_unordered(ctx.cfg.worker.concurrency)
            .collect()
            .await;
        let mut out = BatchOutcome {
            claimed: results.len(),
            ..Default::default()
        };
        for (_, o) in &results {
            match o {
                Outcome::Done { .. } => out.done += 1,
                Outcome::Retry { .. } => out.retried += 1,
                Outcome::Failed { .. } => out.failed += 1,
            }
        }
        event::complete(&ctx.pool, &self.id, &results).await?;
        Ok(out)
    }

    /// The daemon loop. Runs until `cancel`, then stops claiming, lets in-flight work finish
    /// within `worker.shutdown_timeout`, and releases whatever it still holds.
    pub async fn run(self, wake: Arc<Notify>, cancel: CancellationToken) {
        let ctx = self.ctx.clone();
        let worker_id = Arc::new(self.id.clone());
        let concurrency = ctx.cfg.worker.concurrency;
        let sem = Arc::new(Semaphore::new(concurrency));
        let freed = Arc::new(Notify::new());
        let outstanding = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::unbounded_channel::<(ClaimedEntity, Outcome)>();
        let completer = tokio::spawn(completer(ctx.clone(), worker_id.clone(), rx));
        let mut tick = tokio::time::interval(ctx.cfg.worker.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_reap = std::time::Instant::now() - Duration::from_secs(3600);
        info!(worker = %worker_id, concurrency, "worker started");

        'outer: loop {
            if last_reap.elapsed() >= ctx.cfg.worker.poll_interval.max(Duration::from_secs(1)) {
                last_reap = std::time::Instant::now();
                match event::release_expired_leases(&ctx.pool).await {
                    Ok(n) if n > 0 => {
                        warn!(events = n, "took over events whose worker lease ran out")
                    }
                    Ok(_) => {}
                    Err(e) => debug!(error = %e, "could not check for expired leases"),
                }
            }
            // Claim while there is room and work. Claimed entities queue for a permit (at most
            // `concurrency` reconcile at once); keeping about two rounds queued keeps claims
            // large (cheap) and the pipeline full.
            loop {
                if cancel.is_cancelled() {
                    break 'outer;
                }
                let queued = outstanding.load(Ordering::SeqCst);
                let room = (concurrency * 3).saturating_sub(queued);
                if room == 0 || queued > concurrency * 2 {
                    break;
                }
                let limit = ctx.breaker.claim_limit(ctx.cfg.worker.batch_size.min(room));
                if limit == 0 {
                    break;
                }
                let claimed = match event::claim(&ctx.pool, &worker_id, limit, ctx.cfg.worker.lease)
                    .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        ctx.breaker.on_other();
                        warn!(error = %e, "claiming events failed; will retry on the next tick");
                        break;
                    }
                };
                if claimed.is_empty() {
                    ctx.breaker.on_other();
                    break;
                }
                let n = claimed.len();
                outstanding.fetch_add(n, Ordering::SeqCst);
                // Reading the batch's rows happens off the claim loop, so the next claim can go
                // out while this one's rows are read.
                let (ctx2, tx2, freed2, sem2, outstanding2) = (
                    ctx.clone(),
                    tx.clone(),
                    freed.clone(),
                    sem.clone(),
                    outstanding.clone(),
                );
                tokio::spawn(async move {
                    let rows = Arc::new(prefetch(&ctx2, &claimed).await);
                    for entity in claimed {
                        let ctx = ctx2.clone();
                        let tx = tx2.clone();
                        let freed = freed2.clone();
                        let rows = rows.clone();
                        let sem = sem2.clone();
                        let outstanding = outstanding2.clone();
                        tokio::spawn(async move {
                            // The semaphore is never closed, so acquiring cannot fail.
                            let permit = sem.acquire_owned().await;
                            let outcome = process_entity(&ctx, &entity, &rows).await;
                            let _ = tx.send((entity, outcome));
                            drop(permit);
                            outstanding.fetch_sub(1, Ordering::SeqCst);
                            freed.notify_one();
                        });
                    }
                });
                if n < limit {
                    break;
                }
            }
            let sleep_for = ctx.breaker.open_for().unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = wake.notified() => {}
                _ = freed.notified() => {}
                _ = tick.tick() => {}
                _ = tokio::time::sleep(sleep_for) => {}
            }
        }

        // Shutdown: no more claims; wait for in-flight work, bounded.
        info!(worker = %worker_id, "worker stopping: finishing in-flight work");
        let finished = tokio::time::timeout(ctx.cfg.worker.shutdown_timeout, async {
            while outstanding.load(Ordering::SeqCst) > 0 {
                freed.notified().await;
            }
        })
        .await;
        if finished.is_err() {
            warn!(
                timeout = ?ctx.cfg.worker.shutdown_timeout,
                "in-flight work did not finish in time; its events are released for another worker"
            );
        }
        drop(tx);
        let _ = tokio::time::timeout(Duration::from_secs(10), completer).await;
        match event::release_worker(&ctx.pool, &worker_id).await {
            Ok(n) if n > 0 => info!(events = n, "released claimed events"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "could not release leases; they expire by themselves"),
        }
        info!(worker = %worker_id, "worker stopped");
    }
}

/// Writes outcomes in bulk as they arrive; retries the write if the database is away (the
/// reconciles are idempotent, so a lease that expires meanwhile only costs a repeat).
async fn completer(
    ctx: Arc<SyncContext>,
    worker_id: Arc<String>,
    mut rx: mpsc::UnboundedReceiver<(ClaimedEntity, Outcome)>,
) {
    let mut buf = Vec::new();
    while let Some(first) = rx.recv().await {
        buf.push(first);
        while buf.len() < 1000 {
            match rx.try_recv() {
                Ok(item) => buf.push(item),
                Err(_) => break,
            }
        }
        let mut delay = Duration::from_millis(100);
        let mut tries = 0;
        loop {
            match event::complete(&ctx.pool, &worker_id, &buf).await {
                Ok(()) => break,
                Err(e) => {
                    tries += 1;
                    if tries > 50 {
                        error!(error = %e, entities = buf.len(), "giving up recording outcomes; the events come back when their lease ends");
                        break;
                    }
                    warn!(error = %e, "recording outcomes failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        buf.clear();
    }
}

async fn prefetch(ctx: &SyncContext, claimed: &[ClaimedEntity]) -> Prefetched {
    let keys: Vec<String> = claimed
        .iter()
        .filter(|e| prefetchable(e))
        .map(|e| e.key.clone())
        .collect();
    if keys.is_empty() {
        return None;
    }
    match ctx.tables.users_by_ids(&ctx.pool, &keys).await {
        Ok(rows) => Some(rows),
        Err(e) => {
            debug!(error = %e, "prefetching user rows failed; each reconcile reads its own");
            None
        }
    }
}

/// Reconciles one claimed entity and decides what becomes of its events.
async fn process_entity(ctx: &SyncContext, entity: &ClaimedEntity, rows: &Prefetched) -> Outcome {
    let attempts = entity.attempts();
    let span = tracing::info_span!(
        "reconcile",
        entity = %format!("{}:{}", entity.kind.as_str(), entity.key),
        events = entity.events.len(),
        event.id = entity.events.first().map(|e| e.id).unwrap_or_default(),
        attempt = attempts,
    );
    let result = async {
        match entity.kind {
            EntityKind::User => {
                // The batch read answers "no row" only for keys it asked for.
                let row = match rows {
                    Some(rows) if prefetchable(entity) => Some(rows.get(&entity.key).cloned()),
                    _ => None,
                };
                users::reconcile(ctx, entity, row).await
            }
            EntityKind::Organization => organizations::reconcile(ctx, entity).await,
            EntityKind::Membership => memberships::reconcile(ctx, entity).await,
        }
    }
    .instrument(span.clone())
    .await;
    let _guard = span.enter();
    let kind = entity.kind.as_str();
    let outcome = decide(ctx, entity, attempts, kind, result);
    ctx.metrics.breaker_state(match ctx.breaker.state() {
        breaker::BreakerState::Closed => 0,
        breaker::BreakerState::Open => 1,
        breaker::BreakerState::HalfOpen => 2,
    });
    outcome
}

/// Turns a reconcile's result into the events' outcome (and feeds the breaker and metrics).
fn decide(
    ctx: &SyncContext,
    entity: &ClaimedEntity,
    attempts: i32,
    kind: &str,
    result: Result<Option<String>, SyncError>,
) -> Outcome {
    match result {
        Ok(fingerprint) => {
            ctx.breaker.on_success();
            ctx.metrics.processed(kind, "done");
            let now = Utc::now();
            for e in &entity.events {
                if let Ok(d) = (now - e.created_at).to_std() {
                    ctx.metrics.latency(d);
                }
            }
            debug!("in agreement");
            Outcome::Done { fingerprint }
        }
        Err(SyncError::Permanent(error)) => {
            ctx.breaker.on_other();
            ctx.metrics.processed(kind, "failed");
            warn!(%error, "failed permanently; kept as a failed event (replay with fusionsync --replay-failed)");
            Outcome::Failed { error }
        }
        Err(SyncError::Retryable {
            message,
            retry_after,
            unavailable,
        }) => {
            let open = if unavailable {
                ctx.breaker.on_unavailable()
            } else {
                ctx.breaker.on_other();
                false
            };
            if !open && ctx.retry.exhausted(attempts) {
                ctx.metrics.processed(kind, "failed");
                let error = format!("gave up after {attempts} attempts: {message}");
                warn!(%error, "failed; kept as a failed event (replay with fusionsync --replay-failed)");
                return Outcome::Failed { error };
            }
            ctx.metrics.processed(kind, "retry");
            let delay = if open {
                // Paused by the breaker: come back once it lets work through again.
                ctx.breaker
                    .open_for()
                    .unwrap_or(ctx.cfg.worker.breaker_cooldown)
                    .max(Duration::from_millis(100))
            } else {
                ctx.retry.delay(attempts, retry_after)
            };
            info!(error = %message, retry_in = ?delay, "will retry");
            Outcome::Retry {
                error: message,
                delay,
                // While the breaker is open FusionAuth is down for everyone: do not spend the
                // event's attempts on it.
                count_attempt: !open,
            }
        }
    }
}
