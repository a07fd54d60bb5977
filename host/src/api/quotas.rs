//! `/api/environments/:id/quota`: what one environment may hold and run, beside what it
//! holds now. Everyone who sees the environment may read it; global administrators set
//! it. An extension of Conductor's API (docs/compatibility.md).
//!
//! ```xml
//! <quota environment='default'>
//!   <images>100</images><stored_bytes>1099511627776</stored_bytes>
//!   <running_jobs>2</running_jobs><queued_jobs></queued_jobs>
//!   <usage><images>3</images><stored_bytes>201326592</stored_bytes><queued_jobs>0</queued_jobs></usage>
//! </quota>
//! ```
//! An empty or absent element is no limit of that kind.

use super::xml::Doc;
use super::{ApiError, ApiResult, CurrentUser, Shared, blocking, parse_body, xml_ok};
use crate::model::{Environment, Quota, Usage};
use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;

fn write_quota(doc: &mut Doc, env: &Environment, quota: &Quota, usage: &Usage) {
    let limit = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
    doc.open("quota", &[("environment", &env.name)])
        .text("images", &limit(quota.images))
        .text("stored_bytes", &limit(quota.stored_bytes))
        .text("running_jobs", &limit(quota.running_jobs))
        .text("queued_jobs", &limit(quota.queued_jobs))
        .open("usage", &[])
        .text("images", &usage.images.to_string())
        .text("stored_bytes", &usage.stored_bytes.to_string())
        .text("queued_jobs", &usage.queued_jobs.to_string())
        .close("usage")
        .close("quota");
}

/// The environment by id or name, if the user sees it.
async fn environment(state: &Shared, user: &CurrentUser, key: &str) -> ApiResult<Environment> {
    let lookup = key.to_owned();
    let env = blocking(state, move |store| {
        let environments = store.environments()?;
        Ok(environments
            .iter()
            .find(|e| lookup.parse::<u64>().is_ok_and(|id| id == e.id))
            .or_else(|| environments.iter().find(|e| e.name == lookup))
            .cloned())
    })
    .await?;
    env.filter(|e| user.0.sees(e.id))
        .ok_or_else(|| ApiError::RecordNotFound("Environment", key.to_string()))
}

async fn render(state: &Shared, env: Environment) -> ApiResult {
    let id = env.id;
    let (quota, usage) =
        blocking(state, move |store| Ok((store.quota(id)?, store.usage(id)?))).await?;
    let mut doc = Doc::new();
    write_quota(&mut doc, &env, &quota, &usage);
    Ok(xml_ok(doc.finish()))
}

pub async fn show(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(key): Path<String>,
) -> ApiResult {
    let env = environment(&state, &user, &key).await?;
    render(&state, env).await
}

/// Replaces the quota: every kind not given (or given empty) becomes unlimited.
pub async fn update(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(key): Path<String>,
    body: Bytes,
) -> ApiResult {
    let env = environment(&state, &user, &key).await?;
    user.require_admin()?;
    let request = parse_body(&body, "quota")?;
    let mut problems = Vec::new();
    let mut limit = |name: &str| -> Option<u64> {
        let text = request.child_text(name).filter(|t| !t.is_empty())?;
        match text.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                problems.push(format!(
                    "{name} must be a whole number of at least 0 or empty for no limit, not '{text}'"
                ));
                None
            }
        }
    };
    let quota = Quota {
        images: limit("images"),
        stored_bytes: limit("stored_bytes"),
        running_jobs: limit("running_jobs"),
        queued_jobs: limit("queued_jobs"),
    };
    if !problems.is_empty() {
        return Err(ApiError::Validation(problems));
    }
    let id = env.id;
    blocking(&state, move |store| store.put_quota(id, &quota)).await?;
    tracing::info!(environment = %env.name, ?quota, "quota set");
    let mut response = render(&state, env).await?;
    *response.status_mut() = StatusCode::OK;
    Ok(response)
}
