//! The ec2 push measured against coldsnap, the EBS-direct uploader, in one run, on the
//! same file and the same emulator (DESIGN.md §8): a 1 GiB raw image whose 512 KiB blocks
//! alternate between random data and (allocated) zeros, so half of it is data to send and
//! half is zeros to leave out. Figures are MB/s of the data sent (512 MiB), the median of
//! three runs; the emulator is reset before each run so it never holds more than one
//! upload.
//!
//! Our push does all of what a push does (StartSnapshot, the blocks, CompleteSnapshot,
//! waiting for `completed`, RegisterImage, tags); coldsnap runs `upload --omit-zero-blocks
//! --wait`.
//!
//! Needs the emulator (CONDUCTOR_TEST_MOTO, as tests/emulators/up.sh writes it) and
//! coldsnap (CONDUCTOR_COLDSNAP, or target/tools/bin/coldsnap); bench/run.sh provides
//! both. Run: `bench/run.sh`, or with both set, `cargo bench --bench ec2`.

mod common;

use conductor::plugins::{CallContext, Limits, MemoryReset, Plugins, Target};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const RUNS: usize = 3;
const BLOCK: u64 = 512 << 10;
const SIZE: u64 = 1 << 30;

fn image(path: &Path) -> u64 {
    let file = std::fs::File::create(path).expect("create the image");
    let mut seed = 0x243f_6a88_85a3_08d3u64;
    let mut block = vec![0u8; BLOCK as usize];
    let zeros = vec![0u8; BLOCK as usize];
    let mut data = 0;
    for i in 0..SIZE / BLOCK {
        if i % 2 == 0 {
            for chunk in block.chunks_exact_mut(8) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                chunk.copy_from_slice(&seed.to_le_bytes());
            }
            file.write_all_at(&block, i * BLOCK).expect("write");
            data += BLOCK;
        } else {
            // Written, not left as a hole: both uploaders must read and judge them.
            file.write_all_at(&zeros, i * BLOCK).expect("write");
        }
    }
    file.sync_all().expect("sync");
    data
}

fn reset(endpoint: &str) {
    let status = Command::new("curl")
        .args(["-sf", "-o", "/dev/null", "-X", "POST"])
        .arg(format!("{endpoint}/moto-api/reset"))
        .status()
        .expect("curl");
    assert!(
        status.success(),
        "could not reset the emulator at {endpoint}"
    );
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn main() {
    let endpoint = std::env::var("CONDUCTOR_TEST_MOTO").expect(
        "CONDUCTOR_TEST_MOTO names the EC2/EBS emulator; bench/run.sh starts it (tests/emulators/up.sh)",
    );
    let coldsnap = std::env::var_os("CONDUCTOR_COLDSNAP")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/bin/coldsnap")
        });
    assert!(
        coldsnap.exists(),
        "coldsnap is not at {}; bench/run.sh installs it",
        coldsnap.display()
    );
    let base = std::env::var_os("CONDUCTOR_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(base).expect("bench dir");
    let file = dir.path().join("half-zeros-1g.raw");
    let data = image(&file);
    println!("# ec2 push benchmark (cargo bench --bench ec2), emulator {endpoint}");
    println!(
        "# 1 GiB image, {} MiB of data in alternate 512 KiB blocks; median of {RUNS} runs",
        data >> 20
    );

    let plugins =
        Plugins::new(Limits::default(), &[], MemoryReset::Release, None, None).expect("engine");
    plugins.load_bundled().expect("bundled plugins");
    let ec2 = plugins.get("ec2").expect("the ec2 plugin");
    let target = Target {
        provider_name: "ec2-bench".into(),
        settings: vec![
            ("region".into(), "us-east-1".into()),
            ("endpoint".into(), endpoint.clone()),
        ],
        account_name: "bench".into(),
        credentials: vec![
            ("username".into(), "AKIDBENCH".into()),
            ("password".into(), "bench-secret".into()),
            ("account_id".into(), "123456789012".into()),
        ],
    };

    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for run in 0..RUNS {
        reset(&endpoint);
        let context = CallContext::quiet("bench push");
        let start = Instant::now();
        let ami = ec2
            .push(context, &target, &file, &format!("bench-{run}"), &[])
            .expect("the ec2 push");
        ours.push(start.elapsed());
        assert!(ami.starts_with("ami-"), "{ami}");

        reset(&endpoint);
        let start = Instant::now();
        let status = Command::new(&coldsnap)
            .args(["--region", "us-east-1", "--endpoint", &endpoint])
            .args(["upload", "--omit-zero-blocks", "--wait", "--no-progress"])
            .arg(&file)
            .env("AWS_ACCESS_KEY_ID", "AKIDBENCH")
            .env("AWS_SECRET_ACCESS_KEY", "bench-secret")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run coldsnap");
        assert!(status.success(), "coldsnap upload failed");
        theirs.push(start.elapsed());
    }
    reset(&endpoint);

    let ours = median(ours);
    let theirs = median(theirs);
    let rate = |d: Duration| data as f64 / 1e6 / d.as_secs_f64();
    let ratio = theirs.as_secs_f64() / ours.as_secs_f64();
    println!(
        "{:<46} {:>10} {:>16} {:>7} {:>9}  result",
        "what", "figure", "comparison", "ratio", "budget"
    );
    println!(
        "{:<46} {:>7.1}MB/s {:>11.1}MB/s {ratio:>7.2} {:>9}  {}",
        "ec2 push of 1 GiB, half zero blocks",
        rate(ours),
        rate(theirs),
        "≥1.0x",
        if ratio >= 1.0 { "met" } else { "MISSED" }
    );
    println!(
        "# ours {:.2} s, coldsnap {:.2} s (upload --omit-zero-blocks --wait, 64 workers)",
        ours.as_secs_f64(),
        theirs.as_secs_f64()
    );
    let peak = common::peak_memory_mib(None);
    println!("# peak memory of the process hosting the plugin: {peak:.0} MiB (VmHWM)");
}
