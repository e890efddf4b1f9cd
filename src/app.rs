//! Wiring for `fusionsync run`: migrate, check the app tables, install triggers, then run the
//! listener, the worker, the HTTP server and the housekeeping loops until cancelled.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::db::app::AppTables;
use crate::fusionauth::FusionAuthClient;
use crate::http::{self, signature::JwksCache, AppState};
use crate::metrics::Metrics;
use crate::worker::{listener, SyncContext, Worker};

/// Connects, waiting up to ~30s for a database that is still starting, then migrates.
pub async fn prepare_database(cfg: &Config) -> anyhow::Result<PgPool> {
    let pool =
        crate::db::pool(&cfg.database).context("database.url is not a valid Postgres URL")?;
    let mut tries = 0;
    loop {
        match sqlx::query("select 1").execute(&pool).await {
            Ok(_) => break,
            Err(e) if crate::db::is_unavailable(&e) && tries < 30 => {
                tries += 1;
                warn!(error = %e, "database not reachable yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context("cannot connect to the database (database.url / DATABASE_URL)"))
            }
        }
    }
    if cfg.database.migrate_on_start {
        crate::db::migrate(&pool)
            .await
            .context("applying fusionsync's migrations failed")?;
    } else if !crate::db::migrations_applied(&pool).await? {
        anyhow::bail!("fusionsync's migrations are not applied and database.migrate_on_start = false: run `fusionsync migrate`");
    }
    Ok(pool)
}

/// Checks the configured app tables against the catalog, logging what a default left out.
pub async fn resolve_tables(pool: &PgPool, cfg: &Config) -> anyhow::Result<AppTables> {
    let tables = AppTables::resolve(pool, cfg).await.map_err(|e| {
        anyhow::anyhow!("the configured app tables do not match the database:\n{e}")
    })?;
    for note in &tables.notes {
        warn!("{note}");
    }
    Ok(tables)
}

/// Checks the configured app tables and installs (or removes) the change triggers.
pub async fn prepare_tables(pool: &PgPool, cfg: &Config) -> anyhow::Result<AppTables> {
    let tables = resolve_tables(pool, cfg).await?;
    tables
        .install_triggers(pool, cfg.sources.postgres_triggers)
        .await
        .context("installing the change triggers failed (the role needs to own the app tables; or run `fusionsync migrate` as their owner and set database.migrate_on_start = false)")?;
    Ok(tables)
}

/// For `run`: install the triggers when migrating on start; otherwise (a least-privilege role)
/// only check that `fusionsync migrate` installed them.
async fn tables_for_run(pool: &PgPool, cfg: &Config) -> anyhow::Result<AppTables> {
    if cfg.database.migrate_on_start {
        return prepare_tables(pool, cfg).await;
    }
    let tables = resolve_tables(pool, cfg).await?;
    if cfg.sources.postgres_triggers {
        let missing = tables.missing_triggers(pool).await?;
        if !missing.is_empty() {
            warn!(tables = ?missing, "change triggers are missing (run `fusionsync migrate`); row changes there are not seen");
        }
    }
    Ok(tables)
}

/// A running daemon's handles (tests use the address and the token).
pub struct Running {
    pub http_addr: Option<SocketAddr>,
    pub done: tokio::task::JoinHandle<()>,
}

pub async fn start(cfg: Config, cancel: CancellationToken) -> anyhow::Result<Running> {
    let cfg = Arc::new(cfg);
    let pool = prepare_database(&cfg).await?;
    let tables = tables_for_run(&pool, &cfg).await?;
    let metrics = Arc::new(Metrics::new());
    let fa = FusionAuthClient::new(
        &cfg.fusionauth,
        cfg.retry.in_attempt_max_elapsed,
        Some(metrics.clone()),
    )
    .context("building the FusionAuth HTTP client")?;
    let worker_pool = crate::db::worker_pool(&cfg.database)?;
    let ctx = Arc::new(SyncContext::new(
        worker_pool.clone(),
        fa,
        cfg.clone(),
        tables.clone(),
        metrics.clone(),
    ));

    if cfg.hasura.secret.is_none() && cfg.sources.hasura && cfg.http.enabled {
        warn!("hasura.secret is not set: POST /hasura/events refuses every request until it is");
    }
    if cfg.http.enabled && cfg.sources.fusionauth_webhooks && !cfg.webhook.any_auth_configured() {
        if cfg.webhook.allow_unauthenticated {
            warn!("webhook.allow_unauthenticated = true: ANYONE who can reach POST /fusionauth/webhook can make fusionsync re-read users from FusionAuth");
        } else {
            warn!("no webhook authentication configured: POST /fusionauth/webhook refuses every request until webhook.hmac_secret, webhook.jwks_url, basic auth or a header secret is set");
        }
    }

    let mut tasks = Vec::new();
    let wake = Arc::new(Notify::new());
    let listening = Arc::new(AtomicBool::new(false));
    if cfg.worker.enabled {
        tasks.push(tokio::spawn(listener::run(
            pool.clone(),
            wake.clone(),
            listening.clone(),
            cancel.clone(),
        )));
        tasks.push(tokio::spawn(
            Worker::new(ctx.clone()).run(wake.clone(), cancel.clone()),
        ));
        tasks.push(tokio::spawn(retention_loop(
            pool.clone(),
            cfg.clone(),
            cancel.clone(),
        )));
        if let Some(every) = cfg.reconcile.interval {
            tasks.push(tokio::spawn(crate::reconcile::periodic(
                ctx.clone(),
                every,
                cancel.clone(),
            )));
        }
    }

    let mut http_addr = None;
    if cfg.http.enabled {
        let state = AppState {
            pool: pool.clone(),
            cfg: cfg.clone(),
            tables: Arc::new(tables),
            metrics: metrics.clone(),
            listening: cfg.worker.enabled.then(|| listening.clone()),
            jwks: Arc::new(JwksCache::new(cfg.webhook.jwks_url.clone())),
            ingest: crate::http::ingest::Ingest::start(pool.clone()),
        };
        let listener = tokio::net::TcpListener::bind(cfg.http.listen)
            .await
            .with_context(|| format!("cannot listen on {} (http.listen)", cfg.http.listen))?;
        let addr = listener.local_addr()?;
        http_addr = Some(addr);
        info!(%addr, "HTTP listening");
        let app = http::router(state);
        let token = cancel.clone();
        tasks.push(tokio::spawn(async move {
            let serve = axum::serve(listener, app)
                .with_graceful_shutdown(async move { token.cancelled().await });
            if let Err(e) = serve.await {
                error!(error = %e, "HTTP server failed");
            }
        }));
    }

    let done = tokio::spawn(async move {
        for t in tasks {
            let _ = t.await;
        }
        pool.close().await;
        worker_pool.close().await;
    });
    Ok(Running { http_addr, done })
}

/// `fusionsync run`: until SIGTERM or Ctrl-C.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    let running = start(cfg, cancel.clone()).await?;
    info!("fusionsync running");
    shutdown_signal().await;
    info!("shutting down");
    cancel.cancel();
    let _ = running.done.await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// Prunes done events past `retention.done_after`, a batch at a time (failed events are
/// never pruned automatically).
async fn retention_loop(pool: PgPool, cfg: Arc<Config>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(cfg.retention.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut total = 0;
        loop {
            match crate::db::event::prune_done(
                &pool,
                cfg.retention.done_after,
                cfg.retention.batch_size,
            )
            .await
            {
                Ok(n) => {
                    total += n;
                    if (n as i64) < cfg.retention.batch_size || cancel.is_cancelled() {
                        break;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "pruning done events failed");
                    break;
                }
            }
        }
        if total > 0 {
            info!(
                events = total,
                "pruned done events past retention.done_after"
            );
        }
    }
}
