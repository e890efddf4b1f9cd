//! The command line: `run`, `migrate`, `replay` (and the `--replay-failed` flag), `status`,
//! `events show`, `reconcile`, `prune`. Exit codes: 0 ok, 1 error, 2 usage, 3 failed events
//! present (`status`) or drift found (`reconcile --dry-run --exit-code`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};

use crate::config::{Config, Needs};
use crate::db::admin::{self, ReplayFilter};

pub const EXIT_FAILED_EVENTS: i32 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "fusionsync",
    version,
    about = "Keeps a Hasura/Postgres app database and FusionAuth in agreement about users, organizations and memberships",
    after_help = "Examples:\n  fusionsync run                      # the daemon\n  fusionsync --replay-failed          # put every failed event back to pending\n  fusionsync status                   # what is stuck and why\n  fusionsync reconcile --dry-run      # compare both sides completely\n\nConfiguration: --config FILE (TOML) and FUSIONSYNC__SECTION__KEY variables, plus DATABASE_URL,\nFUSIONAUTH_URL and FUSIONAUTH_API_KEY. See fusionsync.example.toml."
)]
pub struct Cli {
    /// TOML config file (default: ./fusionsync.toml when present)
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Put every failed event back to pending (same as `fusionsync replay --failed`)
    #[arg(long)]
    pub replay_failed: bool,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: workers, LISTEN, HTTP endpoints, housekeeping
    #[command(
        after_help = "Stops on SIGTERM or Ctrl-C: no new claims, in-flight work finishes within worker.shutdown_timeout, leases are released, exit 0."
    )]
    Run,
    /// Apply fusionsync's migrations and install the change triggers, then exit
    Migrate,
    /// Put failed events back to pending (nothing is ever deleted)
    #[command(
        after_help = "Examples:\n  fusionsync replay --failed\n  fusionsync replay --id 42 --id 43\n  fusionsync replay --entity user:2b1c…  --dry-run\n  fusionsync replay --since 2h --error-contains duplicate\n\nExit codes: 0 replayed (or nothing matched), 1 an --id was not a failed event (nothing changed), 2 usage."
    )]
    Replay(ReplayArgs),
    /// Queue depth, oldest pending event, recent failures
    #[command(
        after_help = "Exit codes: 0 healthy, 1 database error, 3 more failed events than --max-failed (default 0)."
    )]
    Status(StatusArgs),
    /// Inspect events
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Compare both sides completely and enqueue fixes for what differs
    #[command(
        after_help = "Examples:\n  fusionsync reconcile --dry-run\n  fusionsync reconcile --users\n\nWith neither --users nor --orgs, both are compared. Exit codes: 0 done, 1 error, 3 drift found with --dry-run --exit-code."
    )]
    Reconcile(ReconcileArgs),
    /// Delete done events older than a given age (failed events are never pruned)
    #[command(after_help = "Example:\n  fusionsync prune --older-than 7d --dry-run")]
    Prune(PruneArgs),
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// One event with its full history
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args, Default)]
pub struct ReplayArgs {
    /// Replay failed events (the default: only failed events can be replayed)
    #[arg(long)]
    pub failed: bool,
    /// Only this event id (repeatable)
    #[arg(long = "id", value_name = "ID")]
    pub ids: Vec<i64>,
    /// Only events of this entity, as KIND:KEY (kind: user, organization, membership)
    #[arg(long, value_name = "KIND:KEY")]
    pub entity: Option<String>,
    /// Only events from this source (postgres, hasura, fusionauth, reconcile)
    #[arg(long)]
    pub source: Option<String>,
    /// Only events created at or after this time (RFC 3339, or an age like 2h)
    #[arg(long)]
    pub since: Option<String>,
    /// Only events created at or before this time (RFC 3339, or an age like 30m)
    #[arg(long)]
    pub until: Option<String>,
    /// Only events whose last error contains this text (case-insensitive)
    #[arg(long, value_name = "TEXT")]
    pub error_contains: Option<String>,
    /// At most this many events
    #[arg(long)]
    pub limit: Option<i64>,
    /// List what would be replayed; change nothing
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Machine-readable output
    #[arg(long)]
    pub json: bool,
    /// How many failed events are still "healthy" for the exit code
    #[arg(long, default_value_t = 0)]
    pub max_failed: i64,
    /// How many recent failures to list
    #[arg(long, default_value_t = 10)]
    pub recent: i64,
}

#[derive(Debug, Args)]
pub struct ReconcileArgs {
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub users: bool,
    #[arg(long)]
    pub orgs: bool,
    #[arg(long)]
    pub json: bool,
    /// With --dry-run: exit 3 when drift is found
    #[arg(long)]
    pub exit_code: bool,
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Age like 7d, 12h
    #[arg(long, value_name = "AGE")]
    pub older_than: String,
    #[arg(long)]
    pub dry_run: bool,
}

/// RFC 3339, or an age ("2h" = two hours ago).
pub fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s.trim()) {
        return Ok(t.with_timezone(&Utc));
    }
    match crate::config::parse_duration(s) {
        Ok(d) => Ok(Utc::now() - chrono::Duration::from_std(d).map_err(|e| e.to_string())?),
        Err(_) => Err(format!(
            "'{s}' is neither an RFC 3339 time nor an age like 2h"
        )),
    }
}

impl ReplayArgs {
    pub fn filter(&self) -> Result<ReplayFilter, String> {
        let entity = match &self.entity {
            None => None,
            Some(e) => {
                let (kind, key) = e.split_once(':').ok_or_else(|| {
                    format!("--entity '{e}' must look like KIND:KEY, e.g. user:2b1c…")
                })?;
                if crate::db::event::EntityKind::parse(kind).is_none() {
                    return Err(format!(
                        "--entity kind '{kind}' must be user, organization or membership"
                    ));
                }
                Some((kind.to_string(), key.to_ascii_lowercase()))
            }
        };
        Ok(ReplayFilter {
            ids: self.ids.clone(),
            entity,
            source: self.source.clone(),
            since: self.since.as_deref().map(parse_time).transpose()?,
            until: self.until.as_deref().map(parse_time).transpose()?,
            error_contains: self.error_contains.clone(),
            limit: self.limit,
        })
    }
}

async fn pool_for(cfg: &Config) -> anyhow::Result<sqlx::PgPool> {
    let pool =
        crate::db::pool(&cfg.database).context("database.url is not a valid Postgres URL")?;
    if !crate::db::migrations_applied(&pool)
        .await
        .context("cannot reach the database (database.url / DATABASE_URL)")?
    {
        anyhow::bail!("fusionsync's tables are not there yet: run `fusionsync migrate` (or start `fusionsync run` once)");
    }
    Ok(pool)
}

/// Runs the parsed command; returns the process exit code.
pub async fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    let config_path = cli.config.clone();
    let command = match (cli.command, cli.replay_failed) {
        (Some(c), false) => c,
        (None, true) => Command::Replay(ReplayArgs {
            failed: true,
            ..Default::default()
        }),
        (Some(_), true) => {
            eprintln!("--replay-failed is a command of its own; use it without a subcommand");
            return Ok(2);
        }
        (None, false) => {
            use clap::CommandFactory;
            Cli::command().print_help()?;
            return Ok(2);
        }
    };
    let needs = match command {
        Command::Run | Command::Reconcile(_) => Needs::DatabaseAndFusionAuth,
        _ => Needs::Database,
    };
    let cfg = Config::load(config_path.as_deref(), needs)?;
    crate::telemetry::init(cfg.log.format, &cfg.log.level);
    match command {
        Command::Run => {
            crate::app::run(cfg).await?;
            Ok(0)
        }
        Command::Migrate => {
            let pool = crate::app::prepare_database(&Config {
                database: crate::config::DatabaseSettings {
                    migrate_on_start: true,
                    ..cfg.database.clone()
                },
                ..cfg.clone()
            })
            .await?;
            crate::app::prepare_tables(&pool, &cfg).await?;
            println!(
                "migrations applied; change triggers {}",
                if cfg.sources.postgres_triggers {
                    "installed"
                } else {
                    "removed (sources.postgres_triggers = false)"
                }
            );
            Ok(0)
        }
        Command::Replay(args) => replay(&cfg, &args).await,
        Command::Status(args) => status(&cfg, &args).await,
        Command::Events {
            command: EventsCommand::Show { id, json },
        } => {
            let pool = pool_for(&cfg).await?;
            match admin::event_detail(&pool, id).await? {
                None => {
                    eprintln!("no event {id}");
                    Ok(1)
                }
                Some(d) if json => {
                    println!("{}", serde_json::to_string_pretty(&d)?);
                    Ok(0)
                }
                Some(d) => {
                    let e = &d.event;
                    println!(
                        "event {}  {} {}:{}  ({}, op {}, from {})",
                        e.id, e.state, e.entity_kind, e.entity_key, e.direction, e.op, e.source
                    );
                    println!("  attempts:     {}", e.attempts);
                    println!("  created:      {}", e.created_at);
                    println!("  updated:      {}", e.updated_at);
                    println!("  next attempt: {}", d.next_attempt_at);
                    if let Some(p) = d.processed_at {
                        println!("  processed:    {p}");
                    }
                    if let Some(err) = &e.last_error {
                        println!("  last error:   {err}");
                    }
                    if let Some(k) = &d.dedup_key {
                        println!("  dedup key:    {k}");
                    }
                    if !d.history.is_empty() {
                        println!("  history:");
                        for h in &d.history {
                            println!(
                                "    {}  {} (was {}, {} attempts){}",
                                h.at,
                                h.action,
                                h.state,
                                h.attempts,
                                h.last_error
                                    .as_ref()
                                    .map(|e| format!(": {e}"))
                                    .unwrap_or_default()
                            );
                        }
                    }
                    Ok(0)
                }
            }
        }
        Command::Reconcile(args) => reconcile(cfg, &args).await,
        Command::Prune(args) => {
            let age = crate::config::parse_duration(&args.older_than)
                .map_err(|e| anyhow::anyhow!("--older-than: {e}"))?;
            let pool = pool_for(&cfg).await?;
            if args.dry_run {
                let n = crate::db::event::count_prunable(&pool, age).await?;
                println!("would prune {n} done events older than {}", args.older_than);
                return Ok(0);
            }
            let mut total = 0;
            loop {
                let n = crate::db::event::prune_done(&pool, age, cfg.retention.batch_size).await?;
                total += n;
                if (n as i64) < cfg.retention.batch_size {
                    break;
                }
            }
            println!(
                "pruned {total} done events older than {} (failed events are kept)",
                args.older_than
            );
            Ok(0)
        }
    }
}

async fn replay(cfg: &Config, args: &ReplayArgs) -> anyhow::Result<i32> {
    let filter = args.filter().map_err(|e| anyhow::anyhow!(e))?;
    let pool = pool_for(cfg).await?;
    if !filter.ids.is_empty() {
        let states = admin::states_of(&pool, &filter.ids).await?;
        let wrong: Vec<String> = states
            .iter()
            .filter(|(_, s)| s.as_deref() != Some("failed"))
            .map(|(id, s)| match s {
                None => format!("event {id} does not exist"),
                Some(s) => format!("event {id} is {s}, not failed"),
            })
            .collect();
        if !wrong.is_empty() {
            for w in &wrong {
                eprintln!("{w}");
            }
            eprintln!("nothing replayed: only failed events can be replayed");
            return Ok(1);
        }
    }
    if args.dry_run {
        let events = admin::failed_matching(&pool, &filter).await?;
        println!("would replay {} failed event(s):", events.len());
        print_events(&events);
        return Ok(0);
    }
    let ids = admin::replay(&pool, &filter).await?;
    println!(
        "replayed {} failed event(s){}",
        ids.len(),
        if ids.is_empty() {
            String::new()
        } else {
            format!(": {}", short_list(&ids))
        }
    );
    Ok(0)
}

fn short_list(ids: &[i64]) -> String {
    let mut s: Vec<String> = ids.iter().take(20).map(|i| i.to_string()).collect();
    if ids.len() > 20 {
        s.push(format!("… ({} more)", ids.len() - 20));
    }
    s.join(", ")
}

fn print_events(events: &[admin::EventSummary]) {
    if events.is_empty() {
        return;
    }
    println!(
        "{:>8}  {:<10}  {:<50}  {:>8}  {:<20}  error",
        "id", "source", "entity", "attempts", "updated"
    );
    for e in events {
        let err: String = e
            .last_error
            .as_deref()
            .unwrap_or("")
            .chars()
            .take(160)
            .collect();
        println!(
            "{:>8}  {:<10}  {:<50}  {:>8}  {:<20}  {}",
            e.id,
            e.source,
            format!("{}:{}", e.entity_kind, e.entity_key),
            e.attempts,
            e.updated_at.format("%Y-%m-%d %H:%M:%S"),
            err
        );
    }
}

async fn status(cfg: &Config, args: &StatusArgs) -> anyhow::Result<i32> {
    let pool = pool_for(cfg).await?;
    let s = admin::status(&pool, args.recent).await?;
    let unhealthy = s.failed > args.max_failed;
    if args.json {
        let mut v = serde_json::to_value(&s)?;
        v["healthy"] = serde_json::Value::Bool(!unhealthy);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("queue:");
        if s.by_state.is_empty() {
            println!("  (empty)");
        }
        for c in &s.by_state {
            println!("  {:<11} {:<13} {:>10}", c.state, c.entity_kind, c.count);
        }
        match s.oldest_pending_age_seconds {
            Some(a) => println!(
                "oldest pending: {}",
                humantime::format_duration(Duration::from_secs(a.max(0.0) as u64))
            ),
            None => println!("oldest pending: none"),
        }
        println!("done in the last hour: {}", s.done_last_hour);
        println!("failed: {}", s.failed);
        if !s.recent_failures.is_empty() {
            println!("recent failures (replay with: fusionsync replay --id ID, or fusionsync --replay-failed):");
            print_events(&s.recent_failures);
        }
        println!(
            "{}",
            if unhealthy {
                "status: FAILED EVENTS"
            } else {
                "status: healthy"
            }
        );
    }
    Ok(if unhealthy { EXIT_FAILED_EVENTS } else { 0 })
}

async fn reconcile(cfg: Config, args: &ReconcileArgs) -> anyhow::Result<i32> {
    let cfg = Arc::new(cfg);
    let pool = pool_for(&cfg).await?;
    let tables = crate::app::resolve_tables(&pool, &cfg).await?;
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let fa = crate::fusionauth::FusionAuthClient::new(
        &cfg.fusionauth,
        cfg.retry.in_attempt_max_elapsed,
        None,
    )?;
    let ctx = crate::worker::SyncContext::new(pool, fa, cfg.clone(), tables, metrics);
    let both = !args.users && !args.orgs;
    let opts = crate::reconcile::ReconcileOptions {
        users: both || args.users,
        orgs: both || args.orgs,
        dry_run: args.dry_run,
    };
    let report = crate::reconcile::run(&ctx, opts)
        .await
        .map_err(|e| anyhow::anyhow!("reconcile failed: {e}"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let line = |name: &str, v: &Vec<String>| {
            if !v.is_empty() {
                println!("  {name}: {}", v.len());
                for k in v.iter().take(10) {
                    println!("    {k}");
                }
                if v.len() > 10 {
                    println!("    …");
                }
            }
        };
        println!(
            "checked {} users, {} organizations",
            report.users_checked, report.organizations_checked
        );
        line(
            "users missing in FusionAuth",
            &report.users_missing_in_fusionauth,
        );
        line(
            "users missing in the database",
            &report.users_missing_in_database,
        );
        line("users with differing fields", &report.users_differing);
        line(
            "users fusionsync cannot map (see their events)",
            &report.users_unmappable,
        );
        line("groups missing in FusionAuth", &report.groups_missing);
        line("groups with differing name/data", &report.groups_differing);
        line(
            "groups whose organization is gone",
            &report.groups_without_organization,
        );
        line(
            "organizations whose members differ",
            &report.organizations_with_member_drift,
        );
        if report.members_missing + report.members_stray + report.members_differing > 0 {
            println!(
                "  members: {} missing, {} stray, {} with different data",
                report.members_missing, report.members_stray, report.members_differing
            );
        }
        if args.dry_run {
            println!(
                "dry run: {} difference(s) found, nothing enqueued",
                report.drift()
            );
        } else {
            println!(
                "enqueued {} fix(es); running daemons apply them",
                report.enqueued
            );
        }
    }
    Ok(if args.dry_run && args.exit_code && report.drift() > 0 {
        EXIT_FAILED_EVENTS
    } else {
        0
    })
}
