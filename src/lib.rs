//! fusionsync keeps an application's Postgres database (the one Hasura serves) and FusionAuth
//! in agreement about users, organizations and organization memberships.
//!
//! - [`config`]: TOML + environment configuration, validated at start-up
//! - [`db`]: the durable event queue (`fusionsync.event`), entity state, the app tables
//! - [`fusionauth`]: a typed FusionAuth API client with retry classification
//! - [`sync`]: pure mapping between rows and FusionAuth objects (fingerprints)
//! - [`worker`]: claim loop, LISTEN, reconcile of users/organizations/memberships, retries
//! - [`http`]: Hasura event triggers, FusionAuth webhooks, health and metrics
//! - [`reconcile`]: the full comparison of both sides
//! - [`app`], [`cli`], [`telemetry`], [`metrics`]: the daemon and its commands
#![forbid(unsafe_code)]

pub mod app;
pub mod cli;
pub mod config;
pub mod db;
pub mod fusionauth;
pub mod http;
pub mod metrics;
pub mod reconcile;
pub mod sync;
pub mod telemetry;
pub mod worker;
