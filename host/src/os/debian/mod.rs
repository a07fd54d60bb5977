//! Debian, installed without a virtual machine, loop devices or mounts on the host:
//! mmdebstrap makes the root tree from the mirror; the template's files and commands are
//! applied inside bubblewrap to an overlay of it (userns.rs), whose upper layer takes
//! every change; mkfs.ext4 turns the merged tree into the root filesystem,
//! mkfs.vfat and mtools make the EFI system partition with systemd-boot (and syslinux
//! for BIOS), and sfdisk lays both out on a GPT disk. The result boots under UEFI and
//! under BIOS.

mod disk;

pub use disk::make_disk;

use super::run::{Log, Step, StepError, run};
use super::{Customization, InstallError, Progress, Refusal, Settings};
use crate::model::tdl::{Content, Template};
use sha2::{Digest, Sha256};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The programs an install runs on the host.
pub const PROGRAMS: &[&str] = &[
    "mmdebstrap",
    "bwrap",
    "mkfs.ext4",
    "mkfs.vfat",
    "mmd",
    "mcopy",
    "sfdisk",
    "syslinux",
];
/// syslinux's boot code for a GPT disk's MBR: it starts the partition marked
/// LegacyBIOSBootable, so the same disk boots under BIOS as well as UEFI.
const GPT_MBR: &str = "/usr/lib/syslinux/mbr/gptmbr.bin";
/// The Debian packages that hold them.
pub const HOST_PACKAGES: &str =
    "mmdebstrap bubblewrap e2fsprogs dosfstools mtools fdisk syslinux syslinux-common";
pub const SUPPORTED: &str = "Debian 12 (bookworm) x86_64";
/// The installed system takes about 700 MiB; a root filesystem needs room besides.
pub const MIN_DISK: u64 = 2 << 30;
/// What one more install adds to the cache, for collection to leave room.
pub const TYPICAL_INSTALL: u64 = 2 << 30;
/// The EFI system partition: kernel, initramfs and systemd-boot fit with room for two
/// kernels.
const ESP_MIB: u64 = 256;
/// Where the root file system starts in the disk: after the first MiB (the GPT) and
/// the EFI system partition.
pub const ROOT_OFFSET: u64 = (1 + ESP_MIB) << 20;
/// What every image gets: an init system, the UEFI boot loader, and fsck for its root.
/// The kernel comes after them (see `install_tree`).
const BASE_PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "initramfs-tools",
    "systemd-boot-efi",
    "zstd",
    "e2fsprogs",
];
const KERNEL: &str = "linux-image-amd64";
const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const ROOT_X86_64_TYPE: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";

/// A Debian release to install, and from where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    version: &'static str,
    suite: &'static str,
    mirror: String,
    /// The security archive, when the operator allows one.
    security: Option<String>,
    /// Sorted, without duplicates: the tree's identity does not depend on their order.
    packages: Vec<String>,
    /// `deb …` lines for the template's repositories, by name.
    repositories: Vec<(String, String)>,
}

/// The release a template names, if it is one this module installs.
pub fn release(template: &Template) -> Option<Release> {
    if !template.os_name.eq_ignore_ascii_case("debian") || template.arch != "x86_64" {
        return None;
    }
    let (version, suite) = match template.os_version.trim().to_ascii_lowercase().as_str() {
        "12" | "bookworm" => ("12", "bookworm"),
        _ => return None,
    };
    Some(Release {
        version,
        suite,
        mirror: String::new(),
        security: None,
        packages: Vec::new(),
        repositories: Vec::new(),
    })
}

/// A repository's `<url>`: a mirror URL, optionally followed by its suite and
/// components (`http://mirror/debian bookworm main contrib`). Returns the URL.
pub fn repository_url(url: &str) -> Result<&str, Refusal> {
    let first = url.split_whitespace().next().unwrap_or_default();
    if !(first.starts_with("http://") || first.starts_with("https://")) {
        return Err(Refusal::RepositoryUrl(url.to_owned()));
    }
    if url.chars().any(|c| c.is_control()) {
        return Err(Refusal::ControlCharacters);
    }
    Ok(first)
}

/// Debian's rule for package names, so that a name can never be read as an option.
pub fn package_name(name: &str) -> Result<(), Refusal> {
    let mut chars = name.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.len() >= 2
        && name.len() <= 128
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Refusal::PackageName {
            name: name.to_owned(),
            family: "Debian ",
        })
    }
}

/// A file's path in the image: absolute, no `..`, no NUL.
pub fn file_path(path: &str) -> Result<(), Refusal> {
    if !path.starts_with('/')
        || path.ends_with('/')
        || path.split('/').any(|part| part == "..")
        || path.contains('\0')
    {
        return Err(Refusal::FilePath(path.to_owned()));
    }
    Ok(())
}

impl Release {
    pub fn mirror(&self) -> &str {
        &self.mirror
    }

    pub fn title(&self) -> String {
        format!("Debian {} ({}) x86_64", self.version, self.suite)
    }

    /// The release installed from `mirror` with `packages` and the repositories
    /// `content` asks for.
    pub fn with(
        mut self,
        mirror: &str,
        content: &Content,
        packages: &[String],
        allowed: &[String],
    ) -> Release {
        self.mirror = mirror.trim().to_owned();
        self.security = allowed
            .iter()
            .find(|m| m.trim_end_matches('/').ends_with("-security"))
            .cloned();
        let mut packages = packages.to_vec();
        packages.sort();
        packages.dedup();
        self.packages = packages;
        self.repositories = content
            .repositories
            .iter()
            .map(|r| {
                let mut words = r.url.split_whitespace();
                let url = words.next().unwrap_or_default();
                let rest: Vec<&str> = words.collect();
                let rest = if rest.is_empty() {
                    format!("{} main", self.suite)
                } else {
                    rest.join(" ")
                };
                let trusted = if r.signed { "" } else { "[trusted=yes] " };
                (r.name.clone(), format!("deb {trusted}{url} {rest}"))
            })
            .collect();
        self
    }

    /// What identifies an installed tree: everything that decides its content.
    pub fn tree_key(&self) -> String {
        let identity = format!(
            "debian-tree-1\0{}\0amd64\0{}\0{:?}\0{:?}\0{:?}",
            self.suite, self.mirror, self.security, self.packages, self.repositories
        );
        crate::blobs::hex(&Sha256::digest(identity))
    }

    fn sources(&self) -> Vec<String> {
        let mut sources = vec![
            format!("deb {} {} main", self.mirror, self.suite),
            format!("deb {} {}-updates main", self.mirror, self.suite),
        ];
        if let Some(security) = &self.security {
            sources.push(format!("deb {security} {}-security main", self.suite));
        }
        sources.extend(self.repositories.iter().map(|(_, line)| line.clone()));
        sources
    }
}

/// Percent of the whole build at which each line mmdebstrap prints begins, and what a
/// user is told then.
const INSTALL_STAGES: &[(&str, u8, &str)] = &[
    ("I: running apt-get update", 2, "fetching the package lists"),
    ("I: downloading packages", 6, "downloading packages"),
    (
        "I: extracting archives",
        12,
        "unpacking the essential packages",
    ),
    (
        "I: installing essential packages",
        18,
        "installing the essential packages",
    ),
    (
        "I: installing remaining packages",
        28,
        "installing the kernel and packages",
    ),
    (
        "I: running --customize-hook",
        46,
        "keeping the downloaded packages",
    ),
    ("I: cleaning package lists", 48, "cleaning up"),
];

/// Runs mmdebstrap into a new tree under `work`; returns the tree.
pub fn install_tree(
    release: &Release,
    settings: &Settings,
    packages: &Path,
    work: &Path,
    log: &Log,
    progress: Progress,
    stopped: &dyn Fn() -> bool,
) -> Result<PathBuf, InstallError> {
    let tree = work.join("tree");
    let mut include: Vec<String> = BASE_PACKAGES.iter().map(|p| p.to_string()).collect();
    include.extend(release.packages.iter().cloned());
    progress(1, &format!("installing {}", release.title()));
    let (sender, receiver) = std::sync::mpsc::channel::<(u8, &'static str)>();
    log.watch(move |line| {
        if let Some((_, percent, activity)) = INSTALL_STAGES
            .iter()
            .find(|(start, _, _)| line.starts_with(start))
        {
            let _ = sender.send((*percent, activity));
        }
    });
    let cache = packages.display().to_string();
    let mut args = vec![
        "--mode=unshare".to_owned(),
        "--variant=minbase".to_owned(),
        "--verbose".to_owned(),
        format!("--include={}", include.join(",")),
        // The package cache: what was downloaded once is not downloaded again.
        "--skip=essential/unlink".to_owned(),
        "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/".to_owned(),
        format!("--setup-hook=sync-in {cache} /var/cache/apt/archives/"),
        // The initramfs is made on this host, where `LABEL=root` names nothing: told the
        // root's type, it carries fsck for it.
        "--essential-hook=mkdir -p \"$1\"/etc/initramfs-tools/conf.d && echo FSTYPE=ext4 > \"$1\"/etc/initramfs-tools/conf.d/rootfs".to_owned(),
        // The kernel last, by itself: in --include, its initramfs would be made twice
        // (by its own script and again by initramfs-tools' trigger), some 20 s more.
        format!("--customize-hook=chroot \"$1\" apt-get install -y --no-install-recommends {KERNEL}"),
        format!("--customize-hook=sync-out /var/cache/apt/archives {cache}"),
        "--customize-hook=rm -f \"$1\"/var/cache/apt/archives/*.deb".to_owned(),
        release.suite.to_owned(),
        tree.display().to_string(),
    ];
    args.extend(release.sources());
    let step = Step {
        what: format!(
            "installing {} and packages {}",
            release.title(),
            include.join(", ")
        ),
        program: "mmdebstrap".into(),
        args,
        deadline: settings.step_deadline,
        env: vec![],
        stdin: None,
    };
    // Progress is read from the log as lines arrive, on this thread, between polls.
    let progress = std::cell::RefCell::new(progress);
    let result = run(&step, work, log, &|| {
        while let Ok((percent, activity)) = receiver.try_recv() {
            (progress.borrow_mut())(percent, activity);
        }
        stopped()
    });
    log.watch(|_| {});
    result.map_err(|e| match e {
        StepError::Failed { status, tail, .. } => InstallError::Io(format!(
            "installing {} failed (mmdebstrap exit status {status}); {}",
            release.title(),
            why_install_failed(&tail)
        )),
        e => e.into(),
    })?;
    Ok(tree)
}

/// The failure's reason in a user's words where mmdebstrap's output says it, followed
/// by the output's last lines.
fn why_install_failed(tail: &str) -> String {
    let missing: Vec<&str> = tail
        .lines()
        .filter_map(|l| l.split("Unable to locate package ").nth(1))
        .map(str::trim)
        .collect();
    let reason = if !missing.is_empty() {
        format!("no such package on the mirror: {}", missing.join(", "))
    } else if tail.contains("Failed to fetch") || tail.contains("Could not resolve") {
        "the mirror could not be reached".to_owned()
    } else {
        "see its last output".to_owned()
    };
    format!("{reason}; its last output:\n{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_and_paths_that_could_be_read_as_something_else_are_refused() {
        assert!(package_name("cowsay").is_ok());
        assert!(package_name("libc6-dev").is_ok());
        assert!(package_name("g++").is_ok());
        for bad in ["-x", "--include=x", "a", "Caps", "a,b", "a b", ""] {
            assert!(package_name(bad).is_err(), "{bad}");
        }
        assert!(file_path("/etc/motd").is_ok());
        for bad in ["etc/motd", "/etc/../x", "/etc/", "/a\0b"] {
            assert!(file_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_missing_package_is_named() {
        let tail = "E: Unable to locate package no-such-package\nE: apt-get failed";
        assert!(
            why_install_failed(tail).starts_with("no such package on the mirror: no-such-package;")
        );
    }

    #[test]
    fn the_tree_key_depends_on_the_packages_not_their_order() {
        let template = |packages: &[&str]| Template {
            name: "t".into(),
            description: String::new(),
            os_name: "Debian".into(),
            os_version: "12".into(),
            arch: "x86_64".into(),
            disk_size: 3 << 30,
            install: Some("url".into()),
            content: Content {
                packages: packages.iter().map(|p| p.to_string()).collect(),
                ..Content::default()
            },
        };
        let key = |packages: &[&str]| {
            let t = template(packages);
            release(&t)
                .expect("debian")
                .with("http://m/debian", &t.content, &t.content.packages, &[])
                .tree_key()
        };
        assert_eq!(key(&["a1", "b1"]), key(&["b1", "a1", "a1"]));
        assert_ne!(key(&["a1"]), key(&["a1", "b1"]));
    }
}
