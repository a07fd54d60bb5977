//! What an installed image holds: its packages as dpkg records them, read from the
//! finished disk's root file system with debugfs (no mount, and nothing the template's
//! commands left in the tree is opened on the host), and kept with the target image as
//! a manifest the SBOM is made from.

use super::run::{Log, Step, run};
use super::{InstallError, Settings};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The most of dpkg's status file that is read: a full desktop install's is about
/// 5 MiB.
const MAX_STATUS: u64 = 64 << 20;

/// One installed package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub architecture: String,
    /// The source package it was built from, and that source's version (dpkg leaves
    /// them out when they equal the binary's name and version).
    pub source: String,
    pub source_version: String,
}

/// A target image's manifest, stored as JSON beside its build log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The layout of this file; readers refuse a version they do not know.
    pub version: u32,
    /// The OS as users name it ("Debian 12 (bookworm) x86_64").
    pub os: String,
    /// Where its packages came from.
    pub mirror: String,
    /// When the build finished, RFC 3339 in UTC.
    pub created: String,
    pub packages: Vec<Package>,
}

impl Manifest {
    pub const VERSION: u32 = 1;
}

/// The packages dpkg has installed, from the text of `/var/lib/dpkg/status`: stanzas
/// whose `Status` is `install ok installed`, sorted by name and architecture.
pub fn parse_dpkg_status(text: &str) -> Vec<Package> {
    let mut packages = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|line| {
                line.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(':'))
                    .map(|value| value.trim().to_owned())
            })
        };
        if field("Status").as_deref() != Some("install ok installed") {
            continue;
        }
        let (Some(name), Some(version)) = (field("Package"), field("Version")) else {
            continue;
        };
        // `Source: name` or `Source: name (version)`.
        let (source, source_version) = match field("Source") {
            Some(source) => match source.split_once(' ') {
                Some((name, rest)) => (
                    name.to_owned(),
                    rest.trim()
                        .trim_start_matches('(')
                        .trim_end_matches(')')
                        .to_owned(),
                ),
                None => (source, version.clone()),
            },
            None => (name.clone(), version.clone()),
        };
        packages.push(Package {
            architecture: field("Architecture").unwrap_or_default(),
            name,
            version,
            source,
            source_version,
        });
    }
    packages.sort_by(|a, b| (&a.name, &a.architecture).cmp(&(&b.name, &b.architecture)));
    packages
}

/// Reads dpkg's status file out of the ext4 file system at `offset` in `disk` with
/// debugfs, into `work`, and answers the packages it lists.
pub fn read_packages(
    disk: &Path,
    offset: u64,
    settings: &Settings,
    work: &Path,
    log: &Log,
    stopped: &dyn Fn() -> bool,
) -> Result<Vec<Package>, InstallError> {
    let out = work.join("dpkg-status");
    let step = Step {
        what: "reading the image's package list".into(),
        program: "debugfs".into(),
        args: vec![
            "-R".into(),
            format!("dump /var/lib/dpkg/status {}", out.display()),
            format!("{}?offset={offset}", disk.display()),
        ],
        deadline: settings.step_deadline,
        env: Vec::new(),
        stdin: None,
    };
    run(&step, work, log, stopped)?;
    let size = std::fs::metadata(&out)
        .map_err(|e| InstallError::io("the image has no dpkg status file", e))?
        .len();
    if size > MAX_STATUS {
        return Err(InstallError::Io(format!(
            "the image's dpkg status file is {size} bytes, more than the {MAX_STATUS} read"
        )));
    }
    let text = std::fs::read(&out).map_err(|e| InstallError::io("reading dpkg's status", e))?;
    Ok(parse_dpkg_status(&String::from_utf8_lossy(&text)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installed_packages_with_and_without_a_source_are_read() {
        let status = "Package: hello\nStatus: install ok installed\nArchitecture: amd64\n\
             Version: 2.10-3\nDescription: x\n continued\n\n\
             Package: libc6\nStatus: install ok installed\nArchitecture: amd64\n\
             Source: glibc\nVersion: 2.36-9+deb12u4\n\n\
             Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n\n\
             Package: libssl3\nStatus: install ok installed\nArchitecture: amd64\n\
             Source: openssl (3.0.11-1~deb12u2)\nVersion: 3.0.11-1~deb12u2+b1\n";
        let packages = parse_dpkg_status(status);
        let seen: Vec<(&str, &str, &str, &str)> = packages
            .iter()
            .map(|p| {
                (
                    p.name.as_str(),
                    p.version.as_str(),
                    p.source.as_str(),
                    p.source_version.as_str(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("hello", "2.10-3", "hello", "2.10-3"),
                ("libc6", "2.36-9+deb12u4", "glibc", "2.36-9+deb12u4"),
                (
                    "libssl3",
                    "3.0.11-1~deb12u2+b1",
                    "openssl",
                    "3.0.11-1~deb12u2"
                ),
            ]
        );
        assert!(packages.iter().all(|p| p.architecture == "amd64"));
    }
}
