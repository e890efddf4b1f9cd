//! The FusionAuth client's error: knows whether a failure is worth retrying.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct ErrorItem {
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub message: String,
}

/// FusionAuth's error body: `generalErrors` and `fieldErrors` keyed by field name.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Errors {
    #[serde(default)]
    pub general_errors: Vec<ErrorItem>,
    #[serde(default)]
    pub field_errors: BTreeMap<String, Vec<ErrorItem>>,
}

impl Errors {
    pub fn has_code(&self, code: &str) -> bool {
        self.general_errors.iter().any(|e| e.code == code)
            || self.field_errors.values().flatten().any(|e| e.code == code)
    }
    pub fn has_field(&self, field: &str) -> bool {
        self.field_errors.contains_key(field)
    }
    pub fn summary(&self) -> String {
        let mut parts: Vec<String> = self
            .general_errors
            .iter()
            .map(|e| format!("{} {}", e.code, e.message))
            .collect();
        for (field, items) in &self.field_errors {
            for e in items {
                parts.push(format!("{field}: {} {}", e.code, e.message));
            }
        }
        parts.join("; ")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FusionAuthError {
    #[error("cannot reach FusionAuth ({method} {path}): {message}")]
    Transport {
        method: String,
        path: String,
        message: String,
    },
    #[error("FusionAuth did not answer {method} {path} within the request timeout")]
    Timeout { method: String, path: String },
    #[error("FusionAuth answered {status} to {method} {path}{}", describe(.errors, .body))]
    Status {
        method: String,
        path: String,
        status: u16,
        errors: Box<Errors>,
        body: String,
        retry_after: Option<Duration>,
    },
    #[error("FusionAuth sent a response fusionsync cannot read ({method} {path}): {message}")]
    Decode {
        method: String,
        path: String,
        message: String,
    },
}

fn describe(errors: &Errors, body: &str) -> String {
    let s = errors.summary();
    if !s.is_empty() {
        format!(": {s}")
    } else if !body.trim().is_empty() {
        let short: String = body.chars().take(300).collect();
        format!(": {short}")
    } else {
        String::new()
    }
}

impl FusionAuthError {
    /// Transport failures, timeouts, 429 and 500/502/503/504 are worth trying again.
    pub fn is_retryable(&self) -> bool {
        match self {
            FusionAuthError::Transport { .. } | FusionAuthError::Timeout { .. } => true,
            FusionAuthError::Status { status, .. } => {
                matches!(status, 429 | 500 | 502 | 503 | 504)
            }
            FusionAuthError::Decode { .. } => false,
        }
    }

    /// Failures that say FusionAuth as a whole is unavailable (feed the circuit breaker).
    pub fn is_unavailable(&self) -> bool {
        match self {
            FusionAuthError::Transport { .. } | FusionAuthError::Timeout { .. } => true,
            FusionAuthError::Status { status, .. } => matches!(status, 502 | 503 | 504 | 500),
            FusionAuthError::Decode { .. } => false,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            FusionAuthError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn errors(&self) -> Option<&Errors> {
        match self {
            FusionAuthError::Status { errors, .. } => Some(errors),
            _ => None,
        }
    }

    pub fn has_code(&self, code: &str) -> bool {
        self.errors().is_some_and(|e| e.has_code(code))
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            FusionAuthError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_error_body() {
        let body = r#"{"generalErrors":[{"code":"[invalid]","message":"Your JSON was invalid"}],
            "fieldErrors":{"user.username":[{"code":"[duplicate]user.username","message":"A User with username = [neo] already exists."}]}}"#;
        let e: Errors = serde_json::from_str(body).unwrap();
        assert!(e.has_code("[duplicate]user.username"));
        assert!(e.has_field("user.username"));
        assert!(e
            .summary()
            .contains("A User with username = [neo] already exists."));
    }

    #[test]
    fn retryable_statuses() {
        let mk = |status| FusionAuthError::Status {
            method: "GET".into(),
            path: "/api/user".into(),
            status,
            errors: Box::default(),
            body: String::new(),
            retry_after: None,
        };
        for s in [429, 500, 502, 503, 504] {
            assert!(mk(s).is_retryable(), "{s}");
        }
        for s in [400, 401, 403, 404, 409] {
            assert!(!mk(s).is_retryable(), "{s}");
        }
    }
}
