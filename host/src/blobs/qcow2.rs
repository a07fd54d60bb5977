//! Reading qcow2 base images (versions 2 and 3) into raw disks: the L1/L2 tables map
//! guest clusters to file offsets; unallocated and zero clusters stay holes in the raw
//! output, compressed clusters are inflated. Backing files, encryption, external data
//! files and non-zlib compression are refused rather than misread.
//! (Layout facts from QEMU's docs/interop/qcow2.txt.)

use flate2::{Decompress, FlushDecompress};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub const MAGIC: [u8; 4] = *b"QFI\xfb";

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// Bits 9–55 of L1 and L2 entries hold the host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED: u64 = 1 << 62;
/// Version 3: the cluster reads as zeros.
const ZERO: u64 = 1;

/// Writes the guest view of the qcow2 image at `from` as a sparse raw file at `to`;
/// returns the virtual size. A virtual size over `max`, or a host cluster that two
/// guest clusters share (how a file of kilobytes claims gigabytes of data; images made
/// by qemu-img share none, snapshots aside, which are not read here), is refused.
/// Stops with [`io::ErrorKind::Interrupted`] when `should_stop` says so.
pub fn convert_to_raw(
    from: &Path,
    to: &Path,
    max: u64,
    should_stop: &dyn Fn() -> bool,
) -> io::Result<u64> {
    let input = File::open(from)?;
    let file_size = input.metadata()?.len();
    let mut header = [0u8; 112];
    input.read_exact_at(&mut header[..72], 0)?;
    if header[..4] != MAGIC {
        return Err(invalid("not a qcow2 image"));
    }
    let version = be32(&header, 4);
    if !(2..=3).contains(&version) {
        return Err(invalid(format!("qcow2 version {version} is not supported")));
    }
    if be64(&header, 8) != 0 {
        return Err(invalid("images with a backing file are not supported"));
    }
    let cluster_bits = be32(&header, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(invalid(format!(
            "cluster_bits {cluster_bits} is out of range"
        )));
    }
    let size = be64(&header, 24);
    if size > max {
        return Err(invalid(format!(
            "its virtual size of {size} bytes is larger than the {max} bytes this server allows"
        )));
    }
    if be32(&header, 32) != 0 {
        return Err(invalid("encrypted images are not supported"));
    }
    let l1_size = be32(&header, 36) as u64;
    let l1_offset = be64(&header, 40);
    if version == 3 {
        input.read_exact_at(&mut header[72..104], 72)?;
        // Incompatible features: bit 0 dirty and bit 1 corrupt are refused too, since
        // the tables may not describe the data.
        let incompatible = be64(&header, 72);
        if incompatible != 0 {
            return Err(invalid(format!(
                "incompatible qcow2 features {incompatible:#x} (dirty, corrupt, external data, zstd or extended L2) are not supported"
            )));
        }
    }
    let cluster = 1u64 << cluster_bits;
    let l2_entries = cluster / 8;
    if l1_size > (size / cluster / l2_entries) + 2 || l1_size * 8 > file_size {
        return Err(invalid("the L1 table does not fit the image"));
    }

    let output = File::create(to)?;
    output.set_len(size)?;
    let mut l1 = vec![0u8; (l1_size * 8) as usize];
    input.read_exact_at(&mut l1, l1_offset)?;
    let mut l2 = vec![0u8; cluster as usize];
    let mut data = vec![0u8; cluster as usize];
    let mut compressed = Vec::new();
    // Host offsets already read, of L2 tables and data clusters alike.
    let mut used = std::collections::HashSet::new();
    let mut claim = |offset: u64| {
        if used.insert(offset) {
            Ok(())
        } else {
            Err(invalid(format!(
                "the host cluster at {offset} is mapped more than once (a compression bomb is refused)"
            )))
        }
    };
    for i in 0..l1_size {
        let l2_offset = be64(&l1, (i * 8) as usize) & OFFSET_MASK;
        if l2_offset == 0 {
            continue;
        }
        if should_stop() {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "stopped"));
        }
        claim(l2_offset)?;
        input.read_exact_at(&mut l2, l2_offset)?;
        for j in 0..l2_entries {
            let guest = (i * l2_entries + j) * cluster;
            if guest >= size {
                break;
            }
            let entry = be64(&l2, (j * 8) as usize);
            let length = cluster.min(size - guest) as usize;
            if entry & COMPRESSED != 0 {
                // Compressed descriptor: offset in the low x bits, extra 512-byte
                // sectors above it, x = 62 - (cluster_bits - 8).
                let x = 62 - (cluster_bits - 8);
                let offset = entry & ((1u64 << x) - 1);
                let sectors = ((entry >> x) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
                claim(offset)?;
                let stored = (sectors * 512 - (offset & 511)).min(file_size.saturating_sub(offset));
                compressed.resize(stored as usize, 0);
                input.read_exact_at(&mut compressed, offset)?;
                let mut inflater = Decompress::new(false);
                inflater
                    .decompress(&compressed, &mut data, FlushDecompress::Finish)
                    .map_err(|e| invalid(format!("a compressed cluster is damaged: {e}")))?;
                if (inflater.total_out() as usize) < length {
                    return Err(invalid("a compressed cluster inflates short"));
                }
            } else {
                let host = entry & OFFSET_MASK;
                if host == 0 || entry & ZERO != 0 {
                    continue;
                }
                claim(host)?;
                input.read_exact_at(&mut data[..length], host)?;
            }
            if data[..length].iter().any(|&b| b != 0) {
                output.write_all_at(&data[..length], guest)?;
            }
        }
    }
    output.sync_all()?;
    Ok(size)
}
