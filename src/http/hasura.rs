//! `POST /hasura/events`: Hasura event triggers (v1 and v2 bodies, every op). The shared-secret
//! header is required; the table decides the entity kind; Hasura's event id is the dedup key.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde_json::{json, Value};
use tracing::debug;

use super::{parse_json, read_body, require_json, secret_matches, ApiError, AppState};
use crate::db::event::{Direction, EntityKind, NewEvent};

const OPS: &[&str] = &["INSERT", "UPDATE", "DELETE", "MANUAL"];

/// What a Hasura event body says, once checked.
#[derive(Debug, PartialEq)]
pub struct HasuraEvent {
    pub id: String,
    pub trigger: Option<String>,
    pub schema: String,
    pub table: String,
    pub op: String,
    pub old: Option<Value>,
    pub new: Option<Value>,
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Result<&'a str, ApiError> {
    let mut cur = v;
    for (i, p) in path.iter().enumerate() {
        cur = match cur.get(p) {
            Some(c) => c,
            None => {
                return Err(ApiError::bad_request(
                    path[..=i].join("."),
                    format!("missing field {}", path[..=i].join(".")),
                ))
            }
        };
    }
    cur.as_str().ok_or_else(|| {
        ApiError::bad_request(
            path.join("."),
            format!(
                "{} must be a string, found {}",
                path.join("."),
                type_name(cur)
            ),
        )
    })
}

pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Checks the shape of a Hasura event body. Tolerates the invocation log's `{"payload": …}`
/// wrapper, a `created_at` with or without offset, null session variables and trace context.
pub fn parse_event(body: &Value) -> Result<HasuraEvent, ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "",
            "the body must be a JSON object (a Hasura event)",
        ));
    }
    let body = match body.get("payload") {
        Some(p) if body.get("event").is_none() && p.is_object() => p,
        _ => body,
    };
    let id = str_at(body, &["id"])?.to_string();
    if id.is_empty() || id.len() > 200 {
        return Err(ApiError::bad_request(
            "id",
            "id must be a non-empty string of at most 200 characters",
        ));
    }
    let schema = str_at(body, &["table", "schema"])?.to_string();
    let table = str_at(body, &["table", "name"])?.to_string();
    let op = str_at(body, &["event", "op"])?.to_string();
    if !OPS.contains(&op.as_str()) {
        return Err(ApiError::bad_request(
            "event.op",
            format!("event.op '{op}' is not one of INSERT, UPDATE, DELETE, MANUAL"),
        ));
    }
    let data = body
        .get("event")
        .and_then(|e| e.get("data"))
        .ok_or_else(|| ApiError::bad_request("event.data", "missing field event.data"))?;
    if !data.is_object() {
        return Err(ApiError::bad_request(
            "event.data",
            format!("event.data must be an object, found {}", type_name(data)),
        ));
    }
    let row = |name: &str| -> Result<Option<Value>, ApiError> {
        match data.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v @ Value::Object(_)) => Ok(Some(v.clone())),
            Some(other) => Err(ApiError::bad_request(
                format!("event.data.{name}"),
                format!(
                    "event.data.{name} must be an object or null, found {}",
                    type_name(other)
                ),
            )),
        }
    };
    let old = row("old")?;
    let new = row("new")?;
    let needed = match op.as_str() {
        "INSERT" | "MANUAL" => new.is_some(),
        "DELETE" => old.is_some(),
        _ => new.is_some() || old.is_some(),
    };
    if !needed {
        let which = if op == "DELETE" { "old" } else { "new" };
        return Err(ApiError::bad_request(
            format!("event.data.{which}"),
            format!("a {op} event needs event.data.{which}"),
        ));
    }
    if let Some(c) = body.get("created_at") {
        if !c.is_string() && !c.is_null() {
            return Err(ApiError::bad_request(
                "created_at",
                "created_at must be a string",
            ));
        }
    }
    let trigger = body
        .get("trigger")
        .and_then(|t| t.get("name"))
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok(HasuraEvent {
        id,
        trigger,
        schema,
        table,
        op,
        old,
        new,
    })
}

/// A key column's value as text; numbers are accepted for non-uuid key columns.
fn key_of(row: &Value, column: &str, ty: &str, path: &str) -> Result<Option<String>, ApiError> {
    let path = format!("{path}.{column}");
    let s = match row.get(column) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => {
            return Err(ApiError::bad_request(
                &path,
                format!(
                    "{path} must be a string or number, found {}",
                    type_name(other)
                ),
            ))
        }
    };
    if ty == "uuid" {
        match uuid::Uuid::parse_str(&s) {
            Ok(u) => return Ok(Some(u.to_string())),
            Err(_) => {
                let shown: String = s.chars().take(64).collect();
                return Err(ApiError::bad_request(
                    &path,
                    format!("{path} is '{shown}', which is not a UUID (the column is uuid; FusionAuth ids are UUIDs)"),
                ));
            }
        }
    }
    if s.is_empty() || s.len() > 200 {
        return Err(ApiError::bad_request(
            &path,
            format!("{path} must be 1 to 200 characters"),
        ));
    }
    Ok(Some(s))
}

/// The events one Hasura event turns into (two for a membership moved between orgs).
pub fn to_events(state: &AppState, ev: &HasuraEvent) -> Result<Vec<NewEvent>, ApiError> {
    let t = &state.tables;
    let same = |name: &crate::config::TableName| name.schema == ev.schema && name.name == ev.table;
    let (kind, column, ty) = if same(&t.users.name) {
        (
            EntityKind::User,
            t.users.id_column.clone(),
            t.users.id_type.clone(),
        )
    } else if let Some(o) = t.organizations.as_ref().filter(|o| same(&o.name)) {
        (
            EntityKind::Organization,
            o.id_column.clone(),
            o.id_type.clone(),
        )
    } else if let Some(m) = t.members.as_ref().filter(|m| same(&m.table.name)) {
        (
            EntityKind::Membership,
            m.table.id_column.clone(),
            m.table.id_type.clone(),
        )
    } else {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_table",
            format!(
                "fusionsync is not configured for table {}.{} (users.table, organizations.table, memberships.table)",
                ev.schema, ev.table
            ),
        ));
    };
    let new_key = match &ev.new {
        Some(r) => key_of(r, &column, &ty, "event.data.new")?,
        None => None,
    };
    let old_key = match &ev.old {
        Some(r) => key_of(r, &column, &ty, "event.data.old")?,
        None => None,
    };
    let mut keys = Vec::new();
    if let Some(k) = new_key {
        keys.push(k);
    }
    if let Some(k) = old_key {
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    if keys.is_empty() {
        let which = if ev.op == "DELETE" { "old" } else { "new" };
        return Err(ApiError::bad_request(
            format!("event.data.{which}.{column}"),
            format!(
                "the row has no {column}, which identifies the {}",
                kind.as_str()
            ),
        ));
    }
    Ok(keys
        .into_iter()
        .enumerate()
        .map(|(i, key)| NewEvent {
            source: "hasura".into(),
            kind,
            key,
            direction: Direction::ToFusionAuth,
            op: ev.op.clone(),
            payload: Some(json!({ "hasura_event_id": ev.id, "trigger": ev.trigger })),
            dedup_key: Some(if i == 0 {
                format!("hasura:{}", ev.id)
            } else {
                format!("hasura:{}:{i}", ev.id)
            }),
        })
        .collect())
}

pub async fn receive(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    if !state.cfg.sources.hasura {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "source_disabled",
            "the Hasura event source is off (sources.hasura = false)",
        ));
    }
    let Some(secret) = &state.cfg.hasura.secret else {
        return Err(ApiError::unauthorized(format!(
            "hasura.secret is not configured; set FUSIONSYNC__HASURA__SECRET and send it in the {} header",
            state.cfg.hasura.secret_header
        )));
    };
    let presented = headers
        .get(state.cfg.hasura.secret_header.as_str())
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !secret_matches(presented, secret.expose().as_bytes()) {
        return Err(ApiError::unauthorized(format!(
            "missing or wrong {} header",
            state.cfg.hasura.secret_header
        )));
    }
    require_json(&headers)?;
    let bytes = read_body(&state, &headers, body).await?;
    let value = parse_json(&bytes)?;
    let ev = parse_event(&value)?;
    let events = to_events(&state, &ev)?;
    debug!(hasura_event = %ev.id, op = %ev.op, table = %ev.table, "recording Hasura event");
    super::record(&state, "hasura", events).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented Hasura bodies (copied verbatim from Hasura's docs into tests/fixtures).
    fn fixture(name: &str) -> Value {
        let path = format!(
            "{}/tests/fixtures/hasura/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn documented_bodies_parse() {
        for name in [
            "insert_docs_v1.json",
            "insert_docs_v2.json",
            "invocation_log_wrapped.json",
        ] {
            let ev = parse_event(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            assert_eq!(ev.op, "INSERT");
            assert_eq!(ev.table, "users");
            assert!(ev.new.is_some());
        }
    }

    #[test]
    fn missing_and_mistyped_fields_name_their_path() {
        let mut v = fixture("insert_docs_v2.json");
        v["event"]["op"] = json!("TRUNCATE");
        assert_eq!(
            parse_event(&v).unwrap_err().path.as_deref(),
            Some("event.op")
        );
        let mut v = fixture("insert_docs_v2.json");
        v["table"]["name"] = json!(5);
        assert_eq!(
            parse_event(&v).unwrap_err().path.as_deref(),
            Some("table.name")
        );
        let mut v = fixture("insert_docs_v2.json");
        v.as_object_mut().unwrap().remove("id");
        assert_eq!(parse_event(&v).unwrap_err().path.as_deref(), Some("id"));
        let mut v = fixture("insert_docs_v2.json");
        v["event"]["data"]["new"] = Value::Null;
        assert!(parse_event(&v).is_err());
    }

    #[test]
    fn v2_created_at_without_offset_and_null_session_are_fine() {
        let mut v = fixture("insert_docs_v2.json");
        v["created_at"] = json!("2025-09-13T12:21:08.552674");
        v["event"]["session_variables"] = Value::Null;
        v["event"]["trace_context"] =
            json!({"trace_id": "0af7651916cd43dd8448eb211c80319c", "span_id": "b7ad6b7169203331"});
        assert!(parse_event(&v).is_ok());
    }

    #[test]
    fn keys_must_be_uuids_for_uuid_columns() {
        let row = json!({"id": "42"});
        assert!(key_of(&row, "id", "uuid", "event.data.new").is_err());
        assert_eq!(
            key_of(&row, "id", "text", "event.data.new")
                .unwrap()
                .as_deref(),
            Some("42")
        );
        let row = json!({"id": 7});
        assert_eq!(
            key_of(&row, "id", "integer", "event.data.new")
                .unwrap()
                .as_deref(),
            Some("7")
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            "\\PC{0,16}".prop_map(Value::String),
        ];
        leaf.prop_recursive(5, 64, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("id".to_string()),
                        Just("table".to_string()),
                        Just("event".to_string()),
                        Just("op".to_string()),
                        Just("data".to_string()),
                        Just("new".to_string()),
                        Just("old".to_string()),
                        Just("payload".to_string()),
                        Just("type".to_string()),
                        Just("user".to_string()),
                        "[a-z]{1,6}"
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// The payload parsers answer Ok or a 4xx for anything; they never panic.
        #[test]
        fn parsers_never_panic_on_arbitrary_json(v in json_value()) {
            if let Err(e) = parse_event(&v) {
                prop_assert!(e.status.is_client_error());
            }
            for mode in [crate::config::MembershipMode::Database, crate::config::MembershipMode::TwoWay] {
                if let Err(e) = crate::http::fusionauth_webhook::interpret(&v, mode, None) {
                    prop_assert!(e.status.is_client_error());
                }
            }
        }

        #[test]
        fn the_json_reader_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = crate::http::parse_json(&bytes);
        }
    }
}
