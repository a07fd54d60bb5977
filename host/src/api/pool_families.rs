//! `/api/pool_families`: environments as Conductor's UI routes manage them (§11.4):
//! created, renamed and deleted by global administrators, with their member accounts
//! managed by the environment's administrators. `environments.rs` has the read-only
//! `/api/environments` view of the same rows.

use super::xml::Doc;
use super::{
    ApiError, ApiResult, CurrentUser, Shared, base, blocking, field, no_content, parse_body,
    xml_created, xml_ok,
};
use crate::model::{DEFAULT_ENVIRONMENT, Environment, new_name_problem};
use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;

fn family_not_found(id: &str) -> ApiError {
    ApiError::RecordNotFound("PoolFamily", id.to_string())
}

/// The environment, if it exists for this user.
async fn find_family(state: &Shared, user: &CurrentUser, raw: &str) -> ApiResult<Environment> {
    let key = raw.parse::<u64>().map_err(|_| family_not_found(raw))?;
    blocking(state, move |store| store.environment(key))
        .await?
        .filter(|e| user.0.sees(e.id))
        .ok_or_else(|| family_not_found(raw))
}

/// Only global administrators create, change and delete environments.
fn require_admin(user: &CurrentUser) -> ApiResult<()> {
    user.require_admin()
}

pub async fn list_families(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    headers: HeaderMap,
) -> ApiResult {
    let base = base(&state, &headers);
    let environments = blocking(&state, |store| store.environments()).await?;
    let mut doc = Doc::new();
    doc.open("pool_families", &[]);
    for env in environments.iter().filter(|e| user.0.sees(e.id)) {
        let id = env.id.to_string();
        doc.empty(
            "pool_family",
            &[("href", &format!("{base}/pool_families/{id}")), ("id", &id)],
        );
    }
    doc.close("pool_families");
    Ok(xml_ok(doc.finish()))
}

async fn render_family(state: &Shared, headers: &HeaderMap, env: Environment) -> ApiResult<String> {
    let base = base(state, headers);
    let key = env.id;
    let (accounts, images) = blocking(state, move |store| {
        Ok((store.accounts()?, store.images(Some(key))?))
    })
    .await?;
    let id = env.id.to_string();
    let mut doc = Doc::new();
    doc.open(
        "pool_family",
        &[("href", &format!("{base}/pool_families/{id}")), ("id", &id)],
    )
    .text("name", &env.name)
    .text("description", &env.description)
    .empty("quota", &[("maximum_running_instances", "unlimited")])
    .open("provider_accounts", &[]);
    for a in accounts.iter().filter(|a| a.environments.contains(&env.id)) {
        let aid = a.id.to_string();
        doc.empty(
            "provider_account",
            &[
                ("href", &format!("{base}/provider_accounts/{aid}")),
                ("id", &aid),
            ],
        );
    }
    doc.close("provider_accounts").open("images", &[]);
    for image in &images {
        let iid = image.id.to_string();
        doc.empty(
            "image",
            &[("href", &format!("{base}/images/{iid}")), ("id", &iid)],
        );
    }
    doc.close("images").close("pool_family");
    Ok(doc.finish())
}

pub async fn show_family(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let env = find_family(&state, &user, &id).await?;
    Ok(xml_ok(render_family(&state, &headers, env).await?))
}

/// Reads name and description, collecting problems.
fn apply_family(
    body: &super::xml::Element,
    env: &mut Environment,
    existing: &[Environment],
    creating: bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(name) = field(body, "name").or_else(|| creating.then(String::new)) {
        let taken = existing.iter().any(|e| e.name == name && e.id != env.id);
        match new_name_problem("Name", &name, taken) {
            Some(problem) => problems.push(problem),
            None if env.name == DEFAULT_ENVIRONMENT && name != env.name && !creating => {
                problems.push("The default environment cannot be renamed".into())
            }
            None => env.name = name,
        }
    }
    if let Some(description) = field(body, "description") {
        env.description = description;
    }
    problems
}

pub async fn create_family(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    require_admin(&user)?;
    let body = parse_body(&body, "pool_family")?;
    let existing = blocking(&state, |store| store.environments()).await?;
    let mut env = Environment {
        id: 0,
        name: String::new(),
        description: String::new(),
    };
    let problems = apply_family(&body, &mut env, &existing, true);
    if !problems.is_empty() {
        return Err(ApiError::Validation(problems));
    }
    let env = blocking(&state, move |store| {
        store.create_environment(&env.name, &env.description)
    })
    .await?;
    Ok(xml_created(render_family(&state, &headers, env).await?))
}

pub async fn update_family(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    require_admin(&user)?;
    let mut env = find_family(&state, &user, &id).await?;
    let body = parse_body(&body, "pool_family")?;
    let existing = blocking(&state, |store| store.environments()).await?;
    let problems = apply_family(&body, &mut env, &existing, false);
    if !problems.is_empty() {
        return Err(ApiError::Validation(problems));
    }
    let saved = env.clone();
    blocking(&state, move |store| store.put_environment(&saved)).await?;
    Ok(xml_ok(render_family(&state, &headers, env).await?))
}

/// Refused for the default environment and for one that still holds images.
pub async fn delete_family(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(id): Path<String>,
) -> ApiResult {
    require_admin(&user)?;
    let env = find_family(&state, &user, &id).await?;
    if env.name == DEFAULT_ENVIRONMENT {
        return Err(ApiError::InUse(
            "The default environment cannot be deleted.".into(),
        ));
    }
    let key = env.id;
    let images = blocking(&state, move |store| {
        let images = store.images(Some(key))?;
        if images.is_empty() {
            store.delete_environment(key)?;
        }
        Ok(images)
    })
    .await?;
    if !images.is_empty() {
        let names: Vec<String> = images
            .iter()
            .map(|i| format!("{} ({})", i.name, i.id))
            .collect();
        return Err(ApiError::InUse(format!(
            "There are following associated images: {}. Delete them first.",
            names.join(", ")
        )));
    }
    Ok(no_content())
}

pub async fn list_members(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let base = base(&state, &headers);
    let env = find_family(&state, &user, &id).await?;
    let accounts = blocking(&state, |store| store.accounts()).await?;
    let mut doc = Doc::new();
    doc.open("provider_accounts", &[]);
    for a in accounts.iter().filter(|a| a.environments.contains(&env.id)) {
        let aid = a.id.to_string();
        doc.empty(
            "provider_account",
            &[
                ("href", &format!("{base}/provider_accounts/{aid}")),
                ("id", &aid),
            ],
        );
    }
    doc.close("provider_accounts");
    Ok(xml_ok(doc.finish()))
}

/// 204 when the account is a member, 404 with an empty body when not (as Conductor).
pub async fn show_member(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path((family, account)): Path<(String, String)>,
) -> ApiResult {
    let env = find_family(&state, &user, &family).await?;
    let key = account.parse::<u64>().ok();
    let member = match key {
        Some(key) => blocking(&state, move |store| store.account(key))
            .await?
            .is_some_and(|a| a.environments.contains(&env.id)),
        None => false,
    };
    Ok(if member {
        no_content()
    } else {
        StatusCode::NOT_FOUND.into_response()
    })
}

/// Membership is managed by the environment's administrators; the account must be one
/// they administer somewhere, so no one can pull another team's account in.
async fn set_member(
    state: &Shared,
    user: &CurrentUser,
    family: &str,
    account: &str,
    member: bool,
) -> ApiResult {
    let env = find_family(state, user, family).await?;
    user.require(env.id, crate::model::Action::ManageAccounts)?;
    let missing = || ApiError::RecordNotFound("ProviderAccount", account.to_string());
    let key = account.parse::<u64>().map_err(|_| missing())?;
    let user = user.clone();
    let changed = blocking(state, move |store| {
        let Some(mut a) = store.account(key)? else {
            return Ok(Ok(false));
        };
        let administers = user.0.admin
            || a.environments
                .iter()
                .any(|e| user.0.may(*e, crate::model::Action::ManageAccounts));
        if !administers {
            return Ok(Ok(false));
        }
        let clash = member
            && store
                .accounts()?
                .iter()
                .any(|o| o.id != a.id && o.label == a.label && o.environments.contains(&env.id));
        if clash {
            return Ok(Err(a.label));
        }
        a.environments.retain(|e| *e != env.id);
        if member {
            a.environments.push(env.id);
        }
        store.put_account(&a)?;
        Ok(Ok(true))
    })
    .await?;
    match changed {
        Ok(true) => Ok(no_content()),
        Ok(false) => Err(missing()),
        // Labels name accounts within an environment, so two there may not share one.
        Err(label) => Err(ApiError::Validation(vec![format!(
            "Label {label} is already used by another account in this environment"
        )])),
    }
}

/// Adds the account to the environment (idempotent).
pub async fn add_member(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path((family, account)): Path<(String, String)>,
) -> ApiResult {
    set_member(&state, &user, &family, &account, true).await
}

/// Removes the account from the environment (idempotent).
pub async fn remove_member(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path((family, account)): Path<(String, String)>,
) -> ApiResult {
    set_member(&state, &user, &family, &account, false).await
}
