//! Test plumbing: a fresh database per test, the daemon in-process (or as the real binary),
//! a TCP proxy that can cut the database away, and polling with a deadline instead of sleeps.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fusionsync::config::{Config, Needs};
use serde_json::Value;
use sqlx::{Connection, PgPool};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::fake_fusionauth::{FakeFusionAuth, API_KEY};

pub const HASURA_SECRET: &str = "hasura-shared-secret";
pub const WEBHOOK_SECRET: &str = "webhook-hmac-secret";

/// The default app schema from DESIGN.md: the tables the shipped Hasura migration creates.
pub const APP_SCHEMA: &str =
    include_str!("../../hasura/migrations/default/1733300000000_app_tables/up.sql");

/// A JSON file under tests/fixtures (the documented FusionAuth and Hasura payloads).
pub fn fixture(path: &str) -> Value {
    let p = format!("{}/tests/fixtures/{path}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database of its own for one test, dropped at the end when the test cleans up.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    pub async fn new() -> Self {
        Self::with_schema(APP_SCHEMA).await
    }

    pub async fn with_schema(schema: &str) -> Self {
        let admin = admin_url();
        let name = format!("fusionsync_test_{}", Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .expect("DATABASE_URL must point at a Postgres server");
        sqlx::query(&format!("create database \"{name}\""))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.ok();
        let mut url = reqwest::Url::parse(&admin).unwrap();
        url.set_path(&format!("/{name}"));
        let url = url.to_string();
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(5)
            .connect(&url)
            .await
            .unwrap();
        sqlx::raw_sql(schema).execute(&pool).await.unwrap();
        TestDb { name, url, pool }
    }

    pub async fn drop_db(self) {
        self.pool.close().await;
        if let Ok(mut conn) = sqlx::PgConnection::connect(&admin_url()).await {
            let _ = sqlx::query(&format!(
                "drop database if exists \"{}\" with (force)",
                self.name
            ))
            .execute(&mut conn)
            .await;
        }
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    pub async fn events_in(&self, state: &str) -> i64 {
        sqlx::query_scalar("select count(*) from fusionsync.event where state = $1")
            .bind(state)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    pub async fn exec(&self, sql: &str) {
        sqlx::raw_sql(sql).execute(&self.pool).await.unwrap();
    }

    pub async fn insert_user(&self, id: Uuid, email: &str) {
        sqlx::query("insert into users (id, email, first_name) values ($1, $2, 'First')")
            .bind(id)
            .bind(email)
            .execute(&self.pool)
            .await
            .unwrap();
    }
}

/// The environment a test daemon runs with (only documented names).
pub fn base_env(db_url: &str, fa_url: &str) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for (k, v) in [
        ("DATABASE_URL", db_url),
        ("FUSIONAUTH_URL", fa_url),
        ("FUSIONAUTH_API_KEY", API_KEY),
        ("FUSIONSYNC__HTTP__LISTEN", "127.0.0.1:0"),
        ("FUSIONSYNC__HASURA__SECRET", HASURA_SECRET),
        ("FUSIONSYNC__WEBHOOK__HMAC_SECRET", WEBHOOK_SECRET),
        ("FUSIONSYNC__WORKER__POLL_INTERVAL", "200ms"),
        ("FUSIONSYNC__WORKER__LEASE", "20s"),
        ("FUSIONSYNC__WORKER__SHUTDOWN_TIMEOUT", "5s"),
        ("FUSIONSYNC__WORKER__BREAKER_COOLDOWN", "300ms"),
        ("FUSIONSYNC__RETRY__INITIAL", "100ms"),
        ("FUSIONSYNC__RETRY__MAX", "1s"),
        ("FUSIONSYNC__RETRY__IN_ATTEMPT_MAX_ELAPSED", "300ms"),
        ("FUSIONSYNC__FUSIONAUTH__REQUEST_TIMEOUT", "3s"),
        ("FUSIONSYNC__DATABASE__MAX_CONNECTIONS", "8"),
    ] {
        env.insert(k.to_string(), v.to_string());
    }
    env
}

pub fn config(env: &BTreeMap<String, String>) -> Config {
    Config::load_from(None, Needs::DatabaseAndFusionAuth, env.clone())
        .expect("test config is valid")
}

/// fusionsync running in-process.
pub struct TestApp {
    pub db: TestDb,
    pub fa: FakeFusionAuth,
    pub addr: Option<SocketAddr>,
    pub cancel: CancellationToken,
    pub done: Option<tokio::task::JoinHandle<()>>,
    pub env: BTreeMap<String, String>,
    pub http: reqwest::Client,
}

impl TestApp {
    /// A fresh database with the default schema, a fake FusionAuth, and the daemon.
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(tweak: impl FnOnce(&mut BTreeMap<String, String>)) -> Self {
        let db = TestDb::new().await;
        let fa = FakeFusionAuth::start().await;
        Self::spawn_on(db, fa, tweak).await
    }

    pub async fn spawn_on(
        db: TestDb,
        fa: FakeFusionAuth,
        tweak: impl FnOnce(&mut BTreeMap<String, String>),
    ) -> Self {
        fusionsync::telemetry::init(fusionsync::config::LogFormat::Human, "warn");
        let mut env = base_env(&db.url, &fa.url());
        tweak(&mut env);
        let cancel = CancellationToken::new();
        let running = fusionsync::app::start(config(&env), cancel.clone())
            .await
            .expect("daemon starts");
        TestApp {
            db,
            fa,
            addr: running.http_addr,
            cancel,
            done: Some(running.done),
            env,
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr.expect("HTTP is on"), path)
    }

    /// Stops the daemon cleanly (as SIGTERM would).
    pub async fn stop(&mut self) {
        self.cancel.cancel();
        if let Some(d) = self.done.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), d).await;
        }
    }

    pub async fn finish(mut self) {
        self.stop().await;
        let TestApp { db, .. } = self;
        db.drop_db().await;
    }

    pub async fn post_hasura(&self, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url("/hasura/events"))
            .header("X-Fusionsync-Secret", HASURA_SECRET)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn post_webhook(&self, body: &Value) -> reqwest::Response {
        let raw = serde_json::to_vec(body).unwrap();
        self.http
            .post(self.url("/fusionauth/webhook"))
            .header("content-type", "application/json")
            .header(
                "X-FusionAuth-Signature-JWT",
                sign_webhook(&raw, WEBHOOK_SECRET),
            )
            .body(raw)
            .send()
            .await
            .unwrap()
    }

    /// Waits until every event is done (or failed), and none is pending or processing.
    pub async fn settle(&self) {
        let db = &self.db;
        eventually(Duration::from_secs(30), "the queue to drain", || async {
            db.count(
                "select count(*) from fusionsync.event where state in ('pending', 'processing')",
            )
            .await
                == 0
        })
        .await;
    }
}

/// A signature JWT as FusionAuth sends it (HMAC key).
pub fn sign_webhook(body: &[u8], secret: &str) -> String {
    let claims = serde_json::json!({
        "request_body_sha256": fusionsync::http::signature::body_sha256(body),
        "iat": chrono::Utc::now().timestamp(),
        "exp": chrono::Utc::now().timestamp() + 300,
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("webhook-key".into());
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// Polls `check` until it holds or the deadline passes (then panics with `what`).
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return;
        }
        if start.elapsed() > within {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP proxy in front of Postgres that can cut every connection and refuse new ones.
pub struct DbProxy {
    pub addr: SocketAddr,
    down: Arc<AtomicBool>,
    kill: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
}

impl Drop for DbProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl DbProxy {
    pub async fn start(upstream: &str) -> Self {
        let url = reqwest::Url::parse(upstream).unwrap();
        let target = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let down = Arc::new(AtomicBool::new(false));
        let kill = Arc::new(tokio::sync::Notify::new());
        let stop = CancellationToken::new();
        let (d, k, s) = (down.clone(), kill.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                if d.load(Ordering::SeqCst) {
                    let _ = inbound.shutdown().await;
                    continue;
                }
                let target = target.clone();
                let k = k.clone();
                let s = s.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = k.notified() => {}
                        _ = s.cancelled() => {}
                    }
                });
            }
        });
        DbProxy {
            addr,
            down,
            kill,
            stop,
        }
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn url_for(&self, url: &str) -> String {
        let mut u = reqwest::Url::parse(url).unwrap();
        u.set_host(Some("127.0.0.1")).unwrap();
        u.set_port(Some(self.addr.port())).unwrap();
        u.to_string()
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            // notify_waiters reaches every connection task alive now
            self.kill.notify_waiters();
        }
    }
}

/// The real binary, as a child process.
pub struct Daemon {
    pub child: tokio::process::Child,
    pub addr: Option<SocketAddr>,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_fusionsync")
}

impl Daemon {
    /// Starts `fusionsync run` with exactly `env` (plus PATH) and waits for /healthz.
    pub async fn start(env: &BTreeMap<String, String>, port: u16) -> Self {
        let mut cmd = tokio::process::Command::new(binary());
        cmd.arg("run")
            .env_clear()
            .envs(env)
            .env("FUSIONSYNC__HTTP__LISTEN", format!("127.0.0.1:{port}"));
        if let Ok(p) = std::env::var("PATH") {
            cmd.env("PATH", p);
        }
        cmd.env(
            "RUST_LOG",
            std::env::var("TEST_DAEMON_LOG").unwrap_or_else(|_| "warn".into()),
        );
        cmd.stdout(std::process::Stdio::null()).kill_on_drop(true);
        let child = cmd.spawn().expect("spawn fusionsync");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let client = reqwest::Client::new();
        eventually(Duration::from_secs(30), "the daemon's /healthz", || {
            let client = client.clone();
            async move {
                client
                    .get(format!("http://{addr}/healthz"))
                    .send()
                    .await
                    .is_ok()
            }
        })
        .await;
        Daemon {
            child,
            addr: Some(addr),
        }
    }

    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM, then wait for the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("daemon exits after SIGTERM")
            .unwrap()
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl TestApp {
    /// A worker on this app's database to drive by hand (`process_next_batch`).
    pub async fn worker(&self) -> fusionsync::worker::Worker {
        let cfg = std::sync::Arc::new(config(&self.env));
        let pool = fusionsync::app::prepare_database(&cfg).await.unwrap();
        let tables = fusionsync::db::app::AppTables::resolve(&pool, &cfg)
            .await
            .unwrap();
        let metrics = std::sync::Arc::new(fusionsync::metrics::Metrics::new());
        let fa = fusionsync::fusionauth::FusionAuthClient::new(
            &cfg.fusionauth,
            cfg.retry.in_attempt_max_elapsed,
            None,
        )
        .unwrap();
        let ctx = fusionsync::worker::SyncContext::new(pool, fa, cfg, tables, metrics);
        fusionsync::worker::Worker::new(std::sync::Arc::new(ctx))
    }

    /// Processes batches until nothing is due.
    pub async fn drain(&self, worker: &fusionsync::worker::Worker) {
        for _ in 0..1000 {
            let out = worker.process_next_batch().await.unwrap();
            if out.claimed == 0 && !out.paused {
                return;
            }
        }
        panic!("the queue did not drain");
    }
}
