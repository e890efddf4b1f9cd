//! `/healthz` (the process answers), `/readyz` (database reachable, LISTEN connected,
//! migrations applied) and `/metrics` (Prometheus text).

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::AppState;

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

pub async fn readyz(State(state): State<AppState>) -> Response {
    let mut reasons = Vec::new();
    let db = tokio::time::timeout(
        Duration::from_secs(2),
        crate::db::migrations_applied(&state.pool),
    )
    .await;
    match db {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            reasons.push("migrations are not applied (run fusionsync migrate)".to_string())
        }
        Ok(Err(e)) => reasons.push(format!("database unreachable: {e}")),
        Err(_) => reasons.push("database did not answer within 2s".to_string()),
    }
    if let Some(l) = &state.listening {
        if !l.load(Ordering::SeqCst) {
            reasons.push("LISTEN connection is not up (workers fall back to polling)".to_string());
        }
    }
    if reasons.is_empty() {
        (StatusCode::OK, Json(json!({ "status": "ready" }))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not_ready", "reasons": reasons })),
        )
            .into_response()
    }
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    let body = state.metrics.render(&state.pool).await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
