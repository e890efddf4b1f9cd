//! Memberships: the membership rows of one organization ↔ the members of its group. The role
//! (and any mapped columns) travel in the member's `data`.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::{hash_json, normalize};
use crate::fusionauth::Member;

/// user id (lower-case) → member data.
pub type MemberSet = BTreeMap<String, Value>;

pub fn desired_members(
    rows: &[Value],
    user_column: &str,
    role_column: Option<&str>,
    data_columns: &[String],
) -> MemberSet {
    let mut out = MemberSet::new();
    for row in rows {
        let Some(user) = row.get(user_column).and_then(Value::as_str) else {
            continue;
        };
        let mut data = Map::new();
        if let Some(rc) = role_column {
            let v = normalize(row.get(rc));
            if !v.is_null() {
                data.insert("role".into(), v);
            }
        }
        for c in data_columns {
            let v = normalize(row.get(c));
            if !v.is_null() {
                data.insert(c.clone(), v);
            }
        }
        out.insert(user.to_ascii_lowercase(), Value::Object(data));
    }
    out
}

pub fn actual_members(members: &[Member]) -> MemberSet {
    members
        .iter()
        .map(|m| {
            let data = match &m.data {
                Value::Object(o) => Value::Object(o.clone()),
                _ => json!({}),
            };
            (m.user_id.to_ascii_lowercase(), data)
        })
        .collect()
}

pub fn fingerprint(set: &MemberSet) -> String {
    let v: Map<String, Value> = set.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    format!("m1:{}", hash_json(&Value::Object(v)))
}

#[derive(Debug, Default, PartialEq)]
pub struct MemberDiff {
    /// Not in the group yet.
    pub add: Vec<Member>,
    /// In the group but not in the table.
    pub remove: Vec<String>,
    /// In both, with different data (removed and added again: FusionAuth keeps the data of a
    /// re-added member unchanged).
    pub change: Vec<Member>,
}

impl MemberDiff {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty() && self.change.is_empty()
    }
}

pub fn diff(desired: &MemberSet, actual: &MemberSet) -> MemberDiff {
    let mut d = MemberDiff::default();
    for (user, data) in desired {
        match actual.get(user) {
            None => d.add.push(Member {
                user_id: user.clone(),
                data: data.clone(),
            }),
            Some(a) if normalize(Some(a)) != normalize(Some(data)) => d.change.push(Member {
                user_id: user.clone(),
                data: data.clone(),
            }),
            Some(_) => {}
        }
    }
    for user in actual.keys() {
        if !desired.contains_key(user) {
            d.remove.push(user.clone());
        }
    }
    d
}

/// Membership-table columns for a member read from FusionAuth (two-way mode).
pub fn columns_from_member(
    data: &Value,
    role_column: Option<&str>,
    data_columns: &[String],
) -> Map<String, Value> {
    let mut out = Map::new();
    if let Some(rc) = role_column {
        out.insert(
            rc.to_string(),
            data.get("role").cloned().unwrap_or(Value::Null),
        );
    }
    for c in data_columns {
        out.insert(c.clone(), data.get(c).cloned().unwrap_or(Value::Null));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Vec<Value> {
        vec![
            json!({"organization_id": "o", "user_id": "A", "role": "admin"}),
            json!({"organization_id": "o", "user_id": "b", "role": "member"}),
            json!({"organization_id": "o", "user_id": "c", "role": null}),
        ]
    }

    #[test]
    fn rows_become_members_with_their_role() {
        let d = desired_members(&rows(), "user_id", Some("role"), &[]);
        assert_eq!(d["a"], json!({"role": "admin"}));
        assert_eq!(d["c"], json!({}));
    }

    #[test]
    fn the_diff_adds_removes_and_changes() {
        let desired = desired_members(&rows(), "user_id", Some("role"), &[]);
        let actual = actual_members(&[
            Member {
                user_id: "b".into(),
                data: json!({"role": "admin"}),
            },
            Member {
                user_id: "c".into(),
                data: Value::Null,
            },
            Member {
                user_id: "stray".into(),
                data: json!({}),
            },
        ]);
        let d = diff(&desired, &actual);
        assert_eq!(d.add.len(), 1);
        assert_eq!(d.add[0].user_id, "a");
        assert_eq!(d.remove, vec!["stray".to_string()]);
        assert_eq!(d.change.len(), 1);
        assert_eq!(d.change[0].user_id, "b");
        assert!(diff(&desired, &desired).is_empty());
    }

    #[test]
    fn member_data_round_trips_to_columns() {
        let desired = desired_members(&rows(), "user_id", Some("role"), &[]);
        let cols = columns_from_member(&desired["a"], Some("role"), &[]);
        assert_eq!(cols["role"], json!("admin"));
    }
}
