//! `POST /fusionauth/webhook`: FusionAuth events. User events make the users table follow
//! FusionAuth; group member events make the group follow the membership table again
//! (database mode) or the table follow FusionAuth (two-way mode).

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use base64::Engine;
use serde_json::{json, Value};
use tracing::{debug, warn};

use super::hasura::type_name;
use super::{parse_json, read_body, require_json, secret_matches, signature, ApiError, AppState};
use crate::config::MembershipMode;
use crate::db::event::{Direction, EntityKind, NewEvent};

/// What a webhook body asks fusionsync to do.
#[derive(Debug, PartialEq)]
pub enum WebhookAction {
    Record(NewEvent),
    Ignore(String),
}

fn uuid_at(v: &Value, obj: &str, path: &str) -> Result<String, ApiError> {
    let raw = v
        .get(obj)
        .and_then(|o| o.get("id"))
        .ok_or_else(|| ApiError::bad_request(path, format!("missing field {path}")))?;
    let s = raw.as_str().ok_or_else(|| {
        ApiError::bad_request(
            path,
            format!("{path} must be a string, found {}", type_name(raw)),
        )
    })?;
    uuid::Uuid::parse_str(s)
        .map(|u| u.to_string())
        .map_err(|_| ApiError::bad_request(path, format!("{path} is not a UUID")))
}

/// Interprets a webhook body (wrapped as `{"event": …}`, or bare as in some docs examples).
pub fn interpret(
    body: &Value,
    mode: MembershipMode,
    tenant: Option<uuid::Uuid>,
) -> Result<WebhookAction, ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "",
            "the body must be a JSON object (a FusionAuth event)",
        ));
    }
    let (ev, prefix) = match body.get("event") {
        Some(e) if e.is_object() => (e, "event."),
        Some(other) => {
            return Err(ApiError::bad_request(
                "event",
                format!("event must be an object, found {}", type_name(other)),
            ))
        }
        None => (body, ""),
    };
    let ty = match ev.get("type") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(ApiError::bad_request(
                format!("{prefix}type"),
                format!("{prefix}type must be a string, found {}", type_name(other)),
            ))
        }
        None => {
            return Err(ApiError::bad_request(
                format!("{prefix}type"),
                format!("missing field {prefix}type"),
            ))
        }
    };
    let id = match ev.get("id") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 200 => s.clone(),
        Some(_) => {
            return Err(ApiError::bad_request(
                format!("{prefix}id"),
                format!("{prefix}id must be a non-empty string"),
            ))
        }
        None => {
            return Err(ApiError::bad_request(
                format!("{prefix}id"),
                format!("missing field {prefix}id"),
            ))
        }
    };
    if let (Some(t), Some(Value::String(ev_tenant))) = (tenant, ev.get("tenantId")) {
        if uuid::Uuid::parse_str(ev_tenant).ok() != Some(t) {
            return Ok(WebhookAction::Ignore(format!(
                "event of tenant {ev_tenant}, not fusionauth.tenant_id"
            )));
        }
    }
    let base = ty.strip_suffix(".complete").unwrap_or(&ty);
    let dedup = Some(format!("fusionauth:{ty}:{id}"));
    let user_event = matches!(
        base,
        "user.create"
            | "user.update"
            | "user.delete"
            | "user.deactivate"
            | "user.reactivate"
            | "user.registration.create"
            | "user.registration.update"
            | "user.registration.delete"
            | "user.email.verified"
            | "user.email.update"
    );
    if user_event {
        let key = uuid_at(ev, "user", &format!("{prefix}user.id"))?;
        return Ok(WebhookAction::Record(NewEvent {
            source: "fusionauth".into(),
            kind: EntityKind::User,
            key,
            direction: Direction::ToDatabase,
            op: ty.clone(),
            payload: Some(json!({ "fusionauth_event_id": id, "type": ty })),
            dedup_key: dedup,
        }));
    }
    if matches!(
        base,
        "group.member.add" | "group.member.remove" | "group.member.update"
    ) {
        let key = uuid_at(ev, "group", &format!("{prefix}group.id"))?;
        let (direction, payload) = match mode {
            // The table is the truth: look at the group again and undo what differs.
            MembershipMode::Database => (
                Direction::ToFusionAuth,
                json!({ "fusionauth_event_id": id, "type": ty, "force": true }),
            ),
            MembershipMode::TwoWay => (
                Direction::ToDatabase,
                json!({ "fusionauth_event_id": id, "type": ty }),
            ),
        };
        return Ok(WebhookAction::Record(NewEvent {
            source: "fusionauth".into(),
            kind: EntityKind::Membership,
            key,
            direction,
            op: ty.clone(),
            payload: Some(payload),
            dedup_key: dedup,
        }));
    }
    Ok(WebhookAction::Ignore(format!(
        "fusionsync does not act on {ty} events"
    )))
}

/// Checks the header-borne credentials (all configured methods must pass); runs before the
/// body is read, so an unauthenticated client cannot make us read a body.
fn check_credentials(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let w = &state.cfg.webhook;
    if !w.any_auth_configured() {
        if w.allow_unauthenticated {
            return Ok(());
        }
        return Err(ApiError::unauthorized(
            "webhook authentication is not configured: set webhook.hmac_secret or webhook.jwks_url (signing), \
             webhook.basic_username/basic_password or webhook.header_name/header_value — or, knowingly, \
             webhook.allow_unauthenticated = true",
        ));
    }
    if let (Some(name), Some(value)) = (&w.header_name, &w.header_value) {
        let presented = headers
            .get(name.as_str())
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !secret_matches(presented, value.expose().as_bytes()) {
            return Err(ApiError::unauthorized(format!(
                "missing or wrong {name} header"
            )));
        }
    }
    if let (Some(user), Some(pass)) = (&w.basic_username, &w.basic_password) {
        let expected = format!("{user}:{}", pass.expose());
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| {
                base64::engine::general_purpose::STANDARD
                    .decode(b.trim())
                    .ok()
            })
            .unwrap_or_default();
        if !secret_matches(&presented, expected.as_bytes()) {
            return Err(ApiError::unauthorized(
                "missing or wrong HTTP Basic credentials",
            ));
        }
    }
    if w.signature_configured() && !headers.contains_key("X-FusionAuth-Signature-JWT") {
        return Err(ApiError::unauthorized(
            signature::SignatureError::Missing.to_string(),
        ));
    }
    Ok(())
}

/// Verifies the signature over the raw body, when signing is configured.
async fn check_signature(
    state: &AppState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), ApiError> {
    let w = &state.cfg.webhook;
    if !w.signature_configured() {
        return Ok(());
    }
    let token = headers
        .get("X-FusionAuth-Signature-JWT")
        .and_then(|v| v.to_str().ok());
    match signature::verify(token, body, w.hmac_secret.as_ref(), &state.jwks).await {
        Ok(()) => Ok(()),
        Err(e @ signature::SignatureError::JwksUnavailable(_)) => {
            warn!(error = %e, "cannot check a webhook signature");
            let mut err = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "jwks_unavailable",
                e.to_string(),
            );
            err.retry_after = Some(std::time::Duration::from_secs(5));
            Err(err)
        }
        Err(e) => Err(ApiError::unauthorized(e.to_string())),
    }
}

pub async fn receive(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    if !state.cfg.sources.fusionauth_webhooks {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "source_disabled",
            "the FusionAuth webhook source is off (sources.fusionauth_webhooks = false)",
        ));
    }
    check_credentials(&state, &headers)?;
    let bytes = read_body(&state, &headers, body).await?;
    check_signature(&state, &headers, &bytes).await?;
    require_json(&headers)?;
    let value = parse_json(&bytes)?;
    match interpret(
        &value,
        state.cfg.memberships.mode,
        state.cfg.fusionauth.tenant_id,
    )? {
        WebhookAction::Ignore(reason) => {
            debug!(%reason, "ignored FusionAuth event");
            Ok(Json(json!({ "status": "ignored", "reason": reason })))
        }
        WebhookAction::Record(event) => {
            debug!(event = %event.op, key = %event.key, "recording FusionAuth event");
            super::record(&state, "fusionauth", vec![event]).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Value {
        let path = format!(
            "{}/tests/fixtures/fusionauth/events/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn every_documented_event_is_understood() {
        let user_events = [
            "user-create.json",
            "user-create-complete.json",
            "user-update.json",
            "user-update-complete.json",
            "user-delete.json",
            "user-delete-complete.json",
            "user-deactivate.json",
            "user-registration-create.json",
        ];
        for name in user_events {
            match interpret(&fixture(name), MembershipMode::Database, None).unwrap() {
                WebhookAction::Record(e) => {
                    assert_eq!(e.kind, EntityKind::User, "{name}");
                    assert_eq!(e.direction, Direction::ToDatabase);
                    assert!(e.dedup_key.unwrap().starts_with("fusionauth:user."));
                }
                other => panic!("{name}: {other:?}"),
            }
        }
        for name in [
            "group-member-add.json",
            "group-member-add-complete.json",
            "group-member-remove.json",
        ] {
            match interpret(&fixture(name), MembershipMode::Database, None).unwrap() {
                WebhookAction::Record(e) => {
                    assert_eq!(e.kind, EntityKind::Membership);
                    assert_eq!(e.key, "89450cd0-24a9-401d-a6ad-4116de45b8e2");
                    assert_eq!(e.direction, Direction::ToFusionAuth);
                }
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn other_events_and_other_tenants_are_ignored() {
        let v = json!({"event": {"type": "jwt.refresh", "id": "x"}});
        assert!(matches!(
            interpret(&v, MembershipMode::Database, None).unwrap(),
            WebhookAction::Ignore(_)
        ));
        let tenant = uuid::Uuid::new_v4();
        assert!(matches!(
            interpret(
                &fixture("user-create.json"),
                MembershipMode::Database,
                Some(tenant)
            )
            .unwrap(),
            WebhookAction::Ignore(_)
        ));
    }

    #[test]
    fn bad_user_ids_are_refused_with_their_path() {
        let mut v = fixture("user-create.json");
        v["event"]["user"]["id"] = json!("42; drop table users");
        assert_eq!(
            interpret(&v, MembershipMode::Database, None)
                .unwrap_err()
                .path
                .as_deref(),
            Some("event.user.id")
        );
        let mut v = fixture("user-create.json");
        v["event"]["type"] = json!(5);
        assert_eq!(
            interpret(&v, MembershipMode::Database, None)
                .unwrap_err()
                .path
                .as_deref(),
            Some("event.type")
        );
    }
}
