//! How each table's rows are laid out on disk, apart from the model types.
//!
//! A stored row is one version byte, then the postcard encoding of that table's row type
//! for that version. postcard is positional: a field added to a model type, or two fields
//! of one type swapped, would make old rows unreadable or, worse, read them wrong. So
//! the model never touches the disk: each table has its own row types here, one per
//! version, written out field by field, and conversions to and from the model. A change
//! to what a table stores adds a `…V2` type beside the old one and a conversion from the
//! old one, and bumps the table's version; every version ever written stays readable.
//! The golden files under `store/golden/` hold rows written by past releases, and the
//! tests below decode them all.
//!
//! Enums are stored as explicit row enums too, so reordering a model enum's variants
//! changes nothing on disk.

use crate::model::{
    BaseImage, BootCheck, Build, CheckResult, Deletion, Disk, DiskFormat, Environment, Firmware,
    Hook, Id, Image, Job, JobKind, Progress, Provider, ProviderImage, Quota, Role, Status,
    TargetImage, User,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A model type stored in one table.
pub(super) trait Row: Sized {
    /// The table's name in messages.
    const TABLE: &'static str;
    /// The version this release writes.
    const VERSION: u8;
    fn encode(&self) -> Vec<u8>;
    /// Reads a row of any version this release knows; the error says why not.
    fn decode(bytes: &[u8]) -> Result<Self, RowError>;
}

/// Why a stored row cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum RowError {
    #[error("empty row")]
    Empty,
    #[error(
        "row version {version} is unknown to this server (it reads {table} rows up to version \
         {known}); a newer release wrote it"
    )]
    UnknownVersion {
        table: &'static str,
        version: u8,
        known: u8,
    },
    #[error("{0}")]
    Layout(#[from] postcard::Error),
    #[error("{0} bytes left over after the row: it was written in another layout")]
    LeftOver(usize),
}

/// The version byte, then the row type's postcard encoding.
fn versioned<R: Serialize>(version: u8, row: &R) -> Vec<u8> {
    let mut bytes = vec![version];
    // postcard only fails for types serde cannot describe, which row types never are.
    bytes.extend(postcard::to_stdvec(row).unwrap_or_default());
    bytes
}

/// Splits off the version byte.
fn version_of(bytes: &[u8]) -> Result<(u8, &[u8]), RowError> {
    match bytes.split_first() {
        Some((version, rest)) => Ok((*version, rest)),
        None => Err(RowError::Empty),
    }
}

/// Decodes a whole row: bytes left over mean the row was not written as this type, and
/// reading it anyway would misread it.
fn exactly<R: DeserializeOwned>(bytes: &[u8]) -> Result<R, RowError> {
    let (row, rest) = postcard::take_from_bytes(bytes)?;
    if rest.is_empty() {
        Ok(row)
    } else {
        Err(RowError::LeftOver(rest.len()))
    }
}

fn unknown_version(table: &'static str, version: u8, known: u8) -> RowError {
    RowError::UnknownVersion {
        table,
        version,
        known,
    }
}

/// Implements [`Row`] for a model type whose table has one version so far.
macro_rules! one_version {
    ($model:ty, $table:literal, $v1:ty) => {
        impl Row for $model {
            const TABLE: &'static str = $table;
            const VERSION: u8 = 1;
            fn encode(&self) -> Vec<u8> {
                versioned(Self::VERSION, &<$v1>::from(self))
            }
            fn decode(bytes: &[u8]) -> Result<Self, RowError> {
                match version_of(bytes)? {
                    (1, rest) => Ok(exactly::<$v1>(rest)?.into()),
                    (version, _) => Err(unknown_version($table, version, 1)),
                }
            }
        }
    };
}

// ---- shared parts, version 1 ----

#[derive(Serialize, Deserialize, Clone, Copy)]
enum StatusV1 {
    New,
    Pending,
    Building,
    Pushing,
    Complete,
    Failed,
    Deleting,
    Cancelled,
}

impl From<Status> for StatusV1 {
    fn from(status: Status) -> Self {
        match status {
            Status::New => StatusV1::New,
            Status::Pending => StatusV1::Pending,
            Status::Building => StatusV1::Building,
            Status::Pushing => StatusV1::Pushing,
            Status::Complete => StatusV1::Complete,
            Status::Failed => StatusV1::Failed,
            Status::Deleting => StatusV1::Deleting,
            Status::Cancelled => StatusV1::Cancelled,
        }
    }
}

impl From<StatusV1> for Status {
    fn from(status: StatusV1) -> Self {
        match status {
            StatusV1::New => Status::New,
            StatusV1::Pending => Status::Pending,
            StatusV1::Building => Status::Building,
            StatusV1::Pushing => Status::Pushing,
            StatusV1::Complete => Status::Complete,
            StatusV1::Failed => Status::Failed,
            StatusV1::Deleting => Status::Deleting,
            StatusV1::Cancelled => Status::Cancelled,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct ProgressV1 {
    status: StatusV1,
    percent: u8,
    activity: String,
    error: String,
}

impl From<&Progress> for ProgressV1 {
    fn from(p: &Progress) -> Self {
        ProgressV1 {
            status: p.status.into(),
            percent: p.percent,
            activity: p.activity.clone(),
            error: p.error.clone(),
        }
    }
}

impl From<ProgressV1> for Progress {
    fn from(p: ProgressV1) -> Self {
        Progress {
            status: p.status.into(),
            percent: p.percent,
            activity: p.activity,
            error: p.error,
        }
    }
}

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
pub(super) struct SealedAccount {
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
pub(super) fn credentials_to_bytes(credentials: &[(String, String)]) -> Vec<u8> {
    // postcard fails only for types serde cannot describe; pairs of strings never do.
    postcard::to_stdvec(credentials).unwrap_or_default()
}

pub(super) fn credentials_from_bytes(bytes: &[u8]) -> Result<Vec<(String, String)>, RowError> {
    exactly(bytes)
}

// ---- images ----

#[derive(Serialize, Deserialize)]
struct ImageV1 {
    id: Id,
    environment_id: u64,
    name: String,
    description: String,
    os: String,
    os_version: String,
    arch: String,
    template_id: Id,
    template: String,
}

impl From<&Image> for ImageV1 {
    fn from(i: &Image) -> Self {
        ImageV1 {
            id: i.id,
            environment_id: i.environment_id,
            name: i.name.clone(),
            description: i.description.clone(),
            os: i.os.clone(),
            os_version: i.os_version.clone(),
            arch: i.arch.clone(),
            template_id: i.template_id,
            template: i.template.clone(),
        }
    }
}

impl From<ImageV1> for Image {
    fn from(i: ImageV1) -> Self {
        Image {
            id: i.id,
            environment_id: i.environment_id,
            name: i.name,
            description: i.description,
            os: i.os,
            os_version: i.os_version,
            arch: i.arch,
            template_id: i.template_id,
            template: i.template,
        }
    }
}

one_version!(Image, "images", ImageV1);

// ---- builds ----

#[derive(Serialize, Deserialize)]
struct BuildV1 {
    id: Id,
    image_id: Id,
}

impl From<&Build> for BuildV1 {
    fn from(b: &Build) -> Self {
        BuildV1 {
            id: b.id,
            image_id: b.image_id,
        }
    }
}

impl From<BuildV1> for Build {
    fn from(b: BuildV1) -> Self {
        Build {
            id: b.id,
            image_id: b.image_id,
        }
    }
}

one_version!(Build, "builds", BuildV1);

// ---- target images ----

#[derive(Serialize, Deserialize)]
struct BaseImageV1 {
    url: String,
    /// A blob name's form of the digest (`blobs::digest`): a plain SHA-256 in rows
    /// written before the sparse digest, the same position after.
    digest: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy)]
enum DiskFormatV1 {
    Raw,
    Qcow2,
    Vmdk,
}

#[derive(Serialize, Deserialize)]
struct DiskV1 {
    /// The blob's name: a plain SHA-256 then, either kind now (`blobs::digest`).
    blob: String,
    format: DiskFormatV1,
    size: u64,
    virtual_size: u64,
}

#[derive(Serialize, Deserialize)]
struct TargetImageV1 {
    id: Id,
    build_id: Id,
    target: String,
    progress: ProgressV1,
    parameters: Vec<(String, String)>,
    base_image: Option<BaseImageV1>,
    disk: Option<DiskV1>,
}

impl From<TargetImageV1> for TargetImage {
    fn from(t: TargetImageV1) -> Self {
        TargetImageV2 {
            id: t.id,
            build_id: t.build_id,
            target: t.target,
            progress: t.progress,
            parameters: t.parameters,
            base_image: t.base_image,
            // What version 1 did not record is not known.
            disk: t.disk.map(|d| DiskV2 {
                blob: d.blob,
                format: d.format,
                size: d.size,
                virtual_size: d.virtual_size,
                firmware: Vec::new(),
            }),
        }
        .into()
    }
}

#[derive(Serialize, Deserialize, Clone, Copy)]
enum FirmwareV1 {
    Bios,
    Uefi,
}

/// Version 2 adds the firmware a disk boots with.
#[derive(Serialize, Deserialize)]
struct DiskV2 {
    blob: String,
    format: DiskFormatV1,
    size: u64,
    virtual_size: u64,
    firmware: Vec<FirmwareV1>,
}

#[derive(Serialize, Deserialize)]
struct TargetImageV2 {
    id: Id,
    build_id: Id,
    target: String,
    progress: ProgressV1,
    parameters: Vec<(String, String)>,
    base_image: Option<BaseImageV1>,
    disk: Option<DiskV2>,
}

impl From<TargetImageV2> for TargetImage {
    fn from(t: TargetImageV2) -> Self {
        TargetImageV3 {
            id: t.id,
            build_id: t.build_id,
            target: t.target,
            progress: t.progress,
            parameters: t.parameters,
            base_image: t.base_image,
            // What version 2 did not record is not known.
            disk: t.disk.map(|d| DiskV3 {
                blob: d.blob,
                format: d.format,
                size: d.size,
                virtual_size: d.virtual_size,
                firmware: d.firmware,
                packages: None,
                check: None,
            }),
        }
        .into()
    }
}

#[derive(Serialize, Deserialize, Clone, Copy)]
enum CheckResultV1 {
    Passed,
    Failed,
    TimedOut,
}

#[derive(Serialize, Deserialize)]
struct BootCheckV1 {
    result: CheckResultV1,
    seconds: u32,
    firmware: FirmwareV1,
    detail: String,
}

/// Version 3 adds the count of the manifest's packages and the boot check.
#[derive(Serialize, Deserialize)]
struct DiskV3 {
    blob: String,
    format: DiskFormatV1,
    size: u64,
    virtual_size: u64,
    firmware: Vec<FirmwareV1>,
    packages: Option<u32>,
    check: Option<BootCheckV1>,
}

#[derive(Serialize, Deserialize)]
struct TargetImageV3 {
    id: Id,
    build_id: Id,
    target: String,
    progress: ProgressV1,
    parameters: Vec<(String, String)>,
    base_image: Option<BaseImageV1>,
    disk: Option<DiskV3>,
}

fn firmware_v1(f: Firmware) -> FirmwareV1 {
    match f {
        Firmware::Bios => FirmwareV1::Bios,
        Firmware::Uefi => FirmwareV1::Uefi,
    }
}

fn firmware_of(f: FirmwareV1) -> Firmware {
    match f {
        FirmwareV1::Bios => Firmware::Bios,
        FirmwareV1::Uefi => Firmware::Uefi,
    }
}

impl From<&TargetImage> for TargetImageV3 {
    fn from(t: &TargetImage) -> Self {
        TargetImageV3 {
            id: t.id,
            build_id: t.build_id,
            target: t.target.clone(),
            progress: (&t.progress).into(),
            parameters: t.parameters.clone(),
            base_image: t.base_image.as_ref().map(|b| BaseImageV1 {
                url: b.url.clone(),
                digest: b.digest.clone(),
            }),
            disk: t.disk.as_ref().map(|d| DiskV3 {
                blob: d.blob.clone(),
                format: match d.format {
                    DiskFormat::Raw => DiskFormatV1::Raw,
                    DiskFormat::Qcow2 => DiskFormatV1::Qcow2,
                    DiskFormat::Vmdk => DiskFormatV1::Vmdk,
                },
                size: d.size,
                virtual_size: d.virtual_size,
                firmware: d.firmware.iter().copied().map(firmware_v1).collect(),
                packages: d.packages,
                check: d.check.as_ref().map(|c| BootCheckV1 {
                    result: match c.result {
                        CheckResult::Passed => CheckResultV1::Passed,
                        CheckResult::Failed => CheckResultV1::Failed,
                        CheckResult::TimedOut => CheckResultV1::TimedOut,
                    },
                    seconds: c.seconds,
                    firmware: firmware_v1(c.firmware),
                    detail: c.detail.clone(),
                }),
            }),
        }
    }
}

impl From<TargetImageV3> for TargetImage {
    fn from(t: TargetImageV3) -> Self {
        TargetImage {
            id: t.id,
            build_id: t.build_id,
            target: t.target,
            progress: t.progress.into(),
            parameters: t.parameters,
            base_image: t.base_image.map(|b| BaseImage {
                url: b.url,
                digest: b.digest,
            }),
            disk: t.disk.map(|d| Disk {
                blob: d.blob,
                format: match d.format {
                    DiskFormatV1::Raw => DiskFormat::Raw,
                    DiskFormatV1::Qcow2 => DiskFormat::Qcow2,
                    DiskFormatV1::Vmdk => DiskFormat::Vmdk,
                },
                size: d.size,
                virtual_size: d.virtual_size,
                firmware: d.firmware.into_iter().map(firmware_of).collect(),
                packages: d.packages,
                check: d.check.map(|c| BootCheck {
                    result: match c.result {
                        CheckResultV1::Passed => CheckResult::Passed,
                        CheckResultV1::Failed => CheckResult::Failed,
                        CheckResultV1::TimedOut => CheckResult::TimedOut,
                    },
                    seconds: c.seconds,
                    firmware: firmware_of(c.firmware),
                    detail: c.detail,
                }),
            }),
        }
    }
}

impl Row for TargetImage {
    const TABLE: &'static str = "target images";
    const VERSION: u8 = 3;
    fn encode(&self) -> Vec<u8> {
        versioned(Self::VERSION, &TargetImageV3::from(self))
    }
    fn decode(bytes: &[u8]) -> Result<Self, RowError> {
        match version_of(bytes)? {
            (1, rest) => Ok(exactly::<TargetImageV1>(rest)?.into()),
            (2, rest) => Ok(exactly::<TargetImageV2>(rest)?.into()),
            (3, rest) => Ok(exactly::<TargetImageV3>(rest)?.into()),
            (version, _) => Err(unknown_version(Self::TABLE, version, Self::VERSION)),
        }
    }
}

// ---- provider images ----

#[derive(Serialize, Deserialize)]
struct ProviderImageV1 {
    id: Id,
    target_image_id: Id,
    provider_id: u64,
    account_id: u64,
    provider_name: String,
    account_label: String,
    target_identifier: String,
    progress: ProgressV1,
    parameters: Vec<(String, String)>,
}

impl From<&ProviderImage> for ProviderImageV1 {
    fn from(p: &ProviderImage) -> Self {
        ProviderImageV1 {
            id: p.id,
            target_image_id: p.target_image_id,
            provider_id: p.provider_id,
            account_id: p.account_id,
            provider_name: p.provider_name.clone(),
            account_label: p.account_label.clone(),
            target_identifier: p.target_identifier.clone(),
            progress: (&p.progress).into(),
            parameters: p.parameters.clone(),
        }
    }
}

impl From<ProviderImageV1> for ProviderImage {
    fn from(p: ProviderImageV1) -> Self {
        ProviderImage {
            id: p.id,
            target_image_id: p.target_image_id,
            provider_id: p.provider_id,
            account_id: p.account_id,
            provider_name: p.provider_name,
            account_label: p.account_label,
            target_identifier: p.target_identifier,
            progress: p.progress.into(),
            parameters: p.parameters,
        }
    }
}

one_version!(ProviderImage, "provider images", ProviderImageV1);

// ---- jobs ----

#[derive(Serialize, Deserialize, Clone, Copy)]
enum JobKindV1 {
    Build,
    Push,
    Delete,
}

#[derive(Serialize, Deserialize)]
struct DeletionV1 {
    provider_id: u64,
    account_id: u64,
    provider_name: String,
    account_label: String,
    target_identifier: String,
}

#[derive(Serialize, Deserialize)]
struct JobV1 {
    id: Id,
    kind: JobKindV1,
    attempts: u32,
    deletion: Option<DeletionV1>,
}

impl From<&Job> for JobV1 {
    fn from(j: &Job) -> Self {
        JobV1 {
            id: j.id,
            kind: match j.kind {
                JobKind::Build => JobKindV1::Build,
                JobKind::Push => JobKindV1::Push,
                JobKind::Delete => JobKindV1::Delete,
            },
            attempts: j.attempts,
            deletion: j.deletion.as_ref().map(|d| DeletionV1 {
                provider_id: d.provider_id,
                account_id: d.account_id,
                provider_name: d.provider_name.clone(),
                account_label: d.account_label.clone(),
                target_identifier: d.target_identifier.clone(),
            }),
        }
    }
}

impl From<JobV1> for Job {
    fn from(j: JobV1) -> Self {
        Job {
            id: j.id,
            kind: match j.kind {
                JobKindV1::Build => JobKind::Build,
                JobKindV1::Push => JobKind::Push,
                JobKindV1::Delete => JobKind::Delete,
            },
            attempts: j.attempts,
            deletion: j.deletion.map(|d| Deletion {
                provider_id: d.provider_id,
                account_id: d.account_id,
                provider_name: d.provider_name,
                account_label: d.account_label,
                target_identifier: d.target_identifier,
            }),
        }
    }
}

one_version!(Job, "jobs", JobV1);

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

#[cfg(test)]
#[path = "golden.rs"]
mod golden;
