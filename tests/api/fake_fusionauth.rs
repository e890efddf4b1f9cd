//! A stateful fake FusionAuth: the paths, status codes, error bodies and uniqueness rules of
//! the real API as documented in shared/fixtures (README), with switches for faults. Every
//! request is recorded, and concurrent requests touching the same user or group are counted
//! as overlaps.

#![allow(dead_code)]
// Handlers return `Result<_, Response>` the way axum code does; the size does not matter here.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{Request, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::Rng;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const API_KEY: &str = "test-api-key-7f3a";

#[derive(Clone, Debug)]
pub struct Recorded {
    pub at: std::time::Instant,
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Value,
}

impl Recorded {
    pub fn is_write(&self) -> bool {
        self.method != "GET" && !self.path.ends_with("/search")
    }
}

#[derive(Default)]
pub struct Faults {
    /// Probability (per mille) of answering 503 / 500.
    pub fail_per_mille: AtomicU64,
    /// Probability (per mille) of dropping the connection without an answer.
    pub drop_per_mille: AtomicU64,
    /// Probability (per mille) of doing the work and then dropping the connection (the client
    /// cannot know the request succeeded).
    pub drop_after_per_mille: AtomicU64,
    /// Fixed latency added to each request, in microseconds, plus a random part.
    pub latency_us: AtomicU64,
    pub jitter_us: AtomicU64,
    /// Everything answers 503 (`Unavailable`) or the connection is dropped (`Down`).
    pub unavailable: AtomicBool,
    pub down: AtomicBool,
    /// Answer 503 to the next N requests.
    pub fail_next: AtomicU64,
    /// What was injected so far.
    pub injected_errors: AtomicU64,
    pub injected_drops: AtomicU64,
    pub refused_while_down: AtomicU64,
}

#[derive(Default)]
pub struct Data {
    pub users: BTreeMap<Uuid, Value>,
    pub groups: BTreeMap<Uuid, Value>,
    /// group id → members (id, userId, data, insertInstant)
    pub members: BTreeMap<Uuid, Vec<Value>>,
    pub log: Vec<Recorded>,
    pub in_flight: HashMap<String, usize>,
    pub overlaps: Vec<String>,
    /// how many times each user id was created (a duplicate create is a bug)
    pub creates: HashMap<Uuid, usize>,
    pub group_creates: HashMap<Uuid, usize>,
    /// lower-case email → user id, so uniqueness checks stay cheap with many users (a hit is
    /// verified against the user, so users removed or edited directly are handled).
    pub emails: HashMap<String, Uuid>,
}

pub struct FakeState {
    pub data: Mutex<Data>,
    pub faults: Faults,
    pub requests: AtomicUsize,
    /// Require `X-FusionAuth-TenantId` (as with more than one tenant).
    pub require_tenant: AtomicBool,
    /// Before FusionAuth 1.59 a password was required unless sendSetPasswordEmail.
    pub require_password: AtomicBool,
}

pub struct FakeFusionAuth {
    pub addr: SocketAddr,
    pub state: Arc<FakeState>,
    stop: CancellationToken,
}

impl Drop for FakeFusionAuth {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[derive(Clone)]
struct Kill(CancellationToken);

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn field_error(field: &str, code: &str, message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "fieldErrors": { field: [{ "code": code, "message": message }] } })),
    )
        .into_response()
}

fn general_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({ "generalErrors": [{ "code": code, "message": message }] })),
    )
        .into_response()
}

fn empty(status: StatusCode) -> Response {
    status.into_response()
}

impl FakeFusionAuth {
    pub async fn start() -> Self {
        let state = Arc::new(FakeState {
            data: Mutex::new(Data::default()),
            faults: Faults::default(),
            requests: AtomicUsize::new(0),
            require_tenant: AtomicBool::new(false),
            require_password: AtomicBool::new(false),
        });
        let router = Router::new()
            .route(
                "/api/user/search",
                get(search_users_get).post(search_users_post),
            )
            .route(
                "/api/user/{id}",
                post(create_user)
                    .get(get_user)
                    .put(put_user)
                    .patch(patch_user)
                    .delete(delete_user),
            )
            .route(
                "/api/user/registration/{id}",
                post(create_user_registration),
            )
            .route("/api/group", get(list_groups))
            .route("/api/group/member/search", post(search_members))
            .route(
                "/api/group/member",
                post(add_members)
                    .put(replace_members)
                    .delete(delete_members),
            )
            .route(
                "/api/group/{id}",
                post(create_group)
                    .put(put_group)
                    .get(get_group)
                    .delete(delete_group),
            )
            .layer(axum::middleware::from_fn_with_state(state.clone(), gate))
            // Public keys, as FusionAuth publishes them (no API key needed).
            .route("/.well-known/jwks.json", get(jwks))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let stop2 = stop.clone();
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = stop2.cancelled() => return,
                    r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
                };
                if st.faults.down.load(Ordering::SeqCst) {
                    st.faults.refused_while_down.fetch_add(1, Ordering::SeqCst);
                    drop(stream);
                    continue;
                }
                let kill = CancellationToken::new();
                let router = router.clone();
                let stop3 = stop2.clone();
                tokio::spawn(async move {
                    let k = kill.clone();
                    let svc = hyper::service::service_fn(
                        move |mut req: Request<hyper::body::Incoming>| {
                            req.extensions_mut().insert(Kill(k.clone()));
                            let router = router.clone();
                            async move {
                                use tower::ServiceExt;
                                router.oneshot(req.map(Body::new)).await
                            }
                        },
                    );
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = kill.cancelled() => {}
                        _ = stop3.cancelled() => {}
                    }
                });
            }
        });
        FakeFusionAuth { addr, state, stop }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn data(&self) -> std::sync::MutexGuard<'_, Data> {
        self.state.data.lock().unwrap()
    }

    pub fn user(&self, id: &Uuid) -> Option<Value> {
        self.data().users.get(id).cloned()
    }

    pub fn group(&self, id: &Uuid) -> Option<Value> {
        self.data().groups.get(id).cloned()
    }

    /// user id → member data of a group
    pub fn members(&self, gid: &Uuid) -> BTreeMap<String, Value> {
        self.data()
            .members
            .get(gid)
            .map(|ms| {
                ms.iter()
                    .map(|m| {
                        (
                            m["userId"].as_str().unwrap().to_string(),
                            m.get("data").cloned().unwrap_or(json!({})),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn log(&self) -> Vec<Recorded> {
        self.data().log.clone()
    }

    pub fn writes(&self) -> Vec<Recorded> {
        self.log().into_iter().filter(Recorded::is_write).collect()
    }

    pub fn clear_log(&self) {
        self.data().log.clear();
    }

    /// Creates a user directly, as a sign-up on FusionAuth's hosted pages would.
    pub fn insert_user(&self, user: Value) -> Uuid {
        let id = user
            .get("id")
            .and_then(Value::as_str)
            .and_then(|s| Uuid::parse_str(s).ok())
            .unwrap_or_else(Uuid::new_v4);
        let mut u = user;
        u["id"] = json!(id.to_string());
        u.as_object_mut()
            .unwrap()
            .entry("active")
            .or_insert(json!(true));
        u["insertInstant"] = json!(now_ms());
        let mut d = self.data();
        index_email(&mut d, id, &u);
        d.users.insert(id, u);
        id
    }

    /// Adds a member by hand, as in FusionAuth's admin UI.
    pub fn insert_member(&self, gid: &Uuid, user: &Uuid, data: Value) {
        self.data().members.entry(*gid).or_default().push(json!({
            "id": Uuid::new_v4().to_string(), "userId": user.to_string(), "data": data, "insertInstant": now_ms()
        }));
    }

    pub fn set_fail_per_mille(&self, n: u64) {
        self.state.faults.fail_per_mille.store(n, Ordering::SeqCst);
    }
    pub fn set_drop_per_mille(&self, n: u64) {
        self.state.faults.drop_per_mille.store(n, Ordering::SeqCst);
    }
    pub fn set_drop_after_per_mille(&self, n: u64) {
        self.state
            .faults
            .drop_after_per_mille
            .store(n, Ordering::SeqCst);
    }
    pub fn set_latency(&self, fixed: Duration, jitter: Duration) {
        self.state
            .faults
            .latency_us
            .store(fixed.as_micros() as u64, Ordering::SeqCst);
        self.state
            .faults
            .jitter_us
            .store(jitter.as_micros() as u64, Ordering::SeqCst);
    }
    pub fn set_unavailable(&self, on: bool) {
        self.state.faults.unavailable.store(on, Ordering::SeqCst);
    }
    pub fn set_down(&self, on: bool) {
        self.state.faults.down.store(on, Ordering::SeqCst);
    }
    pub fn overlaps(&self) -> Vec<String> {
        self.data().overlaps.clone()
    }
    pub fn max_creates(&self) -> usize {
        let d = self.data();
        d.creates
            .values()
            .chain(d.group_creates.values())
            .copied()
            .max()
            .unwrap_or(0)
    }
}

/// The key a request touches, for overlap detection.
fn entity_of(uri: &Uri, body: &Value) -> Option<String> {
    let p = uri.path();
    if let Some(rest) = p.strip_prefix("/api/user/registration/") {
        return Some(format!("user:{rest}"));
    }
    if let Some(rest) = p.strip_prefix("/api/user/") {
        if rest != "search" {
            return Some(format!("user:{rest}"));
        }
    }
    if p == "/api/group/member" {
        if let Some(m) = body.get("members").and_then(Value::as_object) {
            return m.keys().next().map(|g| format!("members:{g}"));
        }
    }
    if p == "/api/group/member/search" {
        return None;
    }
    if let Some(rest) = p.strip_prefix("/api/group/") {
        return Some(format!("group:{rest}"));
    }
    None
}

struct InFlight {
    state: Arc<FakeState>,
    key: Option<String>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(k) = &self.key {
            let mut d = self.state.data.lock().unwrap();
            if let Some(n) = d.in_flight.get_mut(k) {
                *n -= 1;
            }
        }
    }
}

/// Authentication, faults, latency, recording and overlap detection in front of every route.
async fn gate(
    State(st): State<Arc<FakeState>>,
    Extension(kill): Extension<Kill>,
    req: Request<Body>,
    next: axum::middleware::Next,
) -> Response {
    st.requests.fetch_add(1, Ordering::SeqCst);
    let f = &st.faults;
    if f.down.load(Ordering::SeqCst) {
        f.refused_while_down.fetch_add(1, Ordering::SeqCst);
        kill.0.cancel();
        return std::future::pending().await;
    }
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 16 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let json_body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let (drop_it, fail_it, delay) = {
        let mut rng = rand::thread_rng();
        let drop_it = rng.gen_range(0..1000) < f.drop_per_mille.load(Ordering::SeqCst);
        let fail_it = rng.gen_range(0..1000) < f.fail_per_mille.load(Ordering::SeqCst);
        let jitter = f.jitter_us.load(Ordering::SeqCst);
        let delay = f.latency_us.load(Ordering::SeqCst)
            + if jitter > 0 {
                rng.gen_range(0..jitter)
            } else {
                0
            };
        (drop_it, fail_it, delay)
    };
    let key = entity_of(&parts.uri, &json_body);
    let _guard = {
        let mut d = st.data.lock().unwrap();
        d.log.push(Recorded {
            at: std::time::Instant::now(),
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            query: parts.uri.query().unwrap_or("").to_string(),
            body: json_body,
        });
        if let Some(k) = &key {
            let n = d.in_flight.entry(k.clone()).or_insert(0);
            *n += 1;
            if *n > 1 {
                d.overlaps
                    .push(format!("{} {}", parts.method, parts.uri.path()));
            }
        }
        InFlight {
            state: st.clone(),
            key,
        }
    };
    if delay > 0 {
        tokio::time::sleep(Duration::from_micros(delay)).await;
    }
    if drop_it {
        f.injected_drops.fetch_add(1, Ordering::SeqCst);
        kill.0.cancel();
        return std::future::pending().await;
    }
    if f.unavailable.load(Ordering::SeqCst) {
        return empty(StatusCode::SERVICE_UNAVAILABLE);
    }
    if f.fail_next.load(Ordering::SeqCst) > 0 {
        f.fail_next.fetch_sub(1, Ordering::SeqCst);
        return empty(StatusCode::SERVICE_UNAVAILABLE);
    }
    if fail_it {
        f.injected_errors.fetch_add(1, Ordering::SeqCst);
        let status = if rand::thread_rng().gen_bool(0.5) {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        return empty(status);
    }
    match parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
    {
        Some(k) if k == API_KEY => {}
        _ => return empty(StatusCode::UNAUTHORIZED),
    }
    if st.require_tenant.load(Ordering::SeqCst)
        && !parts.headers.contains_key("x-fusionauth-tenantid")
    {
        return general_error(
            StatusCode::BAD_REQUEST,
            "[TenantIdRequired]",
            "A Tenant Id is required to complete this request. To complete this request, you may assign a Tenant to your API key, or add the X-FusionAuth-TenantId HTTP request header with the Tenant Id.",
        );
    }
    if !bytes.is_empty() && serde_json::from_slice::<Value>(&bytes).is_err() {
        return general_error(
            StatusCode::BAD_REQUEST,
            "[invalidJSON]",
            "Invalid JSON in the request body.",
        );
    }
    let req = Request::from_parts(parts, Body::from(bytes));
    let resp = next.run(req).await;
    if rand::thread_rng().gen_range(0..1000) < f.drop_after_per_mille.load(Ordering::SeqCst) {
        f.injected_drops.fetch_add(1, Ordering::SeqCst);
        kill.0.cancel();
        return std::future::pending().await;
    }
    resp
}

/// The test key pair's public half (tests/fixtures/keys), like FusionAuth's Key Master keys.
async fn jwks(State(st): State<Arc<FakeState>>) -> Response {
    st.requests.fetch_add(1, Ordering::SeqCst);
    let path = format!(
        "{}/tests/fixtures/keys/webhook-test-jwks.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let body: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    Json(body).into_response()
}

fn parse_id(id: &str, field: &str) -> Result<Uuid, Response> {
    Uuid::parse_str(id).map_err(|_| field_error(field, &format!("[couldNotConvert]{field}"), &format!("Invalid {field} [{id}]. This must be a valid UUID String (e.g. 25a872da-bb44-4af8-a43d-e7bcb5351ebc).")))
}

fn body_json(bytes: &Bytes) -> Value {
    serde_json::from_slice(bytes).unwrap_or(Value::Null)
}

fn email_taken(d: &Data, email: &str, except: &Uuid) -> bool {
    let e = email.to_lowercase();
    match d.emails.get(&e) {
        Some(id) if id != except => d
            .users
            .get(id)
            .and_then(|u| u.get("email"))
            .and_then(Value::as_str)
            .is_some_and(|x| x.to_lowercase() == e),
        _ => false,
    }
}

fn index_email(d: &mut Data, id: Uuid, user: &Value) {
    if let Some(e) = user.get("email").and_then(Value::as_str) {
        d.emails.insert(e.to_lowercase(), id);
    }
}

fn username_taken(d: &Data, username: &str, except: &Uuid) -> bool {
    d.users
        .iter()
        .any(|(id, u)| id != except && u.get("username").and_then(Value::as_str) == Some(username))
}

fn validate_user(d: &Data, id: &Uuid, user: &Value) -> Result<(), Response> {
    let email = user
        .get("email")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty());
    let username = user
        .get("username")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty());
    if email.is_none() && username.is_none() {
        return Err(field_error(
            "user.email",
            "[blank]user.email",
            "You must specify either the [user.email] or [user.username] property.",
        ));
    }
    if let Some(e) = email {
        if !e.contains('@') {
            return Err(field_error(
                "user.email",
                "[notEmail]user.email",
                "The [user.email] property is not a valid email address.",
            ));
        }
        if email_taken(d, e, id) {
            return Err(field_error(
                "user.email",
                "[duplicate]user.email",
                &format!("A User with email = [{e}] already exists."),
            ));
        }
    }
    if let Some(u) = username {
        if username_taken(d, u, id) {
            return Err(field_error(
                "user.username",
                "[duplicate]user.username",
                &format!("A User with username = [{u}] already exists."),
            ));
        }
    }
    for f in ["firstName", "lastName", "email", "username"] {
        if user
            .get(f)
            .and_then(Value::as_str)
            .is_some_and(|s| s.chars().count() > 191)
        {
            return Err(field_error(
                &format!("user.{f}"),
                &format!("[tooLong]user.{f}"),
                "Too long.",
            ));
        }
    }
    Ok(())
}

fn do_create_user(
    st: &FakeState,
    id: &str,
    body: &Value,
    registration: Option<&Value>,
) -> Response {
    let id = match parse_id(id, "userId") {
        Ok(i) => i,
        Err(r) => return r,
    };
    let Some(user) = body.get("user").filter(|u| u.is_object()) else {
        return field_error(
            "user",
            "[missing]user",
            "Your request is missing the User information as JSON in the entity-body.",
        );
    };
    let mut d = st.data.lock().unwrap();
    if d.users.contains_key(&id) {
        return field_error(
            "userId",
            "[duplicate]userId",
            &format!("A User with Id [{id}] already exists."),
        );
    }
    if let Err(e) = validate_user(&d, &id, user) {
        return e;
    }
    let send_email = body
        .get("sendSetPasswordEmail")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let password = user.get("password").and_then(Value::as_str);
    if password.is_none() && !send_email && st.require_password.load(Ordering::SeqCst) {
        return field_error(
            "user.password",
            "[blank]user.password",
            "You must specify the [user.password] property.",
        );
    }
    if password.is_some_and(|p| p.len() < 8) {
        return field_error(
            "user.password",
            "[tooShort]user.password",
            "The [user.password] property is shorter than the minimum of [8] characters.",
        );
    }
    let mut u = user.clone();
    let obj = u.as_object_mut().unwrap();
    obj.remove("password");
    obj.insert("id".into(), json!(id.to_string()));
    obj.insert("active".into(), json!(true));
    obj.insert("insertInstant".into(), json!(now_ms()));
    obj.insert(
        "tenantId".into(),
        json!("f24aca2b-ce4a-4dad-951a-c9d690e71415"),
    );
    if let Some(reg) = registration {
        obj.insert("registrations".into(), json!([{ "applicationId": reg.get("applicationId"), "roles": reg.get("roles").cloned().unwrap_or(json!([])), "id": Uuid::new_v4().to_string() }]));
    }
    index_email(&mut d, id, &u);
    d.users.insert(id, u.clone());
    *d.creates.entry(id).or_insert(0) += 1;
    (StatusCode::OK, Json(json!({ "user": u }))).into_response()
}

async fn create_user(
    State(st): State<Arc<FakeState>>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Response {
    do_create_user(&st, &id, &body_json(&bytes), None)
}

async fn create_user_registration(
    State(st): State<Arc<FakeState>>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Response {
    let body = body_json(&bytes);
    let reg = body.get("registration").cloned();
    if reg.as_ref().and_then(|r| r.get("applicationId")).is_none() {
        return field_error(
            "registration.applicationId",
            "[blank]registration.applicationId",
            "You must specify the [registration.applicationId] property.",
        );
    }
    do_create_user(&st, &id, &body, reg.as_ref())
}

async fn get_user(State(st): State<Arc<FakeState>>, Path(id): Path<String>) -> Response {
    let id = match parse_id(&id, "userId") {
        Ok(i) => i,
        Err(r) => return r,
    };
    match st.data.lock().unwrap().users.get(&id) {
        Some(u) => Json(json!({ "user": u })).into_response(),
        None => empty(StatusCode::NOT_FOUND),
    }
}

fn deactivated_error() -> Response {
    field_error(
        "userId",
        "[inactive]userId",
        "The User is deactivated and cannot be updated. Reactivate the User first.",
    )
}

async fn put_user(
    State(st): State<Arc<FakeState>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    bytes: Bytes,
) -> Response {
    let id = match parse_id(&id, "userId") {
        Ok(i) => i,
        Err(r) => return r,
    };
    let mut d = st.data.lock().unwrap();
    if !d.users.contains_key(&id) {
        return empty(StatusCode::NOT_FOUND);
    }
    if q.get("reactivate").map(String::as_str) == Some("true") {
        let u = d.users.get_mut(&id).unwrap();
        u["active"] = json!(true);
        return Json(json!({ "user": u })).into_response();
    }
    let body = body_json(&bytes);
    let Some(user) = body.get("user").filter(|u| u.is_object()) else {
        return field_error(
            "user",
            "[missing]user",
            "Your request is missing the User information as JSON in the entity-body.",
        );
    };
    if d.users[&id]["active"] == json!(false) {
        return deactivated_error();
    }
    if let Err(e) = validate_user(&d, &id, user) {
        return e;
    }
    let old = d.users[&id].clone();
    let mut u = user.clone();
    let obj = u.as_object_mut().unwrap();
    obj.remove("password");
    for keep in ["id", "active", "insertInstant", "tenantId", "registrations"] {
        if let Some(v) = old.get(keep) {
            obj.insert(keep.into(), v.clone());
        }
    }
    index_email(&mut d, id, &u);
    d.users.insert(id, u.clone());
    Json(json!({ "user": u })).into_response()
}

async fn patch_user(
    State(st): State<Arc<FakeState>>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Response {
    let id = match parse_id(&id, "userId") {
        Ok(i) => i,
        Err(r) => return r,
    };
    let mut d = st.data.lock().unwrap();
    let Some(old) = d.users.get(&id).cloned() else {
        return empty(StatusCode::NOT_FOUND);
    };
    if old["active"] == json!(false) {
        return deactivated_error();
    }
    let body = body_json(&bytes);
    let Some(patch) = body.get("user").and_then(Value::as_object) else {
        return field_error(
            "user",
            "[missing]user",
            "Your request is missing the User information as JSON in the entity-body.",
        );
    };
    let mut merged = old.clone();
    for (k, v) in patch {
        if k == "active" || k == "id" {
            continue;
        }
        if v.is_null() {
            merged.as_object_mut().unwrap().remove(k);
        } else {
            merged[k] = v.clone();
        }
    }
    if let Err(e) = validate_user(&d, &id, &merged) {
        return e;
    }
    index_email(&mut d, id, &merged);
    d.users.insert(id, merged.clone());
    Json(json!({ "user": merged })).into_response()
}

async fn delete_user(
    State(st): State<Arc<FakeState>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let id = match parse_id(&id, "userId") {
        Ok(i) => i,
        Err(r) => return r,
    };
    let mut d = st.data.lock().unwrap();
    if !d.users.contains_key(&id) {
        return empty(StatusCode::NOT_FOUND);
    }
    if q.get("hardDelete").map(String::as_str) == Some("true") {
        d.users.remove(&id);
        let uid = id.to_string();
        for ms in d.members.values_mut() {
            ms.retain(|m| m["userId"] != json!(uid));
        }
    } else {
        d.users.get_mut(&id).unwrap()["active"] = json!(false);
    }
    empty(StatusCode::OK)
}

fn search(d: &Data, ids: Option<Vec<String>>, start: usize, n: usize) -> Value {
    let users: Vec<Value> = match ids {
        Some(ids) => ids
            .iter()
            .filter_map(|i| Uuid::parse_str(i).ok())
            .filter_map(|i| d.users.get(&i).cloned())
            .collect(),
        None => d.users.values().cloned().collect(),
    };
    let total = users.len();
    let page: Vec<Value> = users.into_iter().skip(start).take(n).collect();
    json!({ "total": total, "users": page })
}

async fn search_users_get(State(st): State<Arc<FakeState>>, uri: Uri) -> Response {
    let ids: Vec<String> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.strip_prefix("ids="))
        .map(str::to_string)
        .collect();
    let d = st.data.lock().unwrap();
    Json(search(&d, Some(ids), 0, usize::MAX)).into_response()
}

async fn search_users_post(State(st): State<Arc<FakeState>>, bytes: Bytes) -> Response {
    let body = body_json(&bytes);
    let s = body.get("search").cloned().unwrap_or(json!({}));
    let ids = s.get("ids").and_then(Value::as_array).map(|a| {
        a.iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    });
    let start = s.get("startRow").and_then(Value::as_u64).unwrap_or(0) as usize;
    let n = s
        .get("numberOfResults")
        .and_then(Value::as_u64)
        .unwrap_or(25) as usize;
    let d = st.data.lock().unwrap();
    Json(search(&d, ids, start, n)).into_response()
}

async fn list_groups(State(st): State<Arc<FakeState>>) -> Response {
    let d = st.data.lock().unwrap();
    Json(json!({ "groups": d.groups.values().cloned().collect::<Vec<_>>() })).into_response()
}

fn group_name_taken(d: &Data, name: &str, except: &Uuid) -> bool {
    d.groups
        .iter()
        .any(|(id, g)| id != except && g.get("name").and_then(Value::as_str) == Some(name))
}

async fn create_group(
    State(st): State<Arc<FakeState>>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Response {
    let id = match parse_id(&id, "groupId") {
        Ok(i) => i,
        Err(r) => return r,
    };
    let body = body_json(&bytes);
    let Some(group) = body.get("group").filter(|g| g.is_object()) else {
        return field_error(
            "group",
            "[missing]group",
            "Your request is missing the Group information as JSON in the entity-body.",
        );
    };
    let mut d = st.data.lock().unwrap();
    if d.groups.contains_key(&id) {
        return field_error(
            "groupId",
            "[duplicate]groupId",
            &format!("A Group with Id [{id}] already exists."),
        );
    }
    let mut g = match checked_group(&d, &id, group) {
        Ok(g) => g,
        Err(r) => return r,
    };
    g["insertInstant"] = json!(now_ms());
    d.groups.insert(id, g.clone());
    *d.group_creates.entry(id).or_insert(0) += 1;
    Json(json!({ "group": g })).into_response()
}

/// The group as it would be stored: a name is required and unique per tenant.
fn checked_group(d: &Data, id: &Uuid, group: &Value) -> Result<Value, Response> {
    let Some(name) = group
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
    else {
        return Err(field_error(
            "group.name",
            "[blank]group.name",
            "You must specify the [group.name] property.",
        ));
    };
    if group_name_taken(d, name, id) {
        return Err(field_error(
            "group.name",
            "[duplicate]group.name",
            &format!("A Group with name [{name}] already exists."),
        ));
    }
    let mut g = group.clone();
    g["id"] = json!(id.to_string());
    g["roles"] = json!({});
    Ok(g)
}

async fn put_group(
    State(st): State<Arc<FakeState>>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Response {
    let id = match parse_id(&id, "groupId") {
        Ok(i) => i,
        Err(r) => return r,
    };
    let body = body_json(&bytes);
    let mut d = st.data.lock().unwrap();
    if !d.groups.contains_key(&id) {
        return empty(StatusCode::NOT_FOUND);
    }
    let Some(group) = body.get("group").filter(|g| g.is_object()) else {
        return field_error(
            "group",
            "[missing]group",
            "Your request is missing the Group information as JSON in the entity-body.",
        );
    };
    let g = match checked_group(&d, &id, group) {
        Ok(g) => g,
        Err(r) => return r,
    };
    d.groups.insert(id, g.clone());
    Json(json!({ "group": g })).into_response()
}

async fn get_group(State(st): State<Arc<FakeState>>, Path(id): Path<String>) -> Response {
    let id = match parse_id(&id, "groupId") {
        Ok(i) => i,
        Err(r) => return r,
    };
    match st.data.lock().unwrap().groups.get(&id) {
        Some(g) => Json(json!({ "group": g })).into_response(),
        None => empty(StatusCode::NOT_FOUND),
    }
}

async fn delete_group(State(st): State<Arc<FakeState>>, Path(id): Path<String>) -> Response {
    let id = match parse_id(&id, "groupId") {
        Ok(i) => i,
        Err(r) => return r,
    };
    let mut d = st.data.lock().unwrap();
    if d.groups.remove(&id).is_none() {
        return empty(StatusCode::NOT_FOUND);
    }
    d.members.remove(&id);
    empty(StatusCode::OK)
}

fn members_map(body: &Value) -> Result<Map<String, Value>, Response> {
    match body.get("members").and_then(Value::as_object) {
        Some(m) if !m.is_empty() => Ok(m.clone()),
        _ => Err(field_error(
            "members",
            "[missing]members",
            "Your request is missing the [members] property.",
        )),
    }
}

fn check_group(d: &Data, gid: &str) -> Result<Uuid, Response> {
    match Uuid::parse_str(gid)
        .ok()
        .filter(|g| d.groups.contains_key(g))
    {
        Some(g) => Ok(g),
        None => Err(field_error(
            &format!("members[{gid}]"),
            "[invalid]members",
            &format!("The Group with Id [{gid}] does not exist."),
        )),
    }
}

async fn add_members(State(st): State<Arc<FakeState>>, bytes: Bytes) -> Response {
    let body = body_json(&bytes);
    let map = match members_map(&body) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let mut d = st.data.lock().unwrap();
    let mut out = Map::new();
    for (gid, list) in &map {
        let g = match check_group(&d, gid) {
            Ok(g) => g,
            Err(r) => return r,
        };
        let mut added = Vec::new();
        for m in list.as_array().cloned().unwrap_or_default() {
            let Some(uid) = m
                .get("userId")
                .and_then(Value::as_str)
                .and_then(|u| Uuid::parse_str(u).ok())
            else {
                return field_error("userId", "[invalid]userId", "Invalid userId.");
            };
            if !d.users.contains_key(&uid) {
                return field_error(
                    &format!("members[{gid}]"),
                    "[invalid]userId",
                    &format!("The User with Id [{uid}] does not exist."),
                );
            }
            let entry = d.members.entry(g).or_default();
            let rec = json!({ "id": Uuid::new_v4().to_string(), "userId": uid.to_string(), "data": m.get("data").cloned().unwrap_or(json!({})), "insertInstant": now_ms() });
            // Re-adding an existing member answers 200 but leaves the stored membership as it was.
            if !entry.iter().any(|e| e["userId"] == json!(uid.to_string())) {
                entry.push(rec.clone());
            }
            added.push(rec);
        }
        out.insert(gid.clone(), json!(added));
    }
    Json(json!({ "members": out })).into_response()
}

async fn replace_members(State(st): State<Arc<FakeState>>, bytes: Bytes) -> Response {
    let body = body_json(&bytes);
    let map = match members_map(&body) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let mut d = st.data.lock().unwrap();
    for (gid, list) in &map {
        let g = match check_group(&d, gid) {
            Ok(g) => g,
            Err(r) => return r,
        };
        let new: Vec<Value> = list.as_array().cloned().unwrap_or_default().into_iter().map(|m| json!({
            "id": Uuid::new_v4().to_string(), "userId": m.get("userId"), "data": m.get("data").cloned().unwrap_or(json!({})), "insertInstant": now_ms()
        })).collect();
        d.members.insert(g, new);
    }
    Json(json!({ "members": map })).into_response()
}

async fn delete_members(
    State(st): State<Arc<FakeState>>,
    Query(q): Query<HashMap<String, String>>,
    bytes: Bytes,
) -> Response {
    let mut d = st.data.lock().unwrap();
    if let (Some(gid), Some(uid)) = (q.get("groupId"), q.get("userId")) {
        let g = match check_group(&d, gid) {
            Ok(g) => g,
            Err(r) => return r,
        };
        if let Some(ms) = d.members.get_mut(&g) {
            ms.retain(|m| m["userId"] != json!(uid));
        }
        return empty(StatusCode::OK);
    }
    let body = body_json(&bytes);
    if let Some(ids) = body.get("memberIds").and_then(Value::as_array) {
        for ms in d.members.values_mut() {
            ms.retain(|m| !ids.contains(&m["id"]));
        }
        return empty(StatusCode::OK);
    }
    let map = match members_map(&body) {
        Ok(m) => m,
        Err(r) => return r,
    };
    for (gid, users) in &map {
        let g = match check_group(&d, gid) {
            Ok(g) => g,
            Err(r) => return r,
        };
        let users = users.as_array().cloned().unwrap_or_default();
        if let Some(ms) = d.members.get_mut(&g) {
            ms.retain(|m| !users.contains(&m["userId"]));
        }
    }
    empty(StatusCode::OK)
}

async fn search_members(State(st): State<Arc<FakeState>>, bytes: Bytes) -> Response {
    let body = body_json(&bytes);
    let s = body.get("search").cloned().unwrap_or(json!({}));
    let start = s.get("startRow").and_then(Value::as_u64).unwrap_or(0) as usize;
    let n = s
        .get("numberOfResults")
        .and_then(Value::as_u64)
        .unwrap_or(25) as usize;
    let d = st.data.lock().unwrap();
    let all: Vec<Value> = match s
        .get("groupId")
        .and_then(Value::as_str)
        .and_then(|g| Uuid::parse_str(g).ok())
    {
        Some(g) => d
            .members
            .get(&g)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|mut m| {
                m["groupId"] = json!(g.to_string());
                m
            })
            .collect(),
        None => Vec::new(),
    };
    let total = all.len();
    Json(json!({ "total": total, "members": all.into_iter().skip(start).take(n).collect::<Vec<_>>() })).into_response()
}
