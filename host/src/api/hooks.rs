//! `/api/hooks`: webhooks (reference/conductor-api.md §7.7), made real. A registered URL
//! receives a POST with the target image or provider image document, the same as a GET
//! returns, on every status change and progress report, in order, with retries; clients
//! need not poll.
//!
//! Conductor stored hooks but never called them, and let anyone register one; here only
//! administrators may, since a hook makes the server send requests.

use super::xml::Doc;
use super::{ApiResult, CurrentUser, Shared, blocking, no_content, xml_ok};
use crate::jobs::Change;
use crate::model::Hook;
use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::time::Duration;

/// Deliveries waiting for one hook; past this, the oldest reports are dropped (a hook
/// that is down must not hold the server's memory).
const QUEUE: usize = 1024;
/// Tries per delivery, with the pause doubling from the first.
const TRIES: u32 = 4;
const FIRST_PAUSE: Duration = Duration::from_millis(250);
/// One delivery, connection and answer included.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

fn write_hook(doc: &mut Doc, base: &str, hook: &Hook) {
    let id = hook.id.to_string();
    doc.open(
        "hook",
        &[("href", &format!("{base}/hooks/{id}")), ("id", &id)],
    )
    .text("uri", &hook.uri)
    .text("version", "1")
    .close("hook");
}

/// Hooks answer errors with an empty body, as Conductor did.
fn empty(status: StatusCode) -> Response {
    status.into_response()
}

fn forbidden() -> Response {
    super::ApiError::Forbidden.into_response()
}

/// Hooks are the server's own outgoing requests and their URLs may carry secrets, so
/// only global administrators see them.
pub async fn list(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    headers: HeaderMap,
) -> ApiResult {
    if !user.0.admin {
        return Ok(forbidden());
    }
    let base = super::base(&state, &headers);
    let hooks = blocking(&state, |store| store.hooks()).await?;
    let mut doc = Doc::new();
    doc.open("hooks", &[]);
    for hook in &hooks {
        write_hook(&mut doc, &base, hook);
    }
    doc.close("hooks");
    Ok(xml_ok(doc.finish()))
}

pub async fn show(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    if !user.0.admin {
        return Ok(forbidden());
    }
    let base = super::base(&state, &headers);
    let hooks = blocking(&state, |store| store.hooks()).await?;
    match hooks.iter().find(|h| h.id.to_string() == id) {
        Some(hook) => {
            let mut doc = Doc::new();
            write_hook(&mut doc, &base, hook);
            Ok(xml_ok(doc.finish()))
        }
        None => Ok(empty(StatusCode::NOT_FOUND)),
    }
}

/// Reads `hook[uri]`/`hook[version]` from a form, or `<hook><uri/><version/></hook>`.
fn read_request(body: &[u8]) -> Option<(Option<String>, Option<String>)> {
    if let Ok(element) = super::xml::parse(body) {
        if element.name != "hook" {
            return None;
        }
        return Some((element.child_text("uri"), element.child_text("version")));
    }
    let text = std::str::from_utf8(body).ok()?;
    let mut uri = None;
    let mut version = None;
    let mut seen = false;
    for pair in text.split('&') {
        let (key, value) = pair.split_once('=')?;
        let value = percent_decode(value);
        match percent_decode(key).as_str() {
            "hook[uri]" => (uri, seen) = (Some(value), true),
            "hook[version]" => (version, seen) = (Some(value), true),
            _ => {}
        }
    }
    seen.then_some((uri, version))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (_, Some(b)) => {
                out.push(b);
                i += 2;
            }
            (b'+', None) => out.push(b' '),
            (b, None) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub async fn create(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    if !user.0.admin {
        return Ok(forbidden());
    }
    let Some((uri, version)) = read_request(&body) else {
        return Ok(empty(StatusCode::BAD_REQUEST));
    };
    if version.as_deref() != Some("1") {
        return Ok(empty(StatusCode::NOT_IMPLEMENTED));
    }
    let uri = uri.unwrap_or_default();
    // A URI with control characters (possible through the form encoding) would make
    // every later hooks document unreadable as XML.
    if uri.chars().any(|c| c.is_control()) || uri.len() > 2048 {
        return Ok(empty(StatusCode::BAD_REQUEST));
    }
    if !(uri.starts_with("http://") || uri.starts_with("https://"))
        || reqwest::Url::parse(&uri).is_err()
    {
        return Ok(empty(StatusCode::BAD_REQUEST));
    }
    // A hook to an internal address would make the server post documents there; it
    // takes an operator's --fetch-allow. (Names are checked again at every delivery,
    // after they are resolved.)
    if let Err(refused) = state.fetch.check(&uri) {
        return Err(super::ApiError::Incorrect(format!("Hook {uri}: {refused}")));
    }
    let hook = blocking(&state, move |store| store.create_hook(&uri)).await?;
    let base = super::base(&state, &headers);
    let mut doc = Doc::new();
    write_hook(&mut doc, &base, &hook);
    let mut response = super::xml_created(doc.finish());
    if let Ok(location) = header::HeaderValue::from_str(&format!("{base}/hooks/{}", hook.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

pub async fn delete(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(id): Path<String>,
) -> ApiResult {
    if !user.0.admin {
        return Ok(forbidden());
    }
    let Ok(key) = id.parse::<u64>() else {
        return Ok(empty(StatusCode::NOT_FOUND));
    };
    let existed = blocking(&state, move |store| store.delete_hook(key)).await?;
    Ok(if existed {
        no_content()
    } else {
        empty(StatusCode::NOT_FOUND)
    })
}

/// Follows every change the jobs announce and delivers it to every hook: one queue and
/// one sender task per hook, so each hook sees changes in the order they happened.
pub fn spawn_dispatcher(state: Shared, base: String) {
    let mut changes = state.jobs.subscribe();
    tokio::spawn(async move {
        // Deliveries go through the same guard as base image downloads: a hook whose
        // name resolves to an internal address is refused at each delivery.
        let client = match state.fetch.client() {
            Ok(client) => client,
            Err(e) => {
                tracing::error!("webhooks are off: {e}");
                return;
            }
        };
        let mut queues: HashMap<u64, tokio::sync::mpsc::Sender<(&'static str, String)>> =
            HashMap::new();
        loop {
            let change = match changes.recv().await {
                Ok(change) => change,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "webhooks fell behind and skipped reports");
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            let Ok(hooks) = blocking(&state, |store| store.hooks()).await else {
                continue;
            };
            if hooks.is_empty() {
                queues.clear();
                continue;
            }
            let document = match change {
                Change::TargetImage(ti) => (
                    "target_image",
                    super::target_images::document(&state, &base, *ti).await,
                ),
                Change::ProviderImage(pi) => (
                    "provider_image",
                    super::provider_images::document(&state, &base, *pi).await,
                ),
            };
            let (event, Some(body)) = document else {
                continue;
            };
            queues.retain(|id, _| hooks.iter().any(|h| h.id == *id));
            for hook in hooks {
                let queue = queues.entry(hook.id).or_insert_with(|| {
                    let (sender, receiver) = tokio::sync::mpsc::channel(QUEUE);
                    tokio::spawn(deliver(
                        client.clone(),
                        state.fetch.clone(),
                        hook.uri.clone(),
                        receiver,
                    ));
                    sender
                });
                if queue.try_send((event, body.clone())).is_err() {
                    tracing::warn!(hook = %hook.uri, "webhook queue full; a report was dropped");
                }
            }
        }
    });
}

async fn deliver(
    client: reqwest::Client,
    policy: std::sync::Arc<crate::fetch::FetchPolicy>,
    uri: String,
    mut queue: tokio::sync::mpsc::Receiver<(&'static str, String)>,
) {
    while let Some((event, body)) = queue.recv().await {
        // A hook stored before its address was refused (by an older release, or while
        // the operator allowed it) is not delivered: an address in the URL itself
        // never reaches the resolver's check.
        if let Err(refused) = policy.check(&uri) {
            tracing::warn!(hook = %uri, "webhook not delivered: {refused}");
            continue;
        }
        let mut pause = FIRST_PAUSE;
        for attempt in 1..=TRIES {
            let sent = client
                .post(&uri)
                .timeout(DELIVERY_TIMEOUT)
                .header("Content-Type", "application/xml; charset=utf-8")
                .header("X-Conductor-Event", event)
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(response) if response.status().is_success() => break,
                Ok(response) => {
                    tracing::warn!(hook = %uri, status = %response.status(), attempt, "webhook refused")
                }
                Err(e) => tracing::warn!(hook = %uri, attempt, "webhook unreachable: {e}"),
            }
            if attempt < TRIES {
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
        }
    }
}
