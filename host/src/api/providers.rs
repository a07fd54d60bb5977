//! `/api/provider_types` (one per loaded plugin), `/api/providers` and
//! `/api/provider_accounts`, read-only (reference/conductor-api.md §11).
//!
//! A provider type's id is its target name (`mock`), since types come from plugins
//! rather than database rows.

use super::xml::Doc;
use super::{ApiError, ApiResult, Shared, base, blocking, xml_ok};
use crate::model::{Account, Provider};
use axum::extract::{Path, State};
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
    .open("credential_definitions", &[]);
    for (n, c) in info.credentials.iter().enumerate() {
        doc.open("credential_definition", &[("id", &(n + 1).to_string())])
            .text("name", &c.name)
            .text("label", &c.label)
            .text("input_type", &c.input_type)
            .close("credential_definition");
    }
    doc.close("credential_definitions").close("provider_type");
    Ok(xml_ok(doc.finish()))
}

fn write_provider(doc: &mut Doc, base: &str, p: &Provider) {
    let id = p.id.to_string();
    doc.open(
        "provider",
        &[("href", &format!("{base}/providers/{id}")), ("id", &id)],
    )
    .text("name", &p.name)
    .text("url", "")
    .text("provider_type", &p.target)
    .text("deltacloud_provider", "")
    .close("provider");
}

pub async fn list(State(state): State<Shared>, headers: HeaderMap) -> ApiResult {
    let base = base(&state, &headers);
    let providers = blocking(&state, |store| store.providers()).await?;
    let mut doc = Doc::new();
    doc.open("providers", &[]);
    for p in &providers {
        write_provider(&mut doc, &base, p);
    }
    doc.close("providers");
    Ok(xml_ok(doc.finish()))
}

pub async fn show(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let base = base(&state, &headers);
    let missing = || {
        ApiError::not_found(
            "RecordNotFound",
            format!("Couldn't find Provider with id={id}"),
        )
    };
    let key = id.parse::<u64>().map_err(|_| missing())?;
    let provider = blocking(&state, move |store| store.provider(key))
        .await?
        .ok_or_else(missing)?;
    let mut doc = Doc::new();
    write_provider(&mut doc, &base, &provider);
    Ok(xml_ok(doc.finish()))
}

fn write_account(doc: &mut Doc, base: &str, a: &Account, provider: Option<&Provider>) {
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
    )
    .close("provider_account");
}

/// Accounts are listed without credentials; showing them waits for per-account
/// permissions (only those who may modify an account will see them).
pub async fn list_accounts(State(state): State<Shared>, headers: HeaderMap) -> ApiResult {
    let base = base(&state, &headers);
    let (accounts, providers) =
        blocking(&state, |store| Ok((store.accounts()?, store.providers()?))).await?;
    let mut doc = Doc::new();
    doc.open("provider_accounts", &[]);
    for a in &accounts {
        write_account(
            &mut doc,
            &base,
            a,
            providers.iter().find(|p| p.id == a.provider_id),
        );
    }
    doc.close("provider_accounts");
    Ok(xml_ok(doc.finish()))
}

pub async fn show_account(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let base = base(&state, &headers);
    let missing = || {
        ApiError::not_found(
            "RecordNotFound",
            format!("Couldn't find ProviderAccount with id={id}"),
        )
    };
    let key = id.parse::<u64>().map_err(|_| missing())?;
    let (account, providers) = blocking(&state, move |store| {
        Ok((store.account(key)?, store.providers()?))
    })
    .await?;
    let account = account.ok_or_else(missing)?;
    let mut doc = Doc::new();
    write_account(
        &mut doc,
        &base,
        &account,
        providers.iter().find(|p| p.id == account.provider_id),
    );
    Ok(xml_ok(doc.finish()))
}
