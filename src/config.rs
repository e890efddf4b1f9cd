//! Configuration: TOML file + `FUSIONSYNC__SECTION__KEY` environment (through the `config` crate),
//! plus the conventional `DATABASE_URL`, `FUSIONAUTH_URL`, `FUSIONAUTH_API_KEY`. Everything is
//! validated at load time and every problem is reported at once, naming the key.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use uuid::Uuid;

/// A value that must never be printed (API keys, secrets, database passwords).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A `schema.table` name as written in the config. It is only ever used quoted, after
/// [`crate::db::app`] has checked that it exists in the catalog.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (schema, name) = match s.split_once('.') {
            Some((schema, name)) => (schema, name),
            None => ("public", s),
        };
        check_identifier(schema)?;
        check_identifier(name)?;
        Ok(Self {
            schema: schema.to_string(),
            name: name.to_string(),
        })
    }

    /// `"schema"."table"`, each part quoted.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// Accepts what Postgres accepts as an identifier once quoted, minus the characters that make
/// no sense in a table or column name we are configured with.
pub fn check_identifier(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("an identifier may not be empty".into());
    }
    if s.len() > 63 {
        return Err(format!("identifier '{s}' is longer than 63 bytes"));
    }
    if s.chars().any(|c| c.is_control() || c == '"' || c == '.') {
        return Err(format!(
            "identifier '{}' contains a quote, dot or control character",
            s.escape_debug()
        ));
    }
    Ok(())
}

/// Quote an identifier for SQL. Callers pass names validated by [`check_identifier`].
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewUserPassword {
    /// Ask FusionAuth to email the user a link to set a password (`sendSetPasswordEmail`).
    SendSetPasswordEmail,
    /// Create the user without a password (FusionAuth ≥ 1.59, passwordless login).
    None,
    /// Generate a long random password nobody knows (users log in through another method).
    Random,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeletePolicy {
    Deactivate,
    HardDelete,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FusionAuthDeletePolicy {
    /// A user deleted in FusionAuth is deleted from the users table.
    Delete,
    /// A user deleted in FusionAuth is kept in the table with `active = false`.
    Deactivate,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MembershipMode {
    /// The membership table is the truth; members added by hand in FusionAuth are removed.
    Database,
    /// Member changes made in FusionAuth are written back to the membership table.
    TwoWay,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Clone, Debug)]
pub struct DatabaseSettings {
    pub url: Secret,
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    pub migrate_on_start: bool,
}

#[derive(Clone, Debug)]
pub struct FusionAuthSettings {
    pub url: String,
    pub api_key: Secret,
    pub tenant_id: Option<Uuid>,
    pub application_id: Option<Uuid>,
    pub default_roles: Vec<String>,
    pub request_timeout: Duration,
    pub max_idle_connections: usize,
    pub new_user_password: NewUserPassword,
    pub delete_policy: DeletePolicy,
}

#[derive(Clone, Debug)]
pub struct HttpSettings {
    pub enabled: bool,
    pub listen: SocketAddr,
    pub body_limit: usize,
    pub request_timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct HasuraSettings {
    pub secret_header: String,
    pub secret: Option<Secret>,
}

#[derive(Clone, Debug)]
pub struct WebhookSettings {
    pub hmac_secret: Option<Secret>,
    pub jwks_url: Option<String>,
    pub basic_username: Option<String>,
    pub basic_password: Option<Secret>,
    pub header_name: Option<String>,
    pub header_value: Option<Secret>,
    pub allow_unauthenticated: bool,
}

impl WebhookSettings {
    pub fn signature_configured(&self) -> bool {
        self.hmac_secret.is_some() || self.jwks_url.is_some()
    }
    pub fn any_auth_configured(&self) -> bool {
        self.signature_configured() || self.basic_password.is_some() || self.header_value.is_some()
    }
}

#[derive(Clone, Debug)]
pub struct SourcesSettings {
    pub postgres_triggers: bool,
    pub hasura: bool,
    pub fusionauth_webhooks: bool,
}

#[derive(Clone, Debug)]
pub struct WorkerSettings {
    pub enabled: bool,
    pub concurrency: usize,
    pub batch_size: usize,
    pub max_attempts: i32,
    pub lease: Duration,
    pub poll_interval: Duration,
    pub shutdown_timeout: Duration,
    pub breaker_threshold: u32,
    pub breaker_cooldown: Duration,
}

#[derive(Clone, Debug)]
pub struct RetrySettings {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
    /// How long one attempt may keep retrying transient HTTP failures in-process.
    pub in_attempt_max_elapsed: Duration,
}

/// FusionAuth user field → users-table column. `None` means the field is not synced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserColumns {
    pub id: String,
    pub fields: BTreeMap<String, String>,
    /// The fields whose column was set in the config (a missing default column is skipped
    /// with a warning; a missing configured one is an error).
    pub explicit: BTreeSet<String>,
}

/// The FusionAuth user fields that can be mapped to a column, with their default column.
pub const USER_FIELDS: &[(&str, &str)] = &[
    ("email", "email"),
    ("username", "username"),
    ("firstName", "first_name"),
    ("lastName", "last_name"),
    ("middleName", "middle_name"),
    ("fullName", "full_name"),
    ("mobilePhone", "mobile_phone"),
    ("imageUrl", "image_url"),
    ("timezone", "timezone"),
    ("active", "active"),
    ("data", "data"),
];

/// Fields mapped by default (the default schema in DESIGN.md has these columns).
const DEFAULT_USER_FIELDS: &[&str] = &[
    "email",
    "username",
    "firstName",
    "lastName",
    "active",
    "data",
];

#[derive(Clone, Debug)]
pub struct UsersSettings {
    pub table: TableName,
    pub columns: UserColumns,
    pub on_fusionauth_delete: FusionAuthDeletePolicy,
}

#[derive(Clone, Debug)]
pub struct OrganizationsSettings {
    pub enabled: bool,
    pub table: TableName,
    pub id_column: String,
    pub name_column: String,
    /// Extra columns copied into the group's `data` (under their column name).
    pub data_columns: Vec<String>,
    pub group_name_template: String,
    /// Whether any organizations.* key was set (then a missing table is an error, not a
    /// warning that turns organization sync off).
    pub explicit: bool,
}

#[derive(Clone, Debug)]
pub struct MembershipsSettings {
    pub enabled: bool,
    pub table: TableName,
    pub organization_column: String,
    pub user_column: String,
    pub role_column: Option<String>,
    pub data_columns: Vec<String>,
    pub mode: MembershipMode,
    /// Whether any memberships.* key was set.
    pub explicit: bool,
}

#[derive(Clone, Debug)]
pub struct ReconcileSettings {
    pub interval: Option<Duration>,
    pub page_size: usize,
}

#[derive(Clone, Debug)]
pub struct RetentionSettings {
    pub done_after: Duration,
    pub interval: Duration,
    pub batch_size: i64,
}

#[derive(Clone, Debug)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub database: DatabaseSettings,
    pub fusionauth: FusionAuthSettings,
    pub http: HttpSettings,
    pub hasura: HasuraSettings,
    pub webhook: WebhookSettings,
    pub sources: SourcesSettings,
    pub worker: WorkerSettings,
    pub retry: RetrySettings,
    pub users: UsersSettings,
    pub organizations: OrganizationsSettings,
    pub memberships: MembershipsSettings,
    pub reconcile: ReconcileSettings,
    pub retention: RetentionSettings,
    pub log: LogSettings,
}

/// What a command needs: the admin commands work with only a database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    Database,
    DatabaseAndFusionAuth,
}

/// All problems found while loading the configuration, one line each.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n{}", .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

/// Every key fusionsync reads (dynamic maps are matched by prefix).
const KNOWN_KEYS: &[&str] = &[
    "database.url",
    "database.max_connections",
    "database.acquire_timeout",
    "database.migrate_on_start",
    "fusionauth.url",
    "fusionauth.api_key",
    "fusionauth.tenant_id",
    "fusionauth.application_id",
    "fusionauth.default_roles",
    "fusionauth.request_timeout",
    "fusionauth.max_idle_connections",
    "fusionauth.new_user_password",
    "fusionauth.delete_policy",
    "http.enabled",
    "http.listen",
    "http.body_limit",
    "http.request_timeout",
    "hasura.secret_header",
    "hasura.secret",
    "webhook.hmac_secret",
    "webhook.jwks_url",
    "webhook.basic_username",
    "webhook.basic_password",
    "webhook.header_name",
    "webhook.header_value",
    "webhook.allow_unauthenticated",
    "sources.postgres_triggers",
    "sources.hasura",
    "sources.fusionauth_webhooks",
    "worker.enabled",
    "worker.concurrency",
    "worker.batch_size",
    "worker.max_attempts",
    "worker.lease",
    "worker.poll_interval",
    "worker.shutdown_timeout",
    "worker.breaker_threshold",
    "worker.breaker_cooldown",
    "retry.initial",
    "retry.max",
    "retry.multiplier",
    "retry.in_attempt_max_elapsed",
    "users.table",
    "users.id_column",
    "users.on_fusionauth_delete",
    "organizations.enabled",
    "organizations.table",
    "organizations.id_column",
    "organizations.name_column",
    "organizations.data_columns",
    "organizations.group_name_template",
    "memberships.enabled",
    "memberships.table",
    "memberships.organization_column",
    "memberships.user_column",
    "memberships.role_column",
    "memberships.data_columns",
    "memberships.mode",
    "reconcile.interval",
    "reconcile.page_size",
    "retention.done_after",
    "retention.interval",
    "retention.batch_size",
    "log.format",
    "log.level",
];
const KNOWN_PREFIXES: &[&str] = &["users.columns."];

/// Reads keys one by one, collecting every problem instead of stopping at the first.
struct Reader {
    cfg: config::Config,
    problems: Vec<String>,
}

fn env_name(key: &str) -> String {
    format!("FUSIONSYNC__{}", key.replace('.', "__").to_uppercase())
}

impl Reader {
    fn raw(&mut self, key: &str) -> Option<String> {
        match self.cfg.get::<config::Value>(key) {
            Ok(v) => match v.kind {
                config::ValueKind::Nil => None,
                config::ValueKind::Array(_) | config::ValueKind::Table(_) => {
                    self.problems.push(format!(
                        "{key}: expected a single value, found a list or table"
                    ));
                    None
                }
                _ => v.into_string().ok(),
            },
            Err(_) => None,
        }
    }

    fn problem(&mut self, key: &str, msg: impl fmt::Display) {
        self.problems
            .push(format!("{key} (env {}): {msg}", env_name(key)));
    }

    fn string(&mut self, key: &str, default: &str) -> String {
        self.raw(key).unwrap_or_else(|| default.to_string())
    }

    fn opt_string(&mut self, key: &str) -> Option<String> {
        self.raw(key).filter(|s| !s.trim().is_empty())
    }

    fn secret(&mut self, key: &str) -> Option<Secret> {
        self.opt_string(key).map(Secret)
    }

    fn bool(&mut self, key: &str, default: bool) -> bool {
        match self.raw(key) {
            None => default,
            Some(v) => match v.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                other => {
                    self.problem(key, format!("expected true or false, got '{other}'"));
                    default
                }
            },
        }
    }

    fn number<T>(&mut self, key: &str, default: T, min: T, max: T) -> T
    where
        T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
    {
        match self.raw(key) {
            None => default,
            Some(v) => match v.trim().parse::<T>() {
                Ok(n) if n >= min && n <= max => n,
                Ok(n) => {
                    self.problem(key, format!("{n} is out of range ({min} to {max})"));
                    default
                }
                Err(_) => {
                    self.problem(key, format!("expected a number, got '{v}'"));
                    default
                }
            },
        }
    }

    fn duration(&mut self, key: &str, default: &str) -> Duration {
        let v = self.string(key, default);
        match parse_duration(&v) {
            Ok(d) => d,
            Err(e) => {
                self.problem(key, e);
                parse_duration(default).unwrap_or_default()
            }
        }
    }

    fn opt_duration(&mut self, key: &str) -> Option<Duration> {
        let v = self.opt_string(key)?;
        if matches!(v.trim(), "off" | "0" | "none") {
            return None;
        }
        match parse_duration(&v) {
            Ok(d) if d.is_zero() => None,
            Ok(d) => Some(d),
            Err(e) => {
                self.problem(key, e);
                None
            }
        }
    }

    fn uuid(&mut self, key: &str) -> Option<Uuid> {
        let v = self.opt_string(key)?;
        match Uuid::parse_str(v.trim()) {
            Ok(u) => Some(u),
            Err(_) => {
                self.problem(key, format!("'{v}' is not a UUID"));
                None
            }
        }
    }

    fn list(&mut self, key: &str) -> Vec<String> {
        match self.cfg.get::<config::Value>(key) {
            Ok(v) => match v.kind {
                config::ValueKind::Array(items) => items
                    .into_iter()
                    .filter_map(|i| i.into_string().ok())
                    .collect(),
                config::ValueKind::Nil => Vec::new(),
                _ => v
                    .into_string()
                    .unwrap_or_default()
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect(),
            },
            Err(_) => Vec::new(),
        }
    }

    fn one_of<T: Copy>(&mut self, key: &str, default: T, options: &[(&str, T)]) -> T {
        match self.raw(key) {
            None => default,
            Some(v) => {
                let wanted = v.trim().to_ascii_lowercase().replace('-', "_");
                match options.iter().find(|(name, _)| *name == wanted) {
                    Some((_, t)) => *t,
                    None => {
                        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
                        self.problem(key, format!("'{v}' is not one of: {}", names.join(", ")));
                        default
                    }
                }
            }
        }
    }

    fn table(&mut self, key: &str, default: &str) -> TableName {
        let v = self.string(key, default);
        match TableName::parse(&v) {
            Ok(t) => t,
            Err(e) => {
                self.problem(key, e);
                TableName::parse(default).expect("defaults are valid table names")
            }
        }
    }

    fn column(&mut self, key: &str, default: &str) -> String {
        let v = self.string(key, default);
        match check_identifier(&v) {
            Ok(()) => v,
            Err(e) => {
                self.problem(key, e);
                default.to_string()
            }
        }
    }

    fn columns(&mut self, key: &str) -> Vec<String> {
        let cols = self.list(key);
        let mut ok = Vec::new();
        for c in cols {
            match check_identifier(&c) {
                Ok(()) => ok.push(c),
                Err(e) => self.problem(key, e),
            }
        }
        ok
    }
}

/// Parses `500ms`, `10s`, `5m`, `2h`, `7d` (and combinations humantime understands).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("'{s}' is not a duration like 500ms, 10s, 5m ({e})"))
}

/// Flattens a config tree into dotted keys, to find keys nobody reads (typos).
fn flatten(prefix: &str, value: &config::Value, out: &mut BTreeSet<String>) {
    match &value.kind {
        config::ValueKind::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        _ => {
            out.insert(prefix.to_string());
        }
    }
}

impl Config {
    /// Loads from an optional file (an explicitly named file must exist; the default
    /// `fusionsync.toml` is read only if present) and the environment.
    pub fn load(path: Option<&Path>, needs: Needs) -> Result<Self, ConfigError> {
        Self::load_from(path, needs, std::env::vars().collect())
    }

    /// As [`Config::load`], with the environment given explicitly (tests).
    pub fn load_from(
        path: Option<&Path>,
        needs: Needs,
        env: BTreeMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        match path {
            Some(p) => {
                if !p.exists() {
                    return Err(ConfigError {
                        problems: vec![format!("config file {} does not exist", p.display())],
                    });
                }
                builder = builder.add_source(
                    config::File::from(p.to_path_buf()).format(config::FileFormat::Toml),
                );
            }
            None => {
                builder = builder.add_source(
                    config::File::with_name("fusionsync.toml")
                        .format(config::FileFormat::Toml)
                        .required(false),
                );
            }
        }
        let env_map: config::Map<String, String> = env
            .iter()
            .filter(|(k, _)| k.starts_with("FUSIONSYNC__"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("FUSIONSYNC")
                .prefix_separator("__")
                .separator("__")
                .source(Some(env_map)),
        );
        // The conventional variables win over nothing but defaults: a key set in the file or as
        // FUSIONSYNC__… is more specific, so only fill them in when that key is unset.
        let cfg = builder.build().map_err(|e| ConfigError {
            problems: vec![format!("cannot read configuration: {e}")],
        })?;
        let mut r = Reader {
            cfg,
            problems: Vec::new(),
        };

        let mut all_keys = BTreeSet::new();
        if let Ok(table) = r
            .cfg
            .clone()
            .try_deserialize::<config::Map<String, config::Value>>()
        {
            for (k, v) in &table {
                flatten(k, v, &mut all_keys);
            }
        }
        for key in &all_keys {
            if key.is_empty() {
                continue;
            }
            let known = KNOWN_KEYS.contains(&key.as_str())
                || KNOWN_PREFIXES.iter().any(|p| key.starts_with(p));
            if !known {
                r.problems.push(format!(
                    "{key}: unknown key (env {}); see fusionsync.example.toml for the keys",
                    env_name(key)
                ));
            }
        }

        let conventional = |name: &str| env.get(name).filter(|v| !v.trim().is_empty()).cloned();

        // database
        let db_url = r
            .opt_string("database.url")
            .or_else(|| conventional("DATABASE_URL"));
        let db_url = match db_url {
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => Secret(u),
            Some(_) => {
                r.problem(
                    "database.url",
                    "must be a postgres:// or postgresql:// URL (also read from DATABASE_URL)",
                );
                Secret(String::new())
            }
            None => {
                r.problem(
                    "database.url",
                    "is required (set DATABASE_URL or FUSIONSYNC__DATABASE__URL)",
                );
                Secret(String::new())
            }
        };
        let database = DatabaseSettings {
            url: db_url,
            max_connections: r.number("database.max_connections", 10u32, 2, 1000),
            acquire_timeout: r.duration("database.acquire_timeout", "3s"),
            migrate_on_start: r.bool("database.migrate_on_start", true),
        };

        // fusionauth
        let fa_url = r
            .opt_string("fusionauth.url")
            .or_else(|| conventional("FUSIONAUTH_URL"));
        let fa_key = r
            .secret("fusionauth.api_key")
            .or_else(|| conventional("FUSIONAUTH_API_KEY").map(Secret));
        let fa_url = match fa_url {
            Some(u) => {
                let trimmed = u.trim().trim_end_matches('/').to_string();
                match reqwest::Url::parse(&trimmed) {
                    Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => trimmed,
                    _ => {
                        r.problem("fusionauth.url", format!("'{u}' is not an http(s) URL"));
                        String::new()
                    }
                }
            }
            None => {
                if needs == Needs::DatabaseAndFusionAuth {
                    r.problem(
                        "fusionauth.url",
                        "is required (set FUSIONAUTH_URL or FUSIONSYNC__FUSIONAUTH__URL)",
                    );
                }
                String::new()
            }
        };
        if fa_key.is_none() && needs == Needs::DatabaseAndFusionAuth {
            r.problem(
                "fusionauth.api_key",
                "is required (set FUSIONAUTH_API_KEY or FUSIONSYNC__FUSIONAUTH__API_KEY)",
            );
        }
        let fusionauth = FusionAuthSettings {
            url: fa_url,
            api_key: fa_key.unwrap_or_else(|| Secret(String::new())),
            tenant_id: r.uuid("fusionauth.tenant_id"),
            application_id: r.uuid("fusionauth.application_id"),
            default_roles: r.list("fusionauth.default_roles"),
            request_timeout: r.duration("fusionauth.request_timeout", "10s"),
            max_idle_connections: r.number("fusionauth.max_idle_connections", 64usize, 1, 4096),
            new_user_password: r.one_of(
                "fusionauth.new_user_password",
                NewUserPassword::SendSetPasswordEmail,
                &[
                    (
                        "send_set_password_email",
                        NewUserPassword::SendSetPasswordEmail,
                    ),
                    ("none", NewUserPassword::None),
                    ("random", NewUserPassword::Random),
                ],
            ),
            delete_policy: r.one_of(
                "fusionauth.delete_policy",
                DeletePolicy::Deactivate,
                &[
                    ("deactivate", DeletePolicy::Deactivate),
                    ("hard_delete", DeletePolicy::HardDelete),
                ],
            ),
        };

        // http
        let listen_s = r.string("http.listen", "0.0.0.0:8080");
        let listen = match listen_s.trim().parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                r.problem(
                    "http.listen",
                    format!("'{listen_s}' is not an address like 0.0.0.0:8080"),
                );
                SocketAddr::from(([0, 0, 0, 0], 8080))
            }
        };
        let http = HttpSettings {
            enabled: r.bool("http.enabled", true),
            listen,
            body_limit: r.number("http.body_limit", 1024 * 1024usize, 1024, 64 * 1024 * 1024),
            request_timeout: r.duration("http.request_timeout", "10s"),
        };

        let hasura = HasuraSettings {
            secret_header: r.string("hasura.secret_header", "X-Fusionsync-Secret"),
            secret: r.secret("hasura.secret"),
        };
        if axum::http::HeaderName::from_bytes(hasura.secret_header.as_bytes()).is_err() {
            r.problem("hasura.secret_header", "is not a valid HTTP header name");
        }

        let webhook = WebhookSettings {
            hmac_secret: r.secret("webhook.hmac_secret"),
            jwks_url: r.opt_string("webhook.jwks_url"),
            basic_username: r.opt_string("webhook.basic_username"),
            basic_password: r.secret("webhook.basic_password"),
            header_name: r.opt_string("webhook.header_name"),
            header_value: r.secret("webhook.header_value"),
            allow_unauthenticated: r.bool("webhook.allow_unauthenticated", false),
        };
        if webhook.header_value.is_some() != webhook.header_name.is_some() {
            r.problem(
                "webhook.header_name",
                "webhook.header_name and webhook.header_value go together",
            );
        }
        if let Some(name) = &webhook.header_name {
            if axum::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                r.problem("webhook.header_name", "is not a valid HTTP header name");
            }
        }
        if webhook.basic_password.is_some() != webhook.basic_username.is_some() {
            r.problem(
                "webhook.basic_username",
                "webhook.basic_username and webhook.basic_password go together",
            );
        }
        if let Some(u) = &webhook.jwks_url {
            if reqwest::Url::parse(u).is_err() {
                r.problem("webhook.jwks_url", format!("'{u}' is not a URL"));
            }
        }

        let sources = SourcesSettings {
            postgres_triggers: r.bool("sources.postgres_triggers", true),
            hasura: r.bool("sources.hasura", true),
            fusionauth_webhooks: r.bool("sources.fusionauth_webhooks", true),
        };

        let worker = WorkerSettings {
            enabled: r.bool("worker.enabled", true),
            concurrency: r.number("worker.concurrency", 32usize, 1, 4096),
            batch_size: r.number("worker.batch_size", 200usize, 1, 10_000),
            max_attempts: r.number("worker.max_attempts", 12i32, 1, 1000),
            lease: r.duration("worker.lease", "60s"),
            poll_interval: r.duration("worker.poll_interval", "1s"),
            shutdown_timeout: r.duration("worker.shutdown_timeout", "20s"),
            breaker_threshold: r.number("worker.breaker_threshold", 5u32, 1, 10_000),
            breaker_cooldown: r.duration("worker.breaker_cooldown", "5s"),
        };
        if worker.lease < Duration::from_secs(1) {
            r.problem("worker.lease", "must be at least 1s");
        }
        if worker.poll_interval < Duration::from_millis(10) {
            r.problem("worker.poll_interval", "must be at least 10ms");
        }

        let retry = RetrySettings {
            initial: r.duration("retry.initial", "1s"),
            max: r.duration("retry.max", "10m"),
            multiplier: r.number("retry.multiplier", 2.0f64, 1.0, 100.0),
            in_attempt_max_elapsed: r.duration("retry.in_attempt_max_elapsed", "5s"),
        };
        if retry.initial > retry.max {
            r.problem("retry.initial", "must not be larger than retry.max");
        }
        if retry.in_attempt_max_elapsed + fusionauth.request_timeout >= worker.lease {
            r.problem(
                "worker.lease",
                format!(
                    "must be longer than fusionauth.request_timeout + retry.in_attempt_max_elapsed ({}), or a slow attempt could outlive its lease",
                    humantime::format_duration(retry.in_attempt_max_elapsed + fusionauth.request_timeout)
                ),
            );
        }

        // users
        let users_table = r.table("users.table", "public.users");
        let id_column = r.column("users.id_column", "id");
        let mut fields = BTreeMap::new();
        let mut explicit_fields = BTreeSet::new();
        for key in &all_keys {
            if let Some(f) = key.strip_prefix("users.columns.") {
                if let Some((name, _)) = USER_FIELDS.iter().find(|(n, _)| n.eq_ignore_ascii_case(f))
                {
                    explicit_fields.insert(name.to_string());
                }
            }
        }
        for (field, default_col) in USER_FIELDS {
            let key = format!("users.columns.{field}");
            let explicit = r.raw(&key);
            let col = match explicit {
                Some(c) if c.trim().is_empty() || c.trim() == "-" => None,
                Some(c) => match check_identifier(c.trim()) {
                    Ok(()) => Some(c.trim().to_string()),
                    Err(e) => {
                        r.problem(&key, e);
                        None
                    }
                },
                None if DEFAULT_USER_FIELDS.contains(field) => Some(default_col.to_string()),
                None => None,
            };
            if let Some(c) = col {
                fields.insert(field.to_string(), c);
            }
        }
        for key in &all_keys {
            if let Some(field) = key.strip_prefix("users.columns.") {
                if !USER_FIELDS
                    .iter()
                    .any(|(f, _)| f.eq_ignore_ascii_case(field))
                {
                    let names: Vec<&str> = USER_FIELDS.iter().map(|(f, _)| *f).collect();
                    r.problems.push(format!(
                        "{key}: '{field}' is not a FusionAuth user field fusionsync maps (one of: {})",
                        names.join(", ")
                    ));
                }
            }
        }
        // The config crate lowercases keys; accept `users.columns.firstname` for `firstName`.
        for (field, _) in USER_FIELDS {
            let lower = field.to_ascii_lowercase();
            if lower != *field {
                let key = format!("users.columns.{lower}");
                if let Some(c) = r.raw(&key) {
                    if c.trim().is_empty() || c.trim() == "-" {
                        fields.remove(*field);
                    } else if check_identifier(c.trim()).is_ok() {
                        fields.insert(field.to_string(), c.trim().to_string());
                    } else {
                        r.problem(&key, "is not a valid column name");
                    }
                }
            }
        }
        if !fields.contains_key("email") && !fields.contains_key("username") {
            r.problems.push(
                "users.columns: FusionAuth needs an email or a username; map users.columns.email or users.columns.username".into(),
            );
        }
        let users = UsersSettings {
            table: users_table,
            columns: UserColumns {
                id: id_column,
                fields,
                explicit: explicit_fields,
            },
            on_fusionauth_delete: r.one_of(
                "users.on_fusionauth_delete",
                FusionAuthDeletePolicy::Delete,
                &[
                    ("delete", FusionAuthDeletePolicy::Delete),
                    ("deactivate", FusionAuthDeletePolicy::Deactivate),
                ],
            ),
        };

        let organizations = OrganizationsSettings {
            enabled: r.bool("organizations.enabled", true),
            table: r.table("organizations.table", "public.organizations"),
            id_column: r.column("organizations.id_column", "id"),
            name_column: r.column("organizations.name_column", "name"),
            data_columns: match r.cfg.get::<config::Value>("organizations.data_columns") {
                Ok(v) if !matches!(v.kind, config::ValueKind::Nil) => {
                    r.columns("organizations.data_columns")
                }
                _ => vec!["slug".to_string(), "data".to_string()],
            },
            group_name_template: r.string("organizations.group_name_template", "{name}"),
            explicit: all_keys.iter().any(|k| k.starts_with("organizations.")),
        };
        if !organizations.group_name_template.contains("{name}")
            && !organizations.group_name_template.contains("{id}")
            && !organizations.group_name_template.contains("{slug}")
        {
            r.problem(
                "organizations.group_name_template",
                "must contain {name}, {id} or {slug}",
            );
        }

        let memberships = MembershipsSettings {
            enabled: r.bool("memberships.enabled", true),
            table: r.table("memberships.table", "public.organization_members"),
            organization_column: r.column("memberships.organization_column", "organization_id"),
            user_column: r.column("memberships.user_column", "user_id"),
            role_column: {
                let v = r.string("memberships.role_column", "role");
                if v.trim().is_empty() || v.trim() == "-" {
                    None
                } else {
                    match check_identifier(&v) {
                        Ok(()) => Some(v),
                        Err(e) => {
                            r.problem("memberships.role_column", e);
                            None
                        }
                    }
                }
            },
            data_columns: r.columns("memberships.data_columns"),
            mode: r.one_of(
                "memberships.mode",
                MembershipMode::Database,
                &[
                    ("database", MembershipMode::Database),
                    ("two_way", MembershipMode::TwoWay),
                ],
            ),
            explicit: all_keys.iter().any(|k| k.starts_with("memberships.")),
        };
        if memberships.enabled && !organizations.enabled {
            r.problem(
                "memberships.enabled",
                "memberships need organizations.enabled = true (members belong to groups)",
            );
        }

        let reconcile = ReconcileSettings {
            interval: r.opt_duration("reconcile.interval"),
            page_size: r.number("reconcile.page_size", 500usize, 1, 10_000),
        };
        let retention = RetentionSettings {
            done_after: r.duration("retention.done_after", "7d"),
            interval: r.duration("retention.interval", "5m"),
            batch_size: r.number("retention.batch_size", 5000i64, 1, 1_000_000),
        };
        let log = LogSettings {
            format: r.one_of(
                "log.format",
                LogFormat::Human,
                &[("human", LogFormat::Human), ("json", LogFormat::Json)],
            ),
            level: r.string("log.level", "info"),
        };

        if !r.problems.is_empty() {
            return Err(ConfigError {
                problems: r.problems,
            });
        }
        Ok(Config {
            database,
            fusionauth,
            http,
            hasura,
            webhook,
            sources,
            worker,
            retry,
            users,
            organizations,
            memberships,
            reconcile,
            retention,
            log,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn base() -> Vec<(&'static str, &'static str)> {
        vec![
            ("DATABASE_URL", "postgres://u:pw@localhost/db"),
            ("FUSIONAUTH_URL", "http://localhost:9011/"),
            ("FUSIONAUTH_API_KEY", "super-secret-key"),
        ]
    }

    #[test]
    fn conventional_variables_are_enough() {
        let c = Config::load_from(None, Needs::DatabaseAndFusionAuth, env(&base())).unwrap();
        assert_eq!(c.fusionauth.url, "http://localhost:9011");
        assert_eq!(c.worker.max_attempts, 12);
        assert_eq!(c.users.table.quoted(), "\"public\".\"users\"");
        assert_eq!(
            c.users.columns.fields.get("firstName").unwrap(),
            "first_name"
        );
        assert_eq!(c.http.listen.port(), 8080);
    }

    #[test]
    fn sectioned_environment_overrides_defaults() {
        let mut e = base();
        e.push(("FUSIONSYNC__WORKER__CONCURRENCY", "7"));
        e.push(("FUSIONSYNC__WORKER__POLL_INTERVAL", "250ms"));
        e.push(("FUSIONSYNC__USERS__TABLE", "app.people"));
        let c = Config::load_from(None, Needs::DatabaseAndFusionAuth, env(&e)).unwrap();
        assert_eq!(c.worker.concurrency, 7);
        assert_eq!(c.worker.poll_interval, Duration::from_millis(250));
        assert_eq!(c.users.table.to_string(), "app.people");
    }

    #[test]
    fn every_problem_is_reported_at_once_naming_the_key() {
        let e = env(&[
            ("FUSIONSYNC__WORKER__CONCURRENCY", "lots"),
            ("FUSIONSYNC__RETRY__INITIAL", "soon"),
            ("FUSIONSYNC__FUSIONAUTH__TENANT_ID", "not-a-uuid"),
        ]);
        let err = Config::load_from(None, Needs::DatabaseAndFusionAuth, e).unwrap_err();
        let text = err.to_string();
        for key in [
            "worker.concurrency",
            "retry.initial",
            "fusionauth.tenant_id",
            "database.url",
            "fusionauth.url",
            "fusionauth.api_key",
        ] {
            assert!(text.contains(key), "{key} missing from: {text}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let mut e = base();
        e.push(("FUSIONSYNC__WORKER__CONCURENCY", "3"));
        let err = Config::load_from(None, Needs::DatabaseAndFusionAuth, env(&e)).unwrap_err();
        assert!(err.to_string().contains("worker.concurency: unknown key"));
    }

    #[test]
    fn admin_commands_need_only_the_database() {
        let e = env(&[("DATABASE_URL", "postgres://localhost/db")]);
        assert!(Config::load_from(None, Needs::Database, e.clone()).is_ok());
        assert!(Config::load_from(None, Needs::DatabaseAndFusionAuth, e).is_err());
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let c = Config::load_from(None, Needs::DatabaseAndFusionAuth, env(&base())).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("super-secret-key"));
        assert!(!dbg.contains(":pw@"));
    }

    #[test]
    fn table_names_with_quotes_are_refused() {
        assert!(TableName::parse("public.users\"; drop table x; --").is_err());
        assert!(TableName::parse("users").is_ok());
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }

    #[test]
    fn a_user_field_can_be_unmapped() {
        let mut e = base();
        e.push(("FUSIONSYNC__USERS__COLUMNS__DATA", "-"));
        let c = Config::load_from(None, Needs::DatabaseAndFusionAuth, env(&e)).unwrap();
        assert!(!c.users.columns.fields.contains_key("data"));
    }
}

#[cfg(test)]
mod example_file {
    use super::*;

    /// The shipped example documents every key and loads as it is.
    #[test]
    fn the_example_file_loads_and_names_every_key() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fusionsync.example.toml");
        let env: BTreeMap<String, String> = [
            ("DATABASE_URL", "postgres://localhost/db"),
            ("FUSIONAUTH_URL", "http://localhost:9011"),
            ("FUSIONAUTH_API_KEY", "k"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let c = Config::load_from(Some(&path), Needs::DatabaseAndFusionAuth, env).unwrap();
        assert_eq!(c.worker.concurrency, 32);
        assert_eq!(
            c.users.columns.fields.get("firstName").map(String::as_str),
            Some("first_name")
        );
        let text = std::fs::read_to_string(&path).unwrap();
        for key in KNOWN_KEYS {
            let (section, name) = key.split_once('.').unwrap();
            assert!(text.contains(&format!("[{section}]")), "section {section}");
            assert!(
                text.contains(&format!("{name} =")) || text.contains(&format!("# {name} =")),
                "{key} is not documented"
            );
        }
    }
}
