//! The host side of the WIT disk resources: a reader and a writer over files, sparse
//! aware, so that a 10 GiB blank disk costs nothing to pass through a plugin.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Reads are capped so a plugin cannot make the host allocate without bound in one call.
pub const MAX_READ: u32 = 16 << 20;

/// A disk image a plugin reads.
pub struct DiskReader {
    file: File,
    size: u64,
}

/// The disk image a plugin writes.
pub struct DiskWriter {
    file: File,
    /// Writes past this size are refused: a plugin cannot fill the data disk.
    limit: u64,
    /// Set once a write or resize was refused for the limit, so that a build that then
    /// fails can say the limit was the cause.
    refused: AtomicBool,
    /// Bytes written since writeback of this image was last started (see `written`).
    unstarted: AtomicU64,
}

/// How much an image may hold in dirty pages before the writer asks the kernel to start
/// writing them out. Without it nothing reaches the disk until the build's closing
/// fsync (the kernel's own threshold is a tenth of memory), so the build pays for
/// producing the image and then, in full, for storing it; started early, the disk writes
/// while the plugin produces, and the fsync finds little left to do.
const WRITEBACK_EVERY: u64 = 16 << 20;

impl DiskReader {
    pub fn open(path: &Path) -> io::Result<DiskReader> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        Ok(DiskReader { file, size })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Up to `length` bytes from `offset`; fewer only at the end of the file. The buffer
    /// is filled by the read itself rather than zeroed first: on the data path every pass
    /// over the bytes counts.
    pub fn read(&self, offset: u64, length: u32) -> io::Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let end = offset
            .saturating_add(u64::from(length.min(MAX_READ)))
            .min(self.size);
        let wanted = end.saturating_sub(offset);
        let mut buffer = Vec::with_capacity(wanted as usize);
        if wanted == 0 {
            return Ok(buffer);
        }
        // The reader owns its descriptor and is used by one call at a time, so moving
        // the shared offset is safe.
        let mut file = &self.file;
        file.seek(SeekFrom::Start(offset))?;
        file.take(wanted).read_to_end(&mut buffer)?;
        Ok(buffer)
    }

    /// The allocated runs of the file, found with SEEK_DATA/SEEK_HOLE. On a filesystem
    /// without hole support the whole file is one run, which is still correct.
    pub fn extents(&self) -> io::Result<Vec<(u64, u64)>> {
        crate::blobs::allocated_extents(&self.file, self.size)
    }

    /// The runs of `granule`-byte blocks in `offset..offset + length` that hold anything
    /// but zeros (a block past the end of the file reads as zeros). The plugin decides
    /// what to store by them without the bytes being copied into it.
    pub fn data_runs(&self, offset: u64, length: u64, granule: u32) -> io::Result<Vec<(u64, u64)>> {
        let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
        if !granule.is_power_of_two() || !(512..=(4 << 20)).contains(&granule) {
            return Err(invalid(format!(
                "a granule of {granule} bytes is not a power of two from 512 to 4 MiB"
            )));
        }
        let granule = u64::from(granule);
        if !offset.is_multiple_of(granule) {
            return Err(invalid(format!(
                "offset {offset} is not a multiple of the granule {granule}"
            )));
        }
        if length > MAX_EXAMINE {
            return Err(invalid(format!(
                "{length} bytes are more than the {MAX_EXAMINE} one call may examine"
            )));
        }
        let end = offset.saturating_add(length).min(self.size);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        if offset >= end {
            return Ok(runs);
        }
        let mut note = |index: usize| {
            let at = offset + index as u64 * granule;
            match runs.last_mut() {
                Some((start, len)) if *start + *len == at => *len += granule,
                _ => runs.push((at, granule)),
            }
        };
        // Mapped rather than read: a block of data is told from zeros by its first bytes,
        // so only the first page of each block is ever brought in, and nothing is copied.
        match Mapped::new(&self.file, offset, end - offset) {
            Some(mapped) => {
                for (index, block) in mapped.bytes().chunks(granule as usize).enumerate() {
                    if !is_zero(block) {
                        note(index);
                    }
                }
            }
            None => {
                let mut buffer = vec![0u8; (end - offset) as usize];
                self.file.read_exact_at(&mut buffer, offset)?;
                for (index, block) in buffer.chunks(granule as usize).enumerate() {
                    if !is_zero(block) {
                        note(index);
                    }
                }
            }
        }
        Ok(runs)
    }
}

/// A read-only mapping of part of a disk file.
struct Mapped {
    base: *mut libc::c_void,
    mapped: usize,
    /// Where the asked-for range starts within the mapping (mappings start on a page).
    skip: usize,
    len: usize,
}

impl Mapped {
    /// Maps `len` bytes at `offset`, or `None` where the file cannot be mapped.
    fn new(file: &File, offset: u64, len: u64) -> Option<Mapped> {
        use std::os::fd::AsRawFd;
        // SAFETY: sysconf has no preconditions.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
        let start = offset / page * page;
        let skip = usize::try_from(offset - start).ok()?;
        let mapped = usize::try_from(len).ok()?.checked_add(skip)?;
        // SAFETY: a fresh read-only shared mapping of an open file; it is unmapped in
        // Drop and only read through `bytes` while `self` lives. The disks mapped here
        // (a job's base disk, a stored blob) are never truncated while a call runs,
        // only unlinked, which leaves a mapping valid.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                i64::try_from(start).ok()?,
            )
        };
        (base != libc::MAP_FAILED).then(|| Mapped {
            base,
            mapped,
            skip,
            len: mapped - skip,
        })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `mapped` bytes long and lives as long as `self`.
        unsafe { std::slice::from_raw_parts((self.base as *const u8).add(self.skip), self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made.
        unsafe { libc::munmap(self.base, self.mapped) };
    }
}

/// Whether `data` holds only zeros. Sixteen bytes are OR-ed at a time, which the compiler
/// turns into vector instructions, and the scan stops at the first word that is not zero:
/// a block of data is rejected after reading its start.
fn is_zero(data: &[u8]) -> bool {
    let (words, rest) = data.as_chunks::<16>();
    words.iter().all(|w| u128::from_ne_bytes(*w) == 0) && rest.iter().all(|&b| b == 0)
}

/// The most one `data-runs` call examines: it reads that much into memory at once.
pub const MAX_EXAMINE: u64 = 64 << 20;

impl DiskWriter {
    pub fn create(path: &Path, limit: u64) -> io::Result<DiskWriter> {
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(DiskWriter {
            file,
            limit,
            refused: AtomicBool::new(false),
            unstarted: AtomicU64::new(0),
        })
    }

    /// Counts `length` bytes just written and, every `WRITEBACK_EVERY`, starts writeback
    /// of the whole file. SYNC_FILE_RANGE_WRITE only queues the dirty pages not already
    /// on their way and does not wait for them; it makes no promise of durability, which
    /// `sync` still gives.
    fn written(&self, length: u64) {
        use std::os::fd::AsRawFd;
        let before = self.unstarted.fetch_add(length, Ordering::Relaxed);
        if before + length < WRITEBACK_EVERY {
            return;
        }
        self.unstarted.store(0, Ordering::Relaxed);
        // SAFETY: the descriptor is this writer's open file; offset 0 and length 0 name
        // the whole file. A failure is harmless (the fsync writes everything anyway), so
        // the result is not checked.
        unsafe { libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    }

    pub fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset.saturating_add(data.len() as u64);
        if end > self.limit {
            return Err(self.refuse(format!("a write ending at byte {end}")));
        }
        self.file.write_all_at(data, offset)?;
        self.written(data.len() as u64);
        Ok(())
    }

    /// Copies `length` bytes at `offset` of `source` to `at` of this image in the kernel
    /// (copy_file_range: no copy through user space, and a reflink where the filesystem
    /// shares blocks), falling back to reading and writing where the kernel cannot.
    pub fn copy_from(
        &self,
        source: &DiskReader,
        offset: u64,
        length: u64,
        at: u64,
    ) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let end = at.saturating_add(length);
        if end > self.limit {
            return Err(self.refuse(format!("a copy ending at byte {end}")));
        }
        if offset.saturating_add(length) > source.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a copy of {length} bytes from {offset} reads past the end of the {}-byte source",
                    source.size
                ),
            ));
        }
        let (mut from, mut to, mut left) = (offset as i64, at as i64, length);
        while left > 0 {
            // SAFETY: both descriptors are open files owned by `source` and `self` for the
            // duration of the call; the offsets are plain integers the kernel updates.
            let copied = unsafe {
                libc::copy_file_range(
                    source.file.as_raw_fd(),
                    &mut from,
                    self.file.as_raw_fd(),
                    &mut to,
                    // At most WRITEBACK_EVERY at a time, so writeback starts during a
                    // long copy and not only after it.
                    left.min(WRITEBACK_EVERY) as usize,
                    0,
                )
            };
            if copied > 0 {
                left -= copied as u64;
                self.written(copied as u64);
                continue;
            }
            let error = io::Error::last_os_error();
            if copied == 0
                || matches!(
                    error.raw_os_error(),
                    Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL)
                )
            {
                // Not supported between these files (or the source ended early): copy
                // the rest through a buffer.
                return self.copy_through_buffer(source, from as u64, left, to as u64);
            }
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
        Ok(())
    }

    fn copy_through_buffer(
        &self,
        source: &DiskReader,
        mut offset: u64,
        mut left: u64,
        mut at: u64,
    ) -> io::Result<()> {
        let mut buffer = vec![0u8; (left.min(4 << 20)) as usize];
        while left > 0 {
            let n = left.min(buffer.len() as u64) as usize;
            source.file.read_exact_at(&mut buffer[..n], offset)?;
            self.file.write_all_at(&buffer[..n], at)?;
            self.written(n as u64);
            offset += n as u64;
            at += n as u64;
            left -= n as u64;
        }
        Ok(())
    }

    pub fn set_size(&self, size: u64) -> io::Result<()> {
        if size > self.limit {
            return Err(self.refuse(format!("a size of {size} bytes")));
        }
        self.file.set_len(size)
    }

    /// Whether a write or resize was refused for the limit.
    pub fn refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }

    fn refuse(&self, what: String) -> io::Error {
        self.refused.store(true, Ordering::Relaxed);
        io::Error::other(format!(
            "{what} is past this image's size limit of {} MiB ({} bytes)",
            self.limit >> 20,
            self.limit
        ))
    }

    /// Flushes the image to stable storage before the build is reported complete.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_all()
    }
}

/// Creates a blank sparse raw disk of `size` bytes: no blocks are allocated.
pub fn create_blank(path: &Path, size: u64) -> io::Result<()> {
    let file = File::create(path)?;
    file.set_len(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_disk_has_no_extents_and_data_is_found() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("disk.raw");
        create_blank(&path, 64 << 20)?;
        assert_eq!(DiskReader::open(&path)?.extents()?, vec![]);

        let file = File::options().write(true).open(&path)?;
        file.write_all_at(&[7u8; 4096], 8 << 20)?;
        file.sync_all()?;
        let reader = DiskReader::open(&path)?;
        let extents = reader.extents()?;
        assert_eq!(extents.len(), 1);
        let (offset, length) = extents[0];
        assert!(offset <= 8 << 20 && offset + length >= (8 << 20) + 4096);
        assert_eq!(reader.read(8 << 20, 4)?, vec![7, 7, 7, 7]);
        assert_eq!(reader.read((64 << 20) - 2, 10)?.len(), 2);
        Ok(())
    }

    #[test]
    fn data_runs_and_copies_stay_in_the_host() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("disk.raw");
        create_blank(&path, 1 << 20)?;
        let file = File::options().write(true).open(&path)?;
        file.write_all_at(&[1u8; 10], 70_000)?;
        file.write_all_at(&[2u8; 65_536], 131_072)?;
        file.write_all_at(&[3u8; 1], (1 << 20) - 1)?;
        let reader = DiskReader::open(&path)?;
        assert_eq!(
            reader.data_runs(0, 1 << 20, 65_536)?,
            vec![(65_536, 131_072), ((1 << 20) - 65_536, 65_536)]
        );
        assert!(reader.data_runs(1, 4096, 512).is_err());
        assert!(reader.data_runs(0, 4096, 1000).is_err());

        let writer = DiskWriter::create(&dir.path().join("out.raw"), 1 << 20)?;
        writer.copy_from(&reader, 131_072, 65_536, 4096)?;
        let mut copied = vec![0u8; 65_536];
        File::open(dir.path().join("out.raw"))?.read_exact_at(&mut copied, 4096)?;
        assert!(copied.iter().all(|&b| b == 2));
        assert!(writer.copy_from(&reader, (1 << 20) - 10, 20, 0).is_err());
        assert!(writer.copy_from(&reader, 0, 4096, (1 << 20) - 100).is_err());
        assert!(writer.refused());
        Ok(())
    }

    #[test]
    fn writer_refuses_to_grow_past_its_limit() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let writer = DiskWriter::create(&dir.path().join("out.raw"), 1024)?;
        writer.write(0, &[1; 1024])?;
        assert!(!writer.refused());
        assert!(writer.write(1000, &[1; 100]).is_err());
        assert!(writer.refused());
        assert!(writer.set_size(2048).is_err());
        Ok(())
    }
}
