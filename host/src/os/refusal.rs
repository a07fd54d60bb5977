//! Why a template's install is refused before anything runs: each a 400 when the build
//! is requested, and a FAILED build if a stored job meets it after a restart.

/// What in a template, or a plugin's needs, this server will not install.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{os} is installed from a package mirror: give it as <install type='url'><url>")]
    NoInstallUrl { os: String },
    #[error("{what} {url} is not a mirror this server installs from: it allows none")]
    NoMirrorAllowed { what: String, url: String },
    #[error("{what} {url} is not a mirror this server installs from; it allows {}", allowed.join(", "))]
    MirrorNotAllowed {
        what: String,
        url: String,
        allowed: Vec<String>,
    },
    #[error(
        "repository url '{0}' must be an http(s) mirror URL, optionally followed by a suite and components"
    )]
    RepositoryUrl(String),
    #[error("a repository url may not hold control characters")]
    ControlCharacters,
    /// `family` is the OS family whose rule the name breaks, with a space ("Debian "),
    /// or empty for the rule every family's tools share.
    #[error("'{name}' is not a {family}package name")]
    PackageName { name: String, family: &'static str },
    /// `family` as in [`Refusal::PackageName`].
    #[error("the {target} target needs '{name}', which is not a {family}package name")]
    TargetNeeds {
        target: String,
        name: String,
        family: &'static str,
    },
    #[error("file name '{0}' must be an absolute path to a file, without '..'")]
    FilePath(String),
    #[error(
        "{what} '{name}' is given by URL; this server does not fetch them: put its content \
         in the template (type raw or base64)"
    )]
    ByUrl { what: &'static str, name: String },
    #[error(
        "{os} needs a disk of at least {} GiB; the template's <disk><size> is {size} bytes",
        minimum >> 30
    )]
    DiskTooSmall { os: String, minimum: u64, size: u64 },
}
