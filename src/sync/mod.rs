//! Pure mapping between database rows and FusionAuth objects: no IO, no async. What "in
//! agreement" means lives here, as fingerprints of the mapped state.

pub mod membership;
pub mod organization;
pub mod user;

use serde_json::Value;
use sha2::{Digest, Sha256};

/// The fingerprint stored for an entity that no longer exists on either side.
pub const DELETED: &str = "deleted";

/// A stable hash of a JSON value: serde_json's default map keeps keys sorted, so equal values
/// always serialize the same way.
pub fn hash_json(v: &Value) -> String {
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    let digest = Sha256::digest(&bytes);
    hex::encode(&digest[..16])
}

/// Strings that are empty or only whitespace count as absent (FusionAuth does the same).
pub(crate) fn normalize(v: Option<&Value>) -> Value {
    match v {
        None | Some(Value::Null) => Value::Null,
        Some(Value::String(s)) if s.trim().is_empty() => Value::Null,
        Some(Value::Object(m)) if m.is_empty() => Value::Null,
        Some(v) => v.clone(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    #[error("{0}")]
    Invalid(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hash_ignores_key_order() {
        let a: Value = serde_json::from_str(r#"{"a":1,"b":{"y":2,"x":1}}"#).unwrap();
        let b = json!({"b": {"x": 1, "y": 2}, "a": 1});
        assert_eq!(hash_json(&a), hash_json(&b));
        assert_ne!(hash_json(&a), hash_json(&json!({"a": 2})));
    }
}
