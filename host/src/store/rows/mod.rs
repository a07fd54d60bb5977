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
//! golden tests (`golden.rs`) decode them all.
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

mod images;
mod tenants;

pub(super) use tenants::{SealedAccount, credentials_from_bytes, credentials_to_bytes};

#[cfg(test)]
#[path = "../golden.rs"]
mod golden;
