//! Image bodies on disk: a content-addressed store (`blobs/<digest>`, see [`digest`]), written by
//! renaming a finished, synced file into place so a crash never leaves a half-written
//! body under a final name; collection of blobs no record references; and fetching the
//! base image a build starts from (a file in the import directory or an http(s) URL,
//! raw or qcow2) into a sparse raw disk.
//!
//! Never imports axum or wasmtime. Everything here blocks on disk or network, so async
//! callers use the blocking pool.

pub mod digest;
mod qcow2;

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use crate::fetch::{FetchError, FetchPolicy};

/// Reads and hashes are done in chunks of this size.
const CHUNK: usize = 4 << 20;

/// A stored image body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    /// Its content address, which names its file: see [`digest`].
    pub name: String,
    pub size: u64,
}

pub struct Blobs {
    root: PathBuf,
    /// Held for reading from the moment a blob is stored until the record naming it is
    /// written, and for writing by collection, so a new blob is never collected in between.
    gate: RwLock<()>,
}

impl Blobs {
    /// Opens the store under `data/blobs`.
    pub fn open(data: &Path) -> io::Result<Blobs> {
        let root = data.join("blobs");
        std::fs::create_dir_all(&root)?;
        // Image bodies are the tenants' data: nobody but the server's user reads them.
        std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        Ok(Blobs {
            root,
            gate: RwLock::new(()),
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Keeps collection away until the guard is dropped.
    pub fn hold(&self) -> RwLockReadGuard<'_, ()> {
        self.gate
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Moves a finished, synced file into the store as `blob` (its hash, from
    /// [`hash_file`], taken before: hashing is as long as the image is large, so it is
    /// never done under [`Blobs::hold`]). If the same content is already stored, the
    /// file is removed instead: bodies are stored once. Call with [`Blobs::hold`] held
    /// until the record is written.
    pub fn ingest(&self, file: &Path, blob: &Blob) -> io::Result<()> {
        let target = self.path(&blob.name);
        if target.exists() {
            std::fs::remove_file(file)?;
        } else {
            std::fs::rename(file, &target)?;
            // The rename is only durable once the directory is.
            File::open(&self.root)?.sync_all()?;
        }
        Ok(())
    }

    /// Removes every blob not in `referenced`; returns how many were removed.
    pub fn collect(&self, referenced: &HashSet<String>) -> io::Result<usize> {
        let _exclusive = self
            .gate
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.root)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !referenced.contains(&name) {
                std::fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// SEEK_DATA / SEEK_HOLE walk over the file's first `size` bytes.
pub fn allocated_extents(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut extents = Vec::new();
    let mut offset: u64 = 0;
    while offset < size {
        // SAFETY: lseek on a descriptor we own has no memory-safety preconditions.
        let data = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                // ENXIO: no data after `offset`, the rest is a hole.
                Some(libc::ENXIO) => Ok(extents),
                // EINVAL: the filesystem has no SEEK_DATA; treat everything as data.
                Some(libc::EINVAL) => Ok(vec![(0, size)]),
                _ => Err(err),
            };
        }
        let data = data as u64;
        if data >= size {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let hole = (hole as u64).min(size);
        extents.push((data, hole - data));
        offset = hole;
    }
    Ok(extents)
}

/// Content address ([`digest`]) and length of a file. Holes are counted, never read;
/// allocated blocks of zeros are read and compared, never hashed. Stops with
/// [`io::ErrorKind::Interrupted`] when `should_stop` says so, which it is asked between
/// chunks, so a cancel ends the reading of a large image.
pub fn hash_file(path: &Path, should_stop: &dyn Fn() -> bool) -> io::Result<(String, u64)> {
    let mut file = File::open(path)?;
    let size = file.metadata()?.len();
    let extents = allocated_extents(&file, size)?;
    let mut buffer = vec![0u8; CHUNK];
    let mut digest = digest::SparseDigest::default();
    let mut position = 0u64;
    for (offset, length) in extents {
        digest.zeros(offset - position);
        std::io::Seek::seek(&mut file, io::SeekFrom::Start(offset))?;
        let mut left = length;
        while left > 0 {
            if should_stop() {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "stopped"));
            }
            let take = left.min(CHUNK as u64) as usize;
            file.read_exact(&mut buffer[..take])?;
            digest.update(&buffer[..take]);
            left -= take as u64;
        }
        position = offset + length;
    }
    digest.zeros(size - position);
    Ok((digest.finish(), size))
}

/// Bytes as lower-case hex: how digests are written in names and documents.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where a base image may come from and how large it may be.
pub struct BaseSource<'a> {
    /// Where `file://` base images may be read from; none when unset.
    pub import_dir: Option<&'a Path>,
    /// The guard on http(s) fetches, whose `max_bytes` also bounds a base image's
    /// virtual size.
    pub policy: &'a Arc<FetchPolicy>,
}

/// Checks a base image URL when the build is requested, so a bad one is refused at
/// once: `file://` paths must lie inside the import directory, other URLs must be http
/// or https to a host the fetch policy does not refuse on sight.
pub fn check_base_url(url: &str, source: &BaseSource) -> Result<(), BaseRefusal> {
    if let Some(path) = url.strip_prefix("file://") {
        local_path(path, source.import_dir).map(|_| ())
    } else if url.starts_with("http://") || url.starts_with("https://") {
        source
            .policy
            .check(url)
            .map(drop)
            .map_err(|error| BaseRefusal::Fetch {
                url: url.to_owned(),
                error,
            })
    } else {
        Err(BaseRefusal::Scheme(url.to_owned()))
    }
}

/// Why a base image URL is refused before anything is fetched. Messages name neither
/// the import directory nor whether anything lies outside it.
#[derive(Debug, thiserror::Error)]
pub enum BaseRefusal {
    #[error("base images from file:// URLs need the server's --import-dir to be set")]
    NoImportDir,
    #[error("base image {0} is not a file in the import directory")]
    NotImported(String),
    #[error("the server's import directory cannot be read")]
    ImportDirUnreadable,
    #[error("base image {url}: {error}")]
    Fetch { url: String, error: FetchError },
    #[error(
        "base image {0}: only file:// (inside the import directory), http:// and https:// URLs are accepted"
    )]
    Scheme(String),
}

/// The file a `file://` URL names, when it is inside the import directory.
fn local_path(path: &str, import_dir: Option<&Path>) -> Result<PathBuf, BaseRefusal> {
    let Some(dir) = import_dir else {
        return Err(BaseRefusal::NoImportDir);
    };
    let outside = || BaseRefusal::NotImported(path.to_owned());
    let dir = dir.canonicalize().map_err(|e| {
        tracing::error!(dir = %dir.display(), "the import directory cannot be read: {e}");
        BaseRefusal::ImportDirUnreadable
    })?;
    let file = Path::new(path).canonicalize().map_err(|_| outside())?;
    if !file.starts_with(&dir) || !file.is_file() {
        return Err(outside());
    }
    Ok(file)
}

/// Why a base image could not be had.
#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    #[error("fetching the base image {url}: {error}")]
    Fetch { url: String, error: FetchError },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Refused(#[from] BaseRefusal),
    #[error("stopped")]
    Stopped,
}

impl BaseError {
    /// Whether another attempt could succeed (a network failure).
    pub fn is_passing(&self) -> bool {
        matches!(self, BaseError::Fetch { error, .. } if error.is_passing())
    }
}

/// Fetches the base image at `url` into `dest` as a sparse raw disk. `progress(done,
/// total)` follows the download. Returns the SHA-256 of the bytes fetched (the image as
/// given, before any conversion) and the disk's size, which is at most the policy's
/// `max_bytes`.
pub fn fetch_base(
    url: &str,
    source: &BaseSource,
    dest: &Path,
    progress: &mut dyn FnMut(u64, Option<u64>),
    should_stop: &(dyn Fn() -> bool + Sync),
) -> Result<(String, u64), BaseError> {
    let max = source.policy.max_bytes;
    let fetched = dest.with_extension("fetched");
    let digest = if let Some(path) = url.strip_prefix("file://") {
        let source = local_path(path, source.import_dir)?;
        let size = std::fs::metadata(&source)
            .map_err(|e| BaseError::Invalid(format!("reading {path}: {e}")))?
            .len();
        if size > max {
            return Err(BaseError::Invalid(format!(
                "base image {path} is larger than the {max} bytes this server allows"
            )));
        }
        let (digest, _) = hash_file(&source, should_stop)
            .map_err(|e| stopped_or(e, |e| format!("reading {path}: {e}")))?;
        copy_sparse(&source, &fetched)
            .map_err(|e| BaseError::Invalid(format!("copying {path}: {e}")))?;
        digest
    } else {
        download(url, source.policy, &fetched, progress, should_stop)?
    };
    let size = to_raw(&fetched, dest, max, should_stop)?;
    let _ = std::fs::remove_file(&fetched);
    Ok((digest, size))
}

fn stopped_or(e: io::Error, describe: impl FnOnce(io::Error) -> String) -> BaseError {
    if e.kind() == io::ErrorKind::Interrupted {
        BaseError::Stopped
    } else {
        BaseError::Invalid(describe(e))
    }
}

/// Turns a fetched image into a raw disk at `dest`: qcow2 is converted, anything else is
/// taken as raw. The disk may be at most `max` bytes.
fn to_raw(
    fetched: &Path,
    dest: &Path,
    max: u64,
    should_stop: &(dyn Fn() -> bool + Sync),
) -> Result<u64, BaseError> {
    let mut magic = [0u8; 4];
    let is_qcow2 = File::open(fetched)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == qcow2::MAGIC;
    if is_qcow2 {
        qcow2::convert_to_raw(fetched, dest, max, should_stop)
            .map_err(|e| stopped_or(e, |e| format!("reading the qcow2 base image: {e}")))
    } else {
        std::fs::rename(fetched, dest)
            .map_err(|e| BaseError::Invalid(format!("storing the base image: {e}")))?;
        std::fs::metadata(dest)
            .map(|m| m.len())
            .map_err(|e| BaseError::Invalid(e.to_string()))
    }
}

/// Copies only the allocated extents, so a sparse source stays sparse.
fn copy_sparse(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let source = File::open(from)?;
    let size = source.metadata()?.len();
    let dest = File::create(to)?;
    dest.set_len(size)?;
    let mut buffer = vec![0u8; CHUNK];
    for (offset, length) in allocated_extents(&source, size)? {
        let mut done = 0;
        while done < length {
            let take = (length - done).min(CHUNK as u64) as usize;
            source.read_exact_at(&mut buffer[..take], offset + done)?;
            dest.write_all_at(&buffer[..take], offset + done)?;
            done += take as u64;
        }
    }
    Ok(())
}

/// Downloads `url` to `to` through the guarded client, hashing as it goes.
fn download(
    url: &str,
    policy: &Arc<FetchPolicy>,
    to: &Path,
    progress: &mut dyn FnMut(u64, Option<u64>),
    should_stop: &(dyn Fn() -> bool + Sync),
) -> Result<String, BaseError> {
    let failed = |error: FetchError| match error {
        FetchError::Stopped => BaseError::Stopped,
        error => BaseError::Fetch {
            url: url.to_owned(),
            error,
        },
    };
    // Jobs run on the blocking pool; the transfer gets a small runtime of its own, and
    // the client is made on it, so its connections live and die with it.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| failed(FetchError::Failed(e.to_string())))?;
    let mut file = File::create(to).map_err(|e| failed(FetchError::Failed(e.to_string())))?;
    let mut digest = digest::SparseDigest::default();
    runtime
        .block_on(crate::fetch::fetch(
            policy,
            url,
            &mut |chunk| {
                digest.update(chunk);
                file.write_all(chunk)
            },
            progress,
            should_stop,
        ))
        .map_err(failed)?;
    file.sync_all()
        .map_err(|e| failed(FetchError::Failed(format!("storing what was fetched: {e}"))))?;
    Ok(digest.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_file_hashes_as_its_bytes_and_ingest_stores_once() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("a");
        let file = File::create(&path)?;
        file.set_len(3 << 20)?;
        std::os::unix::fs::FileExt::write_all_at(&file, b"abc", 1 << 20)?;
        let mut all = vec![0u8; 3 << 20];
        all[1 << 20..(1 << 20) + 3].copy_from_slice(b"abc");
        let mut of_bytes = digest::SparseDigest::default();
        of_bytes.update(&all);
        let expected = of_bytes.finish();
        assert_eq!(hash_file(&path, &|| false)?, (expected.clone(), 3 << 20));
        let stopped = hash_file(&path, &|| true).map(drop);
        assert!(stopped.is_err_and(|e| e.kind() == io::ErrorKind::Interrupted));

        let blobs = Blobs::open(dir.path())?;
        let blob = Blob {
            name: expected.clone(),
            size: 3 << 20,
        };
        blobs.ingest(&path, &blob)?;
        assert!(blobs.path(&expected).exists() && !path.exists());
        // The same content again is stored once.
        std::fs::copy(blobs.path(&expected), &path)?;
        blobs.ingest(&path, &blob)?;
        assert!(!path.exists());
        assert_eq!(blobs.collect(&HashSet::from([expected.clone()]))?, 0);
        assert_eq!(blobs.collect(&HashSet::new())?, 1);
        assert!(!blobs.path(&expected).exists());
        Ok(())
    }

    #[test]
    fn file_urls_must_stay_inside_the_import_directory() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let inside = dir.path().join("ok.raw");
        File::create(&inside)?;
        let url = format!("file://{}", inside.display());
        let policy = Arc::new(FetchPolicy::default());
        let source = |import_dir| BaseSource {
            import_dir,
            policy: &policy,
        };
        assert!(check_base_url(&url, &source(Some(dir.path()))).is_ok());
        assert!(check_base_url(&url, &source(None)).is_err());
        let escape = format!("file://{}/../etc/passwd", dir.path().display());
        assert!(check_base_url(&escape, &source(Some(dir.path()))).is_err());
        // A missing file and one outside get the same answer, which names no directory.
        let missing = format!("{}/missing.raw", dir.path().display());
        let answers: Vec<String> = [missing.as_str(), "/etc/passwd"]
            .iter()
            .map(|path| {
                check_base_url(&format!("file://{path}"), &source(Some(dir.path())))
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default()
                    .replace(path, "PATH")
            })
            .collect();
        assert_eq!(answers[0], answers[1]);
        assert!(answers[0].contains("not a file in the import directory"));
        assert!(check_base_url("ftp://x/y", &source(Some(dir.path()))).is_err());
        assert!(check_base_url("http://127.0.0.1:1/x", &source(None)).is_err());
        assert!(check_base_url("https://example.com/x", &source(None)).is_ok());
        Ok(())
    }
}
