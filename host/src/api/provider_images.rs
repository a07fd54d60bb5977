//! `/api/provider_images` and `/api/target_images/:ti/provider_images`: list, show,
//! push (create) and delete (reference/conductor-api.md §7.5).

use super::Kind;
use super::images::{deleted_reply, insufficient, parameters};
use super::xml::{self, Doc};
use super::{
    ApiError, ApiResult, CurrentUser, Shared, base, blocking, parse_id, submit, write_progress,
    xml_ok,
};
use crate::jobs::plan_push;
use crate::model::Action;
use crate::model::{self, Id, Progress, ProviderImage, TargetImage, split_list};
use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;

fn write_provider_image(doc: &mut Doc, base: &str, pi: &ProviderImage) {
    let id = pi.id.to_string();
    let ti = pi.target_image_id.to_string();
    doc.open(
        "provider_image",
        &[
            ("href", &format!("{base}/provider_images/{id}")),
            ("id", &id),
        ],
    )
    .text("object_type", "provider_image")
    .text("target_identifier", &pi.target_identifier)
    .text("status", pi.progress.status.as_str());
    write_progress(doc, &pi.progress);
    doc.text("provider", &pi.provider_name)
        .text("account", &pi.account_label)
        .empty(
            "target_image",
            &[("href", &format!("{base}/target_images/{ti}")), ("id", &ti)],
        )
        .close("provider_image");
}

fn render_list(base: &str, rows: &[ProviderImage]) -> ApiResult {
    let mut doc = Doc::new();
    doc.open("provider_images", &[]);
    for pi in rows {
        write_provider_image(&mut doc, base, pi);
    }
    doc.close("provider_images");
    Ok(xml_ok(doc.finish()))
}

pub async fn list(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
    headers: HeaderMap,
) -> ApiResult {
    let page = super::page::Page::parse(query.as_deref())?;
    let rows = blocking(&state, move |store| {
        let reader = store.reader()?;
        let mut rows = Vec::new();
        for pi in reader.provider_images(None)? {
            if user.sees(reader.target_image_environment(pi.target_image_id)?) {
                rows.push(pi);
            }
        }
        Ok(rows)
    })
    .await?;
    let total = rows.len();
    let response = render_list(&base(&state, &headers), &rows[page.range(total)])?;
    Ok(super::page::with_total(response, total))
}

pub async fn list_of_target_image(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(ti): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let missing = || ApiError::ParentNotFound(Kind::TargetImage, ti.to_string());
    let id = parse_id(&ti).ok_or_else(missing)?;
    let rows = blocking(&state, move |store| {
        Ok(if user.sees(store.target_image_environment(id)?) {
            Some(store.provider_images(Some(id))?)
        } else {
            None
        })
    })
    .await?
    .ok_or_else(missing)?;
    render_list(&base(&state, &headers), &rows)
}

/// The environment of a provider image that exists for this user (under `parent` when
/// one is given); `None` when it does not.
async fn visible(
    state: &Shared,
    user: &CurrentUser,
    id: Id,
    parent: Option<Id>,
) -> ApiResult<Option<u64>> {
    let found = blocking(state, move |store| match store.provider_image(id)? {
        Some(pi) if parent.is_none_or(|p| p == pi.target_image_id) => {
            store.target_image_environment(pi.target_image_id)
        }
        _ => Ok(None),
    })
    .await?;
    Ok(found.filter(|env| user.sees(Some(*env))))
}

async fn show_one(
    state: &Shared,
    headers: &HeaderMap,
    user: &CurrentUser,
    raw: &str,
    parent: Option<Id>,
) -> ApiResult {
    let missing = || ApiError::StatusNotFound(Kind::ProviderImage, raw.to_string());
    let id = parse_id(raw).ok_or_else(missing)?;
    visible(state, user, id, parent)
        .await?
        .ok_or_else(missing)?;
    let pi = blocking(state, move |store| store.provider_image(id))
        .await?
        .filter(|pi| parent.is_none_or(|p| p == pi.target_image_id))
        .ok_or_else(missing)?;
    let mut doc = Doc::new();
    write_provider_image(&mut doc, &base(state, headers), &pi);
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

pub async fn show_of_target_image(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path((ti, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    let parent = parse_id(&ti).unwrap_or(Id::nil());
    show_one(&state, &headers, &user, &id, Some(parent)).await
}

async fn delete_one(
    state: &Shared,
    headers: &HeaderMap,
    user: &CurrentUser,
    raw: &str,
    parent: Option<Id>,
) -> ApiResult {
    let missing = || ApiError::NotFound(Kind::ProviderImage, raw.to_string());
    let id = parse_id(raw).ok_or_else(missing)?;
    let env = visible(state, user, id, parent)
        .await?
        .ok_or_else(missing)?;
    user.require(env, Action::ManageImages)?;
    let removed = blocking(state, move |store| store.delete_provider_image(id))
        .await?
        .ok_or_else(missing)?;
    deleted_reply(state, &base(state, headers), "provider_image", id, &removed).await
}

pub async fn delete(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    delete_one(&state, &headers, &user, &id, None).await
}

pub async fn delete_of_target_image(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path((ti, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    let parent = parse_id(&ti).unwrap_or(Id::nil());
    delete_one(&state, &headers, &user, &id, Some(parent)).await
}

/// What the push request names, resolved against the store.
#[derive(Debug, Clone, Copy)]
enum Selection {
    Image(Id),
    Build(Id),
    TargetImage(Id),
}

/// `POST /api/provider_images`: push target images to a comma-separated list of
/// accounts (§7.5.3). Every account is checked before any push is started, and with an
/// image or build the newest build's target image per target is used (§12 #11, #12).
pub async fn create(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let base = base(&state, &headers);
    let request = xml::parse(&body).map_err(|_| insufficient("No Provider Account given"))?;
    if request.name != "provider_image" {
        return Err(insufficient("No Provider Account given"));
    }
    let accounts_text = request
        .child_text("provider_account")
        .ok_or_else(|| insufficient("No Provider Account given"))?;
    let parameters = parameters(&request)?;
    let field = |name: &str| request.child_text(name).filter(|v| !v.is_empty());
    let not_found = |kind: Kind, raw: &str| ApiError::NotFound(kind, raw.to_string());
    // The first of image_id, build_id, target_image_id given decides, as in Conductor.
    let (selection, missing) = if let Some(raw) = field("image_id") {
        let missing = not_found(Kind::Image, &raw);
        (parse_id(&raw).map(Selection::Image), missing)
    } else if let Some(raw) = field("build_id") {
        let missing = not_found(Kind::Build, &raw);
        (parse_id(&raw).map(Selection::Build), missing)
    } else if let Some(raw) = field("target_image_id") {
        let missing = not_found(Kind::TargetImage, &raw);
        (parse_id(&raw).map(Selection::TargetImage), missing)
    } else {
        return Err(insufficient(
            "Invalid Parameters: No Image, Build or TargetImage provided in request",
        ));
    };
    let Some(selection) = selection else {
        return Err(missing);
    };
    let labels = split_list(&accounts_text);
    if labels.len() > crate::model::MAX_LIST {
        return Err(ApiError::Incorrect(format!(
            "At most {} accounts may be pushed to at once",
            crate::model::MAX_LIST
        )));
    }

    let resolved = blocking(&state, move |store| {
        let target_images: Option<Vec<TargetImage>> = match selection {
            Selection::Image(id) => match store.image(id)? {
                None => None,
                Some(_) => {
                    let mut all = Vec::new();
                    // Newest build first, so each account gets the latest image.
                    for build in store.builds(Some(id))?.into_iter().rev() {
                        all.extend(store.target_images(Some(build.id))?);
                    }
                    Some(all)
                }
            },
            Selection::Build(id) => match store.build(id)? {
                None => None,
                Some(_) => Some(store.target_images(Some(id))?),
            },
            Selection::TargetImage(id) => store.target_image(id)?.map(|ti| vec![ti]),
        };
        let environment = match target_images.as_ref().and_then(|t| t.first()) {
            Some(ti) => match store.build(ti.build_id)? {
                Some(build) => store.image(build.image_id)?.map(|i| i.environment_id),
                None => None,
            },
            None => None,
        };
        let selection_env = match selection {
            Selection::Image(id) => store.image_environment(id)?,
            Selection::Build(id) => store.build_environment(id)?,
            Selection::TargetImage(id) => store.target_image_environment(id)?,
        };
        Ok((
            target_images,
            environment,
            selection_env,
            store.accounts()?,
            store.providers()?,
        ))
    })
    .await?;
    let (target_images, environment, selection_env, accounts, providers) = resolved;
    // What the user cannot see does not exist for them.
    let target_images = target_images
        .filter(|_| user.sees(selection_env))
        .ok_or(missing)?;
    if target_images.is_empty() {
        return Err(insufficient("Could not find any matching Target Images"));
    }
    let environment =
        environment.ok_or_else(|| ApiError::internal("a target image without an image"))?;
    user.require(environment, Action::ManageImages)?;

    // Every account is checked before anything is pushed.
    let plan = plan_push(
        &labels,
        environment,
        &accounts,
        &providers,
        &target_images,
        |a| user.sees_account(a),
    )?;
    crate::jobs::refuse_failed_checks(&plan, &parameters)?;
    let provider_images: Vec<ProviderImage> = plan
        .iter()
        .map(|(account, provider, ti)| ProviderImage {
            id: model::new_id(),
            target_image_id: ti.id,
            provider_id: provider.id,
            account_id: account.id,
            provider_name: provider.name.clone(),
            account_label: account.label.clone(),
            target_identifier: String::new(),
            progress: Progress::new(),
            parameters: parameters.clone(),
        })
        .collect();
    {
        let pis = provider_images.clone();
        submit(&state, move |jobs| jobs.submit_push(environment, &pis)).await?;
    }

    let mut doc = Doc::new();
    doc.open("provider_images", &[]);
    for pi in &provider_images {
        let id = pi.id.to_string();
        doc.open(
            "provider_image",
            &[
                ("href", &format!("{base}/provider_images/{id}")),
                ("id", &id),
            ],
        )
        .text("status", pi.progress.status.as_str())
        .text("provider", &pi.provider_name)
        .text("account", &pi.account_label)
        .close("provider_image");
    }
    doc.close("provider_images");
    Ok(xml_ok(doc.finish()))
}

/// `POST /api/provider_images/:id/cancel`: stops the push and marks it CANCELLED.
pub async fn cancel(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(raw): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let missing = || ApiError::NotFound(Kind::ProviderImage, raw.to_string());
    let id = parse_id(&raw).ok_or_else(missing)?;
    let env = visible(&state, &user, id, None)
        .await?
        .ok_or_else(missing)?;
    user.require(env, Action::ManageImages)?;
    let outcome = blocking(&state, move |store| {
        let mut refused = None;
        let updated = store.update_provider_image(id, |pi| refused = pi.progress.cancel().err())?;
        Ok((updated, refused))
    })
    .await?;
    match outcome {
        (None, _) => Err(missing()),
        (Some(_), Some(status)) => Err(ApiError::NotCancellable(
            Kind::ProviderImage,
            raw.to_string(),
            status,
        )),
        (Some(pi), None) => {
            state.jobs.cancel(id);
            state
                .jobs
                .announce(crate::jobs::Change::ProviderImage(Box::new(pi)));
            show_one(&state, &headers, &user, &raw, None).await
        }
    }
}

/// The document of a provider image as it was when it changed, for webhooks.
pub(super) async fn document(_state: &Shared, base: &str, pi: ProviderImage) -> Option<String> {
    let mut doc = Doc::new();
    write_provider_image(&mut doc, base, &pi);
    Some(doc.finish())
}
