//! `/api/images` and `/api/environments/:env/images`: list, show, build (create from a
//! TDL template) and delete with cascade (reference/conductor-api.md §7.2).

use super::page::{Page, with_total};
use super::rendered::Kept;
use super::xml::{self, Doc, Element};
use super::{ApiError, ApiResult, CurrentUser, Shared, base, blocking, parse_id, xml_ok};
use crate::model::{
    self, Action, BaseImage, Build, DEFAULT_ENVIRONMENT, Environment, Image, Job, JobKind,
    Progress, TargetImage, split_list,
};
use crate::plugins::PluginError;
use crate::store::Removed;
use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;

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
    ApiError::not_found("ImageNotFound", format!("Could not find Image {id}"))
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

/// The answer to an import whose lookup failed. An image the provider does not have is
/// Conductor's 404 `ImageNotFound`, word for word. Credentials the provider refused and
/// an identifier the plugin calls malformed are the request's fault: 400, with the
/// reason. Anything else (the provider unreachable, the plugin failing) stays the 404
/// Conductor answered for a connection error, its clients print 4xx messages and not
/// 5xx ones, but the message says what happened instead of claiming the image is not
/// there.
fn lookup_failed(identifier: &str, account: &str, error: PluginError) -> ApiError {
    tracing::info!(%identifier, "import lookup failed: {error}");
    match error {
        PluginError::NotFound(_) => ApiError::not_found(
            "ImageNotFound",
            format!("Could not find Image {identifier} on Provider"),
        ),
        PluginError::BadCredentials(reason) => ApiError::bad_request(
            "ParameterDataIncorrect",
            format!("Provider Account {account}: the provider refused its credentials: {reason}"),
        ),
        PluginError::InvalidInput(reason) => ApiError::bad_request(
            "ParameterDataIncorrect",
            format!("Image {identifier} cannot be looked up on this Provider: {reason}"),
        ),
        other => ApiError::not_found(
            "ImageNotFound",
            format!("Could not find Image {identifier} on Provider: the lookup failed: {other}"),
        ),
    }
}

/// How long a delete reply waits for the provider-side deletes before it answers; what
/// is not done by then goes on in the background (the jobs are stored).
const PROVIDER_DELETE_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// The outcome of removing one image from its provider.
pub(super) struct Outcome {
    identifier: String,
    status: &'static str,
    error: String,
}

/// Runs the provider-side deletes a record delete queued, and waits for them a while.
pub(super) async fn delete_on_providers(state: &Shared, removed: &Removed) -> Vec<Outcome> {
    let handles: Vec<_> = removed
        .deletions
        .iter()
        .map(|job| {
            let identifier = job
                .deletion
                .as_ref()
                .map(|d| d.target_identifier.clone())
                .unwrap_or_default();
            (identifier, state.jobs.start(job.clone()))
        })
        .collect();
    let deadline = tokio::time::Instant::now() + PROVIDER_DELETE_WAIT;
    let mut outcomes = Vec::with_capacity(handles.len());
    for (identifier, handle) in handles {
        let outcome = match tokio::time::timeout_at(deadline, handle).await {
            Ok(Ok(Ok(()))) => ("DELETED", String::new()),
            Ok(Ok(Err(reason))) => ("FAILED", reason),
            Ok(Err(_)) => ("FAILED", "the delete crashed inside the server".to_owned()),
            Err(_) => (
                "DELETING",
                "not finished yet; it goes on in the background".to_owned(),
            ),
        };
        outcomes.push(Outcome {
            identifier,
            status: outcome.0,
            error: outcome.1,
        });
    }
    outcomes
}

/// Writes the `<content>` of a delete reply: every provider image that existed, as
/// (provider, target_identifier), and for each one that had been pushed, what became of
/// it on the provider (`<status>` DELETED, FAILED or DELETING, and `<error>`). Never an
/// empty element, because Conductor's client needs text in it.
pub(super) fn write_content(doc: &mut Doc, removed: &Removed, outcomes: &[Outcome]) {
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

/// Stops the running jobs of deleted records, then removes the blobs that deleted
/// target images leave unreferenced.
pub(super) async fn remove_files(state: &Shared, removed: &Removed) {
    for ti in &removed.target_images {
        state.jobs.cancel(ti.id);
    }
    for pi in &removed.provider_images {
        state.jobs.cancel(pi.id);
    }
    if removed.target_images.iter().all(|ti| ti.disk.is_none()) {
        return;
    }
    let jobs = state.jobs.clone();
    match tokio::task::spawn_blocking(move || jobs.collect_blobs()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!("{e}"),
        Err(e) => tracing::warn!("{e}"),
    }
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
    remove_files(state, &removed).await;
    let outcomes = delete_on_providers(state, &removed).await;
    let id = id.to_string();
    let mut doc = Doc::new();
    doc.open(
        "image",
        &[("href", &format!("{base}/images/{id}")), ("id", &id)],
    )
    .text("status", "DELETED");
    write_content(&mut doc, &removed, &outcomes);
    doc.close("image");
    Ok(xml_ok(doc.finish()))
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

fn insufficient(message: &str) -> ApiError {
    ApiError::bad_request("InsufficientParametersSupplied", message)
}

fn invalid_template(problem: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(
        "ParameterDataIncorrect",
        format!("Invalid Image Template: {problem}"),
    )
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
            .ok_or_else(|| {
                ApiError::bad_request(
                    "ParameterDataIncorrect",
                    "each <parameter> needs a name attribute",
                )
            })?;
        if pairs.len() >= 64 {
            return Err(ApiError::bad_request(
                "ParameterDataIncorrect",
                "at most 64 parameters are accepted",
            ));
        }
        let value = p.text().trim().to_owned();
        if name.len() > 256 || value.chars().count() > super::MAX_VALUE {
            return Err(ApiError::bad_request(
                "ParameterDataIncorrect",
                format!(
                    "parameter names are at most 256 bytes and values at most {} characters",
                    super::MAX_VALUE
                ),
            ));
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
        build(&state, &headers, &user, &request).await
    } else if is_import {
        import(&state, &headers, &user, &request).await
    } else {
        Err(insufficient("Please specify a type, build or import"))
    }
}

/// The `<image><name>…</name></image>` descriptor inside `<image_descriptor>`, given as
/// an element or as escaped text; returns the name it gives.
fn descriptor_name(descriptor: &Element) -> Result<String, ApiError> {
    let bad = |why: &str| {
        ApiError::bad_request(
            "ParameterDataIncorrect",
            format!("Invalid image descriptor: {why}"),
        )
    };
    let parsed;
    let image = match descriptor.elements().next() {
        Some(element) => element,
        None => {
            let text = descriptor.text();
            if text.trim().is_empty() {
                return Err(bad("it is empty; send <image><name>NAME</name></image>"));
            }
            parsed = xml::parse(text.trim().as_bytes()).map_err(|e| bad(&e.0))?;
            &parsed
        }
    };
    if image.name != "image" {
        return Err(bad("its root must be <image>"));
    }
    Ok(image.child_text("name").unwrap_or_default())
}

/// `POST /api/images` with an import body: records an image that already exists on a
/// provider (§7.2.4), after the provider's plugin confirms it exists.
async fn import(
    state: &Shared,
    headers: &HeaderMap,
    user: &CurrentUser,
    request: &Element,
) -> ApiResult {
    let base = base(state, headers);
    let label = request
        .child_text("provider_account_name")
        .unwrap_or_default();
    let identifier = request.child_text("target_identifier").unwrap_or_default();
    let env_name = request
        .child_text("environment")
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| DEFAULT_ENVIRONMENT.to_owned());
    let descriptor = request
        .child("image_descriptor")
        .ok_or_else(|| insufficient("Please specify a type, build or import"))?;

    let (account, environment, providers, accounts) = {
        let (label, env_name, viewer) = (label.clone(), env_name.clone(), user.clone());
        blocking(state, move |store| {
            let environment = store.environment_by_name(&env_name)?;
            let accounts = store.accounts()?;
            // Labels are unique within an environment: the named environment's account
            // of that label, else any of that label (judged by what the user sees below).
            let account = accounts
                .iter()
                .filter(|a| a.label == label)
                .max_by_key(|a| {
                    let in_environment = environment
                        .as_ref()
                        .is_some_and(|e| a.environments.contains(&e.id));
                    let seen = viewer.sees_account(a);
                    (in_environment && seen, seen)
                })
                .cloned();
            Ok((account, environment, store.providers()?, accounts))
        })
        .await?
    };
    // Checks in Conductor's order, so the same request fails the same way. An account
    // or environment the user has no role in does not exist for them.
    let account = account.filter(|a| user.sees_account(a)).ok_or_else(|| {
        ApiError::not_found(
            "ProviderAccountNotFound",
            format!("Could not find Provider Account for name {label}"),
        )
    })?;
    let environment = environment.filter(|e| user.0.sees(e.id)).ok_or_else(|| {
        ApiError::bad_request(
            "ParameterDataIncorrect",
            format!("Environment {env_name} was not found."),
        )
    })?;
    user.require(environment.id, Action::ManageImages)?;
    if !account.environments.contains(&environment.id) {
        let valid: Vec<&str> = accounts
            .iter()
            .filter(|a| a.environments.contains(&environment.id))
            .map(|a| a.label.as_str())
            .collect();
        return Err(ApiError::bad_request(
            "ParameterDataIncorrect",
            format!(
                "Provider Account {label} is not in this Environment. Valid accounts include {}.",
                valid.join(", ")
            ),
        ));
    }
    if identifier.is_empty() {
        return Err(insufficient("No target identifier given"));
    }
    let name = descriptor_name(descriptor)?;
    if name.chars().count() > MAX_NAME {
        return Err(ApiError::bad_request(
            "ParameterDataIncorrect",
            format!("Invalid image descriptor: the name is longer than {MAX_NAME} characters"),
        ));
    }
    let provider = providers
        .into_iter()
        .find(|p| p.id == account.provider_id)
        .ok_or_else(|| ApiError::internal(format!("account {label} has no provider")))?;

    let jobs = state.jobs.clone();
    let found = {
        let (provider, account, identifier) =
            (provider.clone(), account.clone(), identifier.clone());
        tokio::task::spawn_blocking(move || jobs.lookup(&provider, &account, &identifier))
            .await
            .map_err(ApiError::internal)?
    };
    let details = found.map_err(|e| lookup_failed(&identifier, &label, e))?;
    // An image another environment pushed or imported stays theirs: importing it here
    // would let this environment delete it on the provider.
    let holders = {
        let (provider_id, names) = (
            provider.id,
            [identifier.clone(), details.target_identifier.clone()],
        );
        blocking(state, move |store| {
            let mut holders = store.environments_holding(provider_id, &names[0])?;
            holders.extend(store.environments_holding(provider_id, &names[1])?);
            Ok(holders)
        })
        .await?
    };
    if holders.iter().any(|env| *env != environment.id) {
        return Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "ParameterDataIncorrect",
            format!(
                "Image {identifier} on this Provider belongs to another environment and cannot be imported here"
            ),
        ));
    }

    let complete = || Progress {
        status: crate::model::Status::Complete,
        percent: 100,
        activity: "imported".into(),
        error: String::new(),
    };
    let image = Image {
        id: model::new_id(),
        environment_id: environment.id,
        name: if name.is_empty() {
            details.name.clone()
        } else {
            name
        },
        description: String::new(),
        os: String::new(),
        os_version: String::new(),
        arch: details.arch.clone(),
        template_id: model::new_id(),
        template: String::new(),
    };
    let build = Build {
        id: model::new_id(),
        image_id: image.id,
    };
    let ti = TargetImage {
        id: model::new_id(),
        build_id: build.id,
        target: provider.target.clone(),
        progress: complete(),
        parameters: Vec::new(),
        base_image: None,
        disk: None,
    };
    let pi = crate::model::ProviderImage {
        id: model::new_id(),
        target_image_id: ti.id,
        provider_id: provider.id,
        account_id: account.id,
        provider_name: provider.name.clone(),
        account_label: account.label.clone(),
        target_identifier: details.target_identifier.clone(),
        progress: complete(),
        parameters: Vec::new(),
    };
    {
        let (image, build, ti, pi) = (image.clone(), build.clone(), ti.clone(), pi.clone());
        blocking(state, move |store| {
            store.create_import(&image, &build, &ti, &pi)
        })
        .await?;
    }
    let (iid, bid, tid, pid) = (
        image.id.to_string(),
        build.id.to_string(),
        ti.id.to_string(),
        pi.id.to_string(),
    );
    let mut doc = Doc::new();
    doc.open(
        "image",
        &[("href", &format!("{base}/images/{iid}")), ("id", &iid)],
    )
    .open(
        "build",
        &[("href", &format!("{base}/builds/{bid}")), ("id", &bid)],
    )
    .open("target_images", &[])
    .open(
        "target_image",
        &[
            ("href", &format!("{base}/target_images/{tid}")),
            ("id", &tid),
        ],
    )
    .text("status", "COMPLETE")
    .text("target", &ti.target)
    .open("provider_images", &[])
    .open(
        "provider_image",
        &[
            ("href", &format!("{base}/provider_images/{pid}")),
            ("id", &pid),
        ],
    )
    .text("status", "COMPLETE")
    .close("provider_image")
    .close("provider_images")
    .close("target_image")
    .close("target_images")
    .close("build")
    .close("image");
    Ok(xml_ok(doc.finish()))
}

async fn build(
    state: &Shared,
    headers: &HeaderMap,
    user: &CurrentUser,
    request: &Element,
) -> ApiResult {
    let base = base(state, headers);
    // Order of checks as Conductor's, so the same request fails with the same error.
    let tdl = request
        .child("tdl")
        .ok_or_else(|| insufficient("Please specify a type, build or import"))?;
    let template_xml = template_text(tdl)?;
    // The parser has bounds of its own (size, depth, nodes), so a hostile template is
    // refused for what it is before the stricter caps below.
    let template = model::tdl::parse(&template_xml).map_err(invalid_template)?;
    // Every image keeps its template, and lists carry each name and description: caps
    // keep a tenant's images from filling the database and every list.
    if template_xml.len() > MAX_TEMPLATE {
        return Err(invalid_template(format!(
            "the template is longer than the {MAX_TEMPLATE} bytes this server accepts"
        )));
    }
    if template.name.chars().count() > MAX_NAME {
        return Err(invalid_template(format!(
            "name is longer than {MAX_NAME} characters"
        )));
    }
    if template.description.chars().count() > MAX_DESCRIPTION {
        return Err(invalid_template(format!(
            "description is longer than {MAX_DESCRIPTION} characters"
        )));
    }
    let env_name = request
        .child_text("environment")
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| DEFAULT_ENVIRONMENT.to_owned());
    let targets = split_list(&request.child_text("targets").unwrap_or_default());
    if targets.len() > crate::model::MAX_LIST {
        return Err(ApiError::bad_request(
            "ParameterDataIncorrect",
            format!(
                "At most {} targets may be built at once",
                crate::model::MAX_LIST
            ),
        ));
    }
    let parameters = parameters(request)?;

    let plugins = state.plugins.clone();
    let (environment, accounts, providers) = {
        let env_name = env_name.clone();
        blocking(state, move |store| {
            Ok((
                store.environment_by_name(&env_name)?,
                store.accounts()?,
                store.providers()?,
            ))
        })
        .await?
    };
    let environment = environment.filter(|e| user.0.sees(e.id)).ok_or_else(|| {
        ApiError::bad_request(
            "ParameterDataIncorrect",
            format!("Environment {env_name} was not found."),
        )
    })?;
    user.require(environment.id, Action::ManageImages)?;
    // Only now, for a user who may build here, is anything said about a URL or a path.
    let base_image = request
        .child_text("base_image")
        .filter(|u| !u.is_empty())
        .map(|url| -> ApiResult<BaseImage> {
            let source = crate::blobs::BaseSource {
                import_dir: state.import_dir.as_deref(),
                policy: &state.fetch,
            };
            crate::blobs::check_base_url(&url, &source)
                .map_err(|e| ApiError::bad_request("ParameterDataIncorrect", e))?;
            Ok(BaseImage { url, sha256: None })
        })
        .transpose()?;
    // With a base image the disk is the base image's size, held to the same limit when
    // it is fetched.
    let max = state.fetch.max_bytes;
    if base_image.is_none() && template.disk_size > max {
        return Err(invalid_template(format!(
            "disk/size is {} bytes, more than the {max} bytes this server allows for an image",
            template.disk_size
        )));
    }
    if targets.is_empty() {
        return Err(ApiError::bad_request(
            "ParameterDataIncorrect",
            "No targets given: name at least one target, such as <targets>mock</targets>",
        ));
    }
    // A target can be built in an environment when one of its accounts is a member.
    let buildable: Vec<String> = {
        let mut names: Vec<String> = accounts
            .iter()
            .filter(|a| a.environments.contains(&environment.id))
            .filter_map(|a| providers.iter().find(|p| p.id == a.provider_id))
            .map(|p| p.target.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    };
    let mut unknown = None;
    for target in &targets {
        if plugins.get(target).is_none() {
            unknown = Some(target.clone());
        } else if !buildable.contains(target) {
            return Err(ApiError::bad_request(
                "ParameterDataIncorrect",
                format!(
                    "Target {target} has no Provider Accounts in this Environment. Valid targets include {}.",
                    buildable.join(", ")
                ),
            ));
        }
    }
    if let Some(target) = unknown {
        return Err(ApiError::not_found(
            "TargetNotFound",
            format!("Could not find Target {target}"),
        ));
    }
    if base_image.is_none() {
        check_install(state.jobs.installer(), &plugins, &template, &targets)?;
    }

    let image = Image {
        id: model::new_id(),
        environment_id: environment.id,
        name: template.name.clone(),
        description: template.description.clone(),
        os: template.os_name.clone(),
        os_version: template.os_version.clone(),
        arch: template.arch.clone(),
        template_id: model::new_id(),
        template: template_xml,
    };
    let build = Build {
        id: model::new_id(),
        image_id: image.id,
    };
    let target_images: Vec<TargetImage> = targets
        .iter()
        .map(|target| TargetImage {
            id: model::new_id(),
            build_id: build.id,
            target: target.clone(),
            progress: Progress::new(),
            parameters: parameters.clone(),
            base_image: base_image.clone(),
            disk: None,
        })
        .collect();
    let jobs: Vec<Job> = target_images
        .iter()
        .map(|ti| Job {
            id: ti.id,
            kind: JobKind::Build,
            attempts: 0,
            deletion: None,
        })
        .collect();
    {
        let (image, build, target_images, jobs) = (
            image.clone(),
            build.clone(),
            target_images.clone(),
            jobs.clone(),
        );
        blocking(state, move |store| {
            store.create_build(Some(&image), &build, &target_images, &jobs)
        })
        .await?;
    }
    // NEW is announced before the jobs start, so listeners see it first.
    for ti in &target_images {
        state
            .jobs
            .announce(crate::jobs::Change::TargetImage(Box::new(ti.clone())));
    }
    for job in jobs {
        state.jobs.start(job);
    }

    let iid = image.id.to_string();
    let bid = build.id.to_string();
    let mut doc = Doc::new();
    doc.open(
        "image",
        &[("href", &format!("{base}/images/{iid}")), ("id", &iid)],
    )
    .open(
        "build",
        &[("href", &format!("{base}/builds/{bid}")), ("id", &bid)],
    )
    .open("target_images", &[]);
    for ti in &target_images {
        let tid = ti.id.to_string();
        doc.open(
            "target_image",
            &[
                ("href", &format!("{base}/target_images/{tid}")),
                ("id", &tid),
            ],
        )
        .text("status", ti.progress.status.as_str())
        .text("target", &ti.target)
        .open("provider_images", &[])
        .close("provider_images")
        .close("target_image");
    }
    doc.close("target_images").close("build").close("image");
    Ok(xml_ok(doc.finish()))
}

/// What a build without a base image installs, checked now and refused with the reason
/// rather than failed later: an OS this server installs must come from a mirror the
/// operator allows, with the packages each target needs, in a disk each target can
/// boot; and a cloud boots what it is given, so a cloud target of an OS this server
/// cannot install is refused (the mock target builds a blank disk for any OS).
fn check_install(
    installer: &crate::os::Installer,
    plugins: &crate::plugins::Plugins,
    template: &model::tdl::Template,
    targets: &[String],
) -> ApiResult<()> {
    let refuse = |reason: String| ApiError::bad_request("ParameterDataIncorrect", reason);
    let plan = installer
        .plan(template, &plugins.needed_packages(targets))
        .map_err(refuse)?;
    for target in targets {
        let Some(plugin) = plugins.get(target) else {
            continue;
        };
        let needs = &plugin.info.needs.firmware;
        match &plan {
            None if plugin.info.reaches_a_cloud() => {
                return Err(refuse(format!(
                    "Target {target} boots the image it is given, and this server cannot \
                     install {} {} {}: it installs {}. Name one of those in <os>, or give a \
                     <base_image> to build from.",
                    template.os_name,
                    template.os_version,
                    template.arch,
                    installer.installable()
                )));
            }
            Some(plan)
                if !needs.is_empty() && !needs.iter().any(|f| plan.firmware().contains(f)) =>
            {
                let names = |list: &[model::Firmware]| {
                    list.iter()
                        .map(|f| f.as_str())
                        .collect::<Vec<_>>()
                        .join(" or ")
                };
                return Err(refuse(format!(
                    "Target {target} boots with {}, and {} boots with {}",
                    names(needs),
                    plan.title,
                    names(&plan.firmware())
                )));
            }
            _ => {}
        }
    }
    Ok(())
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
        assert!(result.is_err_and(|e| e.message.contains("exactly one")));
    }
}
