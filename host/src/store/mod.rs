//! Metadata in one redb file: typed tables, row codecs, the schema version, and the
//! transactions that keep rows and their indexes in step.
//!
//! Owns every byte in `conductor.redb`. Never imports axum or wasmtime. Calls block on
//! disk, so async callers run them on the blocking pool.

mod rows;
mod tables;

use crate::model::{
    Account, Build, Deletion, Environment, Hook, Id, Image, Job, JobKind, Provider, ProviderImage,
    Quota, QuotaExceeded, TargetImage, Usage, User,
};
use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use redb::{
    Database, Key, ReadTransaction, ReadableTable, Table, TableDefinition, WriteTransaction,
};
use rows::{Row, SealedAccount};
use std::borrow::Borrow;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use tables::*;

/// The layout this build of the server reads and writes.
const SCHEMA_VERSION: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Redb(Box<redb::Error>),
    #[error("the stored {table} row {key} is unreadable: {reason}")]
    Corrupt {
        table: &'static str,
        key: String,
        reason: String,
    },
    #[error(
        "the data directory holds schema version {found}, but this server reads version {SCHEMA_VERSION}; \
         run the conductor release that wrote it, or restore a backup made for this one"
    )]
    SchemaMismatch { found: u64 },
    #[error(
        "another conductor server is using this database (it is locked); stop that one, or \
         give this one another --data directory"
    )]
    InUse,
    /// A request that would take its environment past its quota; nothing was stored.
    #[error(transparent)]
    Quota(#[from] QuotaExceeded),
}

macro_rules! redb_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Redb(Box::new(e.into())) }
        }
    )*};
}
redb_errors!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

type Result<T> = std::result::Result<T, StoreError>;

/// Decodes one stored row, naming its table and key when it cannot be read.
fn decode<T: Row>(key: &dyn std::fmt::Debug, bytes: &[u8]) -> Result<T> {
    T::decode(bytes).map_err(|reason| StoreError::Corrupt {
        table: T::TABLE,
        key: format!("{key:?}"),
        reason,
    })
}

/// Reads one row from a table of either kind of transaction.
fn get<'k, K: Key + 'static, T: Row>(
    table: &impl ReadableTable<K, &'static [u8]>,
    key: impl Borrow<K::SelfType<'k>>,
) -> Result<Option<T>> {
    let key = key.borrow();
    match table.get(key)? {
        Some(row) => Ok(Some(decode(key, row.value())?)),
        None => Ok(None),
    }
}

/// Reads every row of a table, in key order.
fn all<K: Key + 'static, T: Row>(table: &impl ReadableTable<K, &'static [u8]>) -> Result<Vec<T>> {
    let mut rows = Vec::with_capacity(table.len()? as usize);
    for entry in table.iter()? {
        let (key, row) = entry?;
        rows.push(decode(&key.value(), row.value())?);
    }
    Ok(rows)
}

/// The child ids an index holds for one parent, in creation order.
fn children(index: &impl ReadableTable<(u128, u128), ()>, parent: u128) -> Result<Vec<u128>> {
    let mut ids = Vec::new();
    for entry in index.range((parent, 0u128)..=(parent, u128::MAX))? {
        let (key, _) = entry?;
        ids.push(key.value().1);
    }
    Ok(ids)
}

/// Counts what an environment holds, through its indexes: images, the bytes of their
/// built target images, and the builds and pushes not yet finished.
fn usage_in(
    images_by_environment: &impl ReadableTable<(u64, u128), ()>,
    builds_by_image: &impl ReadableTable<(u128, u128), ()>,
    target_images_by_build: &impl ReadableTable<(u128, u128), ()>,
    target_images: &impl ReadableTable<u128, &'static [u8]>,
    provider_images_by_target_image: &impl ReadableTable<(u128, u128), ()>,
    provider_images: &impl ReadableTable<u128, &'static [u8]>,
    environment: u64,
) -> Result<Usage> {
    let mut usage = Usage::default();
    for entry in images_by_environment.range((environment, 0u128)..=(environment, u128::MAX))? {
        let image = entry?.0.value().1;
        usage.images += 1;
        for build in children(builds_by_image, image)? {
            for ti in children(target_images_by_build, build)? {
                if let Some(ti) = get::<u128, TargetImage>(target_images, ti)? {
                    usage.stored_bytes += ti.disk.as_ref().map_or(0, |d| d.size);
                    usage.queued_jobs += u64::from(!ti.progress.status.is_terminal());
                }
                for pi in children(provider_images_by_target_image, ti)? {
                    if let Some(pi) = get::<u128, ProviderImage>(provider_images, pi)? {
                        usage.queued_jobs += u64::from(!pi.progress.status.is_terminal());
                    }
                }
            }
        }
    }
    Ok(usage)
}

fn put<'k, K: Key + 'static, T: Row>(
    table: &mut Table<K, &'static [u8]>,
    key: impl Borrow<K::SelfType<'k>>,
    value: &T,
) -> Result<()> {
    table.insert(key, value.encode().as_slice())?;
    Ok(())
}

/// What a cascading delete removed, so the caller can report the provider content and
/// remove image files.
#[derive(Debug, Default)]
pub struct Removed {
    pub target_images: Vec<TargetImage>,
    pub provider_images: Vec<ProviderImage>,
    /// Jobs, stored in the same transaction, that remove the deleted provider images from
    /// their providers; one per provider image that had been pushed.
    pub deletions: Vec<Job>,
}

pub struct Store {
    db: Database,
    /// Seals account credentials: they are stored only encrypted (AES-256-GCM).
    cipher: Aes256Gcm,
    /// Odd while a write is being committed, even otherwise; grows by two with each
    /// commit (see [`Store::generation`]).
    generation: AtomicU64,
    /// Pairs each commit's two steps of `generation`: redb lets the next write begin as
    /// soon as a commit is done, before that commit's second step.
    committing: std::sync::Mutex<()>,
}

/// The key that seals credentials: 32 bytes.
pub type CredentialKey = [u8; 32];

impl Store {
    /// Opens (or creates) the database, creates missing tables, and refuses a file written
    /// with another schema version.
    pub fn open(path: &Path, key: &CredentialKey) -> Result<Store> {
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse,
            e => e.into(),
        })?;
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let found = meta.get("schema-version")?.map(|v| v.value());
            match found {
                None => {
                    meta.insert("schema-version", SCHEMA_VERSION)?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(found) => return Err(StoreError::SchemaMismatch { found }),
            }
            txn.open_table(ENVIRONMENTS)?;
            txn.open_table(USERS)?;
            txn.open_table(PROVIDERS)?;
            txn.open_table(ACCOUNTS)?;
            txn.open_table(IMAGES)?;
            txn.open_table(BUILDS)?;
            txn.open_table(TARGET_IMAGES)?;
            txn.open_table(PROVIDER_IMAGES)?;
            txn.open_table(JOBS)?;
            txn.open_table(IMAGES_BY_ENVIRONMENT)?;
            txn.open_table(BUILDS_BY_IMAGE)?;
            txn.open_table(TARGET_IMAGES_BY_BUILD)?;
            txn.open_table(PROVIDER_IMAGES_BY_TARGET_IMAGE)?;
            txn.open_table(PLUGIN_STATE)?;
            txn.open_table(HOOKS)?;
            txn.open_table(QUOTAS)?;
        }
        txn.commit()?;
        let store = Store {
            db,
            cipher: Aes256Gcm::new(key.into()),
            generation: AtomicU64::new(0),
            committing: std::sync::Mutex::new(()),
        };
        store.verify()?;
        Ok(store)
    }

    /// Reads every row of every table once, credentials opened, so that a database this
    /// release would misread (a row of an unknown version or layout, credentials sealed
    /// with another key) stops the start with the table and key of the first such row,
    /// instead of failing requests one at a time later.
    fn verify(&self) -> Result<()> {
        fn check<K: Key + 'static, T: Row>(
            table: &impl ReadableTable<K, &'static [u8]>,
        ) -> Result<()> {
            for entry in table.iter()? {
                let (key, row) = entry?;
                decode::<T>(&key.value(), row.value())?;
            }
            Ok(())
        }
        let txn = self.db.begin_read()?;
        check::<_, Environment>(&txn.open_table(ENVIRONMENTS)?)?;
        check::<_, User>(&txn.open_table(USERS)?)?;
        check::<_, Provider>(&txn.open_table(PROVIDERS)?)?;
        self.accounts_in(&txn.open_table(ACCOUNTS)?)?;
        check::<_, Image>(&txn.open_table(IMAGES)?)?;
        check::<_, Build>(&txn.open_table(BUILDS)?)?;
        check::<_, TargetImage>(&txn.open_table(TARGET_IMAGES)?)?;
        check::<_, ProviderImage>(&txn.open_table(PROVIDER_IMAGES)?)?;
        check::<_, Job>(&txn.open_table(JOBS)?)?;
        check::<_, Hook>(&txn.open_table(HOOKS)?)?;
        check::<_, Quota>(&txn.open_table(QUOTAS)?)?;
        Ok(())
    }

    /// Commits a write and counts it. Every write of this store goes through here.
    fn commit(&self, txn: WriteTransaction) -> Result<()> {
        let _one_commit = self
            .committing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.generation.fetch_add(1, Ordering::SeqCst);
        let committed = txn.commit();
        self.generation.fetch_add(1, Ordering::SeqCst);
        committed?;
        Ok(())
    }

    /// A number that changes whenever a write is committed, or `None` while one is being
    /// committed. What was read from the store after reading the generation `g` is still
    /// current while the generation is `g`: answers rendered from it can be kept and
    /// reused until then, without a transaction (and without leaving the async runtime).
    /// A write's first step comes before its data can be seen and its second after, so
    /// no answer read before a write is taken as current once the write can be seen.
    pub fn generation(&self) -> Option<u64> {
        let generation = self.generation.load(Ordering::SeqCst);
        generation.is_multiple_of(2).then_some(generation)
    }

    fn next_id(txn: &WriteTransaction, table: &str) -> Result<u64> {
        let mut meta = txn.open_table(META)?;
        let key = format!("next-id/{table}");
        let id = meta.get(key.as_str())?.map(|v| v.value()).unwrap_or(1);
        meta.insert(key.as_str(), id + 1)?;
        Ok(id)
    }

    fn seal(&self, account: &Account) -> Result<SealedAccount> {
        let nonce_bytes: [u8; 12] = rand::random();
        let plain = rows::credentials_to_bytes(&account.credentials);
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce_bytes), plain.as_slice())
            .map_err(|_| StoreError::Corrupt {
                table: SealedAccount::TABLE,
                key: account.id.to_string(),
                reason: "credentials could not be sealed".into(),
            })?;
        let mut sealed_credentials = nonce_bytes.to_vec();
        sealed_credentials.extend(sealed);
        Ok(SealedAccount {
            id: account.id,
            label: account.label.clone(),
            provider_id: account.provider_id,
            sealed_credentials,
            environments: account.environments.clone(),
            priority: account.priority,
            max_running_instances: account.max_running_instances,
        })
    }

    fn open_row(&self, row: SealedAccount) -> Result<Account> {
        let corrupt = |reason: &str| StoreError::Corrupt {
            table: SealedAccount::TABLE,
            key: row.id.to_string(),
            reason: reason.into(),
        };
        if row.sealed_credentials.len() < 12 {
            return Err(corrupt("sealed credentials are too short"));
        }
        let (nonce, sealed) = row.sealed_credentials.split_at(12);
        let plain = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), sealed)
            .map_err(|_| {
                corrupt(
                    "credentials do not open with this server's key (was the key file replaced?)",
                )
            })?;
        let credentials = rows::credentials_from_bytes(&plain).map_err(|e| corrupt(&e))?;
        Ok(Account {
            id: row.id,
            label: row.label,
            provider_id: row.provider_id,
            credentials,
            environments: row.environments,
            priority: row.priority,
            max_running_instances: row.max_running_instances,
        })
    }

    fn put_account_in(
        &self,
        table: &mut Table<u64, &'static [u8]>,
        account: &Account,
    ) -> Result<()> {
        put(table, account.id, &self.seal(account)?)
    }

    fn accounts_in(&self, table: &impl ReadableTable<u64, &'static [u8]>) -> Result<Vec<Account>> {
        all::<u64, SealedAccount>(table)?
            .into_iter()
            .map(|row| self.open_row(row))
            .collect()
    }

    // ---- environments, users, providers, accounts ----

    pub fn environments(&self) -> Result<Vec<Environment>> {
        let txn = self.db.begin_read()?;
        all(&txn.open_table(ENVIRONMENTS)?)
    }

    pub fn environment(&self, id: u64) -> Result<Option<Environment>> {
        let txn = self.db.begin_read()?;
        get(&txn.open_table(ENVIRONMENTS)?, id)
    }

    pub fn environment_by_name(&self, name: &str) -> Result<Option<Environment>> {
        Ok(self.environments()?.into_iter().find(|e| e.name == name))
    }

    /// Creates an environment, giving it the next free id.
    pub fn create_environment(&self, name: &str, description: &str) -> Result<Environment> {
        let txn = self.db.begin_write()?;
        let env = Environment {
            id: Self::next_id(&txn, "environments")?,
            name: name.into(),
            description: description.into(),
        };
        put(&mut txn.open_table(ENVIRONMENTS)?, env.id, &env)?;
        self.commit(txn)?;
        Ok(env)
    }

    pub fn put_environment(&self, env: &Environment) -> Result<()> {
        let txn = self.db.begin_write()?;
        put(&mut txn.open_table(ENVIRONMENTS)?, env.id, env)?;
        self.commit(txn)?;
        Ok(())
    }

    /// Deletes an environment that holds no images, and drops it from every account.
    /// `Ok(false)` when it still holds images.
    pub fn delete_environment(&self, id: u64) -> Result<bool> {
        let txn = self.db.begin_write()?;
        let has_images = txn
            .open_table(IMAGES_BY_ENVIRONMENT)?
            .range((id, 0u128)..=(id, u128::MAX))?
            .next()
            .is_some();
        if has_images {
            return Ok(false);
        }
        txn.open_table(ENVIRONMENTS)?.remove(id)?;
        txn.open_table(QUOTAS)?.remove(id)?;
        {
            let mut table = txn.open_table(ACCOUNTS)?;
            let accounts = self.accounts_in(&table)?;
            for mut account in accounts {
                if account.environments.contains(&id) {
                    account.environments.retain(|e| *e != id);
                    self.put_account_in(&mut table, &account)?;
                }
            }
        }
        self.commit(txn)?;
        Ok(true)
    }

    pub fn user(&self, name: &str) -> Result<Option<User>> {
        let txn = self.db.begin_read()?;
        get(&txn.open_table(USERS)?, name)
    }

    pub fn users(&self) -> Result<Vec<User>> {
        let txn = self.db.begin_read()?;
        all(&txn.open_table(USERS)?)
    }

    /// The environment an image belongs to.
    pub fn image_environment(&self, id: Id) -> Result<Option<u64>> {
        self.reader()?.image_environment(id)
    }

    /// The environment of a build's image.
    pub fn build_environment(&self, id: Id) -> Result<Option<u64>> {
        self.reader()?.build_environment(id)
    }

    /// The environment of a target image's image.
    pub fn target_image_environment(&self, id: Id) -> Result<Option<u64>> {
        self.reader()?.target_image_environment(id)
    }

    pub fn put_user(&self, user: &User) -> Result<()> {
        let txn = self.db.begin_write()?;
        put(&mut txn.open_table(USERS)?, user.name.as_str(), user)?;
        self.commit(txn)?;
        Ok(())
    }

    pub fn providers(&self) -> Result<Vec<Provider>> {
        let txn = self.db.begin_read()?;
        all(&txn.open_table(PROVIDERS)?)
    }

    pub fn provider(&self, id: u64) -> Result<Option<Provider>> {
        let txn = self.db.begin_read()?;
        get(&txn.open_table(PROVIDERS)?, id)
    }

    /// Creates a provider from `provider` with the next free id.
    pub fn create_provider(&self, mut provider: Provider) -> Result<Provider> {
        let txn = self.db.begin_write()?;
        provider.id = Self::next_id(&txn, "providers")?;
        put(&mut txn.open_table(PROVIDERS)?, provider.id, &provider)?;
        self.commit(txn)?;
        Ok(provider)
    }

    pub fn put_provider(&self, provider: &Provider) -> Result<()> {
        let txn = self.db.begin_write()?;
        put(&mut txn.open_table(PROVIDERS)?, provider.id, provider)?;
        self.commit(txn)?;
        Ok(())
    }

    /// Deletes a provider, its accounts and its plugin state.
    pub fn delete_provider(&self, id: u64) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(PROVIDERS)?.remove(id)?;
        {
            let mut table = txn.open_table(ACCOUNTS)?;
            let rows: Vec<SealedAccount> = all(&table)?;
            for row in rows.iter().filter(|a| a.provider_id == id) {
                table.remove(row.id)?;
            }
        }
        {
            let mut state = txn.open_table(PLUGIN_STATE)?;
            let keys: Vec<String> = state
                .range((id, "")..)?
                .map_while(|entry| match entry {
                    Ok((key, _)) if key.value().0 == id => Some(Ok(key.value().1.to_owned())),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<std::result::Result<_, _>>()?;
            for key in keys {
                state.remove((id, key.as_str()))?;
            }
        }
        self.commit(txn)?;
        Ok(())
    }

    pub fn put_account(&self, account: &Account) -> Result<()> {
        let txn = self.db.begin_write()?;
        self.put_account_in(&mut txn.open_table(ACCOUNTS)?, account)?;
        self.commit(txn)?;
        Ok(())
    }

    pub fn delete_account(&self, id: u64) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(ACCOUNTS)?.remove(id)?;
        self.commit(txn)?;
        Ok(())
    }

    // ---- webhooks ----

    pub fn hooks(&self) -> Result<Vec<Hook>> {
        let txn = self.db.begin_read()?;
        all(&txn.open_table(HOOKS)?)
    }

    pub fn create_hook(&self, uri: &str) -> Result<Hook> {
        let txn = self.db.begin_write()?;
        let hook = Hook {
            id: Self::next_id(&txn, "hooks")?,
            uri: uri.to_owned(),
        };
        put(&mut txn.open_table(HOOKS)?, hook.id, &hook)?;
        self.commit(txn)?;
        Ok(hook)
    }

    /// `Ok(false)` when there is no such hook.
    pub fn delete_hook(&self, id: u64) -> Result<bool> {
        let txn = self.db.begin_write()?;
        let existed = txn.open_table(HOOKS)?.remove(id)?.is_some();
        self.commit(txn)?;
        Ok(existed)
    }

    // ---- plugin state ----

    pub fn plugin_state_get(&self, provider: u64, key: &str) -> Result<Option<Vec<u8>>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PLUGIN_STATE)?;
        Ok(table.get((provider, key))?.map(|v| v.value().to_vec()))
    }

    /// Sets a key, unless the provider already holds `max_keys` other keys.
    /// `Ok(false)` when refused for that reason.
    pub fn plugin_state_set(
        &self,
        provider: u64,
        key: &str,
        value: &[u8],
        max_keys: usize,
    ) -> Result<bool> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(PLUGIN_STATE)?;
            if table.get((provider, key))?.is_none() {
                let count = table
                    .range((provider, "")..)?
                    .take_while(|e| e.as_ref().is_ok_and(|(k, _)| k.value().0 == provider))
                    .take(max_keys)
                    .count();
                if count >= max_keys {
                    return Ok(false);
                }
            }
            table.insert((provider, key), value)?;
        }
        self.commit(txn)?;
        Ok(true)
    }

    pub fn plugin_state_delete(&self, provider: u64, key: &str) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(PLUGIN_STATE)?.remove((provider, key))?;
        self.commit(txn)?;
        Ok(())
    }

    /// Keys of a provider's state that start with `prefix`, at most `limit` of them.
    pub fn plugin_state_keys(
        &self,
        provider: u64,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<String>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PLUGIN_STATE)?;
        let mut keys = Vec::new();
        for entry in table.range((provider, prefix)..)? {
            let (key, _) = entry?;
            let (p, k) = key.value();
            if p != provider || !k.starts_with(prefix) || keys.len() >= limit {
                break;
            }
            keys.push(k.to_owned());
        }
        Ok(keys)
    }

    pub fn accounts(&self) -> Result<Vec<Account>> {
        let txn = self.db.begin_read()?;
        self.accounts_in(&txn.open_table(ACCOUNTS)?)
    }

    pub fn account(&self, id: u64) -> Result<Option<Account>> {
        let txn = self.db.begin_read()?;
        match get::<u64, SealedAccount>(&txn.open_table(ACCOUNTS)?, id)? {
            Some(row) => Ok(Some(self.open_row(row)?)),
            None => Ok(None),
        }
    }

    pub fn create_account(&self, mut account: Account) -> Result<Account> {
        let txn = self.db.begin_write()?;
        account.id = Self::next_id(&txn, "accounts")?;
        self.put_account_in(&mut txn.open_table(ACCOUNTS)?, &account)?;
        self.commit(txn)?;
        Ok(account)
    }

    // ---- images and their descendants ----

    pub fn image(&self, id: Id) -> Result<Option<Image>> {
        self.reader()?.image(id)
    }

    /// All images, or those of one environment, in creation order.
    pub fn images(&self, environment: Option<u64>) -> Result<Vec<Image>> {
        let txn = self.db.begin_read()?;
        let images = txn.open_table(IMAGES)?;
        match environment {
            None => all(&images),
            Some(env) => {
                let index = txn.open_table(IMAGES_BY_ENVIRONMENT)?;
                let mut rows = Vec::new();
                for entry in index.range((env, 0u128)..=(env, u128::MAX))? {
                    let (key, _) = entry?;
                    if let Some(image) = get(&images, key.value().1)? {
                        rows.push(image);
                    }
                }
                Ok(rows)
            }
        }
    }

    /// Images (all, or one environment's) with their builds, read in one transaction:
    /// listing 10,000 images costs one index scan, not one transaction per image.
    pub fn images_with_builds(&self, environment: Option<u64>) -> Result<Vec<(Image, Vec<Build>)>> {
        let txn = self.db.begin_read()?;
        let images_table = txn.open_table(IMAGES)?;
        let images: Vec<Image> = match environment {
            None => all(&images_table)?,
            Some(env) => {
                let index = txn.open_table(IMAGES_BY_ENVIRONMENT)?;
                let mut rows = Vec::new();
                for entry in index.range((env, 0u128)..=(env, u128::MAX))? {
                    let (key, _) = entry?;
                    rows.extend(get::<u128, Image>(&images_table, key.value().1)?);
                }
                rows
            }
        };
        let builds_table = txn.open_table(BUILDS)?;
        let index = txn.open_table(BUILDS_BY_IMAGE)?;
        // Both sequences are in image-id order (the images table and the environment
        // index are keyed by it, the build index by (image, build)), so one pass over the
        // index pairs them, without a map of 10,000 entries.
        let mut keys = index.iter()?;
        let mut next = keys.next().transpose()?.map(|(key, _)| key.value());
        let mut out = Vec::with_capacity(images.len());
        for image in images {
            let id = image.id.as_u128();
            let mut builds = Vec::new();
            while let Some((owner, build)) = next {
                if owner > id {
                    break;
                }
                if owner == id {
                    builds.extend(get::<u128, Build>(&builds_table, build)?);
                }
                next = keys.next().transpose()?.map(|(key, _)| key.value());
            }
            out.push((image, builds));
        }
        Ok(out)
    }

    pub fn build(&self, id: Id) -> Result<Option<Build>> {
        self.reader()?.build(id)
    }

    /// All builds, or the builds of one image, oldest first.
    pub fn builds(&self, image: Option<Id>) -> Result<Vec<Build>> {
        self.reader()?.builds(image)
    }

    pub fn target_image(&self, id: Id) -> Result<Option<TargetImage>> {
        self.reader()?.target_image(id)
    }

    /// All target images, or those of one build, in creation order.
    pub fn target_images(&self, build: Option<Id>) -> Result<Vec<TargetImage>> {
        self.reader()?.target_images(build)
    }

    pub fn provider_image(&self, id: Id) -> Result<Option<ProviderImage>> {
        self.reader()?.provider_image(id)
    }

    /// All provider images, or those of one target image, in creation order.
    pub fn provider_images(&self, target_image: Option<Id>) -> Result<Vec<ProviderImage>> {
        self.reader()?.provider_images(target_image)
    }

    /// One read transaction for several reads: they see one state of the store, and a
    /// list that looks up each row's parents pays for one transaction, not three a row.
    pub fn reader(&self) -> Result<Reader> {
        Ok(Reader {
            txn: self.db.begin_read()?,
        })
    }

    /// Stores a build request at once: the image (when new), the build, its target images
    /// and one job per target image. Nothing is stored if any part fails.
    /// The environment's quota is checked in the same transaction, so requests made at
    /// the same moment cannot together pass it.
    pub fn create_build(
        &self,
        new_image: Option<&Image>,
        build: &Build,
        target_images: &[TargetImage],
        jobs: &[Job],
    ) -> Result<()> {
        let txn = self.db.begin_write()?;
        let environment = match new_image {
            Some(image) => Some(image.environment_id),
            None => Self::image_environment_in(&txn, build.image_id)?,
        };
        if let Some(environment) = environment {
            Self::admit(
                &txn,
                environment,
                u64::from(new_image.is_some()),
                jobs.len() as u64,
            )?;
        }
        Self::create_build_in(&txn, new_image, build, target_images)?;
        Self::put_jobs(&txn, jobs)?;
        self.commit(txn)?;
        Ok(())
    }

    fn create_build_in(
        txn: &WriteTransaction,
        new_image: Option<&Image>,
        build: &Build,
        target_images: &[TargetImage],
    ) -> Result<()> {
        if let Some(image) = new_image {
            put(&mut txn.open_table(IMAGES)?, image.id.as_u128(), image)?;
            txn.open_table(IMAGES_BY_ENVIRONMENT)?
                .insert((image.environment_id, image.id.as_u128()), ())?;
        }
        put(&mut txn.open_table(BUILDS)?, build.id.as_u128(), build)?;
        txn.open_table(BUILDS_BY_IMAGE)?
            .insert((build.image_id.as_u128(), build.id.as_u128()), ())?;
        let mut table = txn.open_table(TARGET_IMAGES)?;
        let mut index = txn.open_table(TARGET_IMAGES_BY_BUILD)?;
        for ti in target_images {
            put(&mut table, ti.id.as_u128(), ti)?;
            index.insert((ti.build_id.as_u128(), ti.id.as_u128()), ())?;
        }
        Ok(())
    }

    /// Stores a push request at once: its provider images and their jobs, within the
    /// quota of `environment`, the images' environment.
    pub fn create_push(
        &self,
        environment: u64,
        provider_images: &[ProviderImage],
        jobs: &[Job],
    ) -> Result<()> {
        let txn = self.db.begin_write()?;
        Self::admit(&txn, environment, 0, jobs.len() as u64)?;
        Self::create_push_in(&txn, provider_images)?;
        Self::put_jobs(&txn, jobs)?;
        self.commit(txn)?;
        Ok(())
    }

    fn create_push_in(txn: &WriteTransaction, provider_images: &[ProviderImage]) -> Result<()> {
        let mut table = txn.open_table(PROVIDER_IMAGES)?;
        let mut index = txn.open_table(PROVIDER_IMAGES_BY_TARGET_IMAGE)?;
        for pi in provider_images {
            put(&mut table, pi.id.as_u128(), pi)?;
            index.insert((pi.target_image_id.as_u128(), pi.id.as_u128()), ())?;
        }
        Ok(())
    }

    /// Stores an imported image in one transaction: image, build, target image and
    /// provider image, all finished.
    pub fn create_import(
        &self,
        image: &Image,
        build: &Build,
        target_image: &TargetImage,
        provider_image: &ProviderImage,
    ) -> Result<()> {
        let txn = self.db.begin_write()?;
        Self::admit(&txn, image.environment_id, 1, 0)?;
        Self::create_build_in(&txn, Some(image), build, std::slice::from_ref(target_image))?;
        Self::create_push_in(&txn, std::slice::from_ref(provider_image))?;
        self.commit(txn)?;
        Ok(())
    }

    /// The environments whose provider images name `identifier` on this provider: who
    /// pushed or imported that provider-side image.
    pub fn environments_holding(&self, provider: u64, identifier: &str) -> Result<Vec<u64>> {
        let reader = self.reader()?;
        let mut found = Vec::new();
        for pi in reader.provider_images(None)? {
            if pi.provider_id != provider || pi.target_identifier != identifier {
                continue;
            }
            if let Some(env) = reader.target_image_environment(pi.target_image_id)?
                && !found.contains(&env)
            {
                found.push(env);
            }
        }
        Ok(found)
    }

    // ---- quotas ----

    /// An environment's quota; no limits when none was set.
    pub fn quota(&self, environment: u64) -> Result<Quota> {
        let txn = self.db.begin_read()?;
        Ok(get(&txn.open_table(QUOTAS)?, environment)?.unwrap_or_default())
    }

    pub fn put_quota(&self, environment: u64, quota: &Quota) -> Result<()> {
        let txn = self.db.begin_write()?;
        put(&mut txn.open_table(QUOTAS)?, environment, quota)?;
        self.commit(txn)?;
        Ok(())
    }

    /// What an environment holds now.
    pub fn usage(&self, environment: u64) -> Result<Usage> {
        let txn = self.db.begin_read()?;
        usage_in(
            &txn.open_table(IMAGES_BY_ENVIRONMENT)?,
            &txn.open_table(BUILDS_BY_IMAGE)?,
            &txn.open_table(TARGET_IMAGES_BY_BUILD)?,
            &txn.open_table(TARGET_IMAGES)?,
            &txn.open_table(PROVIDER_IMAGES_BY_TARGET_IMAGE)?,
            &txn.open_table(PROVIDER_IMAGES)?,
            environment,
        )
    }

    /// Fails with [`StoreError::Quota`] unless `environment` may take `images` more
    /// images and `jobs` more jobs.
    fn admit(txn: &WriteTransaction, environment: u64, images: u64, jobs: u64) -> Result<()> {
        let quota: Quota = get(&txn.open_table(QUOTAS)?, environment)?.unwrap_or_default();
        if quota == Quota::default() {
            return Ok(());
        }
        let usage = usage_in(
            &txn.open_table(IMAGES_BY_ENVIRONMENT)?,
            &txn.open_table(BUILDS_BY_IMAGE)?,
            &txn.open_table(TARGET_IMAGES_BY_BUILD)?,
            &txn.open_table(TARGET_IMAGES)?,
            &txn.open_table(PROVIDER_IMAGES_BY_TARGET_IMAGE)?,
            &txn.open_table(PROVIDER_IMAGES)?,
            environment,
        )?;
        quota.admits(environment, &usage, images, jobs)?;
        Ok(())
    }

    fn image_environment_in(txn: &WriteTransaction, image: Id) -> Result<Option<u64>> {
        let image: Option<Image> = get(&txn.open_table(IMAGES)?, image.as_u128())?;
        Ok(image.map(|i| i.environment_id))
    }

    fn put_jobs(txn: &WriteTransaction, jobs: &[Job]) -> Result<()> {
        let mut table = txn.open_table(JOBS)?;
        for job in jobs {
            put(&mut table, job.id.as_u128(), job)?;
        }
        Ok(())
    }

    /// Changes a target image in place and returns the result; `None` when it no longer
    /// exists (deleted while its job ran).
    pub fn update_target_image(
        &self,
        id: Id,
        change: impl FnOnce(&mut TargetImage),
    ) -> Result<Option<TargetImage>> {
        let txn = self.db.begin_write()?;
        let updated = {
            let mut table = txn.open_table(TARGET_IMAGES)?;
            let current: Option<TargetImage> = get(&table, id.as_u128())?;
            match current {
                Some(mut ti) => {
                    change(&mut ti);
                    put(&mut table, id.as_u128(), &ti)?;
                    Some(ti)
                }
                None => None,
            }
        };
        self.commit(txn)?;
        Ok(updated)
    }

    /// Changes a provider image in place, like [`Store::update_target_image`].
    pub fn update_provider_image(
        &self,
        id: Id,
        change: impl FnOnce(&mut ProviderImage),
    ) -> Result<Option<ProviderImage>> {
        let txn = self.db.begin_write()?;
        let updated = {
            let mut table = txn.open_table(PROVIDER_IMAGES)?;
            let current: Option<ProviderImage> = get(&table, id.as_u128())?;
            match current {
                Some(mut pi) => {
                    change(&mut pi);
                    put(&mut table, id.as_u128(), &pi)?;
                    Some(pi)
                }
                None => None,
            }
        };
        self.commit(txn)?;
        Ok(updated)
    }

    // ---- jobs ----

    pub fn jobs(&self) -> Result<Vec<Job>> {
        let txn = self.db.begin_read()?;
        all(&txn.open_table(JOBS)?)
    }

    pub fn put_job(&self, job: &Job) -> Result<()> {
        let txn = self.db.begin_write()?;
        put(&mut txn.open_table(JOBS)?, job.id.as_u128(), job)?;
        self.commit(txn)?;
        Ok(())
    }

    pub fn remove_job(&self, id: Id) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(JOBS)?.remove(id.as_u128())?;
        self.commit(txn)?;
        Ok(())
    }

    // ---- cascading deletes (reference/conductor-api.md §8) ----

    /// Deletes an image, its builds, their target images and provider images, and their
    /// jobs. `None` when there is no such image.
    pub fn delete_image(&self, id: Id) -> Result<Option<Removed>> {
        let txn = self.db.begin_write()?;
        let mut removed = Removed::default();
        let image: Option<Image> = get(&txn.open_table(IMAGES)?, id.as_u128())?;
        let Some(image) = image else { return Ok(None) };
        let builds = children(&txn.open_table(BUILDS_BY_IMAGE)?, id.as_u128())?;
        for build in builds {
            Self::delete_build_in(&txn, build, &mut removed)?;
        }
        txn.open_table(IMAGES)?.remove(id.as_u128())?;
        txn.open_table(IMAGES_BY_ENVIRONMENT)?
            .remove((image.environment_id, id.as_u128()))?;
        self.commit(txn)?;
        Ok(Some(removed))
    }

    /// Deletes a build with its target images and provider images; the image stays.
    pub fn delete_build(&self, id: Id) -> Result<Option<Removed>> {
        let txn = self.db.begin_write()?;
        let mut removed = Removed::default();
        let exists = txn.open_table(BUILDS)?.get(id.as_u128())?.is_some();
        if !exists {
            return Ok(None);
        }
        Self::delete_build_in(&txn, id.as_u128(), &mut removed)?;
        self.commit(txn)?;
        Ok(Some(removed))
    }

    /// Deletes a target image with its provider images; build and image stay.
    pub fn delete_target_image(&self, id: Id) -> Result<Option<Removed>> {
        let txn = self.db.begin_write()?;
        let mut removed = Removed::default();
        let exists = txn.open_table(TARGET_IMAGES)?.get(id.as_u128())?.is_some();
        if !exists {
            return Ok(None);
        }
        Self::delete_target_image_in(&txn, id.as_u128(), &mut removed)?;
        self.commit(txn)?;
        Ok(Some(removed))
    }

    /// Deletes one provider image record.
    pub fn delete_provider_image(&self, id: Id) -> Result<Option<Removed>> {
        let txn = self.db.begin_write()?;
        let mut removed = Removed::default();
        let exists = txn
            .open_table(PROVIDER_IMAGES)?
            .get(id.as_u128())?
            .is_some();
        if !exists {
            return Ok(None);
        }
        Self::delete_provider_image_in(&txn, id.as_u128(), &mut removed)?;
        self.commit(txn)?;
        Ok(Some(removed))
    }

    fn delete_build_in(txn: &WriteTransaction, build: u128, removed: &mut Removed) -> Result<()> {
        let row: Option<Build> = get(&txn.open_table(BUILDS)?, build)?;
        let target_images = children(&txn.open_table(TARGET_IMAGES_BY_BUILD)?, build)?;
        for ti in target_images {
            Self::delete_target_image_in(txn, ti, removed)?;
        }
        txn.open_table(BUILDS)?.remove(build)?;
        if let Some(row) = row {
            txn.open_table(BUILDS_BY_IMAGE)?
                .remove((row.image_id.as_u128(), build))?;
        }
        Ok(())
    }

    fn delete_target_image_in(
        txn: &WriteTransaction,
        id: u128,
        removed: &mut Removed,
    ) -> Result<()> {
        let index = txn.open_table(PROVIDER_IMAGES_BY_TARGET_IMAGE)?;
        let provider_images = children(&index, id)?;
        drop(index);
        for pi in provider_images {
            Self::delete_provider_image_in(txn, pi, removed)?;
        }
        let row: Option<TargetImage> = get(&txn.open_table(TARGET_IMAGES)?, id)?;
        txn.open_table(TARGET_IMAGES)?.remove(id)?;
        txn.open_table(JOBS)?.remove(id)?;
        if let Some(row) = row {
            txn.open_table(TARGET_IMAGES_BY_BUILD)?
                .remove((row.build_id.as_u128(), id))?;
            removed.target_images.push(row);
        }
        Ok(())
    }

    fn delete_provider_image_in(
        txn: &WriteTransaction,
        id: u128,
        removed: &mut Removed,
    ) -> Result<()> {
        let row: Option<ProviderImage> = get(&txn.open_table(PROVIDER_IMAGES)?, id)?;
        txn.open_table(PROVIDER_IMAGES)?.remove(id)?;
        txn.open_table(JOBS)?.remove(id)?;
        if let Some(row) = row {
            txn.open_table(PROVIDER_IMAGES_BY_TARGET_IMAGE)?
                .remove((row.target_image_id.as_u128(), id))?;
            if !row.target_identifier.is_empty() {
                let job = Job {
                    id: crate::model::new_id(),
                    kind: JobKind::Delete,
                    attempts: 0,
                    deletion: Some(Deletion {
                        provider_id: row.provider_id,
                        account_id: row.account_id,
                        provider_name: row.provider_name.clone(),
                        account_label: row.account_label.clone(),
                        target_identifier: row.target_identifier.clone(),
                    }),
                };
                put(&mut txn.open_table(JOBS)?, job.id.as_u128(), &job)?;
                removed.deletions.push(job);
            }
            removed.provider_images.push(row);
        }
        Ok(())
    }
}

/// Reads made in one read transaction (see [`Store::reader`]).
pub struct Reader {
    txn: ReadTransaction,
}

impl Reader {
    /// The environment an image belongs to.
    pub fn image_environment(&self, id: Id) -> Result<Option<u64>> {
        Ok(self.image(id)?.map(|i| i.environment_id))
    }

    /// The environment of a build's image.
    pub fn build_environment(&self, id: Id) -> Result<Option<u64>> {
        match self.build(id)? {
            Some(build) => self.image_environment(build.image_id),
            None => Ok(None),
        }
    }

    /// The environment of a target image's image.
    pub fn target_image_environment(&self, id: Id) -> Result<Option<u64>> {
        match self.target_image(id)? {
            Some(ti) => self.build_environment(ti.build_id),
            None => Ok(None),
        }
    }

    pub fn image(&self, id: Id) -> Result<Option<Image>> {
        get(&self.txn.open_table(IMAGES)?, id.as_u128())
    }

    pub fn build(&self, id: Id) -> Result<Option<Build>> {
        get(&self.txn.open_table(BUILDS)?, id.as_u128())
    }

    /// All builds, or the builds of one image, oldest first.
    pub fn builds(&self, image: Option<Id>) -> Result<Vec<Build>> {
        self.all_or_children(BUILDS, BUILDS_BY_IMAGE, image)
    }

    pub fn target_image(&self, id: Id) -> Result<Option<TargetImage>> {
        get(&self.txn.open_table(TARGET_IMAGES)?, id.as_u128())
    }

    /// All target images, or those of one build, in creation order.
    pub fn target_images(&self, build: Option<Id>) -> Result<Vec<TargetImage>> {
        self.all_or_children(TARGET_IMAGES, TARGET_IMAGES_BY_BUILD, build)
    }

    pub fn provider_image(&self, id: Id) -> Result<Option<ProviderImage>> {
        get(&self.txn.open_table(PROVIDER_IMAGES)?, id.as_u128())
    }

    /// All provider images, or those of one target image, in creation order.
    pub fn provider_images(&self, target_image: Option<Id>) -> Result<Vec<ProviderImage>> {
        self.all_or_children(
            PROVIDER_IMAGES,
            PROVIDER_IMAGES_BY_TARGET_IMAGE,
            target_image,
        )
    }

    /// Every row of `table`, or, given a parent, the rows `index` lists under it, both in
    /// creation order (ids are time-ordered).
    fn all_or_children<T: Row>(
        &self,
        table: TableDefinition<u128, &'static [u8]>,
        index: TableDefinition<(u128, u128), ()>,
        parent: Option<Id>,
    ) -> Result<Vec<T>> {
        let rows = self.txn.open_table(table)?;
        let Some(parent) = parent else {
            return all(&rows);
        };
        let ids = children(&self.txn.open_table(index)?, parent.as_u128())?;
        let mut found = Vec::with_capacity(ids.len());
        for id in ids {
            found.extend(get::<u128, T>(&rows, id)?);
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> Result<tempfile::TempDir> {
        tempfile::tempdir().map_err(|e| StoreError::Corrupt {
            table: "test",
            key: String::new(),
            reason: e.to_string(),
        })
    }

    #[test]
    fn every_commit_moves_the_generation_on_and_it_is_even_between_commits() -> Result<()> {
        let dir = temp_dir()?;
        let store = Store::open(&dir.path().join("c.redb"), &[7; 32])?;
        let before = store.generation().expect("no commit under way");
        store.create_environment("one", "")?;
        let after = store.generation().expect("no commit under way");
        assert_eq!(after, before + 2);
        store.create_environment("two", "")?;
        assert_eq!(store.generation(), Some(after + 2));
        Ok(())
    }

    #[test]
    fn a_file_with_another_schema_version_is_refused_with_advice() -> Result<()> {
        let dir = temp_dir()?;
        let path = dir.path().join("c.redb");
        drop(Store::open(&path, &[7; 32])?);
        {
            let db = Database::create(&path)?;
            let txn = db.begin_write()?;
            txn.open_table(META)?.insert("schema-version", 99)?;
            txn.commit()?;
        }
        match Store::open(&path, &[7; 32]) {
            Err(e @ StoreError::SchemaMismatch { found: 99 }) => {
                assert!(e.to_string().contains("restore a backup"));
            }
            other => panic!("expected a schema mismatch, got {:?}", other.map(|_| ())),
        }
        Ok(())
    }

    #[test]
    fn a_database_holding_a_row_it_would_misread_is_not_opened() -> Result<()> {
        let dir = temp_dir()?;
        let path = dir.path().join("c.redb");
        let store = Store::open(&path, &[7; 32])?;
        let env = store.create_environment("team", "")?;
        drop(store);
        {
            let db = Database::create(&path)?;
            let txn = db.begin_write()?;
            let mut row = env.encode();
            row.push(0);
            txn.open_table(ENVIRONMENTS)?
                .insert(env.id, row.as_slice())?;
            txn.commit()?;
        }
        match Store::open(&path, &[7; 32]) {
            Err(e @ StoreError::Corrupt { .. }) => {
                let message = e.to_string();
                assert!(
                    message.contains(&format!("environments row {}", env.id)),
                    "{message}"
                );
                assert!(message.contains("left over"), "{message}");
            }
            other => panic!(
                "expected the misread row refused, got {:?}",
                other.map(|_| ())
            ),
        }
        Ok(())
    }

    #[test]
    fn credentials_sealed_with_another_key_stop_the_start_with_advice() -> Result<()> {
        let dir = temp_dir()?;
        let path = dir.path().join("c.redb");
        let store = Store::open(&path, &[7; 32])?;
        store.create_account(Account {
            id: 0,
            label: "acc".into(),
            provider_id: 1,
            credentials: vec![("username".into(), "u".into())],
            environments: vec![],
            priority: None,
            max_running_instances: None,
        })?;
        drop(store);
        match Store::open(&path, &[8; 32]) {
            Err(e) => assert!(e.to_string().contains("key file replaced"), "{e}"),
            Ok(_) => panic!("a database whose credentials do not open was opened"),
        }
        Ok(())
    }
}
