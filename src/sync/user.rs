//! Users: a users-table row ↔ a FusionAuth user.

use serde_json::{json, Map, Value};

use super::{hash_json, normalize, MappingError};

/// The FusionAuth side of a user as fusionsync maps it: the mapped fields and whether the
/// user is active.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredUser {
    /// FusionAuth field name → value (null when empty), every mapped field except `active`.
    pub fields: Map<String, Value>,
    pub active: bool,
}

/// Maximum lengths FusionAuth enforces on the fields we map (longer values are refused there,
/// so refuse them here with a clear reason instead of retrying).
const MAX_LEN: usize = 191;

/// Maps a users-table row (as JSON, `to_jsonb(row)`) to the FusionAuth user it should be.
pub fn desired_user(row: &Value, fields: &[(String, String)]) -> Result<DesiredUser, MappingError> {
    let mut out = Map::new();
    let mut active = true;
    for (field, column) in fields {
        let v = normalize(row.get(column));
        match field.as_str() {
            "active" => {
                active = match v {
                    Value::Null => true,
                    Value::Bool(b) => b,
                    other => {
                        return Err(MappingError::Invalid(format!(
                            "column {column} (active) must be a boolean, found {other}"
                        )))
                    }
                }
            }
            "data" => {
                match &v {
                    Value::Null | Value::Object(_) => {}
                    other => {
                        return Err(MappingError::Invalid(format!(
                            "column {column} (data) must be a JSON object, found {other}"
                        )))
                    }
                }
                out.insert(field.clone(), v);
            }
            _ => {
                let v = match v {
                    Value::Null => Value::Null,
                    Value::String(s) => {
                        if s.chars().count() > MAX_LEN {
                            return Err(MappingError::Invalid(format!(
                                "column {column} ({field}) is {} characters long; FusionAuth accepts at most {MAX_LEN}",
                                s.chars().count()
                            )));
                        }
                        Value::String(s)
                    }
                    other => Value::String(other.to_string()),
                };
                out.insert(field.clone(), v);
            }
        }
    }
    let has = |f: &str| out.get(f).is_some_and(|v| !v.is_null());
    if !has("email") && !has("username") {
        return Err(MappingError::Invalid(
            "the user has neither an email nor a username; FusionAuth requires one".into(),
        ));
    }
    if let Some(Value::String(email)) = out.get("email") {
        if !looks_like_email(email) {
            return Err(MappingError::Invalid(format!(
                "'{email}' is not an email address FusionAuth accepts"
            )));
        }
    }
    Ok(DesiredUser {
        fields: out,
        active,
    })
}

fn looks_like_email(s: &str) -> bool {
    let Some((local, domain)) = s.rsplit_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.is_empty()
        && !s.chars().any(char::is_whitespace)
        && !domain.starts_with('.')
        && !domain.ends_with('.')
}

/// The same projection of a FusionAuth user, for comparing the two sides.
pub fn desired_from_fusionauth(user: &Value, fields: &[(String, String)]) -> DesiredUser {
    let mut out = Map::new();
    for (field, _) in fields {
        if field != "active" {
            out.insert(field.clone(), normalize(user.get(field)));
        }
    }
    DesiredUser {
        fields: out,
        active: user.get("active").and_then(Value::as_bool).unwrap_or(true),
    }
}

/// The columns to write into the users table for a FusionAuth user.
pub fn columns_from_fusionauth(user: &Value, fields: &[(String, String)]) -> Map<String, Value> {
    let mut out = Map::new();
    for (field, column) in fields {
        let v = if field == "active" {
            Value::Bool(user.get("active").and_then(Value::as_bool).unwrap_or(true))
        } else if field == "data" {
            // An absent `data` is an empty object (data columns are usually NOT NULL '{}').
            match normalize(user.get(field)) {
                Value::Null => Value::Object(Map::new()),
                v => v,
            }
        } else {
            normalize(user.get(field))
        };
        out.insert(column.clone(), v);
    }
    out
}

impl DesiredUser {
    pub fn fields_hash(&self) -> String {
        hash_json(&Value::Object(self.fields.clone()))
    }

    /// `u1:<hash of fields>:<a|i>` — the fields and the active flag separately, so a change of
    /// one of them alone needs only the call for it.
    pub fn fingerprint(&self) -> String {
        format!(
            "u1:{}:{}",
            self.fields_hash(),
            if self.active { "a" } else { "i" }
        )
    }

    /// The user object for a PATCH: every mapped field, nulls included so cleared columns
    /// are cleared in FusionAuth too.
    pub fn patch_body(&self) -> Value {
        Value::Object(self.fields.clone())
    }

    /// The user object for a create: nulls left out.
    pub fn create_body(&self, password: Option<&str>) -> Value {
        let mut m: Map<String, Value> = self
            .fields
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(p) = password {
            m.insert("password".into(), json!(p));
        }
        Value::Object(m)
    }
}

/// What a stored user fingerprint says about the last synced state.
#[derive(Debug, PartialEq, Eq)]
pub struct SyncedUser<'a> {
    pub fields_hash: &'a str,
    pub active: bool,
}

pub fn parse_fingerprint(fp: &str) -> Option<SyncedUser<'_>> {
    let rest = fp.strip_prefix("u1:")?;
    let (hash, flag) = rest.rsplit_once(':')?;
    Some(SyncedUser {
        fields_hash: hash,
        active: flag == "a",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn fields() -> Vec<(String, String)> {
        [
            ("email", "email"),
            ("username", "username"),
            ("firstName", "first_name"),
            ("lastName", "last_name"),
            ("active", "active"),
            ("data", "data"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
    }

    #[test]
    fn a_row_maps_to_camel_case_fields() {
        let row = json!({"id": "x", "email": "a@example.com", "username": null,
            "first_name": "Ada", "last_name": "", "active": true, "data": {"plan": "pro"},
            "created_at": "2026-01-01T00:00:00Z"});
        let d = desired_user(&row, &fields()).unwrap();
        assert_eq!(d.fields["email"], json!("a@example.com"));
        assert_eq!(d.fields["firstName"], json!("Ada"));
        assert_eq!(d.fields["lastName"], Value::Null);
        assert_eq!(d.fields["data"], json!({"plan": "pro"}));
        assert!(d.active);
        let body = d.create_body(None);
        assert!(body.get("lastName").is_none());
        assert!(body.get("created_at").is_none());
    }

    #[test]
    fn a_row_round_trips_through_fusionauth() {
        let row = json!({"email": "a@example.com", "username": "ada", "first_name": "Ada",
            "last_name": "L", "active": false, "data": {"k": [1, 2]}});
        let d = desired_user(&row, &fields()).unwrap();
        // what FusionAuth would return after a create + deactivate
        let mut fa = d.create_body(None);
        fa["id"] = json!("00000000-0000-0000-0000-000000000001");
        fa["active"] = json!(false);
        fa["insertInstant"] = json!(1);
        assert_eq!(desired_from_fusionauth(&fa, &fields()), d);
        let cols = columns_from_fusionauth(&fa, &fields());
        assert_eq!(desired_user(&Value::Object(cols), &fields()).unwrap(), d);
    }

    #[test]
    fn fingerprint_separates_fields_and_active() {
        let row = json!({"email": "a@example.com", "active": true});
        let a = desired_user(&row, &fields()).unwrap();
        let mut b = a.clone();
        b.active = false;
        let pa = parse_fingerprint(&a.fingerprint()).map(|p| (p.fields_hash.to_string(), p.active));
        let pb = parse_fingerprint(&b.fingerprint()).map(|p| (p.fields_hash.to_string(), p.active));
        assert_eq!(pa.as_ref().unwrap().0, pb.as_ref().unwrap().0);
        assert!(pa.unwrap().1 && !pb.unwrap().1);
        assert!(parse_fingerprint("deleted").is_none());
    }

    #[test]
    fn unmapped_columns_do_not_change_the_fingerprint() {
        let a = json!({"email": "a@example.com", "updated_at": "1"});
        let b = json!({"email": "a@example.com", "updated_at": "2"});
        assert_eq!(
            desired_user(&a, &fields()).unwrap().fingerprint(),
            desired_user(&b, &fields()).unwrap().fingerprint()
        );
    }

    #[test]
    fn rows_fusionauth_would_refuse_are_refused_with_a_reason() {
        let e = desired_user(&json!({"email": null, "username": null}), &fields()).unwrap_err();
        assert!(e.to_string().contains("neither an email nor a username"));
        let e = desired_user(&json!({"email": "not an email"}), &fields()).unwrap_err();
        assert!(e.to_string().contains("not an email address"));
        let long = "x".repeat(300);
        let e =
            desired_user(&json!({"email": "a@b.c", "first_name": long}), &fields()).unwrap_err();
        assert!(e.to_string().contains("at most"));
        let e = desired_user(&json!({"email": "a@b.c", "data": [1]}), &fields()).unwrap_err();
        assert!(e.to_string().contains("JSON object"));
    }
}

#[cfg(test)]
mod properties {
    use super::tests::fields;
    use super::*;
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = Option<String>> {
        proptest::option::of("\\PC{0,40}")
    }

    proptest! {
        /// Whatever a row holds, mapping never panics; a row that maps survives the trip to
        /// FusionAuth and back into columns unchanged (as FusionAuth would store it).
        #[test]
        fn row_to_fusionauth_and_back_round_trips(
            local in "[a-z0-9._+-]{1,20}", domain in "[a-z0-9-]{1,20}\\.[a-z]{2,5}",
            username in text(), first in text(), last in text(), active in any::<bool>(),
            data in proptest::option::of(proptest::collection::btree_map("[a-z]{1,8}", "\\PC{0,10}", 0..4)),
        ) {
            let row = json!({"email": format!("{local}@{domain}"), "username": username, "first_name": first,
                "last_name": last, "active": active, "data": data});
            let d = desired_user(&row, &fields()).unwrap();
            let mut fa = d.create_body(None);
            fa["active"] = json!(active);
            prop_assert_eq!(desired_from_fusionauth(&fa, &fields()), d.clone());
            let cols = columns_from_fusionauth(&fa, &fields());
            let back = desired_user(&Value::Object(cols), &fields()).unwrap();
            prop_assert_eq!(back.fingerprint(), d.fingerprint());
        }

        #[test]
        fn mapping_arbitrary_json_never_panics(v in arbitrary_json()) {
            let _ = desired_user(&v, &fields());
            let _ = columns_from_fusionauth(&v, &fields());
            let _ = desired_from_fusionauth(&v, &fields());
        }
    }

    pub(crate) fn arbitrary_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            "\\PC{0,20}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z_]{1,12}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }
}
