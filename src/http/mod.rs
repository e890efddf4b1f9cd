//! The HTTP listener: Hasura event triggers, FusionAuth webhooks, health and metrics. Every
//! source only records an event (one INSERT, committed) and answers; nothing is processed
//! inside a request.

pub mod error;
pub mod fusionauth_webhook;
pub mod hasura;
pub mod health;
pub mod ingest;
pub mod signature;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderMap};
use axum::routing::{get, post};
use axum::Router;
use sqlx::PgPool;

use crate::config::Config;
use crate::db::app::AppTables;
use crate::metrics::Metrics;
pub use error::ApiError;

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub cfg: Arc<Config>,
    pub tables: Arc<AppTables>,
    pub metrics: Arc<Metrics>,
    /// Whether the LISTEN connection is up (for /readyz); None when no worker runs here.
    pub listening: Option<Arc<AtomicBool>>,
    pub jwks: Arc<signature::JwksCache>,
    pub ingest: ingest::Ingest,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/hasura/events", post(hasura::receive))
        .route("/fusionauth/webhook", post(fusionauth_webhook::receive))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        // Bodies are read (with their own limit and timeout) by `read_body`.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// Reads a request body with the configured size limit and a deadline (a client that sends
/// its body too slowly gets 408, not a worker held forever).
pub async fn read_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Bytes, ApiError> {
    let limit = state.cfg.http.body_limit;
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if len > limit {
            return Err(ApiError::too_large(limit));
        }
    }
    match tokio::time::timeout(
        state.cfg.http.request_timeout,
        axum::body::to_bytes(body, limit),
    )
    .await
    {
        Err(_) => Err(ApiError::new(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request body did not arrive in time",
        )),
        Ok(Err(e)) => {
            let too_big = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || e.to_string().contains("length limit");
            if too_big {
                Err(ApiError::too_large(limit))
            } else {
                Err(ApiError::bad_request(
                    "body",
                    format!("could not read the request body: {e}"),
                ))
            }
        }
        Ok(Ok(b)) => Ok(b),
    }
}

/// Records a source's events (group-committed) and answers with what happened.
pub async fn record(
    state: &AppState,
    source: &str,
    events: Vec<crate::db::event::NewEvent>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let kind = events.first().map(|e| e.kind.as_str()).unwrap_or("none");
    let n = state
        .ingest
        .record(events)
        .await
        .map_err(|e| ApiError::database(&e))?;
    state.metrics.recorded(source, kind, n);
    Ok(axum::Json(serde_json::json!({
        "status": if n == 0 { "duplicate" } else { "recorded" },
        "recorded": n,
    })))
}

/// Refuses content types other than JSON (a missing one is tolerated).
pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    match headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or(""))
    {
        None => Ok(()),
        Some(ct) => {
            let mime = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if mime == "application/json" || mime.ends_with("+json") || mime.is_empty() {
                Ok(())
            } else {
                Err(ApiError::new(
                    axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    format!("expected Content-Type: application/json, got '{ct}'"),
                ))
            }
        }
    }
}

/// Parses JSON, rejecting duplicate keys and absurd nesting with a clear message.
pub fn parse_json(body: &[u8]) -> Result<serde_json::Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "body",
            "the request body is empty; expected a JSON object",
        ));
    }
    // serde_json refuses nesting deeper than 128 levels by itself.
    let checked: Result<StrictValue, _> = serde_json::from_slice(body);
    match checked {
        Ok(v) => Ok(v.0),
        Err(e) => Err(ApiError::bad_request(
            "body",
            format!("body is not valid JSON: {e}"),
        )),
    }
}

/// A JSON value that refuses objects with the same key twice (an ambiguity attackers use to
/// make two parsers see different things).
struct StrictValue(serde_json::Value);

impl<'de> serde::Deserialize<'de> for StrictValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = StrictValue;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<StrictValue, E> {
                Ok(StrictValue(v.into()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<StrictValue, E> {
                Ok(StrictValue(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<StrictValue, E> {
                Ok(StrictValue(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<StrictValue, E> {
                Ok(StrictValue(
                    serde_json::Number::from_f64(v)
                        .map(serde_json::Value::Number)
                        .unwrap_or(serde_json::Value::Null),
                ))
            }
            fn visit_str<E>(self, v: &str) -> Result<StrictValue, E> {
                Ok(StrictValue(v.into()))
            }
            fn visit_string<E>(self, v: String) -> Result<StrictValue, E> {
                Ok(StrictValue(v.into()))
            }
            fn visit_unit<E>(self) -> Result<StrictValue, E> {
                Ok(StrictValue(serde_json::Value::Null))
            }
            fn visit_none<E>(self) -> Result<StrictValue, E> {
                Ok(StrictValue(serde_json::Value::Null))
            }
            fn visit_some<D2: serde::Deserializer<'de>>(
                self,
                d: D2,
            ) -> Result<StrictValue, D2::Error> {
                serde::Deserialize::deserialize(d)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<StrictValue, A::Error> {
                let mut out = Vec::new();
                while let Some(StrictValue(v)) = seq.next_element()? {
                    out.push(v);
                }
                Ok(StrictValue(serde_json::Value::Array(out)))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<StrictValue, A::Error> {
                let mut out = serde_json::Map::new();
                while let Some(key) = map.next_key::<String>()? {
                    if out.contains_key(&key) {
                        return Err(serde::de::Error::custom(format!("duplicate key '{key}'")));
                    }
                    let StrictValue(v) = map.next_value()?;
                    out.insert(key, v);
                }
                Ok(StrictValue(serde_json::Value::Object(out)))
            }
        }
        d.deserialize_any(V)
    }
}

/// Constant-time comparison of a presented secret with the configured one.
pub fn secret_matches(presented: &[u8], expected: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    // Compare digests so the lengths do not leak either.
    use sha2::{Digest, Sha256};
    let a = Sha256::digest(presented);
    let b = Sha256::digest(expected);
    a.ct_eq(&b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_keys_are_refused() {
        assert!(parse_json(br#"{"a":1,"a":2}"#).is_err());
        assert!(parse_json(br#"{"a":{"b":1},"c":[{"b":2}]}"#).is_ok());
    }

    #[test]
    fn deep_nesting_is_refused_not_a_crash() {
        let deep = "[".repeat(100_000);
        assert!(parse_json(deep.as_bytes()).is_err());
    }

    #[test]
    fn secrets_compare_in_constant_time_and_correctly() {
        assert!(secret_matches(b"abc", b"abc"));
        assert!(!secret_matches(b"abc", b"abd"));
        assert!(!secret_matches(b"", b"abc"));
    }
}
