//! `/api/images` and `/api/environments/:env/images`: list, show, build (create from a
//! TDL template) and delete with cascade (reference/conductor-api.md §7.2).

use super::Kind;
use super::page::{Page, with_total};
use super::rendered::Kept;
use super::xml::{self, Doc, Element};
use super::{ApiError, ApiResult, CurrentUser, Shared, base, blocking, parse_id, submit, xml_ok};
use crate::jobs::DeleteOutcome;
use crate::model::{
    self, Action, BaseImage, Build, DEFAULT_ENVIRONMENT, Environment, Image, Progress, TargetImage,
    split_list,
};
use crate::plugins::PluginError;
use crate::store::Removed;
use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;

mod build;
mod import;

pub(super) fn write_image(doc: &mut Doc, base: &str, image: &Image, env: &str, builds: &[Build]) {
    // Ids and hrefs are written into buffers reused for every element: a list of
    // 10,000 images would otherwise allocate four strings per image for them.
    let mut id = uuid::Uuid::encode_buffer();
    let id = image.id.hyphenated().encode_lower(&mut id);
    let mut href = String::with_capacity(base.len() + 48);
    href.push_str(base);
    href.push_str("/images/");
    href.push_str(id);
    doc.open("image", &[("href", &href), ("id", id)])
        .text("name", &image.name)
        .text("environment", env)
        .text("description", &image.description)
        .text("os", &image.os)
        .text("os_version", &image.os_version)
        .text("arch", &image.arch)
        .open("builds", &[("type", "xs:list")]);
    for build in builds {
        let mut bid = uuid::Uuid::encode_buffer();
        let bid = build.id.hyphenated().encode_lower(&mut bid);
        href.truncate(base.len());
        href.push_str("/builds/");
        href.push_str(bid);
        doc.empty("build", &[("href", &href), ("id", bid)]);
    }
    doc.close("builds").close("image");
}

fn image_not_found(id: &str) -> ApiError {
    ApiError::NotFound(Kind::Image, id.to_string())
}

async fn render_list(
    state: &Shared,
    headers: &HeaderMap,
    user: &CurrentUser,
    env: Option<String>,
    page: Page,
) -> ApiResult {
    let base = base(state, headers);
    let user = user.clone();
    let rows = blocking(state, move |store| {
        let environments = store.environments()?;
        let filter = match &env {
            // An unknown environment lists nothing, as Conductor did (not a 404: its
            // client crashes on a 404 for a list).
            Some(name) => match environments
                .iter()
                .find(|e| &e.name == name && user.0.sees(e.id))
            {
                Some(e) => Some(e.id),
                None => return Ok(Vec::new()),
            },
            None => None,
        };
        let mut rows = Vec::new();
        for (image, builds) in store.images_with_builds(filter)? {
            // Images of environments the user has no role in do not exist for them.
            if !user.0.sees(image.environment_id) {
                continue;
            }
            let env = env_name(&environments, image.environment_id);
            rows.push((image, env, builds));
        }
        Ok(rows)
    })
    .await?;
    let total = rows.len();
    let rows = &rows[page.range(total)];
    // An image with a build or two takes about 450 bytes.
    let mut doc = Doc::with_capacity(64 + rows.len() * 512);
    doc.open("images", &[]);
    for (image, env, builds) in rows {
        write_image(&mut doc, &base, image, env, builds);
    }
    doc.close("images");
    Ok(with_total(xml_ok(doc.finish()), total))
}

fn env_name(environments: &[Environment], id: u64) -> String {
    environments
        .iter()
        .find(|e| e.id == id)
        .map(|e| e.name.clone())
        .unwrap_or_default()
}

pub async fn list(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> ApiResult {
    let page = Page::parse(query.as_deref())?;
    render_list(&state, &headers, &user, None, page).await
}

pub async fn list_in_environment(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(env): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> ApiResult {
    let page = Page::parse(query.as_deref())?;
    render_list(&state, &headers, &user, Some(env), page).await
}

async fn render_one(
    state: &Shared,
    headers: &HeaderMap,
    user: &CurrentUser,
    raw: String,
    env: Option<String>,
) -> ApiResult {
    let base = base(state, headers);
    let id = parse_id(&raw).ok_or_else(|| image_not_found(&raw))?;
    let key = format!("{base}/images/{id}");
    // Read before the record: a write committed in between makes what is kept stale.
    // While a write is being committed nothing is kept or reused.
    let generation = state.store.generation();
    let kept = match generation.and_then(|g| state.rendered.get(&key, g)) {
        Some(kept) => Some(kept),
        None => {
            let found = blocking(state, move |store| {
                let reader = store.reader()?;
                let Some(image) = reader.image(id)? else {
                    return Ok(None);
                };
                let environments = store.environments()?;
                let builds = reader.builds(Some(id))?;
                Ok(Some((
                    env_name(&environments, image.environment_id),
                    image,
                    builds,
                )))
            })
            .await?;
            found.map(|(environment_name, image, builds)| {
                let mut doc = Doc::new();
                write_image(&mut doc, &base, &image, &environment_name, &builds);
                let kept = Kept {
                    generation: generation.unwrap_or_default(),
                    environment: image.environment_id,
                    environment_name,
                    body: Bytes::from(doc.finish()),
                };
                match generation {
                    Some(_) => state.rendered.keep(key, kept),
                    None => std::sync::Arc::new(kept),
                }
            })
        }
    };
    match kept {
        // A nested id that does not belong to its parent is not found (a deliberate
        // change: Conductor ignored the environment in the path).
        Some(kept)
            if env.as_ref().is_none_or(|e| *e == kept.environment_name)
                && user.sees(Some(kept.environment)) =>
        {
            Ok(xml_ok(kept.body.clone()))
        }
        _ => Err(image_not_found(&raw)),
    }
}

pub async fn show(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    render_one(&state, &headers, &user, id, None).await
}

pub async fn show_in_environment(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path((env, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    render_one(&state, &headers, &user, id, Some(env)).await
}

/// The environment a build or import request names in `<environment>`; the default
/// one when it names none (an addition: Conductor required it).
fn environment_named(request: &Element) -> String {
    request
        .child_text("environment")
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| DEFAULT_ENVIRONMENT.to_owned())
}

/// The reply to a delete of the `element` record `id` (`image`, `build`,
/// `target_image`, `provider_image`, at `{base}/{element}s/{id}`): it says DELETED and
/// lists the provider images it took along, once their provider-side deletes ended or
/// went on in the background (`finish_delete`). `<status>DELETED</status>` is an
/// addition in the provider image's reply: Conductor left it out of that one.
pub(super) async fn deleted_reply(
    state: &Shared,
    base: &str,
    element: &str,
    id: crate::model::Id,
    removed: &Removed,
) -> ApiResult {
    let outcomes = state.jobs.finish_delete(removed).await;
    let id = id.to_string();
    let mut doc = Doc::new();
    doc.open(
        element,
        &[("href", &format!("{base}/{element}s/{id}")), ("id", &id)],
    )
    .text("status", "DELETED");
    write_content(&mut doc, removed, &outcomes);
    doc.close(element);
    Ok(xml_ok(doc.finish()))
}

/// Writes the `<content>` of a delete reply: every provider image that existed, as
/// (provider, target_identifier), and for each one that had been pushed, what became of
/// it on the provider (`<status>` DELETED, FAILED or DELETING, and `<error>`). Never an
/// empty element, because Conductor's client needs text in it.
fn write_content(doc: &mut Doc, removed: &Removed, outcomes: &[DeleteOutcome]) {
    doc.open("content", &[]);
    for pi in &removed.provider_images {
        doc.open("provider_content", &[])
            .text("provider", &pi.provider_name)
            .text("target_identifier", &pi.target_identifier);
        if let Some(outcome) = outcomes
            .iter()
            .find(|o| !pi.target_identifier.is_empty() && o.identifier == pi.target_identifier)
        {
            doc.text("status", outcome.status)
                .text("error", &outcome.error);
        }
        doc.close("provider_content");
    }
    doc.close("content");
}

async fn delete_one(
    state: &Shared,
    headers: &HeaderMap,
    user: &CurrentUser,
    raw: String,
    env: Option<String>,
) -> ApiResult {
    let base = base(state, headers);
    let id = parse_id(&raw).ok_or_else(|| image_not_found(&raw))?;
    let found = blocking(state, move |store| {
        let Some(image) = store.image(id)? else {
            return Ok(None);
        };
        let environments = store.environments()?;
        Ok(Some((
            env_name(&environments, image.environment_id),
            image.environment_id,
        )))
    })
    .await?;
    let environment = match found {
        Some((name, environment))
            if env.as_ref().is_none_or(|e| *e == name) && user.sees(Some(environment)) =>
        {
            environment
        }
        _ => return Err(image_not_found(&raw)),
    };
    user.require(environment, Action::ManageImages)?;
    let removed = blocking(state, move |store| store.delete_image(id))
        .await?
        .ok_or_else(|| image_not_found(&raw))?;
    deleted_reply(state, &base, "image", id, &removed).await
}

pub async fn delete(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    delete_one(&state, &headers, &user, id, None).await
}

pub async fn delete_in_environment(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path((env, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    delete_one(&state, &headers, &user, id, Some(env)).await
}

/// The longest template a build takes: Oz's templates are a few KiB, with files inline
/// a few hundred at most.
const MAX_TEMPLATE: usize = 256 << 10;
/// The longest image name and description, which every image list carries.
const MAX_NAME: usize = 255;
const MAX_DESCRIPTION: usize = 4096;

pub(super) fn insufficient(message: &str) -> ApiError {
    ApiError::Insufficient(message.into())
}

fn invalid_template(problem: impl std::fmt::Display) -> ApiError {
    ApiError::InvalidTemplate(problem.to_string())
}

/// The TDL document inside `<tdl>`, in any of the three forms clients send: a child
/// `<template>` element, entity-escaped text, or CDATA (§1.4).
fn template_text(tdl: &Element) -> Result<String, ApiError> {
    let templates: Vec<&Element> = tdl.elements().collect();
    match templates.as_slice() {
        [one] => return Ok(one.to_xml()),
        [] => {}
        _ => return Err(invalid_template("<tdl> must hold exactly one <template>")),
    }
    let text = tdl.text();
    if text.trim().is_empty() {
        return Err(invalid_template("Name is not set."));
    }
    Ok(text.trim().to_owned())
}

/// `<parameters><parameter name='k'>v</parameter>…</parameters>`: extra name/value pairs
/// handed to the plugin (an extension of Conductor's request).
pub(super) fn parameters(request: &Element) -> Result<Vec<(String, String)>, ApiError> {
    let Some(list) = request.child("parameters") else {
        return Ok(Vec::new());
    };
    let mut pairs = Vec::new();
    for p in list.elements() {
        let name = p
            .attribute("name")
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ApiError::Incorrect("each <parameter> needs a name attribute".into()))?;
        if pairs.len() >= 64 {
            return Err(ApiError::Incorrect(
                "at most 64 parameters are accepted".into(),
            ));
        }
        let value = p.text().trim().to_owned();
        if name.len() > 256 || value.chars().count() > super::MAX_VALUE {
            return Err(ApiError::Incorrect(format!(
                "parameter names are at most 256 bytes and values at most {} characters",
                super::MAX_VALUE
            )));
        }
        pairs.push((name.to_owned(), value));
    }
    Ok(pairs)
}

/// `POST /api/images`: a build from a template (import comes with the provider work).
pub async fn create(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let request =
        xml::parse(&body).map_err(|_| insufficient("Please specify a type, build or import"))?;
    if request.name != "image" {
        return Err(insufficient("Please specify a type, build or import"));
    }
    let is_build = request.child("targets").is_some() && request.child("tdl").is_some();
    let is_import = request.child("provider_account_name").is_some()
        && request.child("target_identifier").is_some()
        && request.child("image_descriptor").is_some();
    if is_build {
        build::build(&state, &headers, &user, &request).await
    } else if is_import {
        import::import(&state, &headers, &user, &request).await
    } else {
        Err(insufficient("Please specify a type, build or import"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tdl_of(body: &str) -> Result<String, ApiError> {
        let request = xml::parse(body.as_bytes()).map_err(ApiError::internal)?;
        template_text(
            request
                .child("tdl")
                .ok_or_else(|| ApiError::internal("no tdl"))?,
        )
    }

    #[test]
    fn the_three_tdl_forms_give_the_same_template() -> Result<(), ApiError> {
        let element = tdl_of("<image><tdl><template><name>t</name></template></tdl></image>")?;
        let escaped = tdl_of(
            "<image><tdl>&lt;template&gt;&lt;name&gt;t&lt;/name&gt;&lt;/template&gt;</tdl></image>",
        )?;
        let cdata =
            tdl_of("<image><tdl><![CDATA[<template><name>t</name></template>]]></tdl></image>")?;
        assert_eq!(element, "<template><name>t</name></template>");
        assert_eq!(escaped, element);
        assert_eq!(cdata, element);
        Ok(())
    }

    #[test]
    fn two_templates_are_refused() {
        let result = tdl_of("<image><tdl><template/><template/></tdl></image>");
        assert!(result.is_err_and(|e| e.message().contains("exactly one")));
    }
}
