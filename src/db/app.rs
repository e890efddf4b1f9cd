//! The application's own tables (users, organizations, organization members), whose names come
//! from the config. Every name is checked against the catalog at start-up and only ever used
//! quoted; values are always bound parameters.

use std::collections::HashMap;

use serde_json::{Map, Value};
use sqlx::{PgPool, Postgres, Row, Transaction};

use crate::config::{quote_ident, Config, TableName};

/// A configured table after checking it against the catalog.
#[derive(Clone, Debug)]
pub struct Table {
    pub name: TableName,
    /// `"schema"."table"`
    pub quoted: String,
    pub id_column: String,
    /// The id column's type as Postgres spells it (from `format_type`), for casts.
    pub id_type: String,
}

impl Table {
    fn id(&self) -> String {
        quote_ident(&self.id_column)
    }
}

/// The membership table. Its `table.id_column` is the organization column: membership events
/// are keyed by organization.
#[derive(Clone, Debug)]
pub struct MembersTable {
    pub table: Table,
    pub user_column: String,
}

/// The app tables fusionsync works on, validated.
#[derive(Clone, Debug)]
pub struct AppTables {
    pub users: Table,
    /// FusionAuth field → column, only the mapped ones.
    pub user_fields: Vec<(String, String)>,
    pub organizations: Option<Table>,
    /// Organization columns copied into the group's data (those that exist).
    pub org_data_columns: Vec<String>,
    pub members: Option<MembersTable>,
    pub member_role_column: Option<String>,
    pub member_data_columns: Vec<String>,
    /// What was left out because a *default* table or column does not exist (logged at start).
    pub notes: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AppTablesError {
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

async fn column_types(
    pool: &PgPool,
    table: &TableName,
) -> Result<Option<HashMap<String, String>>, sqlx::Error> {
    let exists: bool = sqlx::query_scalar(
        "select exists (select 1 from pg_catalog.pg_class c
                          join pg_catalog.pg_namespace n on n.oid = c.relnamespace
                         where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p'))",
    )
    .bind(&table.schema)
    .bind(&table.name)
    .fetch_one(pool)
    .await?;
    if !exists {
        return Ok(None);
    }
    let rows = sqlx::query(
        "select a.attname::text, format_type(a.atttypid, a.atttypmod)
           from pg_catalog.pg_attribute a
           join pg_catalog.pg_class c on c.oid = a.attrelid
           join pg_catalog.pg_namespace n on n.oid = c.relnamespace
          where n.nspname = $1 and c.relname = $2 and a.attnum > 0 and not a.attisdropped",
    )
    .bind(&table.schema)
    .bind(&table.name)
    .fetch_all(pool)
    .await?;
    Ok(Some(
        rows.into_iter()
            .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1)))
            .collect(),
    ))
}

impl AppTables {
    /// Checks every configured table and column against the catalog and reports all problems.
    /// A table or column the config names explicitly must exist; one that is only a default
    /// (the DESIGN schema) and does not exist is left out with a note, so an app without
    /// organizations, or without a `username` column, runs without configuring that away.
    pub async fn resolve(pool: &PgPool, cfg: &Config) -> Result<Self, AppTablesError> {
        let mut problems = Vec::new();
        let mut notes = Vec::new();

        // users: the table is always required
        let u = &cfg.users;
        let Some(ucols) = column_types(pool, &u.table).await? else {
            return Err(AppTablesError::Invalid(vec![format!(
                "users.table: table {} does not exist (create it, or set users.table to the right schema.table)",
                u.table
            )]));
        };
        if !ucols.contains_key(&u.columns.id) {
            problems.push(format!(
                "users.id_column: column '{}' does not exist in table {}",
                u.columns.id, u.table
            ));
        }
        let mut user_fields = Vec::new();
        for (field, col) in &u.columns.fields {
            if ucols.contains_key(col) {
                user_fields.push((field.clone(), col.clone()));
            } else if u.columns.explicit.contains(field) {
                problems.push(format!(
                    "users.columns.{field}: column '{col}' does not exist in table {}",
                    u.table
                ));
            } else {
                notes.push(format!(
                    "{}: no column '{col}', so FusionAuth's {field} is not synced",
                    u.table
                ));
            }
        }
        if !user_fields
            .iter()
            .any(|(f, _)| f == "email" || f == "username")
        {
            problems.push(format!(
                "users.columns: table {} has neither the email nor the username column configured; FusionAuth needs one",
                u.table
            ));
        }
        let users = Table {
            name: u.table.clone(),
            quoted: u.table.quoted(),
            id_column: u.columns.id.clone(),
            id_type: ucols
                .get(&u.columns.id)
                .cloned()
                .unwrap_or_else(|| "uuid".into()),
        };

        // organizations: optional unless configured
        let o = &cfg.organizations;
        let mut org_data_columns = Vec::new();
        let organizations = if !o.enabled {
            None
        } else {
            match column_types(pool, &o.table).await? {
                None if o.explicit => {
                    problems.push(format!("organizations.table: table {} does not exist (or set organizations.enabled = false)", o.table));
                    None
                }
                None => {
                    notes.push(format!(
                        "no table {}: organization and membership sync is off",
                        o.table
                    ));
                    None
                }
                Some(ocols) => {
                    for (key, col) in [
                        ("organizations.id_column", &o.id_column),
                        ("organizations.name_column", &o.name_column),
                    ] {
                        if !ocols.contains_key(col) {
                            problems.push(format!(
                                "{key}: column '{col}' does not exist in table {}",
                                o.table
                            ));
                        }
                    }
                    for c in &o.data_columns {
                        if ocols.contains_key(c) {
                            org_data_columns.push(c.clone());
                        } else if o.explicit {
                            problems.push(format!("organizations.data_columns: column '{c}' does not exist in table {}", o.table));
                        } else {
                            notes.push(format!(
                                "{}: no column '{c}' to copy into group data",
                                o.table
                            ));
                        }
                    }
                    Some(Table {
                        name: o.table.clone(),
                        quoted: o.table.quoted(),
                        id_column: o.id_column.clone(),
                        id_type: ocols
                            .get(&o.id_column)
                            .cloned()
                            .unwrap_or_else(|| "uuid".into()),
                    })
                }
            }
        };

        // memberships: need organizations
        let m = &cfg.memberships;
        let mut member_role_column = None;
        let mut member_data_columns = Vec::new();
        let members = if !m.enabled || organizations.is_none() {
            None
        } else {
            match column_types(pool, &m.table).await? {
                None if m.explicit => {
                    problems.push(format!("memberships.table: table {} does not exist (or set memberships.enabled = false)", m.table));
                    None
                }
                None => {
                    notes.push(format!("no table {}: membership sync is off", m.table));
                    None
                }
                Some(mcols) => {
                    for (key, col) in [
                        ("memberships.organization_column", &m.organization_column),
                        ("memberships.user_column", &m.user_column),
                    ] {
                        if !mcols.contains_key(col) {
                            problems.push(format!(
                                "{key}: column '{col}' does not exist in table {}",
                                m.table
                            ));
                        }
                    }
                    if let Some(r) = &m.role_column {
                        if mcols.contains_key(r) {
                            member_role_column = Some(r.clone());
                        } else if m.explicit {
                            problems.push(format!(
                                "memberships.role_column: column '{r}' does not exist in table {}",
                                m.table
                            ));
                        } else {
                            notes.push(format!(
                                "{}: no column '{r}', so members carry no role",
                                m.table
                            ));
                        }
                    }
                    for c in &m.data_columns {
                        if mcols.contains_key(c) {
                            member_data_columns.push(c.clone());
                        } else {
                            problems.push(format!(
                                "memberships.data_columns: column '{c}' does not exist in table {}",
                                m.table
                            ));
                        }
                    }
                    Some(MembersTable {
                        table: Table {
                            name: m.table.clone(),
                            quoted: m.table.quoted(),
                            id_column: m.organization_column.clone(),
                            id_type: mcols
                                .get(&m.organization_column)
                                .cloned()
                                .unwrap_or_else(|| "uuid".into()),
                        },
                        user_column: m.user_column.clone(),
                    })
                }
            }
        };

        if !problems.is_empty() {
            return Err(AppTablesError::Invalid(problems));
        }
        Ok(AppTables {
            users,
            user_fields,
            organizations,
            org_data_columns,
            members,
            member_role_column,
            member_data_columns,
            notes,
        })
    }

    /// Creates (or, when the Postgres source is off, drops) the statement-level triggers that
    /// record changes of the app tables. Idempotent; runs in one transaction.
    pub async fn install_triggers(&self, pool: &PgPool, enabled: bool) -> Result<(), sqlx::Error> {
        let mut tx = pool.begin().await?;
        // Serialize concurrent start-ups of several instances.
        sqlx::query("select pg_advisory_xact_lock(hashtext('fusionsync.install_triggers'))")
            .execute(&mut *tx)
            .await?;
        for (table, kind) in self.trigger_targets() {
            let key_col = &table.id_column;
            for op in ["insert", "update", "delete"] {
                let trigger = quote_ident(&format!("fusionsync_{kind}_{op}"));
                sqlx::query(&format!(
                    "drop trigger if exists {trigger} on {}",
                    table.quoted
                ))
                .execute(&mut *tx)
                .await?;
                if !enabled {
                    continue;
                }
                let referencing = match op {
                    "insert" => "new table as fusionsync_new_rows",
                    "update" => "old table as fusionsync_old_rows new table as fusionsync_new_rows",
                    _ => "old table as fusionsync_old_rows",
                };
                // Trigger arguments are string literals: escape the column name as one.
                let key_literal = format!("'{}'", key_col.replace('\'', "''"));
                sqlx::query(&format!(
                    "create trigger {trigger} after {op} on {} referencing {referencing}
                     for each statement execute function fusionsync.record_change('{kind}', {key_literal})",
                    table.quoted
                ))
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// The tables that get change triggers, with the entity kind their rows are; each table's
    /// `id_column` is the key the trigger records (the organization column for memberships).
    fn trigger_targets(&self) -> Vec<(&Table, &'static str)> {
        let mut targets = vec![(&self.users, "user")];
        if let Some(o) = &self.organizations {
            targets.push((o, "organization"));
        }
        if let Some(m) = &self.members {
            targets.push((&m.table, "membership"));
        }
        targets
    }

    /// Tables that lack one of fusionsync's three change triggers.
    pub async fn missing_triggers(&self, pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
        let mut missing = Vec::new();
        for (table, kind) in self.trigger_targets() {
            let n: i64 = sqlx::query_scalar(
                "select count(*) from pg_catalog.pg_trigger t
                   join pg_catalog.pg_class c on c.oid = t.tgrelid
                   join pg_catalog.pg_namespace n on n.oid = c.relnamespace
                  where n.nspname = $1 and c.relname = $2 and t.tgname like $3",
            )
            .bind(&table.name.schema)
            .bind(&table.name.name)
            .bind(format!("fusionsync_{kind}_%"))
            .fetch_one(pool)
            .await?;
            if n < 3 {
                missing.push(table.name.to_string());
            }
        }
        Ok(missing)
    }

    // ---- users ---------------------------------------------------------------------------

    /// Current rows of the given users, keyed by id text. Keys must already be valid ids.
    pub async fn users_by_ids(
        &self,
        pool: &PgPool,
        keys: &[String],
    ) -> Result<HashMap<String, Value>, sqlx::Error> {
        rows_by_ids(pool, &self.users, keys).await
    }

    pub async fn user_by_id(&self, pool: &PgPool, key: &str) -> Result<Option<Value>, sqlx::Error> {
        Ok(rows_by_ids(pool, &self.users, &[key.to_string()])
            .await?
            .remove(key))
    }

    /// Upserts the mapped columns of one user as fusionsync (the trigger skips it). Returns
    /// whether the row changed.
    pub async fn upsert_user(
        &self,
        pool: &PgPool,
        key: &str,
        columns: &Map<String, Value>,
    ) -> Result<bool, sqlx::Error> {
        let mut tx = origin_tx(pool).await?;
        let changed = upsert_row(&mut tx, &self.users, key, columns).await?;
        tx.commit().await?;
        Ok(changed)
    }

    pub async fn delete_user(&self, pool: &PgPool, key: &str) -> Result<bool, sqlx::Error> {
        let mut tx = origin_tx(pool).await?;
        let n = sqlx::query(&format!(
            "delete from {} where {} = cast($1 as {})",
            self.users.quoted,
            self.users.id(),
            self.users.id_type
        ))
        .bind(key)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(n > 0)
    }

    /// One page of users in id order, after `after` (keyset paging for the full reconcile).
    pub async fn users_page(
        &self,
        pool: &PgPool,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Value)>, sqlx::Error> {
        page(pool, &self.users, after, limit).await
    }

    // ---- organizations -------------------------------------------------------------------

    pub async fn organization(
        &self,
        pool: &PgPool,
        key: &str,
    ) -> Result<Option<Value>, sqlx::Error> {
        match &self.organizations {
            Some(t) => Ok(rows_by_ids(pool, t, &[key.to_string()]).await?.remove(key)),
            None => Ok(None),
        }
    }

    /// Organizations whose name column equals `name` (to explain a group-name collision).
    pub async fn organizations_named(
        &self,
        pool: &PgPool,
        name_column: &str,
        name: &str,
    ) -> Result<Vec<String>, sqlx::Error> {
        let Some(t) = &self.organizations else {
            return Ok(Vec::new());
        };
        sqlx::query_scalar(&format!(
            "select {}::text from {} where {} = $1",
            t.id(),
            t.quoted,
            quote_ident(name_column)
        ))
        .bind(name)
        .fetch_all(pool)
        .await
    }

    pub async fn organizations_page(
        &self,
        pool: &PgPool,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Value)>, sqlx::Error> {
        match &self.organizations {
            Some(t) => page(pool, t, after, limit).await,
            None => Ok(Vec::new()),
        }
    }

    // ---- memberships ---------------------------------------------------------------------

    /// The membership rows of one organization.
    pub async fn members_of(
        &self,
        pool: &PgPool,
        org_key: &str,
    ) -> Result<Vec<Value>, sqlx::Error> {
        let Some(m) = &self.members else {
            return Ok(Vec::new());
        };
        sqlx::query_scalar(&format!(
            "select to_jsonb(t) from {} t where {} = cast($1 as {})",
            m.table.quoted,
            quote_ident(&m.table.id_column),
            m.table.id_type
        ))
        .bind(org_key)
        .fetch_all(pool)
        .await
    }

    /// Makes the membership rows of one organization equal `wanted` (user id → column values),
    /// as fusionsync (the trigger skips it). Used in two-way membership mode.
    pub async fn write_members(
        &self,
        pool: &PgPool,
        org_key: &str,
        remove: &[String],
        upsert: &[(String, Map<String, Value>)],
    ) -> Result<(), sqlx::Error> {
        let Some(m) = &self.members else {
            return Ok(());
        };
        let mut tx = origin_tx(pool).await?;
        if !remove.is_empty() {
            sqlx::query(&format!(
                "delete from {} where {} = cast($1 as {}) and {}::text = any($2)",
                m.table.quoted,
                quote_ident(&m.table.id_column),
                m.table.id_type,
                quote_ident(&m.user_column)
            ))
            .bind(org_key)
            .bind(remove)
            .execute(&mut *tx)
            .await?;
        }
        for (user, cols) in upsert {
            let mut cols = cols.clone();
            cols.insert(
                m.table.id_column.clone(),
                Value::String(org_key.to_string()),
            );
            cols.insert(m.user_column.clone(), Value::String(user.clone()));
            let names: Vec<String> = cols.keys().map(|c| quote_ident(c)).collect();
            let updates: Vec<String> = cols
                .keys()
                .filter(|c| **c != m.table.id_column && **c != m.user_column)
                .map(|c| format!("{0} = excluded.{0}", quote_ident(c)))
                .collect();
            let conflict = if updates.is_empty() {
                "do nothing".to_string()
            } else {
                format!("do update set {}", updates.join(", "))
            };
            sqlx::query(&format!(
                "insert into {table} ({cols})
                 select {cols} from jsonb_populate_record(null::{table}, $1)
                 on conflict ({org}, {user}) {conflict}",
                table = m.table.quoted,
                cols = names.join(", "),
                org = quote_ident(&m.table.id_column),
                user = quote_ident(&m.user_column),
            ))
            .bind(Value::Object(cols))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Distinct organization ids that have membership rows, paged (full reconcile).
    pub async fn membership_orgs_page(
        &self,
        pool: &PgPool,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, sqlx::Error> {
        let Some(m) = &self.members else {
            return Ok(Vec::new());
        };
        let org = quote_ident(&m.table.id_column);
        let sql = match after {
            Some(_) => format!(
                "select distinct {org}::text, {org} from {t} where {org} > cast($1 as {ty}) order by {org} limit $2",
                t = m.table.quoted,
                ty = m.table.id_type
            ),
            None => format!(
                "select distinct {org}::text, {org} from {t} where $1::text is null order by {org} limit $2",
                t = m.table.quoted
            ),
        };
        let rows = sqlx::query(&sql)
            .bind(after)
            .bind(limit as i64)
            .fetch_all(pool)
            .await?;
        Ok(rows.into_iter().map(|r| r.get::<String, _>(0)).collect())
    }
}

/// A transaction whose writes the trigger ignores (`fusionsync.origin = 'fusionauth'`).
async fn origin_tx(pool: &PgPool) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("select set_config('fusionsync.origin', 'fusionauth', true)")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

async fn rows_by_ids(
    pool: &PgPool,
    table: &Table,
    keys: &[String],
) -> Result<HashMap<String, Value>, sqlx::Error> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = sqlx::query(&format!(
        "select t.{id}::text, to_jsonb(t) from {table} t
          where t.{id} = any(cast($1 as text[])::{ty}[])",
        id = table.id(),
        table = table.quoted,
        ty = table.id_type
    ))
    .bind(keys)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.get::<String, _>(0), r.get::<Value, _>(1)))
        .collect())
}

async fn page(
    pool: &PgPool,
    table: &Table,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<(String, Value)>, sqlx::Error> {
    let sql = match after {
        Some(_) => format!(
            "select t.{id}::text, to_jsonb(t) from {table} t
              where t.{id} > cast($1 as {ty}) order by t.{id} limit $2",
            id = table.id(),
            table = table.quoted,
            ty = table.id_type
        ),
        None => format!(
            "select t.{id}::text, to_jsonb(t) from {table} t
              where $1::text is null order by t.{id} limit $2",
            id = table.id(),
            table = table.quoted
        ),
    };
    let rows = sqlx::query(&sql)
        .bind(after)
        .bind(limit as i64)
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.get::<String, _>(0), r.get::<Value, _>(1)))
        .collect())
}

/// `insert … on conflict (id) do update` of the given columns, writing only when a value
/// differs (so an unchanged row fires no trigger and bumps nothing).
async fn upsert_row(
    tx: &mut Transaction<'_, Postgres>,
    table: &Table,
    key: &str,
    columns: &Map<String, Value>,
) -> Result<bool, sqlx::Error> {
    let mut cols = columns.clone();
    cols.insert(table.id_column.clone(), Value::String(key.to_string()));
    let names: Vec<String> = cols.keys().map(|c| quote_ident(c)).collect();
    let non_id: Vec<String> = cols
        .keys()
        .filter(|c| **c != table.id_column)
        .map(|c| quote_ident(c))
        .collect();
    let conflict = if non_id.is_empty() {
        "do nothing".to_string()
    } else {
        format!(
            "do update set ({cols}) = row({excluded})
             where ({current}) is distinct from ({excluded})",
            cols = non_id.join(", "),
            excluded = non_id
                .iter()
                .map(|c| format!("excluded.{c}"))
                .collect::<Vec<_>>()
                .join(", "),
            current = non_id
                .iter()
                .map(|c| format!("{}.{c}", table.quoted))
                .collect::<Vec<_>>()
                .join(", "),
        )
    };
    let n = sqlx::query(&format!(
        "insert into {table} ({names}) select {names} from jsonb_populate_record(null::{table}, $1)
         on conflict ({id}) {conflict}",
        table = table.quoted,
        names = names.join(", "),
        id = table.id(),
    ))
    .bind(Value::Object(cols))
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(n > 0)
}
