//! `/api/users`: who may sign in, and their role in each environment. Global
//! administrators only. Users are created, listed, changed (password, roles, admin) and
//! disabled, never deleted, so what they did stays attributable.

use super::xml::{Doc, Element};
use super::{ApiError, ApiResult, CurrentUser, Shared, base, blocking, field, parse_body};
use crate::auth;
use crate::model::{Environment, Role, User, new_name_problem};
use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;

/// Shorter passwords are refused: they fall to guessing.
const MIN_PASSWORD: usize = 8;

fn write_user(doc: &mut Doc, base: &str, user: &User, environments: &[Environment]) {
    doc.open(
        "user",
        &[
            ("href", &format!("{base}/users/{}", user.name)),
            ("id", &user.name),
        ],
    )
    .text("name", &user.name)
    .text("admin", if user.admin { "true" } else { "false" })
    .text("disabled", if user.disabled { "true" } else { "false" })
    .open("roles", &[]);
    for (env, role) in &user.roles {
        let name = environments
            .iter()
            .find(|e| e.id == *env)
            .map(|e| e.name.as_str())
            .unwrap_or("");
        doc.text_with("role", &[("environment", name)], role.as_str());
    }
    doc.close("roles").close("user");
}

fn user_not_found(name: &str) -> ApiError {
    ApiError::RecordNotFound("User", name.to_string())
}

fn boolean(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" => Some(true),
        "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// Reads password, admin, disabled and roles (when given) into `user`, collecting
/// problems; the roles given replace the old ones.
fn apply(
    body: &Element,
    user: &mut User,
    environments: &[Environment],
    creating: bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    match field(body, "password") {
        Some(p) if p.chars().count() < MIN_PASSWORD => problems.push(format!(
            "Password is too short (minimum is {MIN_PASSWORD} characters)"
        )),
        Some(p) => match auth::hash_password(&p) {
            Ok(hash) => user.password_hash = hash,
            Err(e) => problems.push(e.to_string()),
        },
        None if creating => problems.push("Password can't be blank".into()),
        None => {}
    }
    for (name, slot) in [("admin", &mut user.admin), ("disabled", &mut user.disabled)] {
        if let Some(value) = field(body, name) {
            match boolean(&value) {
                Some(b) => *slot = b,
                None => problems.push(format!("{name} must be true or false")),
            }
        }
    }
    if let Some(roles) = body.child("roles") {
        let mut granted = Vec::new();
        for role in roles.elements() {
            let env_name = role.attribute("environment").unwrap_or("");
            let Some(env) = environments.iter().find(|e| e.name == env_name) else {
                problems.push(format!("Environment {env_name} was not found."));
                continue;
            };
            match Role::parse(&role.text()) {
                Some(r) => {
                    granted.retain(|(e, _)| *e != env.id);
                    granted.push((env.id, r));
                }
                None => problems.push(format!(
                    "Role {} is not one of admin, image_admin, viewer",
                    role.text().trim()
                )),
            }
        }
        user.roles = granted;
    }
    problems
}

pub async fn list(
    State(state): State<Shared>,
    Extension(me): Extension<CurrentUser>,
    headers: HeaderMap,
) -> ApiResult {
    me.require_admin()?;
    let base = base(&state, &headers);
    let (users, environments) =
        blocking(&state, |store| Ok((store.users()?, store.environments()?))).await?;
    let mut doc = Doc::new();
    doc.open("users", &[]);
    for user in &users {
        write_user(&mut doc, &base, user, &environments);
    }
    doc.close("users");
    Ok(super::xml_ok(doc.finish()))
}

pub async fn show(
    State(state): State<Shared>,
    Extension(me): Extension<CurrentUser>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    me.require_admin()?;
    let base = base(&state, &headers);
    let lookup = name.clone();
    let (user, environments) = blocking(&state, move |store| {
        Ok((store.user(&lookup)?, store.environments()?))
    })
    .await?;
    let user = user.ok_or_else(|| user_not_found(&name))?;
    let mut doc = Doc::new();
    write_user(&mut doc, &base, &user, &environments);
    Ok(super::xml_ok(doc.finish()))
}

pub async fn create(
    State(state): State<Shared>,
    Extension(me): Extension<CurrentUser>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    me.require_admin()?;
    let body = parse_body(&body, "user")?;
    let (users, environments) =
        blocking(&state, |store| Ok((store.users()?, store.environments()?))).await?;
    let name = field(&body, "name").unwrap_or_default();
    let mut problems = Vec::new();
    let taken = users.iter().any(|u| u.name == name);
    problems.extend(new_name_problem("Name", &name, taken));
    let mut user = User {
        name,
        password_hash: String::new(),
        admin: false,
        disabled: false,
        roles: Vec::new(),
    };
    // Hashing is slow on purpose: off the async runtime.
    let (user, more) = tokio::task::spawn_blocking(move || {
        let more = apply(&body, &mut user, &environments, true);
        (user, more)
    })
    .await
    .map_err(ApiError::internal)?;
    problems.extend(more);
    if !problems.is_empty() {
        return Err(ApiError::Validation(problems));
    }
    let saved = user.clone();
    blocking(&state, move |store| store.put_user(&saved)).await?;
    let environments = blocking(&state, |store| store.environments()).await?;
    let mut doc = Doc::new();
    write_user(&mut doc, &base(&state, &headers), &user, &environments);
    Ok(super::xml_created(doc.finish()))
}

/// Changes what the body names. The last enabled administrator cannot be disabled or
/// lose the admin flag: the server would have no one left to manage it.
pub async fn update(
    State(state): State<Shared>,
    Extension(me): Extension<CurrentUser>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    me.require_admin()?;
    let body = parse_body(&body, "user")?;
    let lookup = name.clone();
    let (user, users, environments) = blocking(&state, move |store| {
        Ok((store.user(&lookup)?, store.users()?, store.environments()?))
    })
    .await?;
    let mut user = user.ok_or_else(|| user_not_found(&name))?;
    let envs = environments.clone();
    let (user, problems) = tokio::task::spawn_blocking(move || {
        let problems = apply(&body, &mut user, &envs, false);
        (user, problems)
    })
    .await
    .map_err(ApiError::internal)?;
    let mut problems = problems;
    let other_admins = users
        .iter()
        .filter(|u| u.name != user.name && u.admin && !u.disabled)
        .count();
    if other_admins == 0 && (!user.admin || user.disabled) {
        problems.push(
            "The last enabled administrator cannot be disabled or lose the admin flag".into(),
        );
    }
    if !problems.is_empty() {
        return Err(ApiError::Validation(problems));
    }
    let saved = user.clone();
    blocking(&state, move |store| store.put_user(&saved)).await?;
    // Remembered logins must not outlive a disable or a new password.
    state.auth.forget();
    let mut doc = Doc::new();
    write_user(&mut doc, &base(&state, &headers), &user, &environments);
    Ok(super::xml_ok(doc.finish()))
}
