//! The VMDK writer: owns producing a stream-optimized sparse extent (VMware's Virtual Disk
//! Format 5.0, "Stream-Optimized Compressed Sparse Extents"), the variant cloud importers
//! and OVF tools expect, with the descriptor embedded in the same file.
//!
//! The file is written strictly front to back, as the format intends: the header (whose
//! gdOffset says "grain directory at the end"), the descriptor, then each non-zero 64 KiB
//! grain deflate-compressed behind a grain marker, each grain table behind its marker once
//! its 32 MiB range is done, and finally the grain directory, the footer (the header again,
//! now with the real gdOffset) and the end-of-stream marker. Writes are batched into 4 MiB
//! buffers; memory holds one grain table and the grain directory (4 bytes per 32 MiB).

use flate2::{Compress, Compression, FlushCompress, Status};

use crate::{CHUNK, Error, Sink, Source, chunk_usize, for_each_chunk, is_zero};

const SECTOR: u64 = 512;
/// Grain size in sectors: 128 sectors = 64 KiB, the size VMware and QEMU use.
const GRAIN_SECTORS: u64 = 128;
const GRAIN: u64 = GRAIN_SECTORS * SECTOR;
/// numGTEsPerGT is fixed at 512 by the spec, so a grain table (2 KiB, 4 sectors) maps
/// 32 MiB of disk.
const GTES_PER_GT: u64 = 512;
const GT_SECTORS: u64 = GTES_PER_GT * 4 / SECTOR;
/// "KDMV" read as a little-endian u32.
const MAGIC: u32 = 0x564d_444b;
/// Stream-optimized extents (compressed grains) are version 3.
const VERSION: u32 = 3;
/// flags: bit 0 = the newline-detection characters below are valid, bit 16 = grains are
/// compressed, bit 17 = grains and metadata are preceded by markers.
const FLAGS: u32 = 1 | (1 << 16) | (1 << 17);
/// compressAlgorithm 1 is deflate, in the zlib (RFC 1950) wrapping VMware uses.
const COMPRESS_DEFLATE: u16 = 1;
/// gdOffset in the leading header of a stream: the grain directory is found via the footer.
const GD_AT_END: u64 = u64::MAX;
/// Metadata marker types.
const MARKER_EOS: u32 = 0;
const MARKER_GT: u32 = 1;
const MARKER_GD: u32 = 2;
const MARKER_FOOTER: u32 = 3;
/// The descriptor starts right after the header, in sector 1.
const DESCRIPTOR_OFFSET: u64 = 1;
/// overHead: the sectors before the first grain. One grain's worth, as VMware's own
/// stream-optimized files have, leaves room for the header and descriptor.
const OVERHEAD: u64 = GRAIN_SECTORS;
/// Grain and grain-table offsets are 32-bit sector numbers, which caps the file at 2 TiB.
const MAX_SECTOR: u64 = u32::MAX as u64;
/// The largest disk accepted: 64 TiB, just above VMware's own 62 TiB limit for a virtual
/// disk, which keeps the in-memory grain directory at 8 MiB or less.
const MAX_CAPACITY: u64 = 64 << 40;

pub(crate) fn write(
    source: &dyn Source,
    sink: &mut dyn Sink,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64, Error> {
    // capacity is in sectors; a disk whose size is not a multiple of 512 is rounded up,
    // the extra bytes reading as zeros.
    let capacity = source.size().div_ceil(SECTOR);
    if source.size() > MAX_CAPACITY {
        return Err(Error(format!(
            "a {}-byte disk is larger than the 64 TiB a VMDK is written for",
            source.size()
        )));
    }
    let gd_entries = capacity.div_ceil(GRAIN_SECTORS).div_ceil(GTES_PER_GT);
    let descriptor = descriptor(capacity);
    let descriptor_sectors = (descriptor.len() as u64).div_ceil(SECTOR);
    if DESCRIPTOR_OFFSET + descriptor_sectors > OVERHEAD {
        return Err(Error(
            "the VMDK descriptor does not fit before the first grain".into(),
        ));
    }

    let mut writer = Writer {
        out: Stream {
            sink,
            flushed: 0,
            buffer: Vec::with_capacity(chunk_usize(CHUNK) + chunk_usize(2 * GRAIN)),
        },
        // Level 1: on incompressible data (encrypted or already compressed disks)
        // miniz_oxide's higher levels are over three times slower (about 21 s against 6 s
        // per GiB when measured) for nothing, while on text-like data level 1 is only
        // about a quarter larger than zlib's default.
        compress: Compress::new(Compression::fast(), true),
        compressed: Vec::with_capacity(chunk_usize(2 * GRAIN)),
        gd: vec![0; usize::try_from(gd_entries).map_err(|e| Error(e.to_string()))?],
        gt: vec![0; chunk_usize(GTES_PER_GT)],
        gt_index: 0,
        gt_used: false,
    };
    let head = header(capacity, descriptor_sectors, GD_AT_END);
    writer.out.push(&head)?;
    writer.out.push(&descriptor)?;
    writer.out.pad_to_sector(OVERHEAD)?;

    for_each_chunk(source, GRAIN, progress, |offset, data| {
        writer.data(offset, data)
    })?;
    writer.finish(capacity, descriptor_sectors)
}

/// A sequential writer batching small pieces (markers, compressed grains) into large
/// sink writes.
struct Stream<'a> {
    sink: &'a mut dyn Sink,
    /// Bytes already handed to the sink.
    flushed: u64,
    buffer: Vec<u8>,
}

impl Stream<'_> {
    fn position(&self) -> u64 {
        self.flushed + self.buffer.len() as u64
    }

    /// The sector the next byte goes to; every structure starts on a sector boundary.
    fn sector(&self) -> u64 {
        debug_assert!(self.position().is_multiple_of(SECTOR));
        self.position() / SECTOR
    }

    fn push(&mut self, data: &[u8]) -> Result<(), Error> {
        self.buffer.extend_from_slice(data);
        if self.buffer.len() as u64 >= CHUNK {
            self.flush()?;
        }
        Ok(())
    }

    /// Pads with zeros up to a sector boundary, or up to sector `at_least` if that is later.
    fn pad_to_sector(&mut self, at_least: u64) -> Result<(), Error> {
        let target = self
            .position()
            .next_multiple_of(SECTOR)
            .max(at_least * SECTOR);
        let padding = chunk_usize(target - self.position());
        self.buffer.resize(self.buffer.len() + padding, 0);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Error> {
        if !self.buffer.is_empty() {
            self.sink.write(self.flushed, &self.buffer)?;
            self.flushed += self.buffer.len() as u64;
            self.buffer.clear();
        }
        Ok(())
    }
}

struct Writer<'a> {
    out: Stream<'a>,
    compress: Compress,
    compressed: Vec<u8>,
    /// Grain directory: sector of each grain table, 0 where the table was not needed.
    gd: Vec<u32>,
    /// The grain table being filled: sector of each grain's marker, 0 = reads as zeros.
    gt: Vec<u32>,
    /// Which grain directory entry `gt` belongs to.
    gt_index: u64,
    gt_used: bool,
}

impl Writer<'_> {
    /// Compresses and appends the non-zero grains of a chunk (chunks come in ascending
    /// order and are whole grains).
    fn data(&mut self, offset: u64, data: &[u8]) -> Result<(), Error> {
        for (index, grain) in data.chunks_exact(chunk_usize(GRAIN)).enumerate() {
            if is_zero(grain) {
                continue;
            }
            let grain_number = offset / GRAIN + index as u64;
            let gt_index = grain_number / GTES_PER_GT;
            if gt_index != self.gt_index {
                self.flush_gt()?;
                self.gt_index = gt_index;
            }
            let sector = self.out.sector();
            if sector > MAX_SECTOR {
                return Err(Error("the VMDK image would exceed its 2 TiB limit".into()));
            }
            self.compressed.clear();
            self.compress.reset();
            let status = self
                .compress
                .compress_vec(grain, &mut self.compressed, FlushCompress::Finish)
                .map_err(|e| Error(format!("deflate failed: {e}")))?;
            // The buffer has room for twice the grain, far above deflate's worst case, so
            // anything but the end of the stream is a bug.
            if status != Status::StreamEnd {
                return Err(Error("deflate did not finish a grain".into()));
            }
            // Grain marker: lba (u64, the grain's first sector on the disk), size (u32,
            // compressed bytes), then the data, padded to a sector.
            let size = u32::try_from(self.compressed.len()).map_err(|e| Error(e.to_string()))?;
            let mut marker = [0u8; 12];
            marker[..8].copy_from_slice(&(grain_number * GRAIN_SECTORS).to_le_bytes());
            marker[8..].copy_from_slice(&size.to_le_bytes());
            self.out.push(&marker)?;
            let Writer {
                out, compressed, ..
            } = self;
            out.push(compressed)?;
            self.out.pad_to_sector(0)?;
            self.gt[chunk_usize(grain_number % GTES_PER_GT)] = sector as u32;
            self.gt_used = true;
        }
        Ok(())
    }

    /// Writes the current grain table (marker, then the table) if it maps any grain. A
    /// table whose grains are all zero is left out and its directory entry stays 0, which
    /// reads as zeros.
    fn flush_gt(&mut self) -> Result<(), Error> {
        if !self.gt_used {
            return Ok(());
        }
        self.out.push(&metadata_marker(GT_SECTORS, MARKER_GT))?;
        let sector = self.out.sector();
        if sector > MAX_SECTOR {
            return Err(Error("the VMDK image would exceed its 2 TiB limit".into()));
        }
        let mut table = Vec::with_capacity(chunk_usize(GT_SECTORS * SECTOR));
        for entry in &self.gt {
            table.extend_from_slice(&entry.to_le_bytes());
        }
        self.out.push(&table)?;
        self.gd[chunk_usize(self.gt_index)] = sector as u32;
        self.gt.fill(0);
        self.gt_used = false;
        Ok(())
    }

    /// Writes the grain directory, footer and end-of-stream marker; returns the file size.
    fn finish(mut self, capacity: u64, descriptor_sectors: u64) -> Result<u64, Error> {
        self.flush_gt()?;
        // A directory of at least one sector, so that even an empty disk has one to point at.
        let gd_sectors = (self.gd.len() as u64 * 4).div_ceil(SECTOR).max(1);
        self.out.push(&metadata_marker(gd_sectors, MARKER_GD))?;
        let gd_offset = self.out.sector();
        if gd_offset > MAX_SECTOR {
            return Err(Error("the VMDK image would exceed its 2 TiB limit".into()));
        }
        for entry in &self.gd {
            self.out.push(&entry.to_le_bytes())?;
        }
        self.out.pad_to_sector(0)?;
        // The footer and the end-of-stream marker take the last two sectors of the file.
        self.out.push(&metadata_marker(1, MARKER_FOOTER))?;
        self.out
            .push(&header(capacity, descriptor_sectors, gd_offset))?;
        self.out.push(&metadata_marker(0, MARKER_EOS))?;
        self.out.flush()?;
        let size = self.out.position();
        self.out.sink.set_size(size)?;
        Ok(size)
    }
}

/// A metadata marker sector: numSectors (u64) of the structure that follows, size 0 (what
/// tells it from a grain marker), type (u32), then zeros to the end of the sector.
fn metadata_marker(sectors: u64, kind: u32) -> [u8; 512] {
    let mut marker = [0u8; 512];
    marker[..8].copy_from_slice(&sectors.to_le_bytes());
    marker[12..16].copy_from_slice(&kind.to_le_bytes());
    marker
}

/// The 512-byte SparseExtentHeader (little-endian), used both as header and as footer.
fn header(capacity: u64, descriptor_sectors: u64, gd_offset: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&VERSION.to_le_bytes());
    h[8..12].copy_from_slice(&FLAGS.to_le_bytes());
    h[12..20].copy_from_slice(&capacity.to_le_bytes());
    h[20..28].copy_from_slice(&GRAIN_SECTORS.to_le_bytes());
    h[28..36].copy_from_slice(&DESCRIPTOR_OFFSET.to_le_bytes());
    h[36..44].copy_from_slice(&descriptor_sectors.to_le_bytes());
    h[44..48].copy_from_slice(&(GTES_PER_GT as u32).to_le_bytes());
    // 48..56: rgdOffset stays 0: stream-optimized extents have no redundant tables.
    h[56..64].copy_from_slice(&gd_offset.to_le_bytes());
    h[64..72].copy_from_slice(&OVERHEAD.to_le_bytes());
    // 72: uncleanShutdown = 0. 73..77: the newline-detection characters, which let a
    // reader spot a file mangled by a text-mode transfer.
    h[73..77].copy_from_slice(b"\n \r\n");
    h[77..79].copy_from_slice(&COMPRESS_DEFLATE.to_le_bytes());
    h
}

/// The embedded descriptor. The extent line names the file itself; for a monolithic
/// stream-optimized disk readers use the file they opened, so the name is informative.
fn descriptor(capacity: u64) -> Vec<u8> {
    // The geometry VMware reports for SCSI (lsilogic) disks: 255 heads, 63 sectors per
    // track, cylinders capped at what the field has ever held.
    let cylinders = (capacity / (255 * 63)).clamp(1, 65535);
    // The content ID only needs to differ from the "no parent" value ffffffff; deriving it
    // from the capacity keeps the output reproducible.
    let cid = (capacity.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32 & 0xfffffffe;
    format!(
        "# Disk DescriptorFile\n\
         version=1\n\
         CID={cid:08x}\n\
         parentCID=ffffffff\n\
         createType=\"streamOptimized\"\n\
         \n\
         # Extent description\n\
         RW {capacity} SPARSE \"disk.vmdk\"\n\
         \n\
         # The Disk Data Base\n\
         #DDB\n\
         \n\
         ddb.virtualHWVersion = \"4\"\n\
         ddb.adapterType = \"lsilogic\"\n\
         ddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"255\"\n\
         ddb.geometry.sectors = \"63\"\n"
    )
    .into_bytes()
}
