//! fusionsync's benchmark: drain, latency, remote FusionAuth, ingest, memory — and, when Node.js
//! is available, Graphile Worker draining the same number of no-op jobs on the same server.
//!
//!   cargo run --release --example bench                 # full run (20,000 events)
//!   cargo run --release --example bench -- --quick      # small and fast (CI)
//!   cargo run --release --example bench -- --events 100000 --skip-graphile
//!
//! Uses $DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres) to create
//! throwaway databases, the fake FusionAuth from tests/, and the real `fusionsync` binary.

#[path = "../tests/api/fake_fusionauth.rs"]
mod fake_fusionauth;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_fusionauth::{FakeFusionAuth, API_KEY};
use sqlx::{Connection, PgPool};
use uuid::Uuid;

const SCHEMA: &str = "create table users (id uuid primary key, email text unique, username text, first_name text,
  last_name text, active boolean not null default true, data jsonb not null default '{}',
  created_at timestamptz not null default now(), updated_at timestamptz not null default now());
create table organizations (id uuid primary key, name text not null, slug text, data jsonb not null default '{}');
create table organization_members (organization_id uuid references organizations on delete cascade,
  user_id uuid references users on delete cascade, role text, primary key (organization_id, user_id));";

struct Opts {
    events: usize,
    remote_events: usize,
    latency_secs: f64,
    latency_rate: f64,
    ingest_secs: f64,
    concurrency: usize,
    graphile: bool,
}

fn parse_opts() -> Opts {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<usize>().ok())
    };
    let events = value("--events").unwrap_or(if quick { 2_000 } else { 20_000 });
    Opts {
        events,
        remote_events: value("--remote-events").unwrap_or(if quick { 500 } else { 5_000 }),
        latency_secs: if quick { 2.0 } else { 10.0 },
        latency_rate: 50.0,
        ingest_secs: if quick { 2.0 } else { 10.0 },
        concurrency: value("--concurrency").unwrap_or(32),
        graphile: !args.iter().any(|a| a == "--skip-graphile"),
    }
}

fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

struct Db {
    name: String,
    url: String,
    pool: PgPool,
}

async fn fresh_db(schema: &str) -> Db {
    let name = format!("fusionsync_bench_{}", Uuid::new_v4().simple());
    let mut c = sqlx::PgConnection::connect(&admin_url())
        .await
        .expect("DATABASE_URL must reach Postgres");
    sqlx::query(&format!("create database \"{name}\""))
        .execute(&mut c)
        .await
        .unwrap();
    let mut url = reqwest::Url::parse(&admin_url()).unwrap();
    url.set_path(&format!("/{name}"));
    let url = url.to_string();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .unwrap();
    if !schema.is_empty() {
        sqlx::raw_sql(schema).execute(&pool).await.unwrap();
    }
    Db { name, url, pool }
}

async fn drop_db(db: Db) {
    db.pool.close().await;
    if let Ok(mut c) = sqlx::PgConnection::connect(&admin_url()).await {
        let _ = sqlx::query(&format!(
            "drop database if exists \"{}\" with (force)",
            db.name
        ))
        .execute(&mut c)
        .await;
    }
}

fn binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("fusionsync");
    if !bin.exists() {
        let profile = if dir.ends_with("release") {
            vec!["--release"]
        } else {
            vec![]
        };
        let ok = std::process::Command::new("cargo")
            .args(["build", "--bin", "fusionsync"])
            .args(profile)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "could not build the fusionsync binary");
    }
    bin
}

struct Daemon {
    child: tokio::process::Child,
    port: u16,
}

impl Daemon {
    async fn start(db_url: &str, fa_url: &str, extra: &[(&str, String)]) -> Daemon {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cmd = tokio::process::Command::new(binary());
        cmd.arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", db_url)
            .env("FUSIONAUTH_URL", fa_url)
            .env("FUSIONAUTH_API_KEY", API_KEY)
            .env("FUSIONSYNC__HTTP__LISTEN", format!("127.0.0.1:{port}"))
            .env("FUSIONSYNC__HASURA__SECRET", "bench")
            .env("FUSIONSYNC__WEBHOOK__HEADER_NAME", "x-bench")
            .env("FUSIONSYNC__WEBHOOK__HEADER_VALUE", "bench")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(if std::env::var("BENCH_DAEMON_STDERR").is_ok() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .kill_on_drop(true);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let client = reqwest::Client::new();
        for _ in 0..300 {
            if let Ok(r) = client
                .get(format!("http://127.0.0.1:{port}/readyz"))
                .send()
                .await
            {
                if r.status().is_success() {
                    return Daemon { child, port };
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("fusionsync did not become ready");
    }

    /// CPU seconds (user + system) the daemon used so far.
    fn cpu_secs(&self) -> f64 {
        self.child
            .id()
            .map(|pid| proc_cpu_secs(&format!("/proc/{pid}/stat")))
            .unwrap_or(0.0)
    }

    fn rss_kib(&self) -> (u64, u64) {
        let Some(pid) = self.child.id() else {
            return (0, 0);
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
    }
}

fn proc_cpu_secs(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // fields after the ")" of the command name; utime and stime are the 14th and 15th fields
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// (busy, total) CPU seconds of the whole machine so far, from /proc/stat.
fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return (0.0, 0.0);
    }
    let total: f64 = v.iter().sum();
    let idle = v[3] + v[4];
    ((total - idle) / 100.0, total / 100.0)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

struct Drain {
    events_per_sec: f64,
    secs: f64,
    calls_per_event: f64,
    idle_rss_mib: f64,
    peak_rss_mib: f64,
    daemon_cpu: f64,
    bench_cpu: f64,
    machine_busy: f64,
    machine_cpu: f64,
    insert_secs: f64,
}

/// N rows inserted in one statement → time until the fake holds all of them.
async fn drain(n: usize, latency: Duration, concurrency: usize) -> Drain {
    let db = fresh_db(SCHEMA).await;
    let fa = Arc::new(FakeFusionAuth::start().await);
    fa.set_latency(latency, Duration::ZERO);
    let d = Daemon::start(
        &db.url,
        &fa.url(),
        &[("FUSIONSYNC__WORKER__CONCURRENCY", concurrency.to_string())],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (idle, _) = d.rss_kib();
    let cpu0 = (d.cpu_secs(), proc_cpu_secs("/proc/self/stat"));
    let m0 = machine_cpu();
    let t0 = Instant::now();
    sqlx::query("insert into users (id, email, first_name) select gen_random_uuid(), 'bench' || g || '@example.com', 'B' from generate_series(1, $1) g")
        .bind(n as i64)
        .execute(&db.pool)
        .await
        .unwrap();
    let insert_secs = t0.elapsed().as_secs_f64();
    loop {
        if fa.data().users.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let (_, peak) = d.rss_kib();
    let cpu1 = (d.cpu_secs(), proc_cpu_secs("/proc/self/stat"));
    let m1 = machine_cpu();
    let calls = fa.state.requests.load(std::sync::atomic::Ordering::SeqCst);
    d.stop().await;
    drop_db(db).await;
    Drain {
        events_per_sec: n as f64 / secs,
        secs,
        calls_per_event: calls as f64 / n as f64,
        idle_rss_mib: idle as f64 / 1024.0,
        peak_rss_mib: peak as f64 / 1024.0,
        daemon_cpu: cpu1.0 - cpu0.0,
        bench_cpu: cpu1.1 - cpu0.1,
        machine_busy: if m1.1 > m0.1 {
            (m1.0 - m0.0) / (m1.1 - m0.1)
        } else {
            0.0
        },
        machine_cpu: m1.0 - m0.0,
        insert_secs,
    }
}

/// Single-row commits at a low rate → commit-to-FusionAuth-request latency.
async fn latency(secs: f64, rate: f64) -> Vec<Duration> {
    let db = fresh_db(SCHEMA).await;
    let fa = Arc::new(FakeFusionAuth::start().await);
    let d = Daemon::start(&db.url, &fa.url(), &[]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n = (secs * rate) as usize;
    let mut commits = BTreeMap::new();
    let gap = Duration::from_secs_f64(1.0 / rate);
    for i in 0..n {
        let id = Uuid::new_v4();
        sqlx::query("insert into users (id, email) values ($1, $2)")
            .bind(id)
            .bind(format!("lat{i}@example.com"))
            .execute(&db.pool)
            .await
            .unwrap();
        commits.insert(id.to_string(), Instant::now());
        tokio::time::sleep(gap).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut out = Vec::new();
    for r in fa.log() {
        if let Some(id) = r.path.strip_prefix("/api/user/") {
            if let Some(c) = commits.remove(id) {
                out.push(r.at.saturating_duration_since(c));
            }
        }
    }
    d.stop().await;
    drop_db(db).await;
    out.sort();
    out
}

/// The Hasura endpoint under 64 concurrent connections (workers off: ingest only).
async fn ingest(secs: f64) -> (f64, Duration, i64, usize) {
    let db = fresh_db(SCHEMA).await;
    let fa = FakeFusionAuth::start().await;
    let d = Daemon::start(
        &db.url,
        &fa.url(),
        &[
            ("FUSIONSYNC__WORKER__ENABLED", "false".into()),
            ("FUSIONSYNC__DATABASE__MAX_CONNECTIONS", "32".into()),
        ],
    )
    .await;
    let url = format!("http://127.0.0.1:{}/hasura/events", d.port);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let client = client.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut ok = 0usize;
            while Instant::now() < deadline {
                let body = serde_json::json!({
                    "id": Uuid::new_v4(), "created_at": "2025-09-13T12:21:08.552674",
                    "trigger": {"name": "fusionsync_users"}, "table": {"schema": "public", "name": "users"},
                    "delivery_info": {"current_retry": 0, "max_retries": 10},
                    "event": {"op": "INSERT", "data": {"old": null, "new": {"id": Uuid::new_v4(), "email": "x@example.com"}}, "session_variables": {"x-hasura-role": "admin"}, "trace_context": null}
                });
                let s = Instant::now();
                let r = client.post(&url).header("X-Fusionsync-Secret", "bench").json(&body).send().await;
                if let Ok(r) = r {
                    if r.status().is_success() {
                        ok += 1;
                        lat.push(s.elapsed());
                    }
                }
            }
            (ok, lat)
        }));
    }
    let mut accepted = 0;
    let mut lat = Vec::new();
    for t in tasks {
        let (ok, l) = t.await.unwrap();
        accepted += ok;
        lat.extend(l);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    lat.sort();
    let stored: i64 = sqlx::query_scalar("select count(*) from fusionsync.event")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    d.stop().await;
    drop_db(db).await;
    (accepted as f64 / elapsed, pct(&lat, 0.99), stored, accepted)
}

/// Graphile Worker draining N no-op jobs on the same server, if Node.js and npm are here.
async fn graphile(n: usize) -> Result<(f64, f64), String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/graphile");
    let node = which("node").ok_or("node not found")?;
    which("npm").ok_or("npm not found")?;
    let cache = root.join(".cache");
    if !cache.join("node_modules/graphile-worker").exists() {
        let st = std::process::Command::new("npm")
            .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
            .arg(&cache)
            .arg("graphile-worker@0.18")
            .stdout(Stdio::null())
            .status()
            .map_err(|e| e.to_string())?;
        if !st.success() {
            return Err("npm install graphile-worker failed".into());
        }
    }
    // ES modules resolve packages next to the script: run a copy inside the cache folder.
    std::fs::copy(root.join("drain.mjs"), cache.join("drain.mjs")).map_err(|e| e.to_string())?;
    let mut results = Vec::new();
    for mode in ["default", "batched"] {
        let db = fresh_db("").await;
        let out = tokio::process::Command::new(&node)
            .arg(cache.join("drain.mjs"))
            .env("DATABASE_URL", &db.url)
            .env("JOBS", n.to_string())
            .env("MODE", mode)
            .current_dir(&cache)
            .output()
            .await
            .map_err(|e| e.to_string())?;
        drop_db(db).await;
        let text = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = text
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .ok_or_else(|| {
                format!(
                    "graphile run failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
        results.push(v["jobs_per_sec"].as_f64().unwrap_or(0.0));
    }
    Ok((results[0], results[1]))
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(bin))
            .find(|p| p.exists())
    })
}

#[tokio::main]
async fn main() {
    let o = parse_opts();
    let profile = if cfg!(debug_assertions) {
        "debug (figures are not representative: use --release)"
    } else {
        "release"
    };
    println!(
        "fusionsync benchmark — {} cores, build: {profile}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!();

    let d = drain(o.events, Duration::ZERO, o.concurrency).await;
    println!(
        "drain      {} user rows inserted at once, zero-latency FusionAuth",
        o.events
    );
    println!(
        "           {:.0} events/s ({:.2} s, of which {:.2} s the INSERT itself with its trigger), {:.2} FusionAuth calls per event",
        d.events_per_sec, d.secs, d.insert_secs, d.calls_per_event
    );
    println!(
        "           CPU: machine {:.0}% busy ({:.2} s): fusionsync {:.2} s, fake FusionAuth + harness {:.2} s, Postgres and the rest {:.2} s",
        100.0 * d.machine_busy, d.machine_cpu, d.daemon_cpu, d.bench_cpu, d.machine_cpu - d.daemon_cpu - d.bench_cpu
    );
    println!(
        "memory     idle RSS {:.1} MiB, peak RSS during the drain {:.1} MiB",
        d.idle_rss_mib, d.peak_rss_mib
    );

    let lat = latency(o.latency_secs, o.latency_rate).await;
    println!("latency    {} single-row commits at {}/s: commit → FusionAuth request p50 {}, p99 {}, max {}",
        lat.len(), o.latency_rate, ms(pct(&lat, 0.5)), ms(pct(&lat, 0.99)), ms(lat.last().copied().unwrap_or_default()));

    let remote_latency = Duration::from_millis(50);
    let r = drain(o.remote_events, remote_latency, o.concurrency).await;
    let bound = o.concurrency as f64 / remote_latency.as_secs_f64();
    println!("remote     {} events, 50 ms per FusionAuth call, concurrency {}: {:.0} events/s = {:.0}% of the bound {:.0}/s (concurrency / latency)",
        o.remote_events, o.concurrency, r.events_per_sec, 100.0 * r.events_per_sec / bound, bound);

    let (rate, p99, stored, accepted) = ingest(o.ingest_secs).await;
    println!("ingest     POST /hasura/events, 64 connections: {rate:.0} accepted events/s, p99 {}, {stored} of {accepted} accepted events durable", ms(p99));

    if o.graphile {
        match graphile(o.events).await {
            Ok((plain, batched)) => {
                println!("graphile   Graphile Worker, {} no-op jobs, same server: {plain:.0} jobs/s (default), {batched:.0} jobs/s (batched)", o.events);
                println!("ratio      fusionsync drain / Graphile Worker: {:.2}× default, {:.2}× batched (fusionsync's events each do a real reconcile and HTTP call)",
                    d.events_per_sec / plain, d.events_per_sec / batched);
            }
            Err(e) => println!("graphile   skipped: {e}"),
        }
    }
}
