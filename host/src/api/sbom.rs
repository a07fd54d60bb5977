//! What is in a target image and whether it booted: `GET /api/target_images/:id/sbom`
//! (the package manifest as an SPDX 2.3 JSON document) and `…/console` (the serial
//! console of its boot check).

use super::target_images::find;
use super::{ApiError, ApiResult, CurrentUser, Shared, base, blocking};
use crate::model::{Image, TargetImage};
use crate::os::manifest::{Manifest, Package};
use axum::Extension;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, header};
use axum::response::IntoResponse;
use serde_json::{Value, json};

/// `GET /api/target_images/:id/sbom`: the packages of an image whose OS this server
/// installed, as SPDX 2.3 JSON. 404 `NotRecorded` for other images.
pub async fn sbom(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(raw): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let ti = find(&state, &user, &raw).await?;
    let not_recorded = || ApiError::NotRecorded {
        id: raw.clone(),
        what: "package manifest",
        why: "only an image whose OS this server installed has one",
    };
    let path = state.jobs.paths().manifest(ti.id);
    let bytes = read_kept(path.clone()).await?.ok_or_else(not_recorded)?;
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::internal(format!("{}: {e}", path.display())))?;
    if manifest.version != Manifest::VERSION {
        return Err(ApiError::internal(format!(
            "the manifest of {} is of version {}, which this server does not read",
            ti.id, manifest.version
        )));
    }
    let build_id = ti.build_id;
    let image = blocking(&state, move |store| {
        Ok(match store.build(build_id)? {
            Some(build) => store.image(build.image_id)?,
            None => None,
        })
    })
    .await?
    .ok_or_else(not_recorded)?;
    let namespace = format!("{}/target_images/{}/sbom", base(&state, &headers), ti.id);
    let document = spdx(&manifest, &ti, &image, &namespace);
    Ok((
        [(header::CONTENT_TYPE, "application/spdx+json")],
        document.to_string(),
    )
        .into_response())
}

/// `GET /api/target_images/:id/console`: what the boot check's machine printed on its
/// serial console, as plain text. 404 `NotRecorded` for an image never checked.
pub async fn console(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(raw): Path<String>,
) -> ApiResult {
    let ti = find(&state, &user, &raw).await?;
    let text = read_kept(state.jobs.paths().console(ti.id))
        .await?
        .ok_or_else(|| ApiError::NotRecorded {
            id: raw.clone(),
            what: "boot console",
            why: "only a build with verify=boot has one",
        })?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

/// A file kept beside a build log, or `None` when the build made none.
async fn read_kept(path: std::path::PathBuf) -> ApiResult<Option<Vec<u8>>> {
    tokio::task::spawn_blocking(move || match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ApiError::internal(format!("{}: {e}", path.display()))),
    })
    .await
    .map_err(ApiError::internal)?
}

/// The SPDX 2.3 document of a manifest: the image as the package the document
/// describes, containing one package per installed package, each with its `purl`. The
/// creation info names the template, the mirror and the time the build finished.
pub fn spdx(manifest: &Manifest, ti: &TargetImage, image: &Image, namespace: &str) -> Value {
    let packages: Vec<Value> = std::iter::once(json!({
        "SPDXID": "SPDXRef-Image",
        "name": image.name,
        "versionInfo": manifest.os,
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "primaryPackagePurpose": "OPERATING-SYSTEM",
        "comment": format!("the {} target image {} of image {}", ti.target, ti.id, image.id),
    }))
    .chain(
        manifest
            .packages
            .iter()
            .enumerate()
            .map(|(i, p)| package(i, p)),
    )
    .collect();
    let relationships: Vec<Value> = std::iter::once(json!({
        "spdxElementId": "SPDXRef-DOCUMENT",
        "relationshipType": "DESCRIBES",
        "relatedSpdxElement": "SPDXRef-Image",
    }))
    .chain((0..manifest.packages.len()).map(|i| {
        json!({
            "spdxElementId": "SPDXRef-Image",
            "relationshipType": "CONTAINS",
            "relatedSpdxElement": format!("SPDXRef-Package-{i}"),
        })
    }))
    .collect();
    json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": format!("{} ({} target image {})", image.name, ti.target, ti.id),
        "documentNamespace": namespace,
        "creationInfo": {
            "created": manifest.created,
            "creators": [format!("Tool: conductor-{}", env!("CARGO_PKG_VERSION"))],
            "comment": format!(
                "{} installed from {} for the template '{}' (image {}, build {}). The template:\n{}",
                manifest.os, manifest.mirror, image.name, image.id, ti.build_id, image.template
            ),
        },
        "packages": packages,
        "relationships": relationships,
    })
}

fn package(index: usize, p: &Package) -> Value {
    let purl = format!(
        "pkg:deb/debian/{}@{}?arch={}",
        purl_part(&p.name),
        purl_part(&p.version),
        purl_part(&p.architecture)
    );
    json!({
        "SPDXID": format!("SPDXRef-Package-{index}"),
        "name": p.name,
        "versionInfo": p.version,
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "sourceInfo": format!("built from the Debian source package {} {}", p.source, p.source_version),
        "externalRefs": [{
            "referenceCategory": "PACKAGE-MANAGER",
            "referenceType": "purl",
            "referenceLocator": purl,
        }],
    })
}

/// A part of a package URL, percent-encoded where the purl specification asks (an
/// epoch's `:` and a version's `+` among them).
fn purl_part(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b".-_~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_encoded_in_package_urls() {
        assert_eq!(purl_part("1:2.36-9+deb12u4"), "1%3A2.36-9%2Bdeb12u4");
        assert_eq!(purl_part("3.0.11-1~deb12u2"), "3.0.11-1~deb12u2");
    }
}
