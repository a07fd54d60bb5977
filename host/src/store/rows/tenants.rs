//! Rows of the tenants' tables: environments and their quotas, users, providers,
//! accounts (with their sealed credentials) and webhooks.

use super::*;

// ---- environments ----

#[derive(Serialize, Deserialize)]
struct EnvironmentV1 {
    id: u64,
    name: String,
    description: String,
}

impl From<&Environment> for EnvironmentV1 {
    fn from(e: &Environment) -> Self {
        EnvironmentV1 {
            id: e.id,
            name: e.name.clone(),
            description: e.description.clone(),
        }
    }
}

impl From<EnvironmentV1> for Environment {
    fn from(e: EnvironmentV1) -> Self {
        Environment {
            id: e.id,
            name: e.name,
            description: e.description,
        }
    }
}

one_version!(Environment, "environments", EnvironmentV1);

// ---- environment quotas ----

#[derive(Serialize, Deserialize)]
struct QuotaV1 {
    images: Option<u64>,
    stored_bytes: Option<u64>,
    running_jobs: Option<u64>,
    queued_jobs: Option<u64>,
}

impl From<&Quota> for QuotaV1 {
    fn from(q: &Quota) -> Self {
        QuotaV1 {
            images: q.images,
            stored_bytes: q.stored_bytes,
            running_jobs: q.running_jobs,
            queued_jobs: q.queued_jobs,
        }
    }
}

impl From<QuotaV1> for Quota {
    fn from(q: QuotaV1) -> Self {
        Quota {
            images: q.images,
            stored_bytes: q.stored_bytes,
            running_jobs: q.running_jobs,
            queued_jobs: q.queued_jobs,
        }
    }
}

one_version!(Quota, "environment quotas", QuotaV1);

// ---- users ----

#[derive(Serialize, Deserialize, Clone, Copy)]
enum RoleV1 {
    Admin,
    ImageAdmin,
    Viewer,
}

#[derive(Serialize, Deserialize)]
struct UserV1 {
    name: String,
    password_hash: String,
    admin: bool,
    disabled: bool,
    roles: Vec<(u64, RoleV1)>,
}

impl From<&User> for UserV1 {
    fn from(u: &User) -> Self {
        UserV1 {
            name: u.name.clone(),
            password_hash: u.password_hash.clone(),
            admin: u.admin,
            disabled: u.disabled,
            roles: u
                .roles
                .iter()
                .map(|(env, role)| {
                    let role = match role {
                        Role::Admin => RoleV1::Admin,
                        Role::ImageAdmin => RoleV1::ImageAdmin,
                        Role::Viewer => RoleV1::Viewer,
                    };
                    (*env, role)
                })
                .collect(),
        }
    }
}

impl From<UserV1> for User {
    fn from(u: UserV1) -> Self {
        User {
            name: u.name,
            password_hash: u.password_hash,
            admin: u.admin,
            disabled: u.disabled,
            roles: u
                .roles
                .into_iter()
                .map(|(env, role)| {
                    let role = match role {
                        RoleV1::Admin => Role::Admin,
                        RoleV1::ImageAdmin => Role::ImageAdmin,
                        RoleV1::Viewer => Role::Viewer,
                    };
                    (env, role)
                })
                .collect(),
        }
    }
}

one_version!(User, "users", UserV1);

// ---- providers ----

#[derive(Serialize, Deserialize)]
struct ProviderV1 {
    id: u64,
    name: String,
    target: String,
    settings: Vec<(String, String)>,
}

impl From<&Provider> for ProviderV1 {
    fn from(p: &Provider) -> Self {
        ProviderV1 {
            id: p.id,
            name: p.name.clone(),
            target: p.target.clone(),
            settings: p.settings.clone(),
        }
    }
}

impl From<ProviderV1> for Provider {
    fn from(p: ProviderV1) -> Self {
        Provider {
            id: p.id,
            name: p.name,
            target: p.target,
            settings: p.settings,
        }
    }
}

one_version!(Provider, "providers", ProviderV1);

// ---- accounts ----

/// An account as stored: the credentials sealed (see `Store::seal`). The store turns it
/// into an [`crate::model::Account`] once the seal is opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(in crate::store) struct SealedAccount {
    pub id: u64,
    pub label: String,
    pub provider_id: u64,
    /// A 12-byte nonce, then the ciphertext (with its tag) of the postcard-encoded
    /// credentials, a list of name/value pairs.
    pub sealed_credentials: Vec<u8>,
    pub environments: Vec<u64>,
    pub priority: Option<i64>,
    pub max_running_instances: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct AccountV1 {
    id: u64,
    label: String,
    provider_id: u64,
    sealed_credentials: Vec<u8>,
    environments: Vec<u64>,
    priority: Option<i64>,
    max_running_instances: Option<u64>,
}

impl From<&SealedAccount> for AccountV1 {
    fn from(a: &SealedAccount) -> Self {
        AccountV1 {
            id: a.id,
            label: a.label.clone(),
            provider_id: a.provider_id,
            sealed_credentials: a.sealed_credentials.clone(),
            environments: a.environments.clone(),
            priority: a.priority,
            max_running_instances: a.max_running_instances,
        }
    }
}

impl From<AccountV1> for SealedAccount {
    fn from(a: AccountV1) -> Self {
        SealedAccount {
            id: a.id,
            label: a.label,
            provider_id: a.provider_id,
            sealed_credentials: a.sealed_credentials,
            environments: a.environments,
            priority: a.priority,
            max_running_instances: a.max_running_instances,
        }
    }
}

one_version!(SealedAccount, "accounts", AccountV1);

/// The sealed credentials' plaintext, version 1: postcard of name/value pairs.
pub(in crate::store) fn credentials_to_bytes(credentials: &[(String, String)]) -> Vec<u8> {
    // postcard fails only for types serde cannot describe; pairs of strings never do.
    postcard::to_stdvec(credentials).unwrap_or_default()
}

pub(in crate::store) fn credentials_from_bytes(
    bytes: &[u8],
) -> Result<Vec<(String, String)>, RowError> {
    exactly(bytes)
}

// ---- webhooks ----

#[derive(Serialize, Deserialize)]
struct HookV1 {
    id: u64,
    uri: String,
}

impl From<&Hook> for HookV1 {
    fn from(h: &Hook) -> Self {
        HookV1 {
            id: h.id,
            uri: h.uri.clone(),
        }
    }
}

impl From<HookV1> for Hook {
    fn from(h: HookV1) -> Self {
        Hook {
            id: h.id,
            uri: h.uri,
        }
    }
}

one_version!(Hook, "webhooks", HookV1);
