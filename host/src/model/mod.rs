//! Domain types and rules: ids, statuses and their transitions, the records the server
//! keeps (images, builds, target images, provider images, environments, providers,
//! accounts, users, jobs) and TDL validation.
//!
//! Owns the vocabulary every other layer speaks. Never imports axum, redb or wasmtime:
//! records are plain serde structs, and how they are stored or shown is decided elsewhere.

pub mod tdl;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Ids of images, builds, target images and provider images. Version-7 UUIDs sort by
/// creation time, so a table scan lists records in the order they were made.
pub type Id = Uuid;

/// A fresh, time-ordered id.
pub fn new_id() -> Id {
    Uuid::now_v7()
}

/// One status vocabulary for target images and provider images (DESIGN.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    New,
    Pending,
    Building,
    Pushing,
    Complete,
    Failed,
    Deleting,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::New => "NEW",
            Status::Pending => "PENDING",
            Status::Building => "BUILDING",
            Status::Pushing => "PUSHING",
            Status::Complete => "COMPLETE",
            Status::Failed => "FAILED",
            Status::Deleting => "DELETING",
            Status::Cancelled => "CANCELLED",
        }
    }

    /// A finished job never changes status again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Complete | Status::Failed | Status::Cancelled)
    }
}

/// What is happening to a target image or provider image, shown as `percent_complete`
/// and `status_detail` after `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub status: Status,
    pub percent: u8,
    /// One line on what is happening now.
    pub activity: String,
    /// Why a FAILED job failed, in words a user can act on; empty otherwise.
    pub error: String,
}

impl Progress {
    pub fn new() -> Self {
        Progress {
            status: Status::New,
            percent: 0,
            activity: "waiting for a worker".into(),
            error: String::new(),
        }
    }

    /// Marks the work cancelled, unless it already ended: then answers how it ended.
    pub fn cancel(&mut self) -> Result<(), Status> {
        if self.status.is_terminal() {
            return Err(self.status);
        }
        self.mark_cancelled();
        Ok(())
    }

    /// Marks the work cancelled.
    pub fn mark_cancelled(&mut self) {
        self.status = Status::Cancelled;
        self.activity = "cancelled".into();
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

/// Layout of a disk image's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskFormat {
    Raw,
    Qcow2,
    Vmdk,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Vmdk => "vmdk",
        }
    }
}

/// The firmware a machine starts an image with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Firmware {
    /// The PC BIOS: boot code in the disk's first sector.
    Bios,
    /// UEFI: a boot loader in the EFI system partition.
    Uefi,
}

impl Firmware {
    pub fn as_str(self) -> &'static str {
        match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        }
    }
}

/// A tenant: Conductor's pool family. Images, and the accounts they may use, belong to one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Environment {
    pub id: u64,
    pub name: String,
    pub description: String,
}

/// What one environment may hold and run, set by global administrators. `None` is no
/// limit of that kind (the server's own limits still apply).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    /// Images, built or imported.
    pub images: Option<u64>,
    /// Bytes of built images; a build is refused once they reach it.
    pub stored_bytes: Option<u64>,
    /// Builds and pushes running at once (a smaller limit than the server's fair share
    /// takes effect for jobs that start waiting after it was set).
    pub running_jobs: Option<u64>,
    /// Builds and pushes not yet finished, running or waiting.
    pub queued_jobs: Option<u64>,
}

/// What an environment holds now, against its [`Quota`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub images: u64,
    pub stored_bytes: u64,
    pub queued_jobs: u64,
}

/// A request that would take an environment past its quota.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("environment {environment} would hold {wanted} {what}, over its quota of {limit}")]
pub struct QuotaExceeded {
    pub environment: u64,
    /// `images`, `stored bytes` or `queued jobs`.
    pub what: &'static str,
    pub limit: u64,
    pub wanted: u64,
}

impl Quota {
    /// Whether adding `images` images and `jobs` jobs to what `usage` says stays within
    /// the quota. Stored bytes are judged as they are: a build's size is known only once
    /// it is built, so builds are refused once the bytes reach the quota.
    pub fn admits(
        &self,
        environment: u64,
        usage: &Usage,
        images: u64,
        jobs: u64,
    ) -> Result<(), QuotaExceeded> {
        let over = |what, limit: Option<u64>, wanted: u64, used_only: bool| match limit {
            Some(limit) if (used_only && wanted >= limit) || (!used_only && wanted > limit) => {
                Err(QuotaExceeded {
                    environment,
                    what,
                    limit,
                    wanted,
                })
            }
            _ => Ok(()),
        };
        if images > 0 {
            over("images", self.images, usage.images + images, false)?;
            over("stored bytes", self.stored_bytes, usage.stored_bytes, true)?;
        }
        if jobs > 0 {
            over(
                "queued jobs",
                self.queued_jobs,
                usage.queued_jobs + jobs,
                false,
            )?;
        }
        Ok(())
    }
}

/// The name of the environment every server has, and where unnamed requests go.
pub const DEFAULT_ENVIRONMENT: &str = "default";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub id: Id,
    pub environment_id: u64,
    pub name: String,
    pub description: String,
    pub os: String,
    pub os_version: String,
    pub arch: String,
    /// The id the template is known by (Conductor stored templates as records of their own).
    pub template_id: Id,
    /// The TDL document the image is built from; empty for imported images.
    pub template: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Build {
    pub id: Id,
    pub image_id: Id,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetImage {
    pub id: Id,
    pub build_id: Id,
    /// The provider type's target name (`mock`, `ec2`).
    pub target: String,
    pub progress: Progress,
    /// Extra name/value pairs for the plugin's `build`, from the request.
    pub parameters: Vec<(String, String)>,
    /// The disk image the build starts from, when the request named one; otherwise the
    /// base disk is blank.
    pub base_image: Option<BaseImage>,
    /// Set when the build completes.
    pub disk: Option<Disk>,
}

/// A disk image a build request names as its starting point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseImage {
    /// `file:///…` inside the server's import directory, or `http(s)://…`.
    pub url: String,
    /// The digest of the bytes fetched, once fetched, written as a blob's name
    /// (`blobs::digest`).
    pub digest: Option<String>,
}

/// The disk image a finished build produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// The blob holding the image: its content address (`blobs::digest`).
    pub blob: String,
    pub format: DiskFormat,
    /// Size of the image file in bytes.
    pub size: u64,
    /// Size of the disk a guest sees.
    pub virtual_size: u64,
    /// The firmware the image boots with, when this server installed its OS; empty when
    /// that is not known (a blank disk, a base image from elsewhere).
    pub firmware: Vec<Firmware>,
    /// How many packages its manifest lists (kept beside the build log), when this
    /// server installed its OS.
    pub packages: Option<u32>,
    /// The boot check, when the build asked for one (`verify=boot`).
    pub check: Option<BootCheck>,
}

/// A boot of the finished image in a virtual machine, to see it reach a login prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootCheck {
    pub result: CheckResult,
    /// How long the boot ran, in whole seconds.
    pub seconds: u32,
    /// The firmware it booted with.
    pub firmware: Firmware,
    /// What went wrong, with the console's last lines; empty when it passed.
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckResult {
    Passed,
    Failed,
    TimedOut,
}

impl CheckResult {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckResult::Passed => "passed",
            CheckResult::Failed => "failed",
            CheckResult::TimedOut => "timed out",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderImage {
    pub id: Id,
    pub target_image_id: Id,
    pub provider_id: u64,
    pub account_id: u64,
    /// The provider's name and the account's label when the push was made, so the record
    /// still reads well if either is renamed or deleted later.
    pub provider_name: String,
    pub account_label: String,
    /// The provider's id of the image (`ami-…`, `Mock_<provider>_<uuid>`); empty until pushed.
    pub target_identifier: String,
    pub progress: Progress,
    pub parameters: Vec<(String, String)>,
}

/// A cloud endpoint: an instance of a provider type with its settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provider {
    pub id: u64,
    pub name: String,
    /// The provider type's target name.
    pub target: String,
    pub settings: Vec<(String, String)>,
}

/// Debug output names the credentials but never shows their values, so an account
/// that ends up in a log line leaks nothing.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub id: u64,
    pub label: String,
    pub provider_id: u64,
    pub credentials: Vec<(String, String)>,
    /// The environments this account may be used in.
    pub environments: Vec<u64>,
    /// Conductor's account priority (-100 to 100), kept and shown.
    pub priority: Option<i64>,
    /// Conductor's quota of running instances; `None` is unlimited. Kept and shown.
    pub max_running_instances: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    /// An argon2 PHC string; the password itself is never stored.
    pub password_hash: String,
    /// A global administrator: every environment, and what belongs to none (users,
    /// providers, environments themselves, hooks, plugins).
    pub admin: bool,
    /// A disabled user cannot sign in; the record stays for the audit trail.
    pub disabled: bool,
    /// The user's role in each environment they belong to.
    pub roles: Vec<(u64, Role)>,
}

/// A user's role in one environment (see docs/permissions.md for the whole table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Everything in the environment, its accounts and membership included.
    Admin,
    /// Build, import, push, cancel and delete images; see accounts without credentials.
    ImageAdmin,
    /// Look only.
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::ImageAdmin => "image_admin",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text.trim() {
            "admin" => Some(Role::Admin),
            "image_admin" => Some(Role::ImageAdmin),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}

/// What a user may want to do in an environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// See images, builds, target and provider images, accounts (without credentials).
    View,
    /// Build, import, push, cancel, delete images and what they contain.
    ManageImages,
    /// Create, change and delete accounts, show their credentials, change membership.
    ManageAccounts,
}

impl User {
    pub fn role_in(&self, environment: u64) -> Option<Role> {
        self.roles
            .iter()
            .find(|(env, _)| *env == environment)
            .map(|(_, role)| *role)
    }

    /// Whether the environment exists for this user at all: anything in one they cannot
    /// see answers as if it did not exist.
    pub fn sees(&self, environment: u64) -> bool {
        self.admin || self.role_in(environment).is_some()
    }

    pub fn may(&self, environment: u64, action: Action) -> bool {
        if self.admin {
            return true;
        }
        match (self.role_in(environment), action) {
            (None, _) => false,
            (Some(_), Action::View) => true,
            (Some(Role::Admin | Role::ImageAdmin), Action::ManageImages) => true,
            (Some(Role::Admin), Action::ManageAccounts) => true,
            _ => false,
        }
    }
}

impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.credentials.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Account")
            .field("id", &self.id)
            .field("label", &self.label)
            .field("provider_id", &self.provider_id)
            .field("credentials", &names)
            .field("environments", &self.environments)
            .finish_non_exhaustive()
    }
}

/// Durable work: one row per build or push that has not finished. The record it works on
/// carries the status users see; this row carries what a restart needs to run it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: Id,
    pub kind: JobKind,
    /// How many times the job has been started, this run included.
    pub attempts: u32,
    /// For a provider-side delete: what to delete, since its record is already gone.
    pub deletion: Option<Deletion>,
}

/// A URL that receives a POST with the target image or provider image on every status
/// change and progress report (Conductor's `/api/hooks`, version 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hook {
    pub id: u64,
    pub uri: String,
}

/// An image to remove from a provider after its record was deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deletion {
    pub provider_id: u64,
    pub account_id: u64,
    pub provider_name: String,
    pub account_label: String,
    pub target_identifier: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobKind {
    /// Build the target image with this id.
    Build,
    /// Push the provider image with this id.
    Push,
    /// Remove an image from a provider (the job's `deletion`).
    Delete,
}

/// The validation message for a new name of a record, called `what` in messages
/// ("Provider name", "Label"): Conductor's naming rules, then uniqueness (`taken`).
/// `None` when the name is acceptable.
pub fn new_name_problem(what: &str, name: &str, taken: bool) -> Option<String> {
    match name_problem(name) {
        Some(problem) => Some(format!("{what} {problem}")),
        None if taken => Some(format!("{what} has already been taken")),
        None => None,
    }
}

/// Names of environments, providers and accounts: Conductor's `^[\w -]*$`, 1 to 100
/// characters. `None` when acceptable, else the problem.
pub fn name_problem(name: &str) -> Option<&'static str> {
    if name.trim().is_empty() {
        Some("can't be blank")
    } else if name.chars().count() > 100 {
        Some("is too long (maximum is 100 characters)")
    } else if !name
        .chars()
        .all(|c| c.is_alphanumeric() || c == '_' || c == ' ' || c == '-')
    {
        Some("is invalid (letters, digits, spaces, '-' and '_' only)")
    } else {
        None
    }
}

/// The most items a target or account list may hold: more is a mistake or an attack,
/// never a real request.
pub const MAX_LIST: usize = 64;

/// Splits a comma-separated list the way users mean it: items trimmed, empty items
/// dropped (Conductor kept the spaces, so `ec2, mock` asked for a target " mock").
pub fn split_list(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_trimmed_and_empty_items_dropped() {
        assert_eq!(split_list(" ec2, mock,,"), vec!["ec2", "mock"]);
        assert!(split_list("").is_empty());
    }

    #[test]
    fn roles_grant_what_the_permission_table_says() {
        let user = |roles: Vec<(u64, Role)>| User {
            name: "u".into(),
            password_hash: String::new(),
            admin: false,
            disabled: false,
            roles,
        };
        let viewer = user(vec![(1, Role::Viewer)]);
        let images = user(vec![(1, Role::ImageAdmin)]);
        let admin = user(vec![(1, Role::Admin)]);
        for (who, view, manage_images, manage_accounts) in [
            (&viewer, true, false, false),
            (&images, true, true, false),
            (&admin, true, true, true),
        ] {
            assert_eq!(who.may(1, Action::View), view);
            assert_eq!(who.may(1, Action::ManageImages), manage_images);
            assert_eq!(who.may(1, Action::ManageAccounts), manage_accounts);
            // Nothing at all in another environment.
            assert!(!who.sees(2));
            assert!(!who.may(2, Action::View));
        }
        let global = User {
            admin: true,
            ..user(Vec::new())
        };
        assert!(global.may(7, Action::ManageAccounts) && global.sees(7));
    }

    #[test]
    fn terminal_statuses() {
        assert!(Status::Complete.is_terminal());
        assert!(Status::Failed.is_terminal());
        assert!(!Status::Building.is_terminal());
        assert_eq!(Status::Complete.as_str(), "COMPLETE");
    }
}
