//! The residents' web app (SPEC §10) over HTTPS with the hub's own server certificate: the page
//! (`page/`: HTML, CSS and a script, embedded in the binary, nothing loaded from elsewhere) and the
//! JSON API it uses, which any other client may use too: sign-in, the house, live events, commands,
//! history, and for admins users, device credentials and the hub's status.
//!
//! The web is a client with the user's rights, never a way around them: sign-in checks the users'
//! own argon2id passwords on the same bounded pool and per-address throttle as MQTT logins; every
//! command goes through [`crate::broker::publish_checked`] (the guard, the ACL, the house's payload
//! and alarm-code checks) as the signed-in user. Sessions are random 256-bit tokens in an
//! `HttpOnly; Secure; SameSite=Strict` cookie, kept in memory: a hub restart asks everyone to sign
//! in again. State changes take JSON bodies only (a cross-site form cannot act); every response
//! carries a strict Content-Security-Policy. Live events come from an in-process router link of the
//! web's own, fanned out to each `GET /api/events` stream.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::auth::{self, Identity, Throttle};
use crate::broker::dispatch::Dispatch;
use crate::broker::sessions::Sessions;
use crate::broker::{BrokerError, HubLink};
use crate::dispatcher::Dispatcher;
use crate::secret::Secret;
use crate::store::{self, users::Role, Store};

/// The session cookie's name.
pub const COOKIE: &str = "dpi_session";

/// How long a session lasts without use.
const IDLE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Sessions kept at most (the least recently used are ended past it).
const MAX_SESSIONS: usize = 256;

/// The web's in-process client id.
const CLIENT_ID: &str = "\u{0}web";

/// What the live stream carries (`dpi/+/state` takes in `dpi/alarm/state`).
const WATCHED: [&str; 3] = ["dpi/+/state", "dpi/+/availability", "dpi/alarm/event"];

/// Every response's security headers.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
                   frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// A signed-in user.
#[derive(Debug, Clone)]
struct Session {
    name: String,
    role: Role,
    used: Instant,
}

/// What every request handler shares.
struct Web {
    store: Store,
    dispatcher: Dispatcher,
    /// Routes commands, as the signed-in user.
    link: HubLink,
    throttle: Arc<Throttle>,
    /// The broker's client connections.
    clients: Arc<Sessions>,
    /// When the web app started, for the status page.
    started: Instant,
    sessions: Mutex<HashMap<String, Session>>,
    /// Live messages: (topic, payload).
    live: broadcast::Sender<(String, Bytes)>,
    /// The latest state and availability of each device as routed (the retained ones from the
    /// start): fresher than the store, which writes once per commit interval.
    latest: Arc<Mutex<HashMap<String, Bytes>>>,
    /// A valid hash to check a wrong user name against, so that names cannot be probed by timing.
    dummy_hash: String,
}

/// What the web app works with.
#[derive(Debug)]
pub struct Parts {
    /// Users, device credentials, states, history.
    pub store: Store,
    /// The house as configured, and the checks commands go through.
    pub dispatcher: Dispatcher,
    /// Failed logins per address, shared with MQTT.
    pub throttle: Arc<Throttle>,
    /// Client connections: closed when a device's credentials change; counted for the status page.
    pub sessions: Arc<Sessions>,
}

/// Starts the web app on `listener` until `closing`; its connections are tracked on `tasks`.
pub fn start(
    (listener, acceptor): (TcpListener, TlsAcceptor),
    router: &crate::broker::RouterHandle,
    parts: Parts,
    tasks: &TaskTracker,
    closing: &CancellationToken,
) -> Result<(), BrokerError> {
    let Parts { store, dispatcher, throttle, sessions } = parts;
    let (link, mut messages, reader) =
        HubLink::connect_as(router, CLIENT_ID, tokio::sync::mpsc::unbounded_channel().0)?;
    tasks.spawn(closing.clone().run_until_cancelled_owned(async move { drop(reader.run().await) }));
    for filter in WATCHED {
        link.subscribe(filter);
    }
    let (live, _) = broadcast::channel(1024);
    let fan_out = live.clone();
    let latest: Arc<Mutex<HashMap<String, Bytes>>> = Arc::default();
    let keep = Arc::clone(&latest);
    let house = dispatcher.clone();
    tasks.spawn(closing.clone().run_until_cancelled_owned(async move {
        while let Some(m) = messages.recv().await {
            if !m.topic.ends_with("/event") {
                keep.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(m.topic.clone(), m.payload.clone());
            }
            let payload = decoded(&house, &m.topic, m.payload);
            let _ = fan_out.send((m.topic, payload));
        }
    }));
    let web = Arc::new(Web {
        store,
        dispatcher,
        link,
        throttle,
        clients: sessions,
        started: Instant::now(),
        sessions: Mutex::new(HashMap::new()),
        live,
        latest,
        dummy_hash: auth::hash(&Secret::new("not a real password")),
    });
    let router = routes(web);
    let local = listener.local_addr().ok();
    info!(listen = ?local, "web app listening (HTTPS)");
    tasks.spawn(serve(listener, acceptor, router, tasks.clone(), closing.clone()));
    Ok(())
}

fn routes(web: Arc<Web>) -> Router {
    Router::new()
        .route("/", get(|| async { page("text/html; charset=utf-8", include_str!("page/index.html")) }))
        .route("/app.js", get(|| async { page("text/javascript; charset=utf-8", include_str!("page/app.js")) }))
        .route("/style.css", get(|| async { page("text/css; charset=utf-8", include_str!("page/style.css")) }))
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .route("/api/house", get(house))
        .route("/api/events", get(events))
        .route("/api/devices/:id/set", post(device_set))
        .route("/api/alarm", post(alarm))
        .route("/api/scenes/:id", post(scene))
        .route("/api/history", get(history))
        .route("/api/users", get(users).post(add_user))
        .route("/api/users/:name", axum::routing::delete(remove_user))
        .route("/api/users/:name/pin", post(set_pin))
        .route("/api/devices/:id/creds", post(device_creds))
        .route("/api/devices/:id/revoke", post(device_revoke))
        .route("/api/status", get(status))
        .with_state(web)
        .layer(axum::middleware::map_response(security_headers))
}

async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
        (header::STRICT_TRANSPORT_SECURITY, "max-age=31536000"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// Accepts HTTPS connections until `closing`.
async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    router: Router,
    tasks: TaskTracker,
    closing: CancellationToken,
) {
    loop {
        let (socket, peer) = tokio::select! {
            () = closing.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "web: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (acceptor, router, closing) = (acceptor.clone(), router.clone(), closing.clone());
        tasks.spawn(async move {
            let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(socket)).await else {
                debug!(%peer, "web: TLS handshake failed or timed out");
                return;
            };
            let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                let mut router = router.clone();
                async move { tower::Service::call(&mut router, request).await }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = closing.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_millis(250), connection).await;
                }
            }
        });
    }
}

/// A device's state as `/api/house` shows it (its kind's canonical JSON: `OPEN` from a tiny sketch
/// becomes `{"contact":"open"}`); anything else as it was routed.
fn decoded(house: &Dispatcher, topic: &str, payload: Bytes) -> Bytes {
    let Some(crate::topics::Topic::Device { id, leaf: crate::topics::Leaf::State }) = crate::topics::parse(topic)
    else {
        return payload;
    };
    match house.kind_of(id).map(|kind| crate::decode::decode_state(kind, &payload, usize::MAX)) {
        Some(Ok(state)) => Bytes::from(state.to_json()),
        _ => payload,
    }
}

/// One of the page's files, embedded in the binary.
fn page(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// A request without a valid session: 401.
#[derive(Debug)]
struct Unauthorized;

impl IntoResponse for Unauthorized {
    fn into_response(self) -> Response {
        error(StatusCode::UNAUTHORIZED, "sign in first")
    }
}

/// Why an admin endpoint refused a request.
#[derive(Debug)]
enum Refused {
    /// No valid session: 401.
    Unauthorized,
    /// A resident's session: 403.
    NotAdmin,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::Unauthorized => Unauthorized.into_response(),
            Refused::NotAdmin => error(StatusCode::FORBIDDEN, "for admins only"),
        }
    }
}

/// A JSON error with its status.
fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

impl Web {
    /// The signed-in user of a request.
    fn user(&self, headers: &HeaderMap) -> Result<Session, Unauthorized> {
        let token = cookie(headers).ok_or(Unauthorized)?;
        let mut sessions = self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match sessions.get_mut(&token) {
            Some(s) if s.used.elapsed() < IDLE => {
                s.used = Instant::now();
                Ok(s.clone())
            }
            _ => Err(Unauthorized),
        }
    }

    /// The signed-in admin of a request: 401 without a session, 403 for a resident.
    fn admin(&self, headers: &HeaderMap) -> Result<Session, Refused> {
        match self.user(headers) {
            Ok(user) if user.role == Role::Admin => Ok(user),
            Ok(_) => Err(Refused::NotAdmin),
            Err(Unauthorized) => Err(Refused::Unauthorized),
        }
    }

    /// Publishes as the signed-in user, through the broker's checks.
    fn publish(&self, user: &Session, topic: &str, body: &Value) -> Response {
        let identity = Identity::User { name: user.name.clone(), role: user.role };
        let client = format!("web:{}", user.name);
        let payload = Bytes::from(body.to_string());
        match crate::broker::publish_checked(
            &self.dispatcher as &dyn Dispatch,
            &self.link,
            &identity,
            &client,
            topic,
            payload,
        ) {
            Ok(()) => (StatusCode::ACCEPTED, Json(json!({ "ok": true }))).into_response(),
            Err(reason) => error(StatusCode::FORBIDDEN, &reason),
        }
    }
}

/// The session token of the request's cookie.
fn cookie(headers: &HeaderMap) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|pair| {
        let (name, value) = pair.trim().split_once('=')?;
        (name == COOKIE).then(|| value.to_owned())
    })
}

/// 32 random bytes, hex.
fn new_token() -> String {
    use argon2::password_hash::rand_core::{OsRng, RngCore};
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Deserialize)]
struct Login {
    user: String,
    password: String,
}

async fn login(
    State(web): State<Arc<Web>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Json(login): Json<Login>,
) -> Response {
    let ip: IpAddr = peer.ip();
    let delay = web.throttle.delay(ip, std::time::Instant::now());
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let name = login.user.clone();
    let creds = web.store.call(move |c| store::users::credentials(c, &name)).await;
    let creds = match creds {
        Ok(creds) => creds,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    let _slot = web.throttle.begin_check(ip).await;
    let known = creds.is_some();
    let hash = creds.as_ref().map_or_else(|| web.dummy_hash.clone(), |c| c.password_hash.clone());
    let verified = match auth::verify_async(hash, Secret::new(login.password)).await {
        Ok(ok) => ok && known,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    let Some(creds) = creds.filter(|_| verified) else {
        web.throttle.failed(ip, std::time::Instant::now());
        warn!(%peer, user = %login.user, "web: sign-in refused");
        return error(StatusCode::UNAUTHORIZED, "wrong user name or password");
    };
    let token = new_token();
    {
        let mut sessions = web.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        sessions.retain(|_, s| s.used.elapsed() < IDLE);
        if sessions.len() >= MAX_SESSIONS {
            if let Some(oldest) = sessions.iter().min_by_key(|(_, s)| s.used).map(|(t, _)| t.clone()) {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(token.clone(), Session { name: login.user.clone(), role: creds.role, used: Instant::now() });
    }
    info!(%peer, user = %login.user, "web: signed in");
    let cookie = format!("{COOKIE}={token}; HttpOnly; Secure; SameSite=Strict; Path=/");
    let mut response = Json(json!({ "user": login.user, "role": creds.role.as_str() })).into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

async fn logout(State(web): State<Arc<Web>>, headers: HeaderMap, Json(_): Json<Value>) -> Response {
    if let Some(token) = cookie(&headers) {
        web.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&token);
    }
    let mut response = Json(json!({ "ok": true })).into_response();
    let expired = format!("{COOKIE}=; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age=0");
    if let Ok(value) = HeaderValue::from_str(&expired) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

async fn house(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    let me = match web.user(&headers) {
        Ok(user) => user,
        Err(refused) => return refused.into_response(),
    };
    let config = Arc::clone(&web.dispatcher.house().config);
    let stored = web
        .store
        .call(|c| Ok((store::device_state::all(c)?, store::alarm::load(c)?, store::events::latest(c, 100)?)))
        .await;
    let (rows, alarm, recent) = match stored {
        Ok(stored) => stored,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    let rows: HashMap<_, _> = rows.into_iter().map(|r| (r.id.clone(), r)).collect();
    let latest = web.latest.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let live = |id: &str, leaf: crate::topics::Leaf| latest.get(&crate::topics::device(id, leaf)).cloned();
    let devices: Vec<Value> = config
        .devices
        .iter()
        .map(|d| {
            let row = rows.get(&d.id);
            let stored = row.and_then(|r| r.state.as_deref()).and_then(|s| serde_json::from_str::<Value>(s).ok());
            let state = live(&d.id, crate::topics::Leaf::State)
                .and_then(|p| crate::decode::decode_state(d.kind, &p, usize::MAX).ok())
                .and_then(|s| serde_json::from_str::<Value>(&s.to_json()).ok())
                .or(stored);
            let online = live(&d.id, crate::topics::Leaf::Availability)
                .and_then(|p| crate::decode::decode_availability(&p).ok())
                .or_else(|| row.and_then(|r| r.online));
            json!({
                "id": d.id,
                "kind": d.kind.as_str(),
                "room": d.room,
                "state": state,
                "online": online,
                "last_seen": row.and_then(|r| r.seen_at.clone().or_else(|| r.state_at.clone())),
            })
        })
        .collect();
    let rooms: Vec<Value> = config.rooms.iter().map(|r| json!({ "id": r.id, "name": r.name })).collect();
    let scenes: Vec<&str> = config.scenes.iter().map(|s| s.id.as_str()).collect();
    // The running alarm's own word, with the lockout and the time left; the stored one if it is gone.
    let alarm = match web.dispatcher.alarm().status().await {
        Ok(status) => serde_json::to_value(status).unwrap_or(Value::Null),
        Err(_) => alarm
            .as_deref()
            .and_then(crate::alarm::stored_status)
            .map_or(Value::Null, |(state, since)| json!({ "state": state, "since": since })),
    };
    // Who armed or disarmed, and when: the alarm's recent events, newest first.
    let recent: Vec<Value> = recent
        .into_iter()
        .filter(|(_, kind, _)| kind == "alarm")
        .take(20)
        .map(|(at, _, detail)| json!({ "at": at, "detail": detail }))
        .collect();
    let me = json!({ "user": me.name, "role": me.role.as_str() });
    let body = json!({
        "me": me, "house": config.house.name, "rooms": rooms, "devices": devices, "alarm": alarm, "scenes": scenes,
        "recent": recent,
    });
    Json(body).into_response()
}

async fn events(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    if let Err(refused) = web.user(&headers) {
        return refused.into_response();
    }
    let mut live = web.live.subscribe();
    let stream =
        async_stream(move |tx: tokio::sync::mpsc::Sender<Result<SseEvent, std::convert::Infallible>>| async move {
            loop {
                match live.recv().await {
                    Ok((topic, payload)) => {
                        let payload = serde_json::from_slice::<Value>(&payload)
                            .unwrap_or_else(|_| Value::from(String::from_utf8_lossy(&payload).into_owned()));
                        let event = SseEvent::default().data(json!({ "topic": topic, "payload": payload }).to_string());
                        if tx.send(Ok(event)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let event = SseEvent::default().event("lagged").data(n.to_string());
                        if tx.send(Ok(event)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

/// A stream fed by a task that sends into a bounded channel (and ends when the client leaves).
fn async_stream<F, Fut>(
    feed: F,
) -> impl futures_util::Stream<Item = Result<SseEvent, std::convert::Infallible>> + Send + 'static
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<SseEvent, std::convert::Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(feed(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn device_set(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    match web.user(&headers) {
        Ok(_) if web.dispatcher.kind_of(&id).is_none() => error(StatusCode::NOT_FOUND, "no such device"),
        Ok(user) => web.publish(&user, &crate::topics::device(&id, crate::topics::Leaf::Set), &body),
        Err(refused) => refused.into_response(),
    }
}

async fn alarm(State(web): State<Arc<Web>>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    match web.user(&headers) {
        Ok(user) => web.publish(&user, crate::topics::ALARM_SET, &body),
        Err(refused) => refused.into_response(),
    }
}

async fn scene(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(_): Json<Value>,
) -> Response {
    match web.user(&headers) {
        Ok(user) => web.publish(&user, crate::topics::SCENE_SET, &json!({ "scene": id })),
        Err(refused) => refused.into_response(),
    }
}

#[derive(Deserialize)]
struct HistoryQuery {
    device: String,
    #[serde(default = "day")]
    hours: u32,
}

fn day() -> u32 {
    24
}

async fn history(State(web): State<Arc<Web>>, headers: HeaderMap, Query(q): Query<HistoryQuery>) -> Response {
    if let Err(refused) = web.user(&headers) {
        return refused.into_response();
    }
    if web.dispatcher.kind_of(&q.device).is_none() {
        return error(StatusCode::NOT_FOUND, "no such device");
    }
    let since = store::rfc3339(crate::wall::now_utc() - time::Duration::hours(i64::from(q.hours.min(24 * 366))));
    let device = q.device.clone();
    let rows = web.store.call(move |c| store::device_state::history(c, &device, &since)).await;
    match rows {
        Ok(rows) => {
            let rows: Vec<Value> =
                rows.into_iter().map(|(at, kind, value)| json!({ "at": at, "kind": kind, "value": value })).collect();
            Json(json!({ "device": q.device, "history": rows })).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

/// Runs a store job; a failure is a 503.
async fn stored<R, F>(web: &Web, f: F) -> Result<R, Response>
where
    R: Send + 'static,
    F: FnOnce(&mut rusqlite::Connection) -> Result<R, store::StoreError> + Send + 'static,
{
    web.store.call(f).await.map_err(|e| match e {
        store::StoreError::NoSuchUser(_) => error(StatusCode::NOT_FOUND, &e.to_string()),
        e => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    })
}

/// An argon2id hash, off the runtime.
async fn hash_off_runtime(secret: Secret) -> Result<String, Response> {
    tokio::task::spawn_blocking(move || auth::hash(&secret))
        .await
        .map_err(|e| error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()))
}

/// Unwraps a handler step: its error is already the response.
macro_rules! step {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(refused) => return IntoResponse::into_response(refused),
        }
    };
}

async fn users(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    step!(web.admin(&headers));
    let list = step!(stored(&web, |c| store::users::list(c)).await);
    let list: Vec<Value> =
        list.iter().map(|u| json!({ "name": u.name, "role": u.role.as_str(), "has_code": u.has_pin })).collect();
    Json(json!({ "users": list })).into_response()
}

#[derive(Deserialize)]
struct NewUser {
    name: String,
    role: String,
    password: String,
}

async fn add_user(State(web): State<Arc<Web>>, headers: HeaderMap, Json(new): Json<NewUser>) -> Response {
    let admin = step!(web.admin(&headers));
    let role = match new.role.as_str() {
        "admin" => Role::Admin,
        "resident" => Role::Resident,
        _ => return error(StatusCode::BAD_REQUEST, "role must be admin or resident"),
    };
    let house = web.dispatcher.house();
    if let Err(e) = auth::check_user_name(&new.name, |id| house.kind(id).is_some()) {
        return error(StatusCode::BAD_REQUEST, &e);
    }
    let password = Secret::new(new.password);
    if let Err(e) = auth::check_password(&password) {
        return error(StatusCode::BAD_REQUEST, &e);
    }
    let hash = step!(hash_off_runtime(password).await);
    let name = new.name.clone();
    let by = admin.name.clone();
    let added = web
        .store
        .call(move |c| {
            store::users::add(c, &name, role, &hash)?;
            store::events::record(c, "user", &format!("user {name} added ({}) by {by}", role.as_str()))
        })
        .await;
    match added {
        Ok(()) => {
            info!(user = %new.name, by = %admin.name, "web: user added");
            (StatusCode::CREATED, Json(json!({ "name": new.name, "role": role.as_str() }))).into_response()
        }
        Err(e) => error(StatusCode::CONFLICT, &e.to_string()),
    }
}

async fn remove_user(State(web): State<Arc<Web>>, headers: HeaderMap, Path(name): Path<String>) -> Response {
    let admin = step!(web.admin(&headers));
    if name == admin.name {
        return error(StatusCode::BAD_REQUEST, "you cannot remove yourself");
    }
    let target = name.clone();
    let by = admin.name.clone();
    step!(
        stored(&web, move |c| {
            store::users::remove(c, &target)?;
            store::events::record(c, "user", &format!("user {target} removed by {by}"))
        })
        .await
    );
    // Signed-in sessions of that user end with it.
    web.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|_, s| s.name != name);
    Json(json!({ "ok": true })).into_response()
}

#[derive(Deserialize)]
struct Pin {
    code: String,
}

async fn set_pin(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Json(pin): Json<Pin>,
) -> Response {
    let admin = step!(web.admin(&headers));
    let code = Secret::new(pin.code);
    if let Err(e) = auth::check_pin(&code) {
        return error(StatusCode::BAD_REQUEST, &e);
    }
    let hash = step!(hash_off_runtime(code).await);
    let by = admin.name.clone();
    step!(
        stored(&web, move |c| {
            store::users::set_pin(c, &name, &hash)?;
            store::events::record(c, "user", &format!("alarm code set for {name} by {by}"))
        })
        .await
    );
    Json(json!({ "ok": true })).into_response()
}

async fn device_creds(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(_): Json<Value>,
) -> Response {
    let admin = step!(web.admin(&headers));
    if web.dispatcher.kind_of(&id).is_none() {
        return error(StatusCode::NOT_FOUND, "no such device");
    }
    let password = auth::random_secret();
    let hash = auth::hash_token(&password);
    let (target, by) = (id.clone(), admin.name.clone());
    step!(
        stored(&web, move |c| {
            store::devices::set_password(c, &target, &hash)?;
            store::events::record(c, "device", &format!("credentials issued for {target} by {by}"))
        })
        .await
    );
    // The connection with the old password closes.
    web.clients.kick(&id);
    info!(device = %id, by = %admin.name, "web: device credentials issued");
    Json(json!({ "client_id": id, "username": id, "password": password.expose() })).into_response()
}

async fn device_revoke(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(_): Json<Value>,
) -> Response {
    let admin = step!(web.admin(&headers));
    let (target, by) = (id.clone(), admin.name.clone());
    let revoked = step!(
        stored(&web, move |c| {
            let revoked = store::devices::revoke(c, &target)?;
            store::events::record(c, "device", &format!("credentials revoked for {target} by {by}"))?;
            Ok(revoked)
        })
        .await
    );
    web.clients.kick(&id);
    Json(json!({ "revoked": revoked })).into_response()
}

async fn status(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    step!(web.admin(&headers));
    let events = step!(stored(&web, |c| store::events::latest(c, 20)).await);
    let events: Vec<Value> =
        events.into_iter().map(|(at, kind, detail)| json!({ "at": at, "kind": kind, "detail": detail })).collect();
    Json(json!({
        "uptime_s": web.started.elapsed().as_secs(),
        "store_commits": web.store.commits(),
        "connected": web.clients.connected(),
        "client_ids": web.clients.held(),
        "events": events,
    }))
    .into_response()
}
