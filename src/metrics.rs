//! Prometheus metrics (`GET /metrics`): what was recorded and processed, FusionAuth calls,
//! latency, the circuit breaker, and queue depth read from the database at scrape time.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use sqlx::PgPool;

type Labels = Vec<(String, String)>;

pub struct Metrics {
    registry: Registry,
    events_recorded: Family<Labels, Counter>,
    events_processed: Family<Labels, Counter>,
    fusionauth_requests: Family<Labels, Counter>,
    fusionauth_duration: Histogram,
    processing_latency: Histogram,
    breaker_open: Gauge,
    queue_depth: Family<Labels, Gauge>,
    oldest_pending_age: Gauge<f64, AtomicU64>,
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("fusionsync");
        let events_recorded = Family::<Labels, Counter>::default();
        registry.register(
            "events_recorded",
            "Events recorded by this process's HTTP sources, by source and entity kind",
            events_recorded.clone(),
        );
        let events_processed = Family::<Labels, Counter>::default();
        registry.register(
            "events_processed",
            "Entities processed by this process's workers, by kind and outcome (done, retry, failed)",
            events_processed.clone(),
        );
        let fusionauth_requests = Family::<Labels, Counter>::default();
        registry.register(
            "fusionauth_requests",
            "Requests sent to FusionAuth, by endpoint, method and status",
            fusionauth_requests.clone(),
        );
        let fusionauth_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "fusionauth_request_duration_seconds",
            "Duration of FusionAuth requests",
            fusionauth_duration.clone(),
        );
        let processing_latency = Histogram::new(exponential_buckets(0.0005, 2.0, 20));
        registry.register(
            "event_latency_seconds",
            "Time from an event being recorded to its entity being in agreement",
            processing_latency.clone(),
        );
        let breaker_open = Gauge::default();
        registry.register(
            "circuit_breaker_state",
            "FusionAuth circuit breaker: 0 closed, 1 open, 2 half-open",
            breaker_open.clone(),
        );
        let queue_depth = Family::<Labels, Gauge>::default();
        registry.register(
            "queue_depth",
            "Events in the queue by state (read from the database at scrape time)",
            queue_depth.clone(),
        );
        let oldest_pending_age = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "oldest_pending_age_seconds",
            "Age of the oldest pending event",
            oldest_pending_age.clone(),
        );
        Self {
            registry,
            events_recorded,
            events_processed,
            fusionauth_requests,
            fusionauth_duration,
            processing_latency,
            breaker_open,
            queue_depth,
            oldest_pending_age,
        }
    }

    pub fn recorded(&self, source: &str, kind: &str, n: u64) {
        self.events_recorded
            .get_or_create(&labels(&[("source", source), ("kind", kind)]))
            .inc_by(n);
    }

    pub fn processed(&self, kind: &str, outcome: &str) {
        self.events_processed
            .get_or_create(&labels(&[("kind", kind), ("outcome", outcome)]))
            .inc();
    }

    pub fn fusionauth_request(&self, endpoint: &str, method: &str, status: &str, took: Duration) {
        self.fusionauth_requests
            .get_or_create(&labels(&[
                ("endpoint", endpoint),
                ("method", method),
                ("status", status),
            ]))
            .inc();
        self.fusionauth_duration.observe(took.as_secs_f64());
    }

    pub fn latency(&self, took: Duration) {
        self.processing_latency.observe(took.as_secs_f64());
    }

    pub fn breaker_state(&self, state: i64) {
        self.breaker_open.set(state);
    }

    /// Reads queue depth and the oldest pending age from the database, then encodes.
    pub async fn render(&self, pool: &PgPool) -> String {
        if let Ok(rows) = sqlx::query_as::<_, (String, i64)>(
            "select state, count(*) from fusionsync.event group by state",
        )
        .fetch_all(pool)
        .await
        {
            for state in ["pending", "processing", "done", "failed"] {
                let n = rows
                    .iter()
                    .find(|(s, _)| s == state)
                    .map(|(_, n)| *n)
                    .unwrap_or(0);
                self.queue_depth
                    .get_or_create(&labels(&[("state", state)]))
                    .set(n);
            }
        }
        if let Ok(age) = sqlx::query_scalar::<_, Option<f64>>(
            "select extract(epoch from now() - min(created_at))::float8
               from fusionsync.event where state = 'pending'",
        )
        .fetch_one(pool)
        .await
        {
            self.oldest_pending_age.set(age.unwrap_or(0.0));
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
