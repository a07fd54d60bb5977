//! Installing the operating system a template names: the host stage of a build that runs
//! before the plugin's part (Image Factory's base image, then target images).
//!
//! Installers cannot run inside a WebAssembly plugin, so this stage runs the field's own
//! tools (mmdebstrap, mkfs, sfdisk, mtools, bubblewrap) as external processes, each one a
//! [`run::Step`] with a deadline, a work directory and a cleared environment, in its own
//! process group so that a cancel or a shutdown ends all of it. A tenant's commands run
//! in bubblewrap with no network and nothing of the host in view (docs/os-builds.md says
//! what that holds and what it does not).
//!
//! One module per OS family ([`debian`]); [`Installer::plan`] decides at request time
//! whether a template can be installed here and refuses what must not be (a mirror the
//! operator has not allowed). Installed trees are cached by what they contain (OS,
//! version, arch, mirror, packages) and finished disks by everything that went into
//! them, so all targets of one build share one install, and a build with the same OS and
//! packages but other files or commands skips the install. Nothing half-made ever gets
//! its final name: trees and disks are made under a temporary name and renamed.
//!
//! Never imports axum, redb or wasmtime.

pub mod boot;
mod debian;
pub mod manifest;
mod refusal;
pub mod run;
pub mod sources;
pub mod userns;

use crate::blobs::hex;
use crate::lock;
use crate::model::Firmware;
use crate::model::tdl::{Body, Template};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

pub use refusal::Refusal;
pub use run::Log;

/// The percent of a build reached when its OS is installed; the plugin's part fills the
/// rest.
pub const INSTALLED_PERCENT: u8 = 80;

/// What an operator sets about OS installs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Mirrors the installer may fetch from (URL prefixes). Empty: the mirrors this
    /// machine's apt sources name.
    pub mirrors: Vec<String>,
    /// The longest one step (the package install, a filesystem) may take.
    pub step_deadline: Duration,
    /// The longest one of a template's commands may take.
    pub command_deadline: Duration,
    /// Bytes the cache of installed trees and finished disks may hold on disk.
    pub cache_limit: u64,
    /// Where installed trees, finished disks and downloaded packages are kept;
    /// `<data>/os-cache` when unset. Servers may share one.
    pub cache_dir: Option<PathBuf>,
    /// The longest a boot check may wait for a login prompt.
    pub boot_deadline: Duration,
    /// Whether a build that does not say (`verify`) gets a boot check.
    pub check_every_build: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            mirrors: Vec::new(),
            step_deadline: Duration::from_secs(30 * 60),
            command_deadline: Duration::from_secs(10 * 60),
            cache_limit: 20 << 30,
            cache_dir: None,
            boot_deadline: Duration::from_secs(300),
            check_every_build: false,
        }
    }
}

/// Why an install failed, in words for `status_detail/error`.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{0}")]
    Step(#[from] run::StepError),
    #[error("{0}")]
    Io(String),
}

impl InstallError {
    fn io(what: &str, error: impl std::fmt::Display) -> InstallError {
        InstallError::Io(format!("{what}: {error}"))
    }

    pub fn is_stop(&self) -> bool {
        matches!(self, InstallError::Step(run::StepError::Stopped))
    }
}

/// A finished install: the disk, shared through the cache, and what dpkg says it holds.
pub struct Installed {
    pub disk: PathBuf,
    pub packages: Vec<manifest::Package>,
}

/// An install a template asks for, checked against what this server can do and allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The OS as users name it ("Debian 12 (bookworm) x86_64").
    pub title: String,
    family: Family,
    disk_size: u64,
    content: Customization,
}

impl Plan {
    /// The firmware the installed disk boots with.
    /// The mirror its packages come from.
    pub fn mirror(&self) -> &str {
        match &self.family {
            Family::Debian(release) => release.mirror(),
        }
    }

    pub fn firmware(&self) -> Vec<Firmware> {
        match self.family {
            // systemd-boot in the EFI system partition, syslinux behind a GPT MBR.
            Family::Debian(_) => vec![Firmware::Uefi, Firmware::Bios],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Family {
    Debian(debian::Release),
}

/// What a template puts into the OS after its packages, with bodies decoded.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Customization {
    root_password: Option<String>,
    files: Vec<(String, Vec<u8>)>,
    /// `(name, script)`: precommands first, then commands, in their order.
    commands: Vec<(String, Vec<u8>)>,
}

/// A package name any OS family's tools take as a name and never as an option: what a
/// plugin may say its target needs. Each family checks its own rule when it installs.
pub fn package_name(name: &str) -> Result<(), Refusal> {
    let ok = name.len() >= 2
        && name.len() <= 128
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-._".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Refusal::PackageName {
            name: name.to_owned(),
            family: "",
        })
    }
}

/// Progress of an install: a percent of the whole build and a line on what is happening.
pub type Progress<'a> = &'a mut dyn FnMut(u8, &str);

/// The programs an OS family needs, and which of them this machine lacks.
fn missing(programs: &[&str]) -> Vec<String> {
    programs
        .iter()
        .filter(|p| which(p).is_none())
        .map(|p| p.to_string())
        .collect()
}

/// This server's own binary, which runs the sandbox's user namespace (userns.rs). The
/// link, not its target: it still starts the running binary when an upgrade has
/// replaced the file on disk.
fn own_binary() -> PathBuf {
    PathBuf::from("/proc/self/exe")
}

/// The path of `program` on the server's PATH (or the usual system directories).
pub(crate) fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain([
            "/usr/local/sbin",
            "/usr/local/bin",
            "/usr/sbin",
            "/usr/bin",
            "/sbin",
            "/bin",
        ])
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

pub struct Installer {
    settings: Settings,
    /// The allowed mirrors, each ending in `/`.
    mirrors: Vec<String>,
    /// Programs missing for Debian installs; empty when it can install.
    debian_missing: Vec<String>,
    /// The cache: trees/, disks/, packages/.
    dir: PathBuf,
    /// `<data>/os-work`: work directories of installs under way, this server's alone.
    work: PathBuf,
    /// The trees and disks being made (by key), so two targets of one build wait for
    /// one install instead of making it twice, and collection leaves them alone.
    making: Mutex<HashSet<String>>,
    made: Condvar,
    /// The trees that disks being made read now (an overlay over each), with how many
    /// read each: collection leaves them alone too.
    reading: Mutex<HashMap<String, usize>>,
}

impl Installer {
    /// An installer with the tools this machine has, keeping its cache where the
    /// settings say and its work under `data`.
    pub fn new(data: &Path, settings: Settings) -> std::io::Result<Installer> {
        let dir = settings
            .cache_dir
            .clone()
            .unwrap_or_else(|| data.join("os-cache"));
        for sub in ["trees", "disks", "packages"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let work = data.join("os-work");
        std::fs::create_dir_all(&work)?;
        // Work directories of installs a stopped server left behind are of no use.
        if let Ok(entries) = std::fs::read_dir(&work) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let mirrors = if settings.mirrors.is_empty() {
            sources::apt_mirrors(Path::new("/etc/apt"))
        } else {
            settings.mirrors.clone()
        };
        let mirrors = mirrors.iter().map(|m| with_slash(m)).collect();
        let mut debian_missing = missing(debian::PROGRAMS);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            // The sandbox maps the image's users and groups, which only root may do.
            debian_missing.push("root (the server must run as root to install an OS)".into());
        }
        Ok(Installer {
            debian_missing,
            settings,
            mirrors,
            dir,
            work,
            making: Mutex::new(HashSet::new()),
            made: Condvar::new(),
            reading: Mutex::new(HashMap::new()),
        })
    }

    /// One line per OS family for the start-up log: what it installs, or what it lacks.
    pub fn describe(&self) -> Vec<String> {
        let mirrors = if self.mirrors.is_empty() {
            "no mirror allowed (--os-mirror)".to_owned()
        } else {
            format!("from {}", self.mirrors.join(", "))
        };
        vec![if self.debian_missing.is_empty() {
            format!("installs {} {mirrors}", debian::SUPPORTED)
        } else {
            format!(
                "cannot install Debian: {} missing (Debian packages: {})",
                self.debian_missing.join(", "),
                debian::HOST_PACKAGES
            )
        }]
    }

    /// The OSes this server installs, for refusals.
    pub fn installable(&self) -> String {
        if self.debian_missing.is_empty() {
            debian::SUPPORTED.to_owned()
        } else {
            "none (the tools are missing)".to_owned()
        }
    }

    /// Whether this server installs `template`'s OS: `Ok(None)` when it does not (the
    /// build starts from a blank disk, or the base image it names), `Err` with the reason
    /// when the template asks for an install this server must refuse.
    ///
    /// `needed` are packages the build's targets need in their images (cloud-init),
    /// each with the target that needs it; they are installed with the template's.
    pub fn plan(
        &self,
        template: &Template,
        needed: &[(String, String)],
    ) -> Result<Option<Plan>, Refusal> {
        let Some(release) = debian::release(template) else {
            return Ok(None);
        };
        if !self.debian_missing.is_empty() {
            return Ok(None);
        }
        let content = &template.content;
        let Some(url) = content.install_url.as_deref() else {
            return Err(Refusal::NoInstallUrl {
                os: release.title(),
            });
        };
        self.allowed(url, "the install url")?;
        for repo in &content.repositories {
            let url = debian::repository_url(&repo.url)?;
            self.allowed(url, &format!("repository '{}'", repo.name))?;
        }
        for name in &content.packages {
            debian::package_name(name)?;
        }
        for (target, name) in needed {
            debian::package_name(name).map_err(|e| match e {
                Refusal::PackageName { name, family } => Refusal::TargetNeeds {
                    target: target.clone(),
                    name,
                    family,
                },
                other => other,
            })?;
        }
        let mut packages = content.packages.clone();
        packages.extend(needed.iter().map(|(_, name)| name.clone()));
        let bodies = |what: &'static str, name: &str, body: &Body| match body {
            Body::Bytes(bytes) => Ok(bytes.clone()),
            Body::Url(_) => Err(Refusal::ByUrl {
                what,
                name: name.to_owned(),
            }),
        };
        let mut files = Vec::new();
        for file in &content.files {
            debian::file_path(&file.path)?;
            files.push((file.path.clone(), bodies("file", &file.path, &file.body)?));
        }
        let mut commands = Vec::new();
        for command in content.precommands.iter().chain(&content.commands) {
            commands.push((
                command.name.clone(),
                bodies("command", &command.name, &command.body)?,
            ));
        }
        if template.disk_size < debian::MIN_DISK {
            return Err(Refusal::DiskTooSmall {
                os: release.title(),
                minimum: debian::MIN_DISK,
                size: template.disk_size,
            });
        }
        Ok(Some(Plan {
            title: release.title(),
            family: Family::Debian(release.with(url, content, &packages, &self.mirrors)),
            disk_size: template.disk_size,
            content: Customization {
                root_password: content.root_password.clone(),
                files,
                commands,
            },
        }))
    }

    fn allowed(&self, url: &str, what: &str) -> Result<(), Refusal> {
        let url = with_slash(url);
        if self.mirrors.iter().any(|m| url.starts_with(m.as_str())) {
            return Ok(());
        }
        let (what, url) = (what.to_owned(), url.to_owned());
        Err(if self.mirrors.is_empty() {
            Refusal::NoMirrorAllowed { what, url }
        } else {
            Refusal::MirrorNotAllowed {
                what,
                url,
                allowed: self.mirrors.clone(),
            }
        })
    }

    /// Installs `plan` into a raw disk image, or finds the one an earlier build made from
    /// the same plan, and answers it with the packages it holds. The file is shared: link
    /// or copy it, never write to it.
    pub fn install(
        &self,
        plan: &Plan,
        log: &Log,
        progress: Progress,
        stopped: &dyn Fn() -> bool,
    ) -> Result<Installed, InstallError> {
        let disk = self.install_disk(plan, log, progress, stopped)?;
        let work = self.work_dir()?;
        let packages = manifest::read_packages(
            &disk,
            debian::ROOT_OFFSET,
            &self.settings,
            &work,
            log,
            stopped,
        );
        remove_all(&work);
        let packages = packages?;
        log.line(&format!("the image holds {} packages", packages.len()));
        Ok(Installed { disk, packages })
    }

    /// The settings the installer was made with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn install_disk(
        &self,
        plan: &Plan,
        log: &Log,
        progress: Progress,
        stopped: &dyn Fn() -> bool,
    ) -> Result<PathBuf, InstallError> {
        let Family::Debian(release) = &plan.family;
        let tree_key = release.tree_key();
        let disk_key = hex(&Sha256::digest(format!(
            "{tree_key}\0{:?}\0{}",
            plan.content, plan.disk_size
        )));
        let disk = self.dir.join("disks").join(format!("{disk_key}.raw"));
        let _making = self.lock(&disk_key);
        if disk.exists() {
            touch(&disk);
            log.line(&format!(
                "reusing the disk {disk_key}, which an earlier build of the same template made"
            ));
            progress(80, "reusing the installed disk of an earlier build");
            return Ok(disk);
        }
        let tree = self.dir.join("trees").join(&tree_key);
        {
            let _making_tree = self.lock(&tree_key);
            if tree.exists() {
                touch(&tree);
                log.line(&format!("reusing the installed tree {tree_key}"));
            } else {
                self.collect(log);
                let work = self.work_dir()?;
                let result = debian::install_tree(
                    release,
                    &self.settings,
                    &self.dir.join("packages"),
                    &work,
                    log,
                    progress,
                    stopped,
                );
                let made = result.and_then(|made| keep(&made, &tree, "the installed tree"));
                remove_all(&work);
                made?;
            }
        }
        // The disk's customization runs over the tree, so it stays while the disk is made.
        let _reading = self.read(&tree_key);
        let work = self.work_dir()?;
        let result = debian::make_disk(
            release,
            &plan.content,
            &self.settings,
            &tree,
            plan.disk_size,
            &work,
            log,
            progress,
            stopped,
        )
        .and_then(|made| keep(&made, &disk, "the disk"));
        remove_all(&work);
        result?;
        log.line(&format!("made the disk {disk_key}"));
        Ok(disk)
    }

    fn work_dir(&self) -> Result<PathBuf, InstallError> {
        let work = self.work.join(crate::model::new_id().to_string());
        std::fs::create_dir_all(&work)
            .map_err(|e| InstallError::io("making a work directory", e))?;
        Ok(work)
    }

    /// Marks a tree as read until the guard is dropped.
    fn read(&self, key: &str) -> ReadGuard<'_> {
        *lock(&self.reading).entry(key.to_owned()).or_default() += 1;
        ReadGuard {
            installer: self,
            key: key.to_owned(),
        }
    }

    fn lock(&self, key: &str) -> KeyGuard<'_> {
        let mut making = lock(&self.making);
        while making.contains(key) {
            making = self.made.wait(making).unwrap_or_else(|p| p.into_inner());
        }
        making.insert(key.to_owned());
        KeyGuard {
            installer: self,
            key: key.to_owned(),
        }
    }

    /// Removes the least recently used trees and disks until the cache fits its limit
    /// (leaving room for one more install), skipping what an install holds now.
    fn collect(&self, log: &Log) {
        let mut entries = Vec::new();
        for sub in ["trees", "disks"] {
            let dir = match std::fs::read_dir(self.dir.join(sub)) {
                Ok(dir) => dir,
                Err(e) => {
                    tracing::warn!(dir = %self.dir.join(sub).display(), "the OS cache cannot be trimmed: {e}");
                    continue;
                }
            };
            for entry in dir.flatten() {
                let path = entry.path();
                let used = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::SystemTime::UNIX_EPOCH);
                entries.push((used, disk_usage(&path), path));
            }
        }
        entries.sort();
        let mut total: u64 = entries.iter().map(|(_, size, _)| size).sum();
        let room = self
            .settings
            .cache_limit
            .saturating_sub(debian::TYPICAL_INSTALL);
        for (_, size, path) in entries {
            if total <= room {
                break;
            }
            let key = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_owned();
            let busy = lock(&self.making).contains(&key) || lock(&self.reading).contains_key(&key);
            if busy {
                continue;
            }
            log.line(&format!(
                "removing {} from the OS cache to stay within its limit",
                path.display()
            ));
            remove_all(&path);
            total = total.saturating_sub(size);
        }
    }
}

/// Marks a tree as read by a disk being made.
struct ReadGuard<'i> {
    installer: &'i Installer,
    key: String,
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        let mut reading = lock(&self.installer.reading);
        if let Some(count) = reading.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                reading.remove(&self.key);
            }
        }
    }
}

/// Holds one key: another install of it waits until this one is dropped.
struct KeyGuard<'i> {
    installer: &'i Installer,
    key: String,
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        lock(&self.installer.making).remove(&self.key);
        self.installer.made.notify_all();
    }
}

/// Gives what an install made its final name in the cache. Another server sharing the
/// cache may have made the same thing first: then that one is kept and this one dropped.
fn keep(made: &Path, cached: &Path, what: &str) -> Result<(), InstallError> {
    match std::fs::rename(made, cached) {
        Ok(()) => Ok(()),
        Err(_) if cached.exists() => {
            remove_all(made);
            Ok(())
        }
        Err(e) => Err(InstallError::io(&format!("keeping {what}"), e)),
    }
}

fn with_slash(url: &str) -> String {
    let url = url.trim();
    if url.ends_with('/') {
        url.to_owned()
    } else {
        format!("{url}/")
    }
}

/// Marks a cache entry used now, for collection's least-recently-used order.
fn touch(path: &Path) {
    let now = std::fs::FileTimes::new().set_modified(std::time::SystemTime::now());
    if let Ok(file) = std::fs::File::open(path) {
        let _ = file.set_times(now);
    }
}

fn remove_all(path: &Path) {
    let result = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    if let Err(e) = result
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("could not remove {}: {e}", path.display());
    }
}

/// Bytes a file or tree takes on disk (allocated blocks: disks are sparse).
fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let own = meta.blocks() * 512;
    if !meta.is_dir() {
        return own;
    }
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| disk_usage(&e.path()))
                .sum::<u64>()
        })
        .unwrap_or(0)
        + own
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache over its limit loses its least recently used trees, but never one a disk
    /// being made reads or an install holds.
    #[test]
    fn collection_leaves_the_trees_in_use_alone() {
        let dir = tempfile::tempdir().expect("dir");
        let installer = Installer::new(
            dir.path(),
            Settings {
                // Room for nothing beyond the one more install collection keeps free.
                cache_limit: debian::TYPICAL_INSTALL,
                ..Settings::default()
            },
        )
        .expect("installer");
        let trees = dir.path().join("os-cache").join("trees");
        for key in ["read", "held", "idle"] {
            std::fs::create_dir_all(trees.join(key)).expect("tree");
            std::fs::write(trees.join(key).join("file"), vec![1u8; 64 << 10]).expect("file");
        }
        let log = Log::to_file(&dir.path().join("log")).expect("log");
        let reading = installer.read("read");
        let held = installer.lock("held");
        installer.collect(&log);
        assert!(trees.join("read").exists(), "a tree a disk reads stays");
        assert!(trees.join("held").exists(), "a tree an install holds stays");
        assert!(!trees.join("idle").exists(), "an idle tree goes");
        drop((reading, held));
        installer.collect(&log);
        assert!(!trees.join("read").exists(), "once read, it may go");
    }
}
