//! `/api/provider_accounts` and `/api/providers/:id/provider_accounts`: accounts, their
//! credentials checked by the plugin's `check-account` before anything is stored, and
//! their environments (reference/conductor-api.md §11.3).

use super::*;

/// The document of one account; its credentials when `full` (for its administrators).
fn one_account(
    state: &Shared,
    headers: &HeaderMap,
    account: &Account,
    provider: &Provider,
    full: bool,
) -> String {
    let mut doc = Doc::new();
    write_account(
        &mut doc,
        &base(state, headers),
        account,
        Some(provider),
        full,
    );
    doc.finish()
}

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
    let full = administers(&user, &account);
    Ok(xml_ok(one_account(
        &state, &headers, &account, &provider, full,
    )))
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
/// The info of the plugin serving `provider`'s type; an account of a type no plugin
/// serves cannot be checked, and is refused.
fn plugin_info(state: &Shared, provider: &Provider) -> ApiResult<Info> {
    state
        .plugins
        .get(&provider.target)
        .map(|p| p.info.clone())
        .ok_or_else(|| {
            ApiError::Validation(vec![format!(
                "no plugin for provider type {} is loaded on this server",
                provider.target
            )])
        })
}

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
    checked.map_err(|e| ApiError::Validation(vec![credentials_problem(e)]))
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
    let info = plugin_info(state, &provider)?;
    let (existing, environments) = blocking(state, |store| {
        Ok((store.accounts()?, store.environments()?))
    })
    .await?;
    let environment = environments
        .iter()
        .find(|e| e.name == env_name && user.0.sees(e.id))
        .ok_or_else(|| {
            ApiError::Validation(vec![format!("Environment {env_name} was not found.")])
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
        return Err(ApiError::Validation(problems));
    }
    check_credentials(state, &provider, &account).await?;
    let account = blocking(state, move |store| store.create_account(account)).await?;
    Ok(xml_created(one_account(
        state, headers, &account, &provider, true,
    )))
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
        return Err(ApiError::Forbidden);
    }
    let body = parse_body(&body, "provider_account")?;
    let info = plugin_info(&state, &provider)?;
    let existing = blocking(&state, |store| store.accounts()).await?;
    let before = account.credentials.clone();
    let problems = apply_account(&body, &mut account, &info, &existing, false);
    if !problems.is_empty() {
        return Err(ApiError::Validation(problems));
    }
    if account.credentials != before {
        check_credentials(&state, &provider, &account).await?;
    }
    let saved = account.clone();
    blocking(&state, move |store| store.put_account(&saved)).await?;
    Ok(xml_ok(one_account(
        &state, &headers, &account, &provider, true,
    )))
}

/// Deletes an account unless provider images were pushed with it.
pub async fn delete_account(
    State(state): State<Shared>,
    Extension(user): Extension<CurrentUser>,
    Path(id): Path<String>,
) -> ApiResult {
    let (account, _) = find_account(&state, &user, &id).await?;
    if !administers(&user, &account) {
        return Err(ApiError::Forbidden);
    }
    let key = account.id;
    delete_unless_pushed(
        &state,
        move |pi| pi.account_id == key,
        move |store| store.delete_account(key),
    )
    .await
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
