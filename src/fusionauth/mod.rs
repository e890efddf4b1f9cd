//! A typed client for the parts of the FusionAuth API fusionsync uses: users, registrations,
//! groups and group members. Transient failures are retried within one attempt with the
//! `backoff` crate (honouring `Retry-After`); what is left is a [`FusionAuthError`] that knows
//! whether the durable layer should try again.

pub mod error;

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

pub use error::{ErrorItem, Errors, FusionAuthError};

use crate::config::{FusionAuthSettings, Secret};
use crate::metrics::Metrics;

/// Longest `Retry-After` waited for inside one attempt; longer ones end the attempt and the
/// durable retry schedule takes over (at no less than the asked delay).
const MAX_IN_ATTEMPT_RETRY_AFTER: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct FusionAuthClient {
    http: reqwest::Client,
    base: String,
    api_key: Secret,
    tenant_id: Option<Uuid>,
    max_elapsed: Duration,
    metrics: Option<Arc<Metrics>>,
}

/// One page of a search.
#[derive(Debug, Default)]
pub struct Page {
    pub total: u64,
    pub items: Vec<Value>,
    pub next_results: Option<String>,
}

/// A group member as fusionsync needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    pub user_id: String,
    pub data: Value,
}

impl FusionAuthClient {
    pub fn new(
        settings: &FusionAuthSettings,
        in_attempt_max_elapsed: Duration,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .connect_timeout(settings.request_timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(settings.max_idle_connections)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .user_agent(concat!("fusionsync/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            base: settings.url.trim_end_matches('/').to_string(),
            api_key: settings.api_key.clone(),
            tenant_id: settings.tenant_id,
            max_elapsed: in_attempt_max_elapsed,
            metrics,
        })
    }

    async fn send_once(
        &self,
        method: &Method,
        path: &str,
        endpoint: &'static str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<(StatusCode, bytes::Bytes), FusionAuthError> {
        let url = format!("{}{}", self.base, path);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .header("Authorization", self.api_key.expose());
        if let Some(t) = self.tenant_id {
            req = req.header("X-FusionAuth-TenantId", t.to_string());
        }
        if !query.is_empty() {
            req = req.query(query);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let started = Instant::now();
        let result = req.send().await;
        let elapsed = started.elapsed();
        let resp = match result {
            Ok(r) => r,
            Err(e) => {
                if let Some(m) = &self.metrics {
                    m.fusionauth_request(endpoint, method.as_str(), "error", elapsed);
                }
                return Err(transport_error(method, path, &e));
            }
        };
        let status = resp.status();
        if let Some(m) = &self.metrics {
            m.fusionauth_request(endpoint, method.as_str(), status.as_str(), elapsed);
        }
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| transport_error(method, path, &e))?;
        if status.is_success() || status == StatusCode::NOT_FOUND {
            return Ok((status, bytes));
        }
        let text = String::from_utf8_lossy(&bytes).to_string();
        let errors = Box::new(serde_json::from_slice::<Errors>(&bytes).unwrap_or_default());
        Err(FusionAuthError::Status {
            method: method.to_string(),
            path: path.to_string(),
            status: status.as_u16(),
            errors,
            body: text,
            retry_after,
        })
    }

    /// Sends with in-attempt retries of transient failures. 404 is returned, not an error:
    /// callers decide whether "not found" is expected.
    async fn send(
        &self,
        method: Method,
        path: &str,
        endpoint: &'static str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<(StatusCode, bytes::Bytes), FusionAuthError> {
        let policy = backoff::ExponentialBackoffBuilder::new()
            .with_initial_interval(Duration::from_millis(50))
            .with_max_interval(Duration::from_secs(1))
            .with_max_elapsed_time(Some(self.max_elapsed))
            .build();
        backoff::future::retry(policy, || async {
            match self.send_once(&method, path, endpoint, query, body).await {
                Ok(r) => Ok(r),
                Err(e) if e.is_retryable() => match e.retry_after() {
                    Some(ra) if ra > MAX_IN_ATTEMPT_RETRY_AFTER => {
                        Err(backoff::Error::permanent(e))
                    }
                    Some(ra) => Err(backoff::Error::retry_after(e, ra)),
                    None => Err(backoff::Error::transient(e)),
                },
                Err(e) => Err(backoff::Error::permanent(e)),
            }
        })
        .await
    }

    fn decode(method: &str, path: &str, body: &bytes::Bytes) -> Result<Value, FusionAuthError> {
        if body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(body).map_err(|e| FusionAuthError::Decode {
            method: method.to_string(),
            path: path.to_string(),
            message: e.to_string(),
        })
    }

    fn not_found(method: &str, path: &str) -> FusionAuthError {
        FusionAuthError::Status {
            method: method.to_string(),
            path: path.to_string(),
            status: 404,
            errors: Box::default(),
            body: String::new(),
            retry_after: None,
        }
    }

    // ---- users ---------------------------------------------------------------------------

    /// `GET /api/user/{id}`; `None` when FusionAuth has no such user.
    pub async fn get_user(&self, id: &Uuid) -> Result<Option<Value>, FusionAuthError> {
        let path = format!("/api/user/{id}");
        let (status, body) = self
            .send(Method::GET, &path, "/api/user/{id}", &[], None)
            .await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let v = Self::decode("GET", &path, &body)?;
        Ok(v.get("user").cloned())
    }

    /// `POST /api/user/{id}` (or `/api/user/registration/{id}` when a registration is given,
    /// which creates the user and registers it in one call).
    pub async fn create_user(
        &self,
        id: &Uuid,
        user: &Value,
        registration: Option<&Value>,
        send_set_password_email: bool,
    ) -> Result<(), FusionAuthError> {
        let (path, endpoint, body) = match registration {
            Some(reg) => (
                format!("/api/user/registration/{id}"),
                "/api/user/registration/{id}",
                json!({
                    "user": user,
                    "registration": reg,
                    "sendSetPasswordEmail": send_set_password_email,
                    "skipRegistrationVerification": true,
                }),
            ),
            None => (
                format!("/api/user/{id}"),
                "/api/user/{id}",
                json!({ "user": user, "sendSetPasswordEmail": send_set_password_email }),
            ),
        };
        let (status, _) = self
            .send(Method::POST, &path, endpoint, &[], Some(&body))
            .await?;
        if status == StatusCode::NOT_FOUND {
            return Err(Self::not_found("POST", &path));
        }
        Ok(())
    }

    /// `PATCH /api/user/{id}`: merges the given fields (null removes a field).
    pub async fn patch_user(&self, id: &Uuid, user: &Value) -> Result<bool, FusionAuthError> {
        let path = format!("/api/user/{id}");
        let (status, _) = self
            .send(
                Method::PATCH,
                &path,
                "/api/user/{id}",
                &[],
                Some(&json!({ "user": user })),
            )
            .await?;
        Ok(status != StatusCode::NOT_FOUND)
    }

    /// `DELETE /api/user/{id}` (deactivate) or with `hardDelete=true`. False when unknown.
    pub async fn delete_user(&self, id: &Uuid, hard: bool) -> Result<bool, FusionAuthError> {
        let path = format!("/api/user/{id}");
        let query: Vec<(&str, String)> = if hard {
            vec![("hardDelete", "true".into())]
        } else {
            vec![]
        };
        let (status, _) = self
            .send(Method::DELETE, &path, "/api/user/{id}", &query, None)
            .await?;
        Ok(status != StatusCode::NOT_FOUND)
    }

    /// `PUT /api/user/{id}?reactivate=true` with no body. False when unknown.
    pub async fn reactivate_user(&self, id: &Uuid) -> Result<bool, FusionAuthError> {
        let path = format!("/api/user/{id}");
        let (status, _) = self
            .send(
                Method::PUT,
                &path,
                "/api/user/{id}",
                &[("reactivate", "true".into())],
                None,
            )
            .await?;
        Ok(status != StatusCode::NOT_FOUND)
    }

    /// One page of all users (`POST /api/user/search`, `queryString: "*"`).
    pub async fn search_users(
        &self,
        start_row: u64,
        number_of_results: usize,
        next_results: Option<&str>,
    ) -> Result<Page, FusionAuthError> {
        let path = "/api/user/search";
        let search = match next_results {
            Some(token) => json!({ "search": { "nextResults": token } }),
            None => json!({ "search": {
                "queryString": "*",
                "numberOfResults": number_of_results,
                "startRow": start_row,
                "sortFields": [{ "name": "id" }]
            }}),
        };
        let (_, body) = self
            .send(Method::POST, path, path, &[], Some(&search))
            .await?;
        let v = Self::decode("POST", path, &body)?;
        Ok(Page {
            total: v.get("total").and_then(Value::as_u64).unwrap_or(0),
            items: v
                .get("users")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
            next_results: v
                .get("nextResults")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }

    /// `GET /api/user/search?ids=…&ids=…`: the users that exist among `ids`.
    pub async fn users_by_ids(&self, ids: &[Uuid]) -> Result<Vec<Value>, FusionAuthError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let path = "/api/user/search";
        let query: Vec<(&str, String)> = ids.iter().map(|i| ("ids", i.to_string())).collect();
        let (status, body) = self.send(Method::GET, path, path, &query, None).await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(Vec::new());
        }
        Ok(Self::decode("GET", path, &body)?
            .get("users")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default())
    }

    // ---- groups --------------------------------------------------------------------------

    pub async fn get_group(&self, id: &Uuid) -> Result<Option<Value>, FusionAuthError> {
        let path = format!("/api/group/{id}");
        let (status, body) = self
            .send(Method::GET, &path, "/api/group/{id}", &[], None)
            .await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Ok(Self::decode("GET", &path, &body)?.get("group").cloned())
    }

    /// `POST /api/group/{id}` when `create`, else `PUT` (which is a 404 for an unknown group:
    /// returned as `Ok(false)`).
    pub async fn save_group(
        &self,
        id: &Uuid,
        group: &Value,
        create: bool,
    ) -> Result<bool, FusionAuthError> {
        let path = format!("/api/group/{id}");
        let method = if create { Method::POST } else { Method::PUT };
        let (status, _) = self
            .send(
                method,
                &path,
                "/api/group/{id}",
                &[],
                Some(&json!({ "group": group, "roleIds": [] })),
            )
            .await?;
        Ok(status != StatusCode::NOT_FOUND)
    }

    pub async fn delete_group(&self, id: &Uuid) -> Result<bool, FusionAuthError> {
        let path = format!("/api/group/{id}");
        let (status, _) = self
            .send(Method::DELETE, &path, "/api/group/{id}", &[], None)
            .await?;
        Ok(status != StatusCode::NOT_FOUND)
    }

    /// `GET /api/group`: every group of the tenant.
    pub async fn list_groups(&self) -> Result<Vec<Value>, FusionAuthError> {
        let path = "/api/group";
        let (_, body) = self.send(Method::GET, path, path, &[], None).await?;
        Ok(Self::decode("GET", path, &body)?
            .get("groups")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default())
    }

    /// All members of a group (`POST /api/group/member/search`, paged).
    pub async fn group_members(
        &self,
        group_id: &Uuid,
        page_size: usize,
    ) -> Result<Vec<Member>, FusionAuthError> {
        let path = "/api/group/member/search";
        let mut out = Vec::new();
        let mut start = 0usize;
        loop {
            let search = json!({ "search": {
                "groupId": group_id,
                "numberOfResults": page_size,
                "startRow": start
            }});
            let (_, body) = self
                .send(Method::POST, path, path, &[], Some(&search))
                .await?;
            let v = Self::decode("POST", path, &body)?;
            let members = v
                .get("members")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let total = v.get("total").and_then(Value::as_u64).unwrap_or(0) as usize;
            let n = members.len();
            for m in members {
                if let Some(uid) = m.get("userId").and_then(Value::as_str) {
                    out.push(Member {
                        user_id: uid.to_string(),
                        data: m.get("data").cloned().unwrap_or_else(|| json!({})),
                    });
                }
            }
            start += n;
            if n == 0 || start >= total {
                break;
            }
        }
        Ok(out)
    }

    /// `POST /api/group/member`: adds members (re-adding an existing one changes nothing).
    pub async fn add_members(
        &self,
        group_id: &Uuid,
        members: &[Member],
    ) -> Result<(), FusionAuthError> {
        if members.is_empty() {
            return Ok(());
        }
        let path = "/api/group/member";
        let list: Vec<Value> = members
            .iter()
            .map(|m| json!({ "userId": m.user_id, "data": m.data }))
            .collect();
        let body = json!({ "members": { group_id.to_string(): list } });
        self.send(Method::POST, path, path, &[], Some(&body))
            .await?;
        Ok(())
    }

    /// `DELETE /api/group/member` with a body naming the users to remove from the group.
    pub async fn remove_members(
        &self,
        group_id: &Uuid,
        user_ids: &[String],
    ) -> Result<(), FusionAuthError> {
        if user_ids.is_empty() {
            return Ok(());
        }
        let path = "/api/group/member";
        let body = json!({ "members": { group_id.to_string(): user_ids } });
        self.send(Method::DELETE, path, path, &[], Some(&body))
            .await?;
        Ok(())
    }
}

/// A request that got no (complete) answer.
fn transport_error(method: &Method, path: &str, e: &reqwest::Error) -> FusionAuthError {
    if e.is_timeout() {
        FusionAuthError::Timeout {
            method: method.to_string(),
            path: path.to_string(),
        }
    } else {
        FusionAuthError::Transport {
            method: method.to_string(),
            path: path.to_string(),
            message: error_chain(e),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
