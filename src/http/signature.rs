//! FusionAuth webhook signatures: `X-FusionAuth-Signature-JWT` is a JWT whose claim
//! `request_body_sha256` is the base64 SHA-256 of the raw body, signed with an HMAC secret or
//! an RSA/EC key published at FusionAuth's JWKS endpoint (fetched and cached by `kid`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use tracing::warn;

use crate::config::Secret;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SignatureError {
    #[error("missing X-FusionAuth-Signature-JWT header")]
    Missing,
    #[error("the signature JWT is malformed: {0}")]
    Malformed(String),
    #[error("the signature JWT uses {0:?}, for which no key is configured")]
    NoKey(Algorithm),
    #[error("the signature JWT names key id '{0}', which is not in the JWKS")]
    UnknownKid(String),
    #[error("the signature JWT is not valid: {0}")]
    Invalid(String),
    #[error("the body does not match the signature's request_body_sha256")]
    BodyMismatch,
    #[error("cannot fetch the JWKS to check the signature: {0}")]
    JwksUnavailable(String),
}

#[derive(Deserialize)]
struct Claims {
    request_body_sha256: Option<String>,
}

/// RSA/EC public keys from a JWKS URL, refreshed when an unknown `kid` shows up (at most
/// every 10 seconds, so bad requests cannot make us hammer FusionAuth).
pub struct JwksCache {
    url: Option<String>,
    client: reqwest::Client,
    state: Mutex<(HashMap<String, DecodingKey>, Option<Instant>)>,
}

impl JwksCache {
    pub fn new(url: Option<String>) -> Self {
        Self {
            url,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
            state: Mutex::new((HashMap::new(), None)),
        }
    }

    async fn key(&self, kid: &str) -> Result<DecodingKey, SignatureError> {
        let Some(url) = &self.url else {
            return Err(SignatureError::UnknownKid(kid.to_string()));
        };
        let mut state = self.state.lock().await;
        if let Some(k) = state.0.get(kid) {
            return Ok(k.clone());
        }
        let recently = state
            .1
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10));
        if recently {
            return Err(SignatureError::UnknownKid(kid.to_string()));
        }
        state.1 = Some(Instant::now());
        let set: JwkSet = self
            .client
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| SignatureError::JwksUnavailable(e.to_string()))?
            .json()
            .await
            .map_err(|e| SignatureError::JwksUnavailable(e.to_string()))?;
        state.0.clear();
        for jwk in &set.keys {
            let Some(id) = jwk.common.key_id.clone() else {
                continue;
            };
            match DecodingKey::from_jwk(jwk) {
                Ok(k) => {
                    state.0.insert(id, k);
                }
                Err(e) => warn!(kid = %id, error = %e, "skipping a JWKS key fusionsync cannot use"),
            }
        }
        state
            .0
            .get(kid)
            .cloned()
            .ok_or_else(|| SignatureError::UnknownKid(kid.to_string()))
    }
}

pub fn body_sha256(body: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body))
}

/// Verifies the signature JWT against the raw body.
pub async fn verify(
    token: Option<&str>,
    body: &[u8],
    hmac: Option<&Secret>,
    jwks: &JwksCache,
) -> Result<(), SignatureError> {
    let token = token
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(SignatureError::Missing)?;
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| SignatureError::Malformed(e.to_string()))?;
    let key = match header.alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => match hmac {
            Some(s) => DecodingKey::from_secret(s.expose().as_bytes()),
            None => return Err(SignatureError::NoKey(header.alg)),
        },
        alg => match &header.kid {
            Some(kid) => jwks.key(kid).await?,
            None => return Err(SignatureError::NoKey(alg)),
        },
    };
    let mut validation = Validation::new(header.alg);
    validation.required_spec_claims.clear();
    validation.validate_aud = false;
    validation.validate_exp = true;
    validation.leeway = 60;
    let data = jsonwebtoken::decode::<Claims>(token, &key, &validation)
        .map_err(|e| SignatureError::Invalid(e.to_string()))?;
    let claimed = data
        .claims
        .request_body_sha256
        .ok_or_else(|| SignatureError::Invalid("no request_body_sha256 claim".into()))?;
    let actual = body_sha256(body);
    if crate::http::secret_matches(claimed.as_bytes(), actual.as_bytes()) {
        Ok(())
    } else {
        Err(SignatureError::BodyMismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    fn sign(body: &[u8], secret: &str, exp: Option<i64>) -> String {
        let mut claims = json!({ "request_body_sha256": body_sha256(body), "iat": chrono::Utc::now().timestamp() });
        if let Some(e) = exp {
            claims["exp"] = json!(e);
        }
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_good_hmac_signature_passes_and_a_changed_body_does_not() {
        let jwks = JwksCache::new(None);
        let secret = Secret::new("s3cret");
        let body = br#"{"event":{"type":"user.create"}}"#;
        let t = sign(body, "s3cret", None);
        assert_eq!(verify(Some(&t), body, Some(&secret), &jwks).await, Ok(()));
        assert_eq!(
            verify(Some(&t), b"{}", Some(&secret), &jwks).await,
            Err(SignatureError::BodyMismatch)
        );
        let wrong = sign(body, "other", None);
        assert!(matches!(
            verify(Some(&wrong), body, Some(&secret), &jwks).await,
            Err(SignatureError::Invalid(_))
        ));
        let expired = sign(body, "s3cret", Some(chrono::Utc::now().timestamp() - 3600));
        assert!(matches!(
            verify(Some(&expired), body, Some(&secret), &jwks).await,
            Err(SignatureError::Invalid(_))
        ));
        assert!(matches!(
            verify(Some("garbage"), body, Some(&secret), &jwks).await,
            Err(SignatureError::Malformed(_))
        ));
        assert_eq!(
            verify(None, body, Some(&secret), &jwks).await,
            Err(SignatureError::Missing)
        );
    }
}
