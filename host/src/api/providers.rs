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
    let plugin = state.plugins.get(&id).ok_or_else(|| {
        ApiError::not_found(
            "RecordNotFound",
            format!("Couldn't find ProviderType with id={id}"),
        )
    })?;
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
    ApiError::not_found(
        "RecordNotFound",
        format!("Couldn't find Provider with id={id}"),
    )
}

fn account_not_found(id: &str) -> ApiError {
    ApiError::not_found(
        "RecordNotFound",
        format!("Couldn't find ProviderAccount with id={id}"),
    )
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
        return Err(ApiError::validation(problems));
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
        return Err(ApiError::validation(problems));
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
        return Err(ApiError::in_use(format!(
            "There are following associated provider images: {}. Delete them first.",
            images_in_use(&in_use)
        )));
    }
    Ok(no_content())
}

// ---- accounts ----

fn write_account(doc: &mut Doc, base: &str, a: &Account, provider: Option<&Provider>, full: bool) {
    let id = a.id.to_string();
    let pid = a.provider_id.to_string();
    doc.open(
        "provider_account",
        &[
            ("href", &format!("{base}/provider_accounts/{id}")),
            ("id", &id),
        ],
    )
    .text("name", &a.label)
    .text_with(
        "provider",
        &[("href", &format!("{base}/providers/{pid}")), ("id", &pid)],
        provider.map(|p| p.name.as_str()).unwrap_or(""),
    )
    .text(
        "provider_type",
        provider.map(|p| p.target.as_str()).unwrap_or(""),
    );
    if full {
        doc.open("credentials", &[]);
        for (name, value) in &a.credentials {
            doc.text(name, value);
        }
        doc.close("credentials");
    }
    if let Some(priority) = a.priority {
        doc.text("priority", &priority.to_string());
    }
    if full {
        let quota = a
            .max_running_instances
            .map(|n| n.to_string())
            .unwrap_or_else(|| "unlimited".into());
        doc.text("quota_used", "0%")
            .empty("quota", &[("maximum_running_instances", &quota)]);
    }
    doc.close("provider_account");
}

async fn render_accounts(
    state: &Shared,
    headers: &HeaderMap,
    user: &CurrentUser,
    provider: Option<u64>,
) -> ApiResult {
    let base = base(state, headers);
    let (accounts, providers) =
        blocking(state, |store| Ok((store.accounts()?, store.providers()?))).await?;
    let mut doc = Doc::new();
    doc.open("provider_accounts", &[]);
    for a in accounts
        .iter()
        .filter(|a| provider.is_none_or(|p| p == a.provider_id))
        .filter(|a| account_visible(user, a))
    {
        let p = providers.iter().find(|p| p.id == a.provider_id);
        write_account(&mut doc, &base, a, p, false);
    }
    doc.close("provider_accounts");
    Ok(xml_ok(doc.finish()))
}

/// An account exists for a user who has a role in one of its environments.
fn account_visible(user: &CurrentUser, account: &Account) -> bool {
    user.sees_account(account)
}

/// Whether the user administers the account: may see its credentials, change it,
/// delete it.
fn administers(user: &CurrentUser, account: &Account) -> bool {
    user.0.admin
        || account
            .environments
            .iter()
            .any(|e| user.0.may(*e, Action::ManageAccounts))
}

/// The list never carries credentials.
pub async fn list_accounts(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    headers: HeaderMap,
) -> ApiResult {
    render_accounts(&state, &headers, &user, None).await
}

pub async fn list_accounts_of_provider(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let provider = find_provider(&state, &id).await?;
    render_accounts(&state, &headers, &user, Some(provider.id)).await
}

/// The account and its provider, if the account exists for this user.
async fn find_account(
    state: &Shared,
    user: &CurrentUser,
    raw: &str,
) -> ApiResult<(Account, Provider)> {
    let key = raw.parse::<u64>().map_err(|_| account_not_found(raw))?;
    let found = blocking(state, move |store| {
        let Some(account) = store.account(key)? else {
            return Ok(None);
        };
        Ok(store.provider(account.provider_id)?.map(|p| (account, p)))
    })
    .await?;
    found
        .filter(|(account, _)| account_visible(user, account))
        .ok_or_else(|| account_not_found(raw))
}

/// Credentials are shown only to those who administer the account.
pub async fn show_account(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let (account, provider) = find_account(&state, &user, &id).await?;
    let mut doc = Doc::new();
    write_account(
        &mut doc,
        &base(&state, &headers),
        &account,
        Some(&provider),
        administers(&user, &account),
    );
    Ok(xml_ok(doc.finish()))
}

/// "access_key" → "Access Key", as Conductor worded its validation messages.
fn humanize(label: &str) -> String {
    label
        .split(['_', ' '])
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut chars = w.chars();
            match chars.next() {
                Some(first) => first.to_uppercase().chain(chars).collect(),
                None => String::new(),
            }
        })
        .collect::<Vec<String>>()
        .join(" ")
}

/// Reads label, credentials, priority and quota from a `<provider_account>` body into
/// `account`, collecting every problem.
fn apply_account(
    body: &Element,
    account: &mut Account,
    info: &Info,
    existing: &[Account],
    creating: bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(label) = field(body, "label")
        .or_else(|| field(body, "name"))
        .or_else(|| creating.then(String::new))
    {
        // Labels are unique within each environment, not across the server: an
        // environment's administrators cannot learn other environments' labels by
        // finding them taken. Pushes and imports name accounts within an environment.
        let taken = existing.iter().any(|a| {
            a.label == label
                && a.id != account.id
                && a.environments
                    .iter()
                    .any(|e| account.environments.contains(e))
        });
        match new_name_problem("Label", &label, taken) {
            Some(problem) => problems.push(problem),
            None => account.label = label,
        }
    }
    let credentials = body
        .child("credentials")
        .or_else(|| body.child("credentials_hash"));
    if creating && credentials.is_none() && !info.credentials.is_empty() {
        problems.push("Credentials can't be blank".into());
    }
    if let Some(credentials) = credentials {
        for c in credentials.elements() {
            if !info.credentials.iter().any(|d| d.name == c.name) {
                let names: Vec<&str> = info.credentials.iter().map(|d| d.name.as_str()).collect();
                problems.push(format!(
                    "Unknown credential {} for provider type {} (it takes: {})",
                    c.name,
                    info.target,
                    names.join(", ")
                ));
                continue;
            }
            account.credentials.retain(|(k, _)| *k != c.name);
            account
                .credentials
                .push((c.name.clone(), c.text().trim().to_owned()));
        }
    }
    // Stored in the order the type defines them, and every one the type does not mark
    // optional must be present.
    let mut ordered = Vec::new();
    for definition in &info.credentials {
        match account
            .credentials
            .iter()
            .find(|(k, _)| *k == definition.name)
        {
            Some((k, v)) if !v.is_empty() => ordered.push((k.clone(), v.clone())),
            _ if definition.optional => {}
            _ if creating || credentials.is_some() => {
                problems.push(format!("{} can't be blank", humanize(&definition.label)))
            }
            _ => {}
        }
    }
    if creating || credentials.is_some() {
        account.credentials = ordered;
    }
    if let Some(priority) = field(body, "priority").filter(|p| !p.is_empty()) {
        match priority.parse::<i64>() {
            Ok(p) if (-100..=100).contains(&p) => account.priority = Some(p),
            Ok(_) => problems.push("Priority must be between -100 and 100".into()),
            Err(_) => problems.push("Priority is not a number".into()),
        }
    }
    if let Some(quota) = body.child("quota")
        && let Some(max) = field(quota, "maximum_running_instances")
    {
        match max.as_str() {
            "" | "unlimited" => account.max_running_instances = None,
            n => match n.parse::<u64>() {
                Ok(n) => account.max_running_instances = Some(n),
                Err(_) => problems.push("Quota maximum running instances is not a number".into()),
            },
        }
    }
    problems
}

/// Turns a plugin's answer to `check-account` into Conductor's validation message.
fn credentials_problem(error: PluginError) -> String {
    match error {
        // The plugin's own words, without the "credentials refused" prefix they carry as
        // a job error.
        PluginError::BadCredentials(reason) => {
            format!("Login credentials are invalid for this Provider: {reason}")
        }
        other => format!(
            "An error occurred when checking Provider credentials. Please check your setup and try again: {other}"
        ),
    }
}

async fn check_credentials(
    state: &Shared,
    provider: &Provider,
    account: &Account,
) -> ApiResult<()> {
    let jobs = state.jobs.clone();
    let (provider, account) = (provider.clone(), account.clone());
    let checked = tokio::task::spawn_blocking(move || jobs.check_account(&provider, &account))
        .await
        .map_err(ApiError::internal)?;
    checked.map_err(|e| ApiError::validation(vec![credentials_problem(e)]))
}

async fn create_account_for(
    state: &Shared,
    headers: &HeaderMap,
    user: &CurrentUser,
    provider_key: Option<String>,
    body: Bytes,
) -> ApiResult {
    let body = parse_body(&body, "provider_account")?;
    // The environment the account joins: `<environment>` (an addition) or, as in
    // Conductor, the default one. Its administrators may create accounts for it.
    let env_name = field(&body, "environment")
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| DEFAULT_ENVIRONMENT.to_owned());
    // The provider from the URL wins over one in the body, as in Conductor.
    let provider_key = provider_key
        .or_else(|| body.child("provider").and_then(|p| field(p, "id")))
        .unwrap_or_default();
    let provider = find_provider(state, &provider_key).await?;
    let info = state
        .plugins
        .get(&provider.target)
        .map(|p| p.info.clone())
        .ok_or_else(|| {
            ApiError::validation(vec![format!(
                "no plugin for provider type {} is loaded on this server",
                provider.target
            )])
        })?;
    let (existing, environments) = blocking(state, |store| {
        Ok((store.accounts()?, store.environments()?))
    })
    .await?;
    let environment = environments
        .iter()
        .find(|e| e.name == env_name && user.0.sees(e.id))
        .ok_or_else(|| {
            ApiError::validation(vec![format!("Environment {env_name} was not found.")])
        })?;
    user.require(environment.id, Action::ManageAccounts)?;
    let mut account = Account {
        id: 0,
        label: String::new(),
        provider_id: provider.id,
        credentials: Vec::new(),
        environments: vec![environment.id],
        priority: None,
        max_running_instances: None,
    };
    let problems = apply_account(&body, &mut account, &info, &existing, true);
    if !problems.is_empty() {
        return Err(ApiError::validation(problems));
    }
    check_credentials(state, &provider, &account).await?;
    let account = blocking(state, move |store| store.create_account(account)).await?;
    let mut doc = Doc::new();
    write_account(
        &mut doc,
        &base(state, headers),
        &account,
        Some(&provider),
        true,
    );
    Ok(xml_created(doc.finish()))
}

pub async fn create_account(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    create_account_for(&state, &headers, &user, None, body).await
}

pub async fn create_account_of_provider(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    create_account_for(&state, &headers, &user, Some(id), body).await
}

/// Changes what the body names and leaves the rest as it was (Conductor reset a quota
/// that was left out).
pub async fn update_account(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let (mut account, provider) = find_account(&state, &user, &id).await?;
    if !administers(&user, &account) {
        return Err(super::forbidden());
    }
    let body = parse_body(&body, "provider_account")?;
    let info = state
        .plugins
        .get(&provider.target)
        .map(|p| p.info.clone())
        .ok_or_else(|| {
            ApiError::validation(vec![format!(
                "no plugin for provider type {} is loaded on this server",
                provider.target
            )])
        })?;
    let existing = blocking(&state, |store| store.accounts()).await?;
    let before = account.credentials.clone();
    let problems = apply_account(&body, &mut account, &info, &existing, false);
    if !problems.is_empty() {
        return Err(ApiError::validation(problems));
    }
    if account.credentials != before {
        check_credentials(&state, &provider, &account).await?;
    }
    let saved = account.clone();
    blocking(&state, move |store| store.put_account(&saved)).await?;
    let mut doc = Doc::new();
    write_account(
        &mut doc,
        &base(&state, &headers),
        &account,
        Some(&provider),
        true,
    );
    Ok(xml_ok(doc.finish()))
}

/// Deletes an account unless provider images were pushed with it.
pub async fn delete_account(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(id): Path<String>,
) -> ApiResult {
    let (account, _) = find_account(&state, &user, &id).await?;
    if !administers(&user, &account) {
        return Err(super::forbidden());
    }
    let key = account.id;
    delete_unless_pushed(
        &state,
        move |pi| pi.account_id == key,
        move |store| store.delete_account(key),
    )
    .await
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
    .map_err(|e| ApiError::validation(vec![e]))?;
    if !failures.is_empty() {
        return Err(ApiError::validation(
            failures.iter().map(|f| f.to_string()).collect(),
        ));
    }
    list_types(State(state), headers).await
}

#[cfg(test)]
mod tests {
    use super::humanize;

    #[test]
    fn labels_read_as_conductor_worded_them() {
        assert_eq!(humanize("access_key"), "Access Key");
        assert_eq!(humanize("username"), "Username");
    }
}
