//! `/api/provider_types` (one per loaded plugin), `/api/providers` and
//! `/api/provider_accounts` (reference/conductor-api.md §11.1–11.3).
//!
//! A provider type's id is its target name (`mock`), since types come from plugins
//! rather than database rows. Account credentials are checked by the plugin's
//! `check-account` before an account is stored.

use super::xml::{Doc, Element};
use super::{
    ApiError, ApiResult, CurrentUser, Shared, base, blocking, field, no_content, parse_body,
    xml_created, xml_ok,
};
use crate::model::{Account, Action, DEFAULT_ENVIRONMENT, Provider, new_name_problem};
use crate::plugins::{Info, PluginError};
use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;

mod accounts;

pub use accounts::{
    create_account, create_account_of_provider, delete_account, list_accounts,
    list_accounts_of_provider, show_account, update_account,
};

pub async fn list_types(State(state): State<Shared>, headers: HeaderMap) -> ApiResult {
    let base = base(&state, &headers);
    let mut doc = Doc::new();
    doc.open("provider_types", &[]);
    for plugin in state.plugins.all() {
        let id = &plugin.info.target;
        doc.open(
            "provider_type",
            &[("href", &format!("{base}/provider_types/{id}")), ("id", id)],
        )
        .text("name", &plugin.info.display_name)
        .text("deltacloud_driver", id)
        .close("provider_type");
    }
    doc.close("provider_types");
    Ok(xml_ok(doc.finish()))
}

pub async fn show_type(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let base = base(&state, &headers);
    let plugin = state
        .plugins
        .get(&id)
        .ok_or_else(|| ApiError::RecordNotFound("ProviderType", id.to_string()))?;
    let info = &plugin.info;
    let mut doc = Doc::new();
    doc.open(
        "provider_type",
        &[
            ("href", &format!("{base}/provider_types/{id}")),
            ("id", &id),
        ],
    )
    .text("name", &info.display_name)
    .text("deltacloud_driver", &info.target)
    .text("version", &info.version)
    .text("format", info.format.as_str())
    .open("settings", &[]);
    for setting in &info.settings {
        doc.text("setting", setting);
    }
    doc.close("settings").open("credential_definitions", &[]);
    for (n, c) in info.credentials.iter().enumerate() {
        doc.open("credential_definition", &[("id", &(n + 1).to_string())])
            .text("name", &c.name)
            .text("label", &c.label)
            .text("input_type", &c.input_type)
            .text("required", if c.optional { "false" } else { "true" })
            .close("credential_definition");
    }
    doc.close("credential_definitions").close("provider_type");
    Ok(xml_ok(doc.finish()))
}

/// Settings every provider may carry whatever its type: Conductor's provider fields.
const COMMON_SETTINGS: &[&str] = &["url", "deltacloud_provider"];

fn setting<'a>(p: &'a Provider, name: &str) -> &'a str {
    p.settings
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

fn write_provider(doc: &mut Doc, base: &str, p: &Provider) {
    let id = p.id.to_string();
    doc.open(
        "provider",
        &[("href", &format!("{base}/providers/{id}")), ("id", &id)],
    )
    .text("name", &p.name)
    .text("url", setting(p, "url"))
    .text("provider_type", &p.target)
    .text("deltacloud_provider", setting(p, "deltacloud_provider"))
    .open("settings", &[]);
    for (name, value) in p
        .settings
        .iter()
        .filter(|(k, _)| !COMMON_SETTINGS.contains(&k.as_str()))
    {
        doc.text_with("setting", &[("name", name)], value);
    }
    doc.close("settings").close("provider");
}

fn provider_not_found(id: &str) -> ApiError {
    ApiError::RecordNotFound("Provider", id.to_string())
}

fn account_not_found(id: &str) -> ApiError {
    ApiError::RecordNotFound("ProviderAccount", id.to_string())
}

/// `?minimal=…` leaves each provider its href and id only, whatever the value
/// (`minimal=false` too), as Conductor did (reference §7.5): clients written against it
/// send it that way.
pub async fn list(
    State(state): State<Shared>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> ApiResult {
    let base = base(&state, &headers);
    let minimal = query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .any(|pair| pair.split('=').next() == Some("minimal"));
    let mut providers = blocking(&state, |store| store.providers()).await?;
    providers.sort_by(|a, b| a.name.cmp(&b.name));
    let mut doc = Doc::new();
    doc.open("providers", &[]);
    for p in &providers {
        if minimal {
            let id = p.id.to_string();
            doc.empty(
                "provider",
                &[("href", &format!("{base}/providers/{id}")), ("id", &id)],
            );
        } else {
            write_provider(&mut doc, &base, p);
        }
    }
    doc.close("providers");
    Ok(xml_ok(doc.finish()))
}

async fn find_provider(state: &Shared, raw: &str) -> ApiResult<Provider> {
    let key = raw.parse::<u64>().map_err(|_| provider_not_found(raw))?;
    blocking(state, move |store| store.provider(key))
        .await?
        .ok_or_else(|| provider_not_found(raw))
}

pub async fn show(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let provider = find_provider(&state, &id).await?;
    let mut doc = Doc::new();
    write_provider(&mut doc, &base(&state, &headers), &provider);
    Ok(xml_ok(doc.finish()))
}

/// Reads name, type and settings from a `<provider>` body into `provider`, collecting
/// every problem. `creating` allows (and requires) the type.
fn apply_provider(
    state: &Shared,
    body: &Element,
    provider: &mut Provider,
    existing: &[Provider],
    creating: bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(name) = field(body, "name").or_else(|| creating.then(String::new)) {
        let taken = existing
            .iter()
            .any(|p| p.name == name && p.id != provider.id);
        match new_name_problem("Provider name", &name, taken) {
            Some(problem) => problems.push(problem),
            None => provider.name = name,
        }
    }
    // The type: `<provider_type id='mock'/>`, `<provider_type>mock</provider_type>` or
    // `<provider_type_deltacloud_driver>mock</provider_type_deltacloud_driver>`.
    let given_type = body
        .child("provider_type")
        .and_then(|t| field(t, "id").or_else(|| Some(t.text().trim().to_owned())))
        .filter(|t| !t.is_empty())
        .or_else(|| field(body, "provider_type_deltacloud_driver"));
    let mut info: Option<Info> = state.plugins.get(&provider.target).map(|p| p.info.clone());
    match (creating, given_type) {
        (true, None) => problems.push("Provider Type can't be blank".into()),
        (true, Some(target)) => match state.plugins.get(&target) {
            Some(plugin) => {
                provider.target = target;
                info = Some(plugin.info.clone());
            }
            None => problems.push("Provider type does not exist".into()),
        },
        (false, Some(target)) if target != provider.target => {
            problems.push("Provider type cannot be changed".into())
        }
        (false, _) => {}
    }
    let mut given: Vec<(String, String)> = Vec::new();
    for name in COMMON_SETTINGS {
        if let Some(value) = field(body, name) {
            given.push(((*name).to_owned(), value));
        }
    }
    if let Some(list) = body.child("settings") {
        for s in list.elements() {
            match s.attribute("name").filter(|n| !n.is_empty()) {
                Some(name) => given.push((name.to_owned(), s.text().trim().to_owned())),
                None => problems.push("each <setting> needs a name attribute".into()),
            }
        }
    }
    for (name, value) in given {
        let known = COMMON_SETTINGS.contains(&name.as_str())
            || info.as_ref().is_some_and(|i| i.settings.contains(&name));
        if !known {
            let uses = info
                .as_ref()
                .map(|i| i.settings.join(", "))
                .unwrap_or_default();
            problems.push(format!(
                "Setting {name} is not used by provider type {} (it uses: {uses})",
                provider.target
            ));
            continue;
        }
        provider.settings.retain(|(k, _)| *k != name);
        if !value.is_empty() {
            provider.settings.push((name, value));
        }
    }
    problems
}

pub async fn create(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    user.require_admin()?;
    let body = parse_body(&body, "provider")?;
    let existing = blocking(&state, |store| store.providers()).await?;
    let mut provider = Provider {
        id: 0,
        name: String::new(),
        target: String::new(),
        settings: Vec::new(),
    };
    let problems = apply_provider(&state, &body, &mut provider, &existing, true);
    if !problems.is_empty() {
        return Err(ApiError::Validation(problems));
    }
    let provider = blocking(&state, move |store| store.create_provider(provider)).await?;
    let mut doc = Doc::new();
    write_provider(&mut doc, &base(&state, &headers), &provider);
    Ok(xml_created(doc.finish()))
}

pub async fn update(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    user.require_admin()?;
    let mut provider = find_provider(&state, &id).await?;
    let body = parse_body(&body, "provider")?;
    let existing = blocking(&state, |store| store.providers()).await?;
    let problems = apply_provider(&state, &body, &mut provider, &existing, false);
    if !problems.is_empty() {
        return Err(ApiError::Validation(problems));
    }
    let saved = provider.clone();
    blocking(&state, move |store| store.put_provider(&saved)).await?;
    let mut doc = Doc::new();
    write_provider(&mut doc, &base(&state, &headers), &provider);
    Ok(xml_ok(doc.finish()))
}

/// Names the provider images that still use accounts, for a refused delete.
fn images_in_use(images: &[crate::model::ProviderImage]) -> String {
    images
        .iter()
        .map(|pi| {
            if pi.target_identifier.is_empty() {
                pi.id.to_string()
            } else {
                pi.target_identifier.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Deletes a provider and its accounts, unless an account still has provider images.
pub async fn delete(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(id): Path<String>,
) -> ApiResult {
    user.require_admin()?;
    let provider = find_provider(&state, &id).await?;
    let key = provider.id;
    delete_unless_pushed(
        &state,
        move |pi| pi.provider_id == key,
        move |store| store.delete_provider(key),
    )
    .await
}

/// Deletes a provider or account with `delete`, unless provider images that `uses`
/// picks out still exist: those are named in a 409, since deleting what made them
/// would leave them on the cloud with no way to remove them.
async fn delete_unless_pushed(
    state: &Shared,
    uses: impl Fn(&crate::model::ProviderImage) -> bool + Send + 'static,
    delete: impl FnOnce(&crate::store::Store) -> Result<(), crate::store::StoreError> + Send + 'static,
) -> ApiResult {
    let in_use = blocking(state, move |store| {
        let images: Vec<_> = store
            .provider_images(None)?
            .into_iter()
            .filter(|pi| uses(pi))
            .collect();
        if images.is_empty() {
            delete(store)?;
        }
        Ok(images)
    })
    .await?;
    if !in_use.is_empty() {
        return Err(ApiError::InUse(format!(
            "There are following associated provider images: {}. Delete them first.",
            images_in_use(&in_use)
        )));
    }
    Ok(no_content())
}

/// `POST /api/provider_types/rescan` (administrators): loads every plugin in the
/// plugins folder again, so plugins added or replaced there are picked up without a
/// restart. Jobs already running finish on the version they started with.
pub async fn rescan(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    headers: HeaderMap,
) -> ApiResult {
    user.require_admin()?;
    let plugins = state.plugins.clone();
    let failures = tokio::task::spawn_blocking(move || match plugins.dir() {
        Some(dir) => plugins.load_dir(dir).map_err(|e| e.to_string()),
        None => Ok(Vec::new()),
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|e| ApiError::Validation(vec![e]))?;
    if !failures.is_empty() {
        return Err(ApiError::Validation(
            failures.iter().map(|f| f.to_string()).collect(),
        ));
    }
    list_types(State(state), headers).await
}
