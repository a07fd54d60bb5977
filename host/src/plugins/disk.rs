//! The host side of the WIT disk resources: a reader and a writer over files, sparse
//! aware, so that a 10 GiB blank disk costs nothing to pass through a plugin.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

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
}

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
}

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
        })
    }

    pub fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset.saturating_add(data.len() as u64);
        if end > self.limit {
            return Err(self.refuse(format!("a write ending at byte {end}")));
        }
        self.file.write_all_at(data, offset)
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
