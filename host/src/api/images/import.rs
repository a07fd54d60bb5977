//! `POST /api/images` with a `<target_identifier>`: an image already on a provider,
//! found through its plugin's `lookup` and recorded as an image, a build, a target image
//! and a provider image (reference/conductor-api.md §7.2).

use super::*;

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
        PluginError::NotFound(_) => ApiError::NotOnProvider {
            identifier: identifier.to_owned(),
            failure: None,
        },
        PluginError::BadCredentials(reason) => ApiError::Incorrect(format!(
            "Provider Account {account}: the provider refused its credentials: {reason}"
        )),
        PluginError::InvalidInput(reason) => ApiError::Incorrect(format!(
            "Image {identifier} cannot be looked up on this Provider: {reason}"
        )),
        other => ApiError::NotOnProvider {
            identifier: identifier.to_owned(),
            failure: Some(other.to_string()),
        },
    }
}

/// The `<image><name>…</name></image>` descriptor inside `<image_descriptor>`, given as
/// an element or as escaped text; returns the name it gives.
fn descriptor_name(descriptor: &Element) -> Result<String, ApiError> {
    let bad = |why: &str| ApiError::Incorrect(format!("Invalid image descriptor: {why}"));
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
pub(super) async fn import(
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
    let env_name = environment_named(request);
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
    let account = account
        .filter(|a| user.sees_account(a))
        .ok_or_else(|| ApiError::AccountNotFound(label.to_string()))?;
    let environment = environment
        .filter(|e| user.0.sees(e.id))
        .ok_or_else(|| ApiError::EnvironmentNotFound(env_name.to_string()))?;
    user.require(environment.id, Action::ManageImages)?;
    if !account.environments.contains(&environment.id) {
        let valid = accounts
            .iter()
            .filter(|a| a.environments.contains(&environment.id))
            .map(|a| a.label.clone())
            .collect();
        return Err(ApiError::AccountNotInEnvironment {
            label: label.to_string(),
            valid,
        });
    }
    if identifier.is_empty() {
        return Err(insufficient("No target identifier given"));
    }
    let name = descriptor_name(descriptor)?;
    if name.chars().count() > MAX_NAME {
        return Err(ApiError::Incorrect(format!(
            "Invalid image descriptor: the name is longer than {MAX_NAME} characters"
        )));
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
        return Err(ApiError::ImportedElsewhere(identifier.to_string()));
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
        submit(state, move |jobs| {
            jobs.record_import(&image, &build, &ti, &pi)
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
