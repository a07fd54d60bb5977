//! Helpers for conductor provider plugins: this crate owns turning a source disk, read
//! through whatever the host offers, into an image file in the format a cloud wants (raw,
//! qcow2 or stream-optimized VMDK). The I/O is abstracted by [`Source`] and [`Sink`] so the
//! same code runs inside a wasm32-wasip2 plugin (over the host's resources) and natively in
//! tests (over files). It does not depend on the plugin bindings; a plugin wraps its WIT
//! resources in these traits.
//!
//! Every writer reads only the source's allocated extents, in large chunks, and leaves out
//! data that is entirely zero, so a mostly empty disk gives a small image whatever its size.

use std::fmt;

#[cfg(feature = "guest")]
pub mod guest;
#[cfg(feature = "http")]
pub mod http;
mod qcow2;
mod raw;
mod vmdk;

/// Where a disk image's bytes come from.
pub trait Source {
    /// The disk's size in bytes.
    fn size(&self) -> u64;
    /// Allocated runs (offset, length), ascending, non-overlapping; everything else reads as zeros.
    fn extents(&self) -> Result<Vec<(u64, u64)>, Error>;
    /// Up to `len` bytes at `offset` (fewer only at the end).
    fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, Error>;
    /// The runs of `granule`-byte blocks in `offset..offset + len` that hold anything but
    /// zeros, if this source can tell without handing the bytes over (the host's disks
    /// can); `None` when it cannot, and the writers read and look themselves.
    fn data_runs(
        &self,
        _offset: u64,
        _len: u64,
        _granule: u64,
    ) -> Option<Result<Vec<(u64, u64)>, Error>> {
        None
    }
}

/// Where the image is written. Regions never written read as zeros.
pub trait Sink {
    /// Writes `data` at byte `offset` of the image file.
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), Error>;
    /// Sets the image file's length in bytes.
    fn set_size(&mut self, size: u64) -> Result<(), Error>;
    /// Copies `len` bytes at `offset` of the source being written to byte `at` of the
    /// image without handing them over, if this sink can (the host's can); `None` when
    /// it cannot.
    fn copy_from_source(&mut self, _offset: u64, _len: u64, _at: u64) -> Option<Result<(), Error>> {
        None
    }
}

/// Whether `source` and `sink` can pass data through without it being read: the writers
/// then only ask where the data is and have it copied.
pub(crate) fn passes_through(source: &dyn Source, sink: &mut dyn Sink) -> bool {
    source.data_runs(0, 0, 512).is_some_and(|r| r.is_ok())
        && sink.copy_from_source(0, 0, 0).is_some_and(|r| r.is_ok())
}

/// Why writing an image failed: a message for people, passed through from the source or
/// the sink or describing a limit of the format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<String> for Error {
    fn from(message: String) -> Self {
        Error(message)
    }
}

impl From<&str> for Error {
    fn from(message: &str) -> Self {
        Error(message.to_owned())
    }
}

/// The image formats [`write_image`] can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// A plain copy of the disk, byte for byte, with holes where the source has none.
    Raw,
    /// qcow2 version 3 with 64 KiB clusters, no compression and no backing file.
    Qcow2,
    /// VMDK stream-optimized: deflate-compressed grains, as cloud importers expect.
    Vmdk,
}

/// Writes `source` into `sink` in `format`; `progress(done_bytes, total_bytes)` is called as work proceeds
/// (total = allocated bytes of the source). Returns the number of bytes of the image file.
pub fn write_image(
    format: Format,
    source: &dyn Source,
    sink: &mut dyn Sink,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64, Error> {
    match format {
        Format::Raw => raw::write(source, sink, progress),
        Format::Qcow2 => qcow2::write(source, sink, progress),
        Format::Vmdk => vmdk::write(source, sink, progress),
    }
}

/// How much the writers read at once. Large reads keep the per-call cost of a host function
/// (or a system call) small next to the copying; 4 MiB is a multiple of every granule used
/// here (64 KiB clusters and grains), so chunks aligned to it never split one.
pub(crate) const CHUNK: u64 = 4 << 20;

/// Whether `data` holds only zero bytes.
///
/// The bytes are OR-ed together 256 at a time as u128 words, which the compiler turns into
/// vector instructions, and the scan stops at the first block that is not zero: random data
/// is rejected after one block, zeros are checked at memory speed.
pub fn is_zero(data: &[u8]) -> bool {
    let (words, rest) = data.as_chunks::<16>();
    words.chunks(16).all(|block| {
        block
            .iter()
            .fold(0u128, |acc, w| acc | u128::from_ne_bytes(*w))
            == 0
    }) && rest.iter().all(|&b| b == 0)
}

/// The source's extents, checked and clipped to its size, with empty ones dropped.
///
/// A host that breaks the contract (extents out of order or overlapping) gets an error
/// rather than a silently wrong image.
pub fn clean_extents(source: &dyn Source) -> Result<Vec<(u64, u64)>, Error> {
    let size = source.size();
    let mut clean: Vec<(u64, u64)> = Vec::new();
    let mut previous_end = 0;
    for (offset, len) in source.extents()? {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error(format!("extent at {offset} of {len} bytes overflows")))?;
        if offset < previous_end {
            return Err(Error(format!(
                "source extents are not ascending and disjoint: one starts at {offset}, before the previous end {previous_end}"
            )));
        }
        previous_end = end;
        let end = end.min(size);
        if offset < end {
            clean.push((offset, end - offset));
        }
    }
    Ok(clean)
}

/// Counts the allocated bytes of the source below a position, for progress reports.
/// Positions only grow, so a cursor over the extents makes each query cheap.
struct Covered<'a> {
    extents: &'a [(u64, u64)],
    next: usize,
    done: u64,
}

impl Covered<'_> {
    fn below(&mut self, pos: u64) -> u64 {
        while let Some(&(offset, len)) = self.extents.get(self.next) {
            if offset + len > pos {
                return self.done + pos.saturating_sub(offset);
            }
            self.done += len;
            self.next += 1;
        }
        self.done
    }
}

/// Reads the source's allocated extents, rounded out to `granule`-aligned ranges, and
/// calls `visit(offset, data)` once per chunk, in ascending order.
///
/// Each chunk starts at a multiple of `granule`, lies within one [`CHUNK`]-aligned window
/// and is a whole number of granules long: the last granule of the disk is padded with
/// zeros past the source's end. Reading the holes next to an extent is fine, since the
/// [`Source`] contract says they read as zeros; the writers decide per granule whether
/// anything needs storing. `granule` must divide [`CHUNK`].
pub(crate) fn for_each_chunk(
    source: &dyn Source,
    granule: u64,
    progress: &mut dyn FnMut(u64, u64),
    mut visit: impl FnMut(u64, &[u8]) -> Result<(), Error>,
) -> Result<(), Error> {
    let size = source.size();
    for_each_window(source, granule, progress, |pos, len| {
        let data = read_padded(source, pos, len, size)?;
        visit(pos, &data)
    })
}

/// The windows [`for_each_chunk`] reads, `(offset, length)`, without reading them: for
/// writers whose source says where its data is and whose sink copies it.
pub(crate) fn for_each_window(
    source: &dyn Source,
    granule: u64,
    progress: &mut dyn FnMut(u64, u64),
    mut visit: impl FnMut(u64, u64) -> Result<(), Error>,
) -> Result<(), Error> {
    debug_assert!(CHUNK.is_multiple_of(granule));
    let extents = clean_extents(source)?;
    let total = extents.iter().map(|&(_, len)| len).sum();
    let mut covered = Covered {
        extents: &extents,
        next: 0,
        done: 0,
    };
    progress(0, total);

    // Extents are ascending, so their rounded ranges are too; neighbours that share a
    // granule are merged so no granule is read or visited twice.
    let mut pos = 0;
    let mut index = 0;
    while index < extents.len() {
        let (offset, len) = extents[index];
        let start = (offset / granule * granule).max(pos);
        let mut end = (offset + len).div_ceil(granule) * granule;
        index += 1;
        while let Some(&(next_offset, next_len)) = extents.get(index) {
            if next_offset / granule * granule > end {
                break;
            }
            end = end.max((next_offset + next_len).div_ceil(granule) * granule);
            index += 1;
        }
        pos = start;
        while pos < end {
            let chunk_end = end.min((pos / CHUNK + 1) * CHUNK);
            visit(pos, chunk_end - pos)?;
            pos = chunk_end;
            progress(covered.below(pos), total);
        }
    }
    Ok(())
}

/// Reads `len` bytes (at most [`CHUNK`]) at `offset`, with zeros past the source's end.
fn read_padded(source: &dyn Source, offset: u64, len: u64, size: u64) -> Result<Vec<u8>, Error> {
    let want = len.min(size.saturating_sub(offset));
    let mut data = source.read(offset, chunk_u32(want))?;
    // The contract allows a short read only at the end; a host that splits reads anyway
    // is asked for the rest rather than trusted to have meant zeros.
    while (data.len() as u64) < want {
        let got = data.len() as u64;
        let more = source.read(offset + got, chunk_u32(want - got))?;
        if more.is_empty() {
            return Err(Error(format!(
                "source returned no data at offset {} before its end at {size}",
                offset + got
            )));
        }
        data.extend_from_slice(&more);
    }
    data.truncate(chunk_usize(want));
    data.resize(chunk_usize(len), 0);
    Ok(data)
}

/// Converts a length of at most [`CHUNK`] bytes to u32; larger values are a bug here.
fn chunk_u32(len: u64) -> u32 {
    debug_assert!(len <= CHUNK);
    u32::try_from(len.min(CHUNK)).unwrap_or(u32::MAX)
}

/// Converts a length of at most [`CHUNK`] bytes to usize, which holds it on every target
/// (usize is 32 bits on wasm32).
pub(crate) fn chunk_usize(len: u64) -> usize {
    debug_assert!(len <= CHUNK);
    usize::try_from(len.min(CHUNK)).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem {
        data: Vec<u8>,
        extents: Vec<(u64, u64)>,
    }

    impl Source for Mem {
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn extents(&self) -> Result<Vec<(u64, u64)>, Error> {
            Ok(self.extents.clone())
        }
        fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, Error> {
            let start = usize::try_from(offset).map_err(|e| Error(e.to_string()))?;
            let end = (start + len as usize).min(self.data.len());
            // Split reads in two to exercise the short-read loop.
            let end = if end - start > 100 {
                start + (end - start) / 2
            } else {
                end
            };
            Ok(self.data[start..end].to_vec())
        }
    }

    #[test]
    fn zero_detection() {
        let mut data = vec![0u8; 65536 + 7];
        assert!(is_zero(&data));
        for at in [0, 15, 16, 255, 256, 4097, 65535, 65536 + 6] {
            data[at] = 1;
            assert!(!is_zero(&data), "byte {at}");
            data[at] = 0;
        }
        assert!(is_zero(&[]));
    }

    #[test]
    fn chunks_are_granule_aligned_merged_and_padded() {
        let granule = 65536;
        let size = 3 * granule + 100;
        let mut data = vec![0u8; usize::try_from(size).expect("small")];
        data[10] = 1;
        data[usize::try_from(size - 1).expect("small")] = 2;
        let source = Mem {
            data,
            // Two extents sharing the first granule, and one in the last partial granule.
            extents: vec![(10, 5), (100, 10), (3 * granule + 50, 1000)],
        };
        let mut seen = Vec::new();
        let mut reports = Vec::new();
        for_each_chunk(
            &source,
            granule,
            &mut |d, t| reports.push((d, t)),
            |o, d| {
                seen.push((o, d.len() as u64, d[10], d.last().copied()));
                Ok(())
            },
        )
        .expect("chunks");
        assert_eq!(
            seen,
            vec![(0, granule, 1, Some(0)), (3 * granule, granule, 0, Some(0))]
        );
        assert_eq!(reports.first(), Some(&(0, 65)));
        assert_eq!(reports.last(), Some(&(65, 65)));
    }

    #[test]
    fn overlapping_extents_are_rejected() {
        let source = Mem {
            data: vec![0; 1000],
            extents: vec![(0, 100), (50, 10)],
        };
        let result = for_each_chunk(&source, 512, &mut |_, _| {}, |_, _| Ok(()));
        assert!(result.is_err());
    }
}
