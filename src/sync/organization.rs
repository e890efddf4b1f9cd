//! Organizations: an organizations-table row ↔ a FusionAuth group.

use serde_json::{json, Map, Value};

use super::{hash_json, normalize, MappingError};

#[derive(Clone, Debug, PartialEq)]
pub struct DesiredGroup {
    pub name: String,
    pub data: Map<String, Value>,
}

/// Fills `{name}`, `{id}` and `{slug}` in the group-name template.
pub fn render_name(template: &str, id: &str, row: &Value, name_column: &str) -> String {
    let text = |v: Option<&Value>| match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    };
    template
        .replace("{name}", &text(row.get(name_column)))
        .replace("{id}", id)
        .replace("{slug}", &text(row.get("slug")))
}

pub fn desired_group(
    id: &str,
    row: &Value,
    name_column: &str,
    data_columns: &[String],
    template: &str,
) -> Result<DesiredGroup, MappingError> {
    let name = render_name(template, id, row, name_column)
        .trim()
        .to_string();
    if name.is_empty() {
        return Err(MappingError::Invalid(format!(
            "organization {id} has an empty name (column {name_column}); a FusionAuth group needs one"
        )));
    }
    if name.chars().count() > 191 {
        return Err(MappingError::Invalid(format!(
            "organization {id}: group name is longer than 191 characters"
        )));
    }
    let mut data = Map::new();
    data.insert("organizationId".into(), json!(id));
    for c in data_columns {
        let v = normalize(row.get(c));
        if !v.is_null() {
            data.insert(c.clone(), v);
        }
    }
    Ok(DesiredGroup { name, data })
}

impl DesiredGroup {
    pub fn fingerprint(&self) -> String {
        format!(
            "g1:{}",
            hash_json(&json!({ "name": self.name, "data": self.data }))
        )
    }

    pub fn body(&self) -> Value {
        json!({ "name": self.name, "data": self.data })
    }

    /// Whether a group read from FusionAuth already matches.
    pub fn matches(&self, group: &Value) -> bool {
        group.get("name").and_then(Value::as_str) == Some(self.name.as_str())
            && normalize(group.get("data")) == normalize(Some(&Value::Object(self.data.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_template_is_filled() {
        let row = json!({"name": "Acme", "slug": "acme"});
        assert_eq!(
            render_name("{name} ({id})", "42", &row, "name"),
            "Acme (42)"
        );
        assert_eq!(render_name("{slug}", "42", &row, "name"), "acme");
    }

    #[test]
    fn data_columns_and_the_org_id_travel_in_group_data() {
        let row = json!({"name": "Acme", "slug": "acme", "data": {"tier": 1}, "secret": "x"});
        let g = desired_group(
            "42",
            &row,
            "name",
            &["slug".into(), "data".into()],
            "{name}",
        )
        .unwrap();
        assert_eq!(g.name, "Acme");
        assert_eq!(g.data["organizationId"], json!("42"));
        assert_eq!(g.data["slug"], json!("acme"));
        assert!(g.data.get("secret").is_none());
        let mut fa = g.body();
        fa["id"] = json!("42");
        assert!(g.matches(&fa));
        fa["name"] = json!("Other");
        assert!(!g.matches(&fa));
    }

    #[test]
    fn an_empty_name_is_refused() {
        assert!(desired_group("1", &json!({"name": " "}), "name", &[], "{name}").is_err());
    }
}
