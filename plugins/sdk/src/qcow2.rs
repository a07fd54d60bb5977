//! The qcow2 writer: owns laying out a qcow2 version 3 image (QEMU's
//! docs/interop/qcow2.txt) with 64 KiB clusters, 16-bit refcounts, no compression and no
//! backing file, and writing it in one pass over the source.
//!
//! Layout: cluster 0 holds the header; then, in guest order, the data clusters that hold
//! anything but zeros, each L2 table written right after the last data cluster it maps;
//! then the L1 table, the refcount table and the refcount blocks. Because every cluster of
//! the file is used exactly once, every refcount is 1 and the refcount blocks follow from
//! the cluster count alone, so nothing but the L1 table and the current L2 table is kept
//! in memory, whatever the disk's size. The header is written last: until then the file
//! does not claim to be a qcow2 image.

use crate::{
    Error, Sink, Source, chunk_usize, for_each_chunk, for_each_window, is_zero, passes_through,
};

/// log2 of the cluster size; the spec allows 9 to 21 and QEMU defaults to 16.
const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// An L2 table is one cluster of 8-byte entries, so it maps 8192 clusters (512 MiB).
const L2_ENTRIES: u64 = CLUSTER / 8;
/// refcount_order 4: refcounts are 16 bits wide, 32768 of them per refcount block.
const REFCOUNT_ORDER: u32 = 4;
const REFCOUNTS_PER_BLOCK: u64 = CLUSTER * 8 / (1 << REFCOUNT_ORDER);
/// A refcount table cluster holds 8-byte offsets of refcount blocks.
const BLOCKS_PER_TABLE_CLUSTER: u64 = CLUSTER / 8;
/// Bit 63 of L1 and L2 entries ("COPIED"): the refcount of the cluster is exactly one.
/// qemu-img check reports an entry whose flag disagrees with the refcount as corrupt.
const COPIED: u64 = 1 << 63;
/// QEMU refuses L1 tables larger than 32 MiB (QCOW_MAX_L1_SIZE), i.e. disks above 2 PiB
/// with 64 KiB clusters.
const MAX_L1_BYTES: u64 = 32 << 20;
/// The version 3 header is 104 bytes up to and including header_length; we set
/// header_length accordingly (no compression_type field, so zlib, which is unused).
const HEADER_LENGTH: u32 = 104;
/// The largest file whose cluster offsets fit an L2 entry, which keeps host offsets in
/// bits 9-55: 64 PiB.
const MAX_FILE_BYTES: u64 = 1 << 56;

pub(crate) fn write(
    source: &dyn Source,
    sink: &mut dyn Sink,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64, Error> {
    // QEMU reads the size field as a whole number of 512-byte sectors (it divides and
    // drops the rest), so a disk whose size is not a multiple of 512 is rounded up, as
    // `qemu-img convert` does; the extra bytes read as zeros.
    let size = source
        .size()
        .checked_next_multiple_of(512)
        .ok_or_else(|| Error("disk size overflows".into()))?;
    let l1_size = size.div_ceil(CLUSTER).div_ceil(L2_ENTRIES);
    if l1_size * 8 > MAX_L1_BYTES {
        return Err(Error(format!(
            "a {size}-byte disk needs an L1 table larger than qcow2 readers accept"
        )));
    }
    let mut writer = Writer {
        sink,
        next_cluster: 1,
        l1: vec![0; usize::try_from(l1_size).map_err(|e| Error(e.to_string()))?],
        l2: vec![0; chunk_usize(CLUSTER)],
        l2_index: 0,
        l2_used: false,
    };
    if passes_through(source, writer.sink) {
        // The source says which clusters hold data and the sink copies them: the bytes
        // are never read here, which is most of the work on a full disk.
        let source_size = source.size();
        for_each_window(source, CLUSTER, progress, |offset, len| {
            let runs = source
                .data_runs(offset, len, CLUSTER)
                .unwrap_or_else(|| Err(Error("the source stopped finding data runs".into())))?;
            for (run, run_len) in runs {
                writer.copy_run(run, run_len, source_size)?;
            }
            Ok(())
        })?;
    } else {
        for_each_chunk(source, CLUSTER, progress, |offset, data| {
            writer.data(offset, data)
        })?;
    }
    writer.finish(size)
}

struct Writer<'a> {
    sink: &'a mut dyn Sink,
    /// The host cluster the next write goes to (cluster 0 is kept for the header).
    next_cluster: u64,
    /// L1 entries (offset of an L2 table, with COPIED) by L1 index; 0 = unallocated.
    l1: Vec<u64>,
    /// The L2 table being filled, already big-endian as it goes on disk.
    l2: Vec<u8>,
    /// Which L1 index `l2` belongs to.
    l2_index: u64,
    /// Whether `l2` maps any cluster and so must be written.
    l2_used: bool,
}

impl Writer<'_> {
    /// Stores the non-zero clusters of a chunk. Chunks come in ascending order and never
    /// cross a 4 MiB boundary, so each lies within the range of a single L2 table.
    fn data(&mut self, offset: u64, data: &[u8]) -> Result<(), Error> {
        let l1_index = offset / (CLUSTER * L2_ENTRIES);
        if l1_index != self.l2_index {
            self.flush_l2()?;
            self.l2_index = l1_index;
        }
        let cluster = chunk_usize(CLUSTER);
        let mut run: Option<usize> = None;
        for (index, piece) in data.chunks_exact(cluster).enumerate() {
            match (is_zero(piece), run) {
                (true, Some(start)) => {
                    self.write_run(offset, data, start, index)?;
                    run = None;
                }
                (false, None) => run = Some(index),
                _ => {}
            }
        }
        if let Some(start) = run {
            self.write_run(offset, data, start, data.len() / cluster)?;
        }
        Ok(())
    }

    /// Has the sink copy the clusters of `offset..offset + len` (cluster-aligned, within
    /// one L2 table's range) from the source to consecutive host clusters, and maps them.
    /// The last cluster of a disk that ends inside it is copied only up to the end; the
    /// rest of it is never written and reads as zeros.
    fn copy_run(&mut self, offset: u64, len: u64, source_size: u64) -> Result<(), Error> {
        let l1_index = offset / (CLUSTER * L2_ENTRIES);
        if l1_index != self.l2_index {
            self.flush_l2()?;
            self.l2_index = l1_index;
        }
        let host = self.next_cluster * CLUSTER;
        let copied = len.min(source_size.saturating_sub(offset));
        self.sink
            .copy_from_source(offset, copied, host)
            .unwrap_or_else(|| Err(Error("the sink stopped copying".into())))?;
        self.map(offset / CLUSTER, len / CLUSTER, host);
        Ok(())
    }

    /// Maps `count` guest clusters from `first_guest` to consecutive host clusters from
    /// byte `host`, in the current L2 table.
    fn map(&mut self, first_guest: u64, count: u64, host: u64) {
        for k in 0..count {
            // A standard cluster descriptor: host offset in bits 9-55, bit 0 ("reads as
            // zeros") and bit 62 (compressed) clear.
            let entry = (host + k * CLUSTER) | COPIED;
            let slot = chunk_usize(((first_guest + k) % L2_ENTRIES) * 8);
            self.l2[slot..slot + 8].copy_from_slice(&entry.to_be_bytes());
        }
        self.next_cluster += count;
        self.l2_used = true;
    }

    /// Writes clusters `start..end` of the chunk at `offset` to consecutive host clusters,
    /// in one call, and maps them in the current L2 table.
    fn write_run(
        &mut self,
        offset: u64,
        data: &[u8],
        start: usize,
        end: usize,
    ) -> Result<(), Error> {
        let cluster = chunk_usize(CLUSTER);
        let host = self.next_cluster * CLUSTER;
        self.sink
            .write(host, &data[start * cluster..end * cluster])?;
        self.map(offset / CLUSTER + start as u64, (end - start) as u64, host);
        Ok(())
    }

    /// Writes the current L2 table after the data it maps, if it maps anything; an L2
    /// range with no data keeps an L1 entry of 0 and reads as zeros.
    fn flush_l2(&mut self) -> Result<(), Error> {
        if !self.l2_used {
            return Ok(());
        }
        let host = self.next_cluster * CLUSTER;
        self.sink.write(host, &self.l2)?;
        let index = usize::try_from(self.l2_index).map_err(|e| Error(e.to_string()))?;
        self.l1[index] = host | COPIED;
        self.next_cluster += 1;
        self.l2.fill(0);
        self.l2_used = false;
        Ok(())
    }

    /// Writes the L1 table, the refcounts and the header; returns the file's size.
    fn finish(mut self, size: u64) -> Result<u64, Error> {
        self.flush_l2()?;

        // The L1 table must start on a cluster boundary and is contiguous. An empty disk
        // has no L1 entries; like QEMU we then leave the offset at 0 rather than point at
        // a cluster no one references (which qemu-img check would call a leak).
        let l1_clusters = (self.l1.len() as u64 * 8).div_ceil(CLUSTER);
        let l1_offset = if l1_clusters == 0 {
            0
        } else {
            self.next_cluster * CLUSTER
        };
        if l1_clusters > 0 {
            let mut table = Vec::with_capacity(chunk_usize(l1_clusters.min(64) * CLUSTER));
            for entry in &self.l1 {
                table.extend_from_slice(&entry.to_be_bytes());
            }
            table.resize(
                usize::try_from(l1_clusters * CLUSTER).map_err(|e| Error(e.to_string()))?,
                0,
            );
            self.sink.write(l1_offset, &table)?;
            self.next_cluster += l1_clusters;
        }

        // The refcount structures must count themselves: grow the block and table
        // counts until they cover every cluster of the file, including their own.
        let used = self.next_cluster;
        let mut table_clusters = 1;
        let mut blocks = 1;
        loop {
            let total = used + table_clusters + blocks;
            let need_blocks = total.div_ceil(REFCOUNTS_PER_BLOCK);
            let need_table = need_blocks.div_ceil(BLOCKS_PER_TABLE_CLUSTER);
            if need_blocks == blocks && need_table == table_clusters {
                break;
            }
            blocks = need_blocks.max(blocks);
            table_clusters = need_table.max(table_clusters);
        }
        let total_clusters = used + table_clusters + blocks;
        if total_clusters * CLUSTER > MAX_FILE_BYTES {
            return Err(Error(
                "the qcow2 image would exceed the format's 64 PiB limit".into(),
            ));
        }

        // Refcount table: offsets of the blocks, which follow it directly.
        let table_offset = used * CLUSTER;
        let first_block = used + table_clusters;
        let mut table = Vec::with_capacity(
            usize::try_from(table_clusters * CLUSTER).map_err(|e| Error(e.to_string()))?,
        );
        for block in 0..blocks {
            table.extend_from_slice(&((first_block + block) * CLUSTER).to_be_bytes());
        }
        table.resize(table.capacity(), 0);
        self.sink.write(table_offset, &table)?;

        // Refcount blocks: a refcount of 1 for every cluster of the file, 0 past its end.
        // Full blocks are identical, so one buffer of up to 64 of them (4 MiB) is reused.
        let one = 1u16.to_be_bytes();
        let full_blocks = total_clusters / REFCOUNTS_PER_BLOCK;
        let batch = full_blocks.clamp(1, 64);
        let ones: Vec<u8> = one
            .iter()
            .copied()
            .cycle()
            .take(chunk_usize(batch * CLUSTER))
            .collect();
        let mut block = 0;
        while block < full_blocks {
            let count = (full_blocks - block).min(batch);
            let bytes = chunk_usize(count * CLUSTER);
            self.sink
                .write((first_block + block) * CLUSTER, &ones[..bytes])?;
            block += count;
        }
        if block < blocks {
            let counted = chunk_usize((total_clusters % REFCOUNTS_PER_BLOCK) * 2);
            let mut last = vec![0u8; chunk_usize(CLUSTER)];
            last[..counted].copy_from_slice(&ones[..counted]);
            self.sink.write((first_block + block) * CLUSTER, &last)?;
        }

        let file_size = total_clusters * CLUSTER;
        self.sink.set_size(file_size)?;
        let l1_size = u32::try_from(self.l1.len()).map_err(|e| Error(e.to_string()))?;
        let table_clusters = u32::try_from(table_clusters).map_err(|e| Error(e.to_string()))?;
        self.sink.write(
            0,
            &header(size, l1_size, l1_offset, table_offset, table_clusters),
        )?;
        Ok(file_size)
    }
}

/// The version 3 header (all fields big-endian), followed by the end-of-extensions marker.
fn header(
    size: u64,
    l1_size: u32,
    l1_offset: u64,
    table_offset: u64,
    table_clusters: u32,
) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LENGTH as usize + 8);
    h.extend_from_slice(b"QFI\xfb"); // 0: magic
    h.extend_from_slice(&3u32.to_be_bytes()); // 4: version
    h.extend_from_slice(&0u64.to_be_bytes()); // 8: backing_file_offset (none)
    h.extend_from_slice(&0u32.to_be_bytes()); // 16: backing_file_size
    h.extend_from_slice(&CLUSTER_BITS.to_be_bytes()); // 20: cluster_bits
    h.extend_from_slice(&size.to_be_bytes()); // 24: size (virtual disk bytes)
    h.extend_from_slice(&0u32.to_be_bytes()); // 32: crypt_method (none)
    h.extend_from_slice(&l1_size.to_be_bytes()); // 36: l1_size (entries)
    h.extend_from_slice(&l1_offset.to_be_bytes()); // 40: l1_table_offset
    h.extend_from_slice(&table_offset.to_be_bytes()); // 48: refcount_table_offset
    h.extend_from_slice(&table_clusters.to_be_bytes()); // 56: refcount_table_clusters
    h.extend_from_slice(&0u32.to_be_bytes()); // 60: nb_snapshots
    h.extend_from_slice(&0u64.to_be_bytes()); // 64: snapshots_offset
    h.extend_from_slice(&0u64.to_be_bytes()); // 72: incompatible_features (clean, no dirty bit)
    h.extend_from_slice(&0u64.to_be_bytes()); // 80: compatible_features
    h.extend_from_slice(&0u64.to_be_bytes()); // 88: autoclear_features
    h.extend_from_slice(&REFCOUNT_ORDER.to_be_bytes()); // 96: refcount_order
    h.extend_from_slice(&HEADER_LENGTH.to_be_bytes()); // 100: header_length
    debug_assert_eq!(h.len(), HEADER_LENGTH as usize);
    // Header extensions start at header_length; type 0 ends the list.
    h.extend_from_slice(&[0; 8]);
    h
}
