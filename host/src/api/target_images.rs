//! `/api/target_images` and `/api/builds/:build_id/target_images`
//! (reference/conductor-api.md §7.4). Unlike Conductor, target images are listed and
//! shown while they build, with their live status and progress.

use super::Kind;
use super::images::deleted_reply;
use super::xml::Doc;
use super::{
    ApiError, ApiResult, CurrentUser, Shared, base, blocking, parse_id, write_progress, xml_ok,
};
use crate::blobs;
use crate::model::Action;
use crate::model::{Id, ProviderImage, TargetImage};
use crate::store::{Reader, StoreError};
use axum::Extension;
use axum::extract::{Path, State};
use axum::http::HeaderMap;

/// A target image with what its element shows: the template id and its provider images.
struct Row {
    ti: TargetImage,
    template: String,
    provider_images: Vec<ProviderImage>,
    /// The environment of the image it belongs to.
    env: Option<u64>,
}

fn row(store: &Reader, ti: TargetImage) -> Result<Row, StoreError> {
    let image = match store.build(ti.build_id)? {
        Some(build) => store.image(build.image_id)?,
        None => None,
    };
    let provider_images = store.provider_images(Some(ti.id))?;
    Ok(Row {
        ti,
        template: image
            .as_ref()
            .map(|i| i.template_id.to_string())
            .unwrap_or_default(),
        provider_images,
        env: image.map(|i| i.environment_id),
    })
}

fn write_target_image(doc: &mut Doc, base: &str, row: &Row) {
    let ti = &row.ti;
    let id = ti.id.to_string();
    let build = ti.build_id.to_string();
    doc.open(
        "target_image",
        &[("href", &format!("{base}/target_images/{id}")), ("id", &id)],
    )
    .text("object_type", "target_image")
    .text("template", &row.template)
    .empty(
        "build",
        &[("href", &format!("{base}/builds/{build}")), ("id", &build)],
    )
    .text("status", ti.progress.status.as_str());
    write_progress(doc, &ti.progress);
    doc.text("target", &ti.target);
    if let Some(base) = &ti.base_image {
        let digest = base.digest.as_deref().map(blobs::digest::shown);
        let mut attributes = Vec::new();
        if let Some((digest, sha256)) = &digest {
            attributes.push(("digest", digest.as_str()));
            attributes.extend(sha256.map(|s| ("sha256", s)));
        }
        doc.text_with("base_image", &attributes, &base.url);
    }
    if let Some(disk) = &ti.disk {
        let href = format!("{base}/target_images/{}/data", ti.id);
        let (digest, sha256) = blobs::digest::shown(&disk.blob);
        let mut attributes = vec![("href", href.as_str()), ("digest", digest.as_str())];
        // Bodies stored before the sparse digest go on showing their SHA-256.
        attributes.extend(sha256.map(|s| ("sha256", s)));
        doc.empty("data", &attributes)
            .text("format", disk.format.as_str())
            .text("size", &disk.size.to_string())
            .text("virtual_size", &disk.virtual_size.to_string());
        if let Some(count) = disk.packages {
            doc.empty(
                "sbom",
                &[
                    ("href", &format!("{base}/target_images/{}/sbom", ti.id)),
                    ("packages", &count.to_string()),
                ],
            );
        }
        if let Some(check) = &disk.check {
            doc.text_with(
                "boot_check",
                &[
                    ("href", &format!("{base}/target_images/{}/console", ti.id)),
                    ("result", check.result.as_str()),
                    ("firmware", check.firmware.as_str()),
                    ("seconds", &check.seconds.to_string()),
                ],
                &check.detail,
            );
        }
    }
    doc.open("provider_images", &[]);
    for pi in &row.provider_images {
        let pid = pi.id.to_string();
        doc.empty(
            "provider_image",
            &[
                ("href", &format!("{base}/provider_images/{pid}")),
                ("id", &pid),
            ],
        );
    }
    doc.close("provider_images").close("target_image");
}

fn render_list(base: &str, rows: &[Row]) -> ApiResult {
    let mut doc = Doc::new();
    doc.open("target_images", &[]);
    for row in rows {
        write_target_image(&mut doc, base, row);
    }
    doc.close("target_images");
    Ok(xml_ok(doc.finish()))
}

pub async fn list(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
    headers: HeaderMap,
) -> ApiResult {
    let page = super::page::Page::parse(query.as_deref())?;
    let mut rows = blocking(&state, |store| {
        let reader = store.reader()?;
        reader
            .target_images(None)?
            .into_iter()
            .map(|ti| row(&reader, ti))
            .collect::<Result<Vec<Row>, StoreError>>()
    })
    .await?;
    rows.retain(|r| user.sees(r.env));
    let total = rows.len();
    let response = render_list(&base(&state, &headers), &rows[page.range(total)])?;
    Ok(super::page::with_total(response, total))
}

pub async fn list_of_build(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(build): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let missing = || ApiError::ParentNotFound(Kind::Build, build.to_string());
    let id = parse_id(&build).ok_or_else(missing)?;
    let rows = blocking(&state, move |store| {
        let reader = store.reader()?;
        if !user.sees(reader.build_environment(id)?) {
            return Ok(None);
        }
        let rows: Result<Vec<Row>, StoreError> = reader
            .target_images(Some(id))?
            .into_iter()
            .map(|ti| row(&reader, ti))
            .collect();
        rows.map(Some)
    })
    .await?
    .ok_or_else(missing)?;
    render_list(&base(&state, &headers), &rows)
}

async fn show_one(
    state: &Shared,
    headers: &HeaderMap,
    user: &CurrentUser,
    raw: &str,
    parent: Option<Id>,
) -> ApiResult {
    let missing = || ApiError::StatusNotFound(Kind::TargetImage, raw.to_string());
    let id = parse_id(raw).ok_or_else(missing)?;
    let found = blocking(state, move |store| {
        let reader = store.reader()?;
        match reader.target_image(id)? {
            Some(ti) if parent.is_none_or(|p| p == ti.build_id) => row(&reader, ti).map(Some),
            _ => Ok(None),
        }
    })
    .await?
    .filter(|r| user.sees(r.env))
    .ok_or_else(missing)?;
    let mut doc = Doc::new();
    write_target_image(&mut doc, &base(state, headers), &found);
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

pub async fn show_of_build(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path((build, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    // A parent that is not an id matches no target image.
    let parent = parse_id(&build).unwrap_or(Id::nil());
    show_one(&state, &headers, &user, &id, Some(parent)).await
}

/// The environment of a target image that exists for this user (under `parent` when
/// one is given); `None` when it does not.
async fn visible(
    state: &Shared,
    user: &CurrentUser,
    id: Id,
    parent: Option<Id>,
) -> ApiResult<Option<u64>> {
    let found = blocking(state, move |store| match store.target_image(id)? {
        Some(ti) if parent.is_none_or(|p| p == ti.build_id) => store.build_environment(ti.build_id),
        _ => Ok(None),
    })
    .await?;
    Ok(found.filter(|env| user.sees(Some(*env))))
}

fn ti_not_found(id: &str) -> ApiError {
    ApiError::NotFound(Kind::TargetImage, id.to_string())
}

async fn delete_one(
    state: &Shared,
    headers: &HeaderMap,
    user: &CurrentUser,
    raw: &str,
    parent: Option<Id>,
) -> ApiResult {
    let id = parse_id(raw).ok_or_else(|| ti_not_found(raw))?;
    let env = visible(state, user, id, parent)
        .await?
        .ok_or_else(|| ti_not_found(raw))?;
    user.require(env, Action::ManageImages)?;
    let removed = blocking(state, move |store| store.delete_target_image(id))
        .await?
        .ok_or_else(|| ti_not_found(raw))?;
    deleted_reply(state, &base(state, headers), "target_image", id, &removed).await
}

pub async fn delete(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    delete_one(&state, &headers, &user, &id, None).await
}

pub async fn delete_of_build(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path((build, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    let parent = parse_id(&build).unwrap_or(Id::nil());
    delete_one(&state, &headers, &user, &id, Some(parent)).await
}

/// A `Range: bytes=…` header resolved against a body of `size` bytes: one range only,
/// as `start-end`, `start-` or `-suffix`. `Err(())` when it cannot be satisfied.
fn byte_range(header: &str, size: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = header.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        // Several ranges would need a multipart reply; the whole body is sent instead.
        return None;
    }
    let (start, end) = spec.split_once('-')?;
    let range = match (start.trim(), end.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().ok()?;
            if n == 0 || size == 0 {
                return Some(Err(()));
            }
            (size.saturating_sub(n), size - 1)
        }
        (start, "") => (start.parse().ok()?, size.saturating_sub(1)),
        (start, end) => {
            let (s, e): (u64, u64) = (start.parse().ok()?, end.parse().ok()?);
            if e < s {
                return None;
            }
            (s, e.min(size.saturating_sub(1)))
        }
    };
    if range.0 >= size {
        return Some(Err(()));
    }
    Some(Ok(range))
}

/// The target image `raw` names, when the user may see it; 404 otherwise.
pub(super) async fn find(state: &Shared, user: &CurrentUser, raw: &str) -> ApiResult<TargetImage> {
    let missing = || ti_not_found(raw);
    let id = parse_id(raw).ok_or_else(missing)?;
    visible(state, user, id, None).await?.ok_or_else(missing)?;
    blocking(state, move |store| store.target_image(id))
        .await?
        .ok_or_else(missing)
}

/// The most of a build log one answer carries; a client reads on with `?offset=`.
const LOG_CHUNK: u64 = 4 << 20;

#[derive(serde::Deserialize)]
pub struct LogQuery {
    offset: Option<u64>,
}

/// `GET /api/target_images/:id/log[?offset=N]`: the build log as plain text, from byte
/// `offset` on (at most 4 MiB per answer). `X-Log-Offset` says where the next read
/// starts and `X-Log-Complete: true` that the build has ended, so a client follows a
/// running build by asking again from there.
pub async fn log(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(raw): Path<String>,
    axum::extract::Query(query): axum::extract::Query<LogQuery>,
) -> ApiResult {
    use axum::http::header;
    use axum::response::IntoResponse;
    use std::io::{Read, Seek};

    let ti = find(&state, &user, &raw).await?;
    let id = ti.id;
    let path = state.jobs.paths().log(id);
    let offset = query.offset.unwrap_or(0);
    let bytes = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
        let mut file = match std::fs::File::open(&path) {
            Ok(file) => file,
            // Not started yet, or built before logs were kept.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        file.seek(std::io::SeekFrom::Start(offset))?;
        let mut bytes = Vec::new();
        file.take(LOG_CHUNK).read_to_end(&mut bytes)?;
        Ok(bytes)
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?;
    let next = offset + bytes.len() as u64;
    let complete = ti.progress.status.is_terminal();
    Ok((
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8".to_owned()),
            (
                header::HeaderName::from_static("x-log-offset"),
                next.to_string(),
            ),
            (
                header::HeaderName::from_static("x-log-complete"),
                complete.to_string(),
            ),
        ],
        bytes,
    )
        .into_response())
}

/// `GET /api/target_images/:id/data`: the built image, with `Range` support so large
/// downloads can resume. 404 until the build is complete.
pub async fn data(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(raw): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    use axum::body::Body;
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    use tokio::io::{AsyncReadExt, AsyncSeekExt};

    let ti = find(&state, &user, &raw).await?;
    let disk = ti
        .disk
        .ok_or_else(|| ApiError::NotBuilt(raw.to_string(), ti.progress.status))?;
    let path = state.jobs.blobs().path(&disk.blob);
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::internal(format!("{}: {e}", path.display())))?;
    let size = disk.size;
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| byte_range(v, size));
    let (status, start, length) = match range {
        None => (StatusCode::OK, 0, size),
        Some(Ok((start, end))) => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        Some(Err(())) => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{size}"))],
            )
                .into_response());
        }
    };
    file.seek(std::io::SeekFrom::Start(start))
        .await
        .map_err(ApiError::internal)?;
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
        file.take(length),
        1 << 20,
    ));
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, length.into());
    headers.insert(
        header::ACCEPT_RANGES,
        header::HeaderValue::from_static("bytes"),
    );
    if let Ok(etag) = header::HeaderValue::from_str(&format!("\"{}\"", disk.blob)) {
        headers.insert(header::ETAG, etag);
    }
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(value) =
            header::HeaderValue::from_str(&format!("bytes {start}-{}/{size}", start + length - 1))
    {
        headers.insert(header::CONTENT_RANGE, value);
    }
    Ok(response)
}

/// `POST /api/target_images/:id/cancel`: stops the build (its plugin call is interrupted
/// within a tick) and marks the target image CANCELLED. A finished one cannot be.
pub async fn cancel(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(raw): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let id = parse_id(&raw).ok_or_else(|| ti_not_found(&raw))?;
    let env = visible(&state, &user, id, None)
        .await?
        .ok_or_else(|| ti_not_found(&raw))?;
    user.require(env, Action::ManageImages)?;
    let outcome = blocking(&state, move |store| {
        let mut refused = None;
        let updated = store.update_target_image(id, |ti| refused = ti.progress.cancel().err())?;
        Ok((updated, refused))
    })
    .await?;
    match outcome {
        (None, _) => Err(ti_not_found(&raw)),
        (Some(_), Some(status)) => Err(ApiError::NotCancellable(
            Kind::TargetImage,
            raw.to_string(),
            status,
        )),
        (Some(ti), None) => {
            state.jobs.cancel(id);
            state
                .jobs
                .announce(crate::jobs::Change::TargetImage(Box::new(ti)));
            show_one(&state, &headers, &user, &raw, None).await
        }
    }
}

/// The document of a target image as it was when it changed, for webhooks.
pub(super) async fn document(state: &Shared, base: &str, ti: TargetImage) -> Option<String> {
    let found = blocking(state, move |store| row(&store.reader()?, ti))
        .await
        .ok()?;
    let mut doc = Doc::new();
    write_target_image(&mut doc, base, &found);
    Some(doc.finish())
}

#[cfg(test)]
mod tests {
    use super::byte_range;

    #[test]
    fn ranges_resolve_like_rfc_9110_says() {
        assert_eq!(byte_range("bytes=0-9", 100), Some(Ok((0, 9))));
        assert_eq!(byte_range("bytes=90-", 100), Some(Ok((90, 99))));
        assert_eq!(byte_range("bytes=-10", 100), Some(Ok((90, 99))));
        assert_eq!(byte_range("bytes=50-500", 100), Some(Ok((50, 99))));
        assert_eq!(byte_range("bytes=100-", 100), Some(Err(())));
        assert_eq!(byte_range("bytes=0-1,5-6", 100), None);
        assert_eq!(byte_range("items=0-1", 100), None);
        assert_eq!(byte_range("bytes=9-1", 100), None);
    }
}
