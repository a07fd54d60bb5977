//! End-to-end checks of the image writers against QEMU: each format is written from a
//! sparse file and must pass `qemu-img check` (no errors, no leaks) and compare identical
//! to the source with `qemu-img compare`. qemu-img is required: a machine without it
//! fails these tests rather than skipping them. They use Linux's SEEK_DATA/SEEK_HOLE and
//! run only there (the crate itself also builds for wasm32-wasip2, where they compile to
//! nothing).
#![cfg(target_os = "linux")]

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use conductor_plugin_sdk::{Error, Format, Sink, Source, write_image};

const MIB: u64 = 1 << 20;
const CLUSTER: u64 = 64 << 10;

/// A source over a file. With `sparse`, its extents come from SEEK_DATA/SEEK_HOLE, as a
/// host would report them; without, the whole file is one extent, so the writers must
/// find the zeros themselves.
struct FileSource {
    file: File,
    size: u64,
    sparse: bool,
    /// Whether it answers `data_runs`, as the host's disks do, so the writers take the
    /// path where the sink copies the data unread.
    in_place: bool,
}

impl FileSource {
    fn open(path: &Path, sparse: bool) -> Self {
        let file = File::open(path).expect("open source");
        let size = file.metadata().expect("source metadata").len();
        FileSource {
            file,
            size,
            sparse,
            in_place: false,
        }
    }
}

fn io_error(e: std::io::Error) -> Error {
    Error(e.to_string())
}

impl Source for FileSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn extents(&self) -> Result<Vec<(u64, u64)>, Error> {
        if !self.sparse {
            return Ok(vec![(0, self.size)]);
        }
        let fd = self.file.as_raw_fd();
        let mut extents = Vec::new();
        let mut pos = 0;
        while pos < self.size {
            let offset = i64::try_from(pos).map_err(|e| Error(e.to_string()))?;
            // SAFETY: lseek on a descriptor this struct owns; it only moves the offset.
            let data = unsafe { libc::lseek(fd, offset, libc::SEEK_DATA) };
            if data < 0 {
                // ENXIO: no data after `pos`.
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            if hole < 0 {
                return Err(io_error(std::io::Error::last_os_error()));
            }
            let (data, hole) = (data as u64, hole as u64);
            extents.push((data, hole - data));
            pos = hole;
        }
        Ok(extents)
    }

    fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, Error> {
        let len = len as u64;
        let len = len.min(self.size.saturating_sub(offset));
        let mut buffer = vec![0; usize::try_from(len).map_err(|e| Error(e.to_string()))?];
        self.file
            .read_exact_at(&mut buffer, offset)
            .map_err(io_error)?;
        Ok(buffer)
    }

    fn data_runs(
        &self,
        offset: u64,
        len: u64,
        granule: u64,
    ) -> Option<Result<Vec<(u64, u64)>, Error>> {
        if !self.in_place {
            return None;
        }
        let end = (offset + len).min(self.size);
        let mut buffer = vec![0u8; end.saturating_sub(offset) as usize];
        if let Err(e) = self.file.read_exact_at(&mut buffer, offset) {
            return Some(Err(io_error(e)));
        }
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (index, block) in buffer.chunks(granule as usize).enumerate() {
            if block.iter().any(|&b| b != 0) {
                let at = offset + index as u64 * granule;
                match runs.last_mut() {
                    Some((start, run)) if *start + *run == at => *run += granule,
                    _ => runs.push((at, granule)),
                }
            }
        }
        Some(Ok(runs))
    }
}

/// A sink over a file; given the source's file, it copies from it itself, as the host
/// does.
struct FileSink(File, Option<File>);

impl Sink for FileSink {
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), Error> {
        self.0.write_all_at(data, offset).map_err(io_error)
    }

    fn set_size(&mut self, size: u64) -> Result<(), Error> {
        self.0.set_len(size).map_err(io_error)
    }

    fn copy_from_source(&mut self, offset: u64, len: u64, at: u64) -> Option<Result<(), Error>> {
        let source = self.1.as_ref()?;
        let mut buffer = vec![0u8; len as usize];
        Some(
            source
                .read_exact_at(&mut buffer, offset)
                .and_then(|()| self.0.write_all_at(&buffer, at))
                .map_err(io_error),
        )
    }
}

/// Deterministic pseudo-random bytes (xorshift64), never all zero.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// What converting one file produced.
struct Written {
    image: PathBuf,
    image_size: u64,
    reports: Vec<(u64, u64)>,
}

fn convert(format: Format, source: &Path, sparse: bool, dir: &Path) -> Written {
    convert_as(format, source, sparse, false, dir)
}

/// As [`convert`]; with `in_place`, through the path where the sink copies data unread.
fn convert_as(format: Format, source: &Path, sparse: bool, in_place: bool, dir: &Path) -> Written {
    let name = match format {
        Format::Raw => "out.raw",
        Format::Qcow2 => "out.qcow2",
        Format::Vmdk => "out.vmdk",
    };
    let image = dir.join(format!(
        "{}-{name}",
        if sparse { "sparse" } else { "dense" }
    ));
    let source_path = source;
    let mut source = FileSource::open(source, sparse);
    source.in_place = in_place;
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&image)
        .expect("create image");
    let mut sink = FileSink(
        file,
        in_place.then(|| File::open(source_path).expect("open source")),
    );
    let mut reports = Vec::new();
    let image_size = write_image(format, &source, &mut sink, &mut |done, total| {
        reports.push((done, total));
    })
    .expect("write image");
    assert_eq!(
        fs::metadata(&image).expect("image metadata").len(),
        image_size,
        "returned size is the file's"
    );
    Written {
        image,
        image_size,
        reports,
    }
}

fn qemu_format(format: Format) -> &'static str {
    match format {
        Format::Raw => "raw",
        Format::Qcow2 => "qcow2",
        Format::Vmdk => "vmdk",
    }
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img must be installed to run these tests")
}

/// `qemu-img check` exits 0 only with no corruptions and no leaks (2 = corrupt, 3 = leaks).
fn assert_check(format: Format, image: &Path) {
    if format == Format::Raw {
        return; // Raw images have no metadata to check.
    }
    let path = image.to_str().expect("utf-8 path");
    let out = qemu_img(&["check", "-f", qemu_format(format), path]);
    assert!(
        out.status.success(),
        "qemu-img check {path} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("No errors were found"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn assert_identical(format: Format, source: &Path, image: &Path) {
    let (a, b) = (
        source.to_str().expect("utf-8 path"),
        image.to_str().expect("utf-8 path"),
    );
    let out = qemu_img(&["compare", "-f", "raw", "-F", qemu_format(format), a, b]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("Images are identical"),
        "qemu-img compare failed ({}):\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // The virtual size is the source's, rounded up to 512 bytes as QEMU counts sectors
    // (for raw files too).
    let out = qemu_img(&["info", "--output=json", "-f", qemu_format(format), b]);
    let info = String::from_utf8_lossy(&out.stdout);
    let size = fs::metadata(source).expect("source metadata").len();
    let expected = size.next_multiple_of(512);
    assert!(
        info.contains(&format!("\"virtual-size\": {expected},")),
        "expected virtual size {expected}:\n{info}"
    );
}

fn assert_progress(reports: &[(u64, u64)], total: u64) {
    assert!(!reports.is_empty());
    assert!(
        reports.iter().all(|&(_, t)| t == total),
        "total is constant"
    );
    assert!(
        reports.windows(2).all(|w| w[0].0 <= w[1].0),
        "progress only grows"
    );
    assert_eq!(
        reports.last().map(|r| r.0),
        Some(total),
        "ends at the total"
    );
}

fn blank(format: Format) {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("blank.raw");
    File::create(&source)
        .and_then(|f| f.set_len(10 << 30))
        .expect("create blank disk");
    let written = convert(format, &source, true, dir.path());
    assert_check(format, &written.image);
    assert_identical(format, &source, &written.image);
    assert_progress(&written.reports, 0);
    let allocated = fs::metadata(&written.image).expect("metadata").blocks() * 512;
    match format {
        // The raw image has the disk's length but no data.
        Format::Raw => assert_eq!(allocated, 0, "blank raw image allocates nothing"),
        _ => assert!(
            written.image_size <= 256 << 10,
            "{} bytes",
            written.image_size
        ),
    }
}

/// Writes a disk with data at awkward places and returns the number of 64 KiB clusters
/// holding non-zero data.
fn scattered_disk(path: &Path, size: u64) -> u64 {
    let file = File::create(path).expect("create disk");
    file.set_len(size).expect("size disk");
    let mut pieces: Vec<(u64, Vec<u8>)> = vec![
        (0, noise(1, 4096)),
        // Not aligned to anything.
        (MIB + 1000, noise(2, 5000)),
        // Crossing a 64 KiB cluster boundary.
        (3 * CLUSTER - 100, noise(3, 200)),
        // A larger run, of an odd length.
        (10 * MIB, noise(4, (3 * MIB + 7) as usize)),
        // Allocated but zero: must not take space in the image.
        (20 * MIB, vec![0; MIB as usize]),
        // Crossing the 32 MiB range of a VMDK grain table.
        (32 * MIB - 300, noise(5, 600)),
        // The last, partial cluster, up to the very last byte.
        (size - 100, noise(6, 100)),
    ];
    if size > 1 << 30 {
        // Crossing the 512 MiB range of a qcow2 L2 table, and far into the disk.
        pieces.push((512 * MIB - 4096, noise(7, 8192)));
        pieces.push((1 << 30, noise(8, 70000)));
    }
    let mut clusters = std::collections::BTreeSet::new();
    for (offset, data) in &pieces {
        file.write_all_at(data, *offset).expect("write piece");
        if data.iter().any(|&b| b != 0) {
            let end = offset + data.len() as u64;
            clusters.extend(offset / CLUSTER..end.div_ceil(CLUSTER));
        }
    }
    file.sync_all().expect("sync disk");
    clusters.len() as u64
}

fn scattered(format: Format, size: u64, sparse: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("scattered.raw");
    let data_clusters = scattered_disk(&source, size);
    let written = convert(format, &source, sparse, dir.path());
    assert_check(format, &written.image);
    assert_identical(format, &source, &written.image);
    let total = FileSource::open(&source, sparse)
        .extents()
        .expect("extents")
        .iter()
        .map(|e| e.1)
        .sum();
    assert_progress(&written.reports, total);
    // Zero clusters, including the allocated zero megabyte, take no space: the image is
    // the non-zero clusters plus a few clusters of metadata (compressed, for VMDK).
    let bound = (data_clusters + 8) * CLUSTER;
    match format {
        Format::Raw => {
            assert_eq!(written.image_size, size);
            let allocated = fs::metadata(&written.image).expect("metadata").blocks() * 512;
            assert!(allocated <= bound, "{allocated} bytes allocated");
        }
        _ => assert!(
            written.image_size <= bound,
            "{} bytes for {data_clusters} data clusters",
            written.image_size
        ),
    }
}

#[test]
fn raw_blank() {
    blank(Format::Raw);
}

#[test]
fn qcow2_blank() {
    blank(Format::Qcow2);
}

#[test]
fn vmdk_blank() {
    blank(Format::Vmdk);
}

/// A 1.5 GiB sparse disk (three qcow2 L2 ranges) whose size is neither cluster- nor
/// sector-aligned.
const BIG: u64 = (1 << 30) + 512 * MIB + 12345;
/// A small disk read as one extent, so every zero is found by reading.
const SMALL: u64 = 64 * MIB + 12345;

#[test]
fn raw_scattered() {
    scattered(Format::Raw, BIG, true);
    scattered(Format::Raw, SMALL, false);
}

#[test]
fn qcow2_scattered() {
    scattered(Format::Qcow2, BIG, true);
    scattered(Format::Qcow2, SMALL, false);
}

#[test]
fn vmdk_scattered() {
    scattered(Format::Vmdk, BIG, true);
    scattered(Format::Vmdk, SMALL, false);
}

/// Incompressible data in every cluster, read as reported by the file system, so long
/// runs of data clusters (and incompressible VMDK grains) are exercised.
#[test]
fn dense_random_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("dense.raw");
    let size = 16 * MIB + 512;
    fs::write(&source, noise(9, size as usize)).expect("write dense disk");
    for format in [Format::Raw, Format::Qcow2, Format::Vmdk] {
        let written = convert(format, &source, true, dir.path());
        assert_check(format, &written.image);
        assert_identical(format, &source, &written.image);
        assert_progress(&written.reports, size);
    }
}

/// Raw and qcow2 through the path a plugin takes over the host's disks: the source says
/// where the data is and the sink copies it, unread by the writer.
#[test]
fn data_passed_through_unread() {
    let dir = tempfile::tempdir().expect("tempdir");
    let scattered = dir.path().join("scattered.raw");
    let data_clusters = scattered_disk(&scattered, BIG);
    let dense = dir.path().join("dense.raw");
    fs::write(&dense, noise(11, (16 * MIB + 512) as usize)).expect("write dense disk");
    for format in [Format::Raw, Format::Qcow2] {
        for (source, sparse) in [(&scattered, true), (&dense, true), (&scattered, false)] {
            let written = convert_as(format, source, sparse, true, dir.path());
            assert_check(format, &written.image);
            assert_identical(format, source, &written.image);
        }
        let written = convert_as(format, &scattered, true, true, dir.path());
        if format == Format::Qcow2 {
            assert!(written.image_size <= (data_clusters + 8) * CLUSTER);
        }
    }
}
