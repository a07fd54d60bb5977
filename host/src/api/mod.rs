//! The HTTP API: routes, authentication of requests, the `.xml` suffix, and the mapping
//! of every failure to a status and Conductor's `<error><code/><message/></error>`.
//!
//! Handlers are verbs in resource modules (`images::create`). Never imports redb or
//! wasmtime: storage and plugins are reached through `store::Store`, `jobs::Jobs` and
//! `plugins::Plugins`, and blocking calls run on the blocking pool.

mod builds;
mod environments;
mod error;
pub mod hooks;
mod images;
pub mod json;
mod page;
mod pool_families;
mod provider_images;
mod providers;
mod quotas;
pub mod rendered;
mod sbom;
mod target_images;
mod users;
pub mod xml;

pub use error::{ApiError, ApiResult, Kind};

use crate::auth::{AuthError, Authenticator, Culprit};
use crate::connections::BodyDeadline;
use crate::jobs::Jobs;
use crate::model::{Action, Progress, User};
use crate::plugins::Plugins;
use crate::store::{Store, StoreError};
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Largest request body accepted; templates and push requests are a few KiB.
pub const MAX_BODY: usize = 1 << 20;

/// What every handler can reach.
pub struct AppState {
    pub store: Arc<Store>,
    pub plugins: Arc<Plugins>,
    pub jobs: Arc<Jobs>,
    pub auth: Arc<Authenticator>,
    /// The public URL of the server (`https://host/conductor`), for hrefs behind a proxy;
    /// without it hrefs are built from the request's Host header.
    pub external_url: Option<String>,
    /// Where `file://` base images may be read from.
    pub import_dir: Option<std::path::PathBuf>,
    /// What the server may fetch for users, and the largest image a build may make.
    pub fetch: Arc<crate::fetch::FetchPolicy>,
    /// Documents answered from memory until the store's next write.
    pub rendered: rendered::Rendered,
}

pub type Shared = Arc<AppState>;

pub(crate) fn xml_headers() -> [(header::HeaderName, HeaderValue); 1] {
    [(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/xml; charset=utf-8"),
    )]
}

/// A 200 response with an XML body.
pub fn xml_ok(body: impl Into<Body>) -> Response {
    (StatusCode::OK, xml_headers(), body.into()).into_response()
}

/// Runs one of the use cases of [`Jobs`] (commit, announce, start) on the blocking pool.
pub async fn submit<T: Send + 'static>(
    state: &Shared,
    f: impl FnOnce(&Arc<Jobs>) -> Result<T, StoreError> + Send + 'static,
) -> ApiResult<T> {
    on_blocking_pool(state.jobs.clone(), f).await
}

/// Runs a store call on the blocking pool.
pub async fn blocking<T: Send + 'static>(
    state: &Shared,
    f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> ApiResult<T> {
    on_blocking_pool(state.store.clone(), move |store| f(store)).await
}

/// Runs `f` on `shared` on the blocking pool; a panic there or a store error becomes
/// the API's error.
async fn on_blocking_pool<S: Send + Sync + 'static, T: Send + 'static>(
    shared: Arc<S>,
    f: impl FnOnce(&Arc<S>) -> Result<T, StoreError> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(move || f(&shared))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::from)
}

/// Conductor's installs served the API under `/conductor/api`, and its clients are
/// configured with that path. Requests under it are served as if under `/api`; this
/// internal header (removed from what clients send) tells [`base`] to keep the prefix.
const MOUNT_HEADER: &str = "x-conductor-mount";
const CONDUCTOR_PREFIX: &str = "/conductor";

/// The absolute base of every href, ending in `/api`.
pub fn base(state: &AppState, headers: &HeaderMap) -> String {
    if let Some(url) = &state.external_url {
        return format!("{}/api", url.trim_end_matches('/'));
    }
    let prefix = if headers.contains_key(MOUNT_HEADER) {
        CONDUCTOR_PREFIX
    } else {
        ""
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            // A Host header is client input: only a plausible authority goes into hrefs.
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-:[]_".contains(c))
        })
        .unwrap_or("localhost");
    format!("http://{host}{prefix}/api")
}

/// Writes `<percent_complete>` and `<status_detail>`, the progress extension that
/// follows `<status>` (reference/conductor-api.md §9.3).
pub fn write_progress(doc: &mut xml::Doc, progress: &Progress) {
    doc.text("percent_complete", &progress.percent.to_string())
        .open("status_detail", &[])
        .text("activity", &progress.activity)
        .text("error", &progress.error)
        .close("status_detail");
}

/// An empty reply with this status (Conductor answered deletes and membership calls so).
pub fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

/// A 201 reply with an XML body.
pub fn xml_created(body: String) -> Response {
    (StatusCode::CREATED, xml_headers(), body).into_response()
}

/// A field of a request element given either as an attribute or as a child element:
/// Conductor's Rails parser treated `<provider id='3'/>` and `<provider><id>3</id></provider>`
/// alike.
pub fn field(element: &xml::Element, name: &str) -> Option<String> {
    element
        .attribute(name)
        .map(|v| v.trim().to_owned())
        .or_else(|| element.child_text(name))
}

/// Parses a request body whose root must be `root`, or fails with a 422 saying so.
pub fn parse_body(body: &[u8], root: &str) -> ApiResult<xml::Element> {
    let element = xml::parse(body).map_err(|e| ApiError::Validation(vec![e.0]))?;
    if element.name != root {
        return Err(ApiError::Validation(vec![format!(
            "the request body must be a <{root}> document, not <{}>",
            element.name
        )]));
    }
    if let Some(name) = overlong(&element) {
        return Err(ApiError::Validation(vec![format!(
            "<{name}> is longer than the {MAX_VALUE} characters a value may have"
        )]));
    }
    Ok(element)
}

/// The longest value (text or attribute) a provider, account, environment or user field
/// may hold: an x509 key fits several times over, a flood does not.
pub const MAX_VALUE: usize = 16 << 10;

/// The name of the first element whose text or an attribute is longer than [`MAX_VALUE`].
fn overlong(element: &xml::Element) -> Option<String> {
    let too_long = element.text().chars().count() > MAX_VALUE
        || element
            .attributes
            .iter()
            .any(|(_, v)| v.chars().count() > MAX_VALUE);
    if too_long {
        return Some(element.name.clone());
    }
    element.elements().find_map(overlong)
}

/// Parses an id from a path. Anything that is not a UUID is simply an id nothing has.
pub fn parse_id(raw: &str) -> Option<uuid::Uuid> {
    uuid::Uuid::parse_str(raw).ok()
}

pub fn router(state: Shared) -> Router {
    let api = Router::new()
        .route("/api", get(entry))
        .route("/api/images", get(images::list).post(images::create))
        .route("/api/images/{id}", get(images::show).delete(images::delete))
        .route("/api/images/{image_id}/builds", get(builds::list_of_image))
        .route(
            "/api/images/{image_id}/builds/{id}",
            get(builds::show_of_image).delete(builds::delete_of_image),
        )
        .route("/api/builds", get(builds::list))
        .route("/api/builds/{id}", get(builds::show).delete(builds::delete))
        .route(
            "/api/builds/{build_id}/target_images",
            get(target_images::list_of_build),
        )
        .route(
            "/api/builds/{build_id}/target_images/{id}",
            get(target_images::show_of_build).delete(target_images::delete_of_build),
        )
        .route("/api/target_images", get(target_images::list))
        .route(
            "/api/target_images/{id}",
            get(target_images::show).delete(target_images::delete),
        )
        .route("/api/target_images/{id}/data", get(target_images::data))
        .route("/api/target_images/{id}/log", get(target_images::log))
        .route("/api/target_images/{id}/sbom", get(sbom::sbom))
        .route("/api/target_images/{id}/console", get(sbom::console))
        .route(
            "/api/target_images/{id}/cancel",
            post(target_images::cancel),
        )
        .route(
            "/api/provider_images/{id}/cancel",
            post(provider_images::cancel),
        )
        .route("/api/provider_types/rescan", post(providers::rescan))
        .route("/api/users", get(users::list).post(users::create))
        .route("/api/users/{name}", get(users::show).put(users::update))
        .route("/api/hooks", get(hooks::list).post(hooks::create))
        .route("/api/hooks/{id}", get(hooks::show).delete(hooks::delete))
        .route(
            "/api/target_images/{ti}/provider_images",
            get(provider_images::list_of_target_image).post(provider_images::create),
        )
        .route(
            "/api/target_images/{ti}/provider_images/{id}",
            get(provider_images::show_of_target_image)
                .delete(provider_images::delete_of_target_image),
        )
        .route(
            "/api/provider_images",
            get(provider_images::list).post(provider_images::create),
        )
        .route(
            "/api/provider_images/{id}",
            get(provider_images::show).delete(provider_images::delete),
        )
        .route("/api/environments", get(environments::list))
        .route("/api/environments/{id}", get(environments::show))
        .route(
            "/api/environments/{id}/quota",
            get(quotas::show).put(quotas::update),
        )
        .route(
            "/api/environments/{env}/images",
            get(images::list_in_environment).post(images::create),
        )
        .route(
            "/api/environments/{env}/images/{id}",
            get(images::show_in_environment).delete(images::delete_in_environment),
        )
        .route("/api/provider_types", get(providers::list_types))
        .route("/api/provider_types/{id}", get(providers::show_type))
        .route(
            "/api/providers",
            get(providers::list).post(providers::create),
        )
        .route(
            "/api/providers/{id}",
            get(providers::show)
                .put(providers::update)
                .delete(providers::delete),
        )
        .route(
            "/api/providers/{id}/provider_accounts",
            get(providers::list_accounts_of_provider).post(providers::create_account_of_provider),
        )
        .route(
            "/api/provider_accounts",
            get(providers::list_accounts).post(providers::create_account),
        )
        .route(
            "/api/provider_accounts/{id}",
            get(providers::show_account)
                .put(providers::update_account)
                .delete(providers::delete_account),
        )
        .route(
            "/api/pool_families",
            get(pool_families::list_families).post(pool_families::create_family),
        )
        .route(
            "/api/pool_families/{id}",
            get(pool_families::show_family)
                .put(pool_families::update_family)
                .delete(pool_families::delete_family),
        )
        .route(
            "/api/pool_families/{id}/provider_accounts",
            get(pool_families::list_members),
        )
        .route(
            "/api/pool_families/{id}/provider_accounts/{account}",
            get(pool_families::show_member)
                .put(pool_families::add_member)
                .delete(pool_families::remove_member),
        )
        .route(
            "/api/{*rest}",
            get(unknown_route)
                .post(unknown_route)
                .put(unknown_route)
                .delete(unknown_route),
        )
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state.clone());
    // Paths are rewritten before routing, so the outer router wraps the inner one.
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback_service(api)
        .layer(middleware::from_fn_with_state(state, edge))
}

/// For load balancers and supervisors: the server is up and answering. No credentials,
/// like `/metrics`; neither tells anything about images or accounts.
async fn healthz() -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"))],
        "ok\n",
    )
        .into_response()
}

async fn metrics() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        crate::metrics::render(),
    )
        .into_response()
}

/// What every request passes through before routing, in this order: its request id and
/// the span its log lines carry ([`request_id`]), the `/conductor` prefix and format
/// suffixes ([`rewrite_path`]), the body limit ([`too_large`]) and, for `/api`, the
/// credentials ([`authenticate`]); after the handler, a body that came too slowly
/// ([`body_too_slow`]). One layer, not four: each layer costs a boxed clone
/// of the service behind it on every request, which was about a sixth of the cost of a GET
/// answered from memory.
async fn edge(State(state): State<Shared>, request: Request, next: Next) -> Response {
    use tracing::Instrument as _;
    let id = request_id(&request);
    let method = request.method().clone();
    let counted = request.uri().path().starts_with("/api")
        || request.uri().path().starts_with(CONDUCTOR_PREFIX);
    let span =
        tracing::info_span!("request", id = %id, method = %method, path = %request.uri().path());
    let started = std::time::Instant::now();
    let mut response = async {
        let (mut request, json) = match rewrite_path(request) {
            Ok(rewritten) => rewritten,
            Err(refused) => return refused.into_response(),
        };
        let path = request.uri().path();
        let response = if too_large(request.headers()) {
            request_too_large()
        } else if (path == "/api" || path.starts_with("/api/"))
            && let Err(refused) = authenticate(&state, &mut request).await
        {
            refused
        } else {
            let deadline = request.extensions().get::<BodyDeadline>().cloned();
            let response = next.run(request).await;
            // A body that missed its deadline failed the handler's read: the client is
            // told that, not that its request was malformed. A chunked body has no
            // length to check up front; the body limit cuts it off with a plain-text
            // 413, which is put into the API's error format here.
            if let Some(deadline) = deadline.filter(BodyDeadline::passed) {
                body_too_slow(deadline.after)
            } else if response.status() == StatusCode::PAYLOAD_TOO_LARGE && !is_xml(&response) {
                request_too_large()
            } else {
                response
            }
        };
        // Every answer of the API, refusals included, in JSON for a client that asked.
        if json {
            as_json(response).await
        } else {
            response
        }
    }
    .instrument(span.clone())
    .await;
    span.in_scope(|| {
        tracing::debug!(
            status = response.status().as_u16(),
            ms = started.elapsed().as_millis() as u64,
            "answered"
        )
    });
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    if counted {
        crate::metrics::inc(
            "conductor_http_requests_total",
            &[
                ("method", method.as_str()),
                ("status", response.status().as_str()),
            ],
        );
    }
    response
}

/// Every request gets an id: the client's `X-Request-Id` when it sends a sane one, else
/// a new one. It is echoed in the answer and tags every log line written while the
/// request is handled, so a user's report and the server's log meet.
fn request_id(request: &Request) -> String {
    request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        })
        .map(str::to_owned)
        .unwrap_or_else(new_request_id)
}

/// A UUIDv7 (ordered by time to the millisecond) whose random part comes from the
/// thread's generator: `Uuid::now_v7` asks the kernel for randomness on every call, a
/// system call per request for an id that needs no secrecy.
fn new_request_id() -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let random: [u8; 10] = rand::random();
    uuid::Builder::from_unix_timestamp_millis(millis, &random)
        .into_uuid()
        .to_string()
}

/// Whether the body's declared length is over [`MAX_BODY`]: such a body is refused
/// before it is read. (Chunked bodies are cut off at the same size by the body limit.)
fn too_large(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > MAX_BODY as u64)
}

fn request_too_large() -> Response {
    ApiError::TooLarge(MAX_BODY).into_response()
}

/// 408: the connection layer's body deadline passed while the handler read the body.
fn body_too_slow(after: Duration) -> Response {
    ApiError::TooSlow(after).into_response()
}

fn is_xml(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/xml"))
}

/// Conductor's clients put `.xml` on every path (and `/conductor` before `/api`); both
/// are accepted and removed. `.json` (or `Accept: application/json`) asks for the answer
/// in JSON, which the second value says. Any other format suffix gets 406, as Conductor
/// answered.
fn rewrite_path(mut request: Request) -> Result<(Request, bool), StatusCode> {
    request.headers_mut().remove(MOUNT_HEADER);
    if let Some(rest) = request.uri().path().strip_prefix(CONDUCTOR_PREFIX)
        && (rest == "/api" || rest.starts_with("/api/") || rest.starts_with("/api."))
    {
        let mut rewritten = rest.to_owned();
        if let Some(query) = request.uri().query() {
            rewritten.push('?');
            rewritten.push_str(query);
        }
        if let Ok(uri) = rewritten.parse() {
            *request.uri_mut() = uri;
            request
                .headers_mut()
                .insert(MOUNT_HEADER, HeaderValue::from_static("1"));
        }
    }
    let path = request.uri().path();
    let mut json = wants_json(request.headers());
    if path.starts_with("/api") {
        let suffix = [".xml", ".json"]
            .into_iter()
            .find_map(|suffix| path.strip_suffix(suffix).map(|p| (p, suffix)));
        if let Some((stripped, suffix)) = suffix {
            json = suffix == ".json";
            let mut rewritten = stripped.to_owned();
            if let Some(query) = request.uri().query() {
                rewritten.push('?');
                rewritten.push_str(query);
            }
            if let Ok(uri) = rewritten.parse() {
                *request.uri_mut() = uri;
            }
        } else if path.rsplit('/').next().is_some_and(|last| {
            last.rsplit_once('.')
                .is_some_and(|(_, ext)| matches!(ext, "html" | "yaml" | "txt"))
        }) {
            return Err(StatusCode::NOT_ACCEPTABLE);
        }
    }
    Ok((request, json))
}

/// Whether the client prefers JSON: it accepts `application/json` and not XML.
fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/json") && !accept.contains("xml"))
}

/// Documents larger than this are turned into JSON [`LARGE_JSON_TURNS`] at a time.
const LARGE_JSON: usize = 1 << 20;
static LARGE_JSON_TURNS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// The same answer as JSON (see [`json`]); anything that is not an XML document (a
/// download, an empty 401) passes unchanged.
async fn as_json(response: Response) -> Response {
    if !is_xml(&response) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let mut empty = false;
    let converted = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(bytes) => {
            empty = bytes.iter().all(u8::is_ascii_whitespace);
            // A document's JSON tree takes several times its size while it is built:
            // large ones (long lists) are converted a few at a time, so that many
            // clients asking at once cannot add those trees up.
            let _turn = if bytes.len() > LARGE_JSON {
                LARGE_JSON_TURNS.acquire().await.ok()
            } else {
                None
            };
            json::from_xml(&bytes).map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    };
    match converted {
        // An empty body stays empty.
        Err(_) if empty => Response::from_parts(parts, axum::body::Body::empty()),
        Ok(value) => {
            parts.headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            parts.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(parts, axum::body::Body::from(value.to_string()))
        }
        Err(e) => ApiError::internal(format!("rendering JSON: {e}")).into_response(),
    }
}

/// Every `/api` request needs valid Basic credentials: 401 with an empty body otherwise.
/// The challenge header is a deliberate addition that helps generic HTTP clients. The
/// user proven is put into the request for the handlers. Credentials the server will not
/// check now get 429 (too many wrong passwords from the address or for the user name) or
/// 503 (every check taken), with `Retry-After`.
async fn authenticate(state: &AppState, request: &mut Request) -> Result<(), Response> {
    // A header verified a moment ago is answered from memory and never limited; only a
    // new one pays for argon2, within the limits the authenticator keeps.
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok());
    let outcome = match header {
        None => Err(AuthError::Missing),
        Some(header) => match state.auth.remembered(header) {
            Some(user) => Ok(user),
            None => {
                let client = request
                    .extensions()
                    .get::<ConnectInfo<SocketAddr>>()
                    .map(|ConnectInfo(peer)| peer.ip());
                state.auth.authenticate(header, client).await
            }
        },
    };
    match outcome {
        Ok(user) => {
            request.extensions_mut().insert(CurrentUser(user));
            Ok(())
        }
        Err(AuthError::Missing | AuthError::Invalid) => {
            let mut response =
                (StatusCode::UNAUTHORIZED, xml_headers(), Body::empty()).into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"conductor\""),
            );
            Err(response)
        }
        Err(AuthError::Throttled {
            culprit,
            retry_after,
        }) => {
            let seconds = whole_seconds(retry_after);
            let whose = match culprit {
                Culprit::Address => "came from your address",
                Culprit::User => "were sent for this user name",
            };
            let error = ApiError::LoginsThrottled { whose, seconds };
            Err(retry_after_seconds(error, seconds))
        }
        Err(AuthError::Busy) => {
            let error = ApiError::Busy;
            Err(retry_after_seconds(error, 1))
        }
        Err(e) => Err(ApiError::internal(e).into_response()),
    }
}

/// A wait in whole seconds, rounded up: `Retry-After` has no fractions, and a client
/// that comes back early is only refused again.
fn whole_seconds(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// The error with a `Retry-After` header.
fn retry_after_seconds(error: ApiError, seconds: u64) -> Response {
    let mut response = error.into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}

/// The authenticated user of a request.
#[derive(Debug, Clone)]
pub struct CurrentUser(pub Arc<User>);

impl CurrentUser {
    /// Whether a record in this environment exists for the user (a missing record's
    /// environment is `None`, which nobody sees).
    pub fn sees(&self, environment: Option<u64>) -> bool {
        environment.is_some_and(|env| self.0.sees(env))
    }

    /// Whether an account exists for the user: a global administrator sees every one
    /// (also one that belongs to no environment), anyone else those of environments
    /// they have a role in.
    pub fn sees_account(&self, account: &crate::model::Account) -> bool {
        self.0.admin || account.environments.iter().any(|e| self.0.sees(*e))
    }

    /// 403 unless the user may do this in the environment (which they can see).
    pub fn require(&self, environment: u64, action: Action) -> ApiResult<()> {
        if self.0.may(environment, action) {
            Ok(())
        } else {
            Err(ApiError::Forbidden)
        }
    }

    /// 403 unless the user is a global administrator.
    pub fn require_admin(&self) -> ApiResult<()> {
        if self.0.admin {
            Ok(())
        } else {
            Err(ApiError::Forbidden)
        }
    }
}

async fn unknown_route(request: Request) -> ApiError {
    ApiError::NoRoute {
        method: request.method().to_string(),
        path: request.uri().path().to_owned(),
    }
}

/// `GET /api`: links to the collections, in Conductor's order (§7.1).
async fn entry(State(state): State<Shared>, headers: HeaderMap) -> Response {
    let base = base(&state, &headers);
    let mut doc = xml::Doc::new();
    doc.open("api", &[("href", &base)]);
    for name in [
        "builds",
        "catalogs",
        "deployments",
        "images",
        "pools",
        "pool_families",
        "providers",
        "provider_accounts",
        "provider_images",
        "provider_realms",
        "target_images",
    ] {
        doc.empty(name, &[("href", &format!("{base}/{name}"))]);
    }
    doc.close("api");
    xml_ok(doc.finish())
}
