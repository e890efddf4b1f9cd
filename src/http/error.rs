//! One error type for every handler, mapped to a status code and a small JSON body in one
//! place. A 5xx never shows internals; the cause goes to the log.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tracing::{error, warn};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// The JSON path of the offending field, when there is one.
    pub path: Option<String>,
    pub retry_after: Option<Duration>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            path: None,
            retry_after: None,
        }
    }

    pub fn bad_request(path: impl Into<String>, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::BAD_REQUEST, "invalid_request", message);
        e.path = Some(path.into());
        e
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than http.body_limit ({limit} bytes)"),
        )
    }

    /// A database failure: 503 with Retry-After when the database is unreachable (the
    /// sender retries), 500 otherwise.
    pub fn database(e: &sqlx::Error) -> Self {
        if crate::db::is_unavailable(e) {
            warn!(error = %e, "database unavailable; asking the sender to retry");
            let mut err = Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unavailable",
                "the database is unavailable; retry later",
            );
            err.retry_after = Some(Duration::from_secs(5));
            err
        } else {
            error!(error = %e, "database error while recording an event");
            Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "could not record the event",
            )
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.code, "message": self.message });
        if let Some(p) = &self.path {
            body["path"] = json!(p);
        }
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(ra) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&ra.as_secs().max(1).to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

pub async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; fusionsync serves POST /hasura/events, POST /fusionauth/webhook, GET /healthz, GET /readyz, GET /metrics",
    )
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "wrong method: events are POSTed, health and metrics are read with GET",
    )
}
