//! Metadata in one redb file: typed tables, row codecs, the schema version, and the
//! transactions that keep rows and their indexes in step.
//!
//! Owns every byte in `conductor.redb`. Never imports axum or wasmtime. Calls block on
//! disk, so async callers run them on the blocking pool.

mod images;
mod rows;
mod tables;
mod tenants;

pub use images::Reader;
pub use rows::RowError;

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
        reason: Unreadable,
    },
    /// The blocking task that read the rows did not finish (it panicked, or the runtime
    /// is shutting down).
    #[error("reading the stored {0} was interrupted: {1}")]
    Interrupted(&'static str, String),
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

/// Why a stored row is unreadable.
#[derive(Debug, thiserror::Error)]
pub enum Unreadable {
    #[error(transparent)]
    Row(#[from] rows::RowError),
    #[error("credentials could not be sealed")]
    Unsealable,
    #[error("sealed credentials are too short")]
    SealTooShort,
    #[error("credentials do not open with this server's key (was the key file replaced?)")]
    WrongKey,
}

/// Decodes one stored row, naming its table and key when it cannot be read.
fn decode<T: Row>(key: &dyn std::fmt::Debug, bytes: &[u8]) -> Result<T> {
    T::decode(bytes).map_err(|reason| StoreError::Corrupt {
        table: T::TABLE,
        key: format!("{key:?}"),
        reason: reason.into(),
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
                reason: Unreadable::Unsealable,
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
        let corrupt = |reason: Unreadable| StoreError::Corrupt {
            table: SealedAccount::TABLE,
            key: row.id.to_string(),
            reason,
        };
        if row.sealed_credentials.len() < 12 {
            return Err(corrupt(Unreadable::SealTooShort));
        }
        let (nonce, sealed) = row.sealed_credentials.split_at(12);
        let plain = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), sealed)
            .map_err(|_| corrupt(Unreadable::WrongKey))?;
        let credentials =
            rows::credentials_from_bytes(&plain).map_err(|e| corrupt(Unreadable::Row(e)))?;
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> Result<tempfile::TempDir> {
        Ok(tempfile::tempdir().expect("a temporary directory"))
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
