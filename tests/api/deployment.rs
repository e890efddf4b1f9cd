//! The shipped stack agrees with fusionsync's defaults: Hasura's migrations create tables the
//! default config accepts, its metadata has event triggers on exactly those tables with the
//! default secret header, and the kickstart, compose file and config use the same ids.

use std::collections::BTreeSet;

use fusionsync::config::{Config, Needs};
use serde_json::Value;

use crate::helpers::*;

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn default_config(db_url: &str) -> Config {
    let env = [
        ("DATABASE_URL", db_url),
        ("FUSIONAUTH_URL", "http://fusionauth:9011"),
        ("FUSIONAUTH_API_KEY", "k"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    Config::load_from(None, Needs::DatabaseAndFusionAuth, env).unwrap()
}

/// (schema, table, header names) of each table file with an event trigger.
fn hasura_triggers() -> Vec<(String, String, Vec<String>, String)> {
    let dir = format!(
        "{}/hasura/metadata/databases/default/tables",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        if !text.contains("event_triggers:") {
            continue;
        }
        let lines: Vec<&str> = text.lines().collect();
        let value_after = |prefix: &str| {
            lines
                .iter()
                .find_map(|l| l.strip_prefix(prefix))
                .map(|v| v.trim().to_string())
        };
        let name = value_after("  name: ").unwrap();
        let schema = value_after("  schema: ").unwrap();
        let headers = lines
            .iter()
            .filter_map(|l| l.trim().strip_prefix("- name: "))
            .filter(|n| !n.starts_with("fusionsync_") && !n.contains(' '))
            .map(str::to_string)
            .filter(|n| n.starts_with('X') || n.starts_with('x'))
            .collect();
        let url = value_after("    webhook_from_env: ").unwrap_or_default();
        out.push((schema, name, headers, url));
    }
    out
}

#[tokio::test]
async fn hasura_migrations_create_tables_the_default_config_accepts() {
    let db = TestDb::with_schema(&read(
        "hasura/migrations/default/1733300000000_app_tables/up.sql",
    ))
    .await;
    let cfg = default_config(&db.url);
    let pool = fusionsync::app::prepare_database(&cfg).await.unwrap();
    let tables = fusionsync::app::prepare_tables(&pool, &cfg)
        .await
        .expect("the default config fits Hasura's tables");
    assert!(tables.organizations.is_some() && tables.members.is_some());
    pool.close().await;
    db.drop_db().await;
}

#[test]
fn hasura_event_triggers_cover_exactly_the_configured_tables_with_the_secret_header() {
    let cfg = default_config("postgres://localhost/app");
    let want: BTreeSet<String> = [
        &cfg.users.table,
        &cfg.organizations.table,
        &cfg.memberships.table,
    ]
    .iter()
    .map(|t| t.to_string())
    .collect();
    let triggers = hasura_triggers();
    let have: BTreeSet<String> = triggers
        .iter()
        .map(|(s, n, _, _)| format!("{s}.{n}"))
        .collect();
    assert_eq!(have, want);
    for (_, table, headers, url_env) in &triggers {
        assert_eq!(headers, &vec![cfg.hasura.secret_header.clone()], "{table}");
        assert_eq!(url_env, "FUSIONSYNC_EVENTS_URL", "{table}");
    }
    let compose = read("docker-compose.yml");
    assert!(compose.contains("FUSIONSYNC_EVENTS_URL: http://fusionsync:8080/hasura/events"));
}

#[test]
fn kickstart_compose_and_config_use_the_same_ids_and_names() {
    let kick: Value = serde_json::from_str(&read("fusionauth/kickstart.json")).unwrap();
    let app_id = kick["variables"]["applicationId"].as_str().unwrap();
    let compose = read("docker-compose.yml");
    assert!(compose.contains(&format!("FUSIONSYNC__FUSIONAUTH__APPLICATION_ID: {app_id}")));
    assert!(
        compose.contains(&format!("\"audience\": \"{app_id}\"")),
        "Hasura checks the application's tokens"
    );
    // The API key may call exactly what the client calls.
    let endpoints: BTreeSet<&str> = kick["apiKeys"][0]["permissions"]["endpoints"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let client = read("src/fusionauth/mod.rs");
    for e in [
        "/api/user",
        "/api/user/search",
        "/api/user/registration",
        "/api/group",
        "/api/group/member",
        "/api/group/member/search",
    ] {
        assert!(endpoints.contains(e), "kickstart API key lacks {e}");
        assert!(
            client.contains(&format!("\"{e}")),
            "client does not use {e}"
        );
    }
    // The webhook points at fusionsync, is signed, and sends the header fusionsync checks.
    let webhook = kick["requests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["url"].as_str().unwrap().starts_with("/api/webhook/"))
        .unwrap();
    assert_eq!(
        webhook["body"]["webhook"]["url"],
        "http://fusionsync:8080/fusionauth/webhook"
    );
    assert_eq!(
        webhook["body"]["webhook"]["signatureConfiguration"]["enabled"],
        true
    );
    let header = webhook["body"]["webhook"]["headers"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    assert!(compose.contains(&format!("FUSIONSYNC__WEBHOOK__HEADER_NAME: {header}")));
    // Every event the webhook sends is one fusionsync acts on.
    for (event, on) in webhook["body"]["webhook"]["eventsEnabled"]
        .as_object()
        .unwrap()
    {
        assert_eq!(on, true);
        let body = serde_json::json!({"event": {"type": event, "id": "1", "user": {"id": uuid::Uuid::new_v4()}, "group": {"id": uuid::Uuid::new_v4()}}});
        let action = fusionsync::http::fusionauth_webhook::interpret(
            &body,
            fusionsync::config::MembershipMode::Database,
            None,
        )
        .unwrap();
        assert!(
            matches!(
                action,
                fusionsync::http::fusionauth_webhook::WebhookAction::Record(_)
            ),
            "{event} would be ignored"
        );
    }
    // No secret is written into the files: the kickstart has placeholders the init step fills.
    assert_eq!(kick["variables"]["apiKey"], "__FUSIONAUTH_API_KEY__");
}
