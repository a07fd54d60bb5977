//! `/api/builds` and `/api/images/:image_id/builds` (reference/conductor-api.md §7.3).

use super::Kind;
use super::images::deleted_reply;
use super::xml::Doc;
use super::{ApiError, ApiResult, CurrentUser, Shared, base, blocking, parse_id, xml_ok};
use crate::model::{Action, Build, Id};
use axum::Extension;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use std::collections::HashSet;

fn write_build(doc: &mut Doc, base: &str, build: &Build) {
    let id = build.id.to_string();
    let image = build.image_id.to_string();
    doc.open(
        "build",
        &[("href", &format!("{base}/builds/{id}")), ("id", &id)],
    )
    .text_with(
        "image",
        &[
            ("href", &format!("{base}/images/{image}")),
            ("type", "xs:string"),
        ],
        &image,
    )
    .close("build");
}

fn build_not_found(id: &str) -> ApiError {
    ApiError::NotFound(Kind::Build, id.to_string())
}

pub async fn list(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
    headers: HeaderMap,
) -> ApiResult {
    let page = super::page::Page::parse(query.as_deref())?;
    let builds = blocking(&state, move |store| {
        // Only the builds of images in the user's environments exist for them.
        let visible: HashSet<Id> = store
            .images(None)?
            .into_iter()
            .filter(|i| user.0.sees(i.environment_id))
            .map(|i| i.id)
            .collect();
        Ok(store
            .builds(None)?
            .into_iter()
            .filter(|b| visible.contains(&b.image_id))
            .collect::<Vec<_>>())
    })
    .await?;
    let total = builds.len();
    let response = render_list(&base(&state, &headers), &builds[page.range(total)])?;
    Ok(super::page::with_total(response, total))
}

fn render_list(base: &str, builds: &[Build]) -> ApiResult {
    let mut doc = Doc::new();
    doc.open("builds", &[]);
    for build in builds {
        write_build(&mut doc, base, build);
    }
    doc.close("builds");
    Ok(xml_ok(doc.finish()))
}

/// A missing parent answers 400, as Conductor did on purpose (BZ 754956).
pub async fn list_of_image(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(image): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let missing = || ApiError::ParentNotFound(Kind::Image, image.to_string());
    let id = parse_id(&image).ok_or_else(missing)?;
    let builds = blocking(&state, move |store| {
        Ok(match store.image(id)? {
            Some(i) if user.0.sees(i.environment_id) => Some(store.builds(Some(id))?),
            _ => None,
        })
    })
    .await?
    .ok_or_else(missing)?;
    render_list(&base(&state, &headers), &builds)
}

/// The build if it exists for this user (and belongs to `parent` when one is given),
/// with its environment.
async fn find(
    state: &Shared,
    user: &CurrentUser,
    raw: &str,
    parent: Option<Id>,
) -> ApiResult<(Build, u64)> {
    let id = parse_id(raw).ok_or_else(|| build_not_found(raw))?;
    let found = blocking(state, move |store| match store.build(id)? {
        Some(build) => {
            let env = store.image_environment(build.image_id)?;
            Ok(Some((build, env)))
        }
        None => Ok(None),
    })
    .await?;
    match found {
        Some((build, env)) if parent.is_none_or(|p| p == build.image_id) && user.sees(env) => {
            Ok((build, env.unwrap_or_default()))
        }
        _ => Err(build_not_found(raw)),
    }
}

async fn show_one(
    state: &Shared,
    headers: &HeaderMap,
    user: &CurrentUser,
    raw: &str,
    parent: Option<Id>,
) -> ApiResult {
    let (build, _) = find(state, user, raw, parent).await?;
    let mut doc = Doc::new();
    write_build(&mut doc, &base(state, headers), &build);
    Ok(xml_ok(doc.finish()))
}

pub async fn show(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    show_one(&state, &headers, &user, &id, None).await
}

pub async fn show_of_image(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path((image, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    let parent = parse_id(&image).ok_or_else(|| build_not_found(&id))?;
    show_one(&state, &headers, &user, &id, Some(parent)).await
}

async fn delete_one(
    state: &Shared,
    headers: &HeaderMap,
    user: &CurrentUser,
    raw: &str,
    parent: Option<Id>,
) -> ApiResult {
    let (build, env) = find(state, user, raw, parent).await?;
    user.require(env, Action::ManageImages)?;
    let id = build.id;
    let removed = blocking(state, move |store| store.delete_build(id))
        .await?
        .ok_or_else(|| build_not_found(raw))?;
    deleted_reply(state, &base(state, headers), "build", id, &removed).await
}

pub async fn delete(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    delete_one(&state, &headers, &user, &id, None).await
}

pub async fn delete_of_image(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path((image, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    let parent = parse_id(&image).ok_or_else(|| build_not_found(&id))?;
    delete_one(&state, &headers, &user, &id, Some(parent)).await
}
