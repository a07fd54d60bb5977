//! `/api/environments`: the tenants (Conductor's pool families), read-only here
//! (reference/conductor-api.md §7.6); `pool_families.rs` changes them.

use super::xml::Doc;
use super::{ApiError, ApiResult, CurrentUser, Shared, base, blocking, xml_ok};
use crate::model::{Account, Environment, Provider};
use axum::Extension;
use axum::extract::{Path, State};
use axum::http::HeaderMap;

pub async fn list(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    headers: HeaderMap,
) -> ApiResult {
    let base = base(&state, &headers);
    let (environments, accounts, providers) = blocking(&state, |store| {
        Ok((store.environments()?, store.accounts()?, store.providers()?))
    })
    .await?;
    let mut doc = Doc::new();
    doc.open("environments", &[]);
    for env in environments.iter().filter(|e| user.0.sees(e.id)) {
        write_environment(&mut doc, &base, env, &accounts, &providers);
    }
    doc.close("environments");
    Ok(xml_ok(doc.finish()))
}

/// One `<environment>` with its `<targets type='xs:list'>`: per target that has member
/// accounts, `<target name=…>` holding an `<account name=…>` for each (§7.6), which
/// aeolus-cli's environment listing reads.
fn write_environment(
    doc: &mut Doc,
    base: &str,
    env: &Environment,
    accounts: &[Account],
    providers: &[Provider],
) {
    let mut targets: Vec<(&str, Vec<&str>)> = Vec::new();
    for account in accounts.iter().filter(|a| a.environments.contains(&env.id)) {
        let Some(provider) = providers.iter().find(|p| p.id == account.provider_id) else {
            continue;
        };
        match targets.iter_mut().find(|(t, _)| *t == provider.target) {
            Some((_, labels)) => labels.push(&account.label),
            None => targets.push((&provider.target, vec![&account.label])),
        }
    }
    let id = env.id.to_string();
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
}

/// By numeric id or by name. Lists, per target with member accounts, those accounts.
pub async fn show(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
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
    let env = env
        .filter(|e| user.0.sees(e.id))
        .ok_or_else(|| ApiError::RecordNotFound("Environment", key.to_string()))?;
    let mut doc = Doc::new();
    write_environment(&mut doc, &base, &env, &accounts, &providers);
    Ok(xml_ok(doc.finish()))
}
