//! `/api/environments`: the tenants (Conductor's pool families), read-only here
//! (reference/conductor-api.md §7.6).

use super::xml::Doc;
use super::{ApiError, ApiResult, Shared, base, blocking, xml_ok};
use crate::model::Environment;
use axum::extract::{Path, State};
use axum::http::HeaderMap;

pub async fn list(State(state): State<Shared>, headers: HeaderMap) -> ApiResult {
    let base = base(&state, &headers);
    let environments = blocking(&state, |store| store.environments()).await?;
    let mut doc = Doc::new();
    doc.open("environments", &[]);
    for env in &environments {
        let id = env.id.to_string();
        doc.open(
            "environment",
            &[("href", &format!("{base}/environments/{id}")), ("id", &id)],
        )
        .text("name", &env.name)
        .text("description", &env.description)
        .close("environment");
    }
    doc.close("environments");
    Ok(xml_ok(doc.finish()))
}

/// By numeric id or by name. Lists, per target with member accounts, those accounts.
pub async fn show(
    State(state): State<Shared>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let base = base(&state, &headers);
    let lookup = key.clone();
    let (env, accounts, providers) = blocking(&state, move |store| {
        let environments = store.environments()?;
        let env: Option<Environment> = environments
            .iter()
            .find(|e| lookup.parse::<u64>().is_ok_and(|id| id == e.id))
            .or_else(|| environments.iter().find(|e| e.name == lookup))
            .cloned();
        Ok((env, store.accounts()?, store.providers()?))
    })
    .await?;
    let env = env.ok_or_else(|| {
        ApiError::not_found(
            "RecordNotFound",
            format!("Couldn't find Environment with id={key}"),
        )
    })?;
    let mut targets: Vec<(String, Vec<String>)> = Vec::new();
    for account in accounts.iter().filter(|a| a.environments.contains(&env.id)) {
        let Some(provider) = providers.iter().find(|p| p.id == account.provider_id) else {
            continue;
        };
        match targets.iter_mut().find(|(t, _)| *t == provider.target) {
            Some((_, labels)) => labels.push(account.label.clone()),
            None => targets.push((provider.target.clone(), vec![account.label.clone()])),
        }
    }
    let id = env.id.to_string();
    let mut doc = Doc::new();
    doc.open(
        "environment",
        &[("href", &format!("{base}/environments/{id}")), ("id", &id)],
    )
    .text("name", &env.name)
    .text("description", &env.description)
    .open("targets", &[("type", "xs:list")]);
    for (target, labels) in &targets {
        doc.open("target", &[("name", target)]);
        for label in labels {
            doc.empty("account", &[("name", label)]);
        }
        doc.close("target");
    }
    doc.close("targets").close("environment");
    Ok(xml_ok(doc.finish()))
}
