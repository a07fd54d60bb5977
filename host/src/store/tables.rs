//! Every redb table the server uses, in one place. Names carry a version: a change to a
//! key or value layout makes a new table (`images-v2`) and a migration, never a silent
//! reinterpretation of old bytes.

use redb::TableDefinition;

/// Schema version, counters: `schema-version`, `next-id/<table>`.
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta-v1");

// Rows: values are a version byte followed by the postcard encoding of that table's row
// type for that version (rows/).
pub const ENVIRONMENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("environments-v1");
pub const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users-v1");
pub const PROVIDERS: TableDefinition<u64, &[u8]> = TableDefinition::new("providers-v1");
pub const ACCOUNTS: TableDefinition<u64, &[u8]> = TableDefinition::new("accounts-v1");
pub const IMAGES: TableDefinition<u128, &[u8]> = TableDefinition::new("images-v1");
pub const BUILDS: TableDefinition<u128, &[u8]> = TableDefinition::new("builds-v1");
pub const TARGET_IMAGES: TableDefinition<u128, &[u8]> = TableDefinition::new("target-images-v1");
pub const PROVIDER_IMAGES: TableDefinition<u128, &[u8]> =
    TableDefinition::new("provider-images-v1");
pub const JOBS: TableDefinition<u128, &[u8]> = TableDefinition::new("jobs-v1");

// Secondary indexes, (parent, child) → (), written in the same transaction as the child.
pub const IMAGES_BY_ENVIRONMENT: TableDefinition<(u64, u128), ()> =
    TableDefinition::new("images-by-environment-v1");
pub const BUILDS_BY_IMAGE: TableDefinition<(u128, u128), ()> =
    TableDefinition::new("builds-by-image-v1");
pub const TARGET_IMAGES_BY_BUILD: TableDefinition<(u128, u128), ()> =
    TableDefinition::new("target-images-by-build-v1");
pub const PROVIDER_IMAGES_BY_TARGET_IMAGE: TableDefinition<(u128, u128), ()> =
    TableDefinition::new("provider-images-by-target-image-v1");

/// Plugins' own records, per provider: (provider id, key) → value. What a plugin keeps
/// between calls (the mock provider's list of images it holds).
pub const PLUGIN_STATE: TableDefinition<(u64, &str), &[u8]> =
    TableDefinition::new("plugin-state-v1");

/// Webhooks: id → the URL that receives status changes.
pub const HOOKS: TableDefinition<u64, &[u8]> = TableDefinition::new("hooks-v1");

/// Quotas per environment: environment id → [`crate::model::Quota`]. A table of its own,
/// so that environment rows written before quotas existed read as they are.
pub const QUOTAS: TableDefinition<u64, &[u8]> = TableDefinition::new("environment-quotas-v1");
