//! The data path measured against the tools it competes with, in one run on the same
//! files (DESIGN.md §8):
//! - a raw image copied through the `mock` plugin (host disk resources, wasm, back)
//!   against `cp`;
//! - a qcow2 image written by the plugin (plugins/sdk) against `qemu-img convert -O qcow2`;
//!
//! each for a 1 GiB fully allocated disk and a 10 GiB sparse one. Every figure is the
//! median of three runs; outputs are removed and the page cache flushed between runs.
//!
//! Run: `cargo bench --bench disk` (set CONDUCTOR_BENCH_DIR to put the files elsewhere
//! than the system temporary directory).

mod common;

use conductor::plugins::{CallContext, Limits, MemoryReset, Plugins, TemplateFacts};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const RUNS: usize = 3;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn flush() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

fn timed(mut run: impl FnMut(), cleanup: impl Fn()) -> Duration {
    let mut samples = Vec::new();
    for _ in 0..RUNS {
        cleanup();
        flush();
        let start = Instant::now();
        run();
        flush();
        samples.push(start.elapsed());
    }
    cleanup();
    median(samples)
}

fn run(cmd: &mut Command) {
    let status = cmd.status().expect("run a command");
    assert!(status.success(), "{cmd:?} failed");
}

fn make_inputs(dir: &Path) -> Vec<(String, PathBuf, u64)> {
    let dense = dir.join("dense-1g.raw");
    let sparse = dir.join("sparse-10g.raw");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut block = vec![0u8; 1 << 20];
    let file = std::fs::File::create(&dense).expect("create");
    for i in 0..1024u64 {
        for chunk in block.chunks_exact_mut(8) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            chunk.copy_from_slice(&seed.to_le_bytes());
        }
        file.write_all_at(&block, i << 20).expect("write");
    }
    let file = std::fs::File::create(&sparse).expect("create");
    file.set_len(10 << 30).expect("size");
    // 256 MiB of data spread over the 10 GiB, one MiB every 40 MiB.
    for i in 0..256u64 {
        file.write_all_at(&block, i * (40 << 20)).expect("write");
    }
    flush();
    vec![
        ("1 GiB allocated".into(), dense, 1 << 30),
        ("10 GiB sparse".into(), sparse, 10 << 30),
    ]
}

fn main() {
    let base = std::env::var_os("CONDUCTOR_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(base).expect("bench dir");
    println!("# conductor data-path benchmark (cargo bench --bench disk)");
    println!(
        "# files in {}; median of {RUNS} runs each",
        dir.path().display()
    );
    let plugins =
        Plugins::new(Limits::default(), &[], MemoryReset::Release, None, None).expect("engine");
    plugins.load_bundled().expect("bundled plugins");
    let mock = plugins.get("mock").expect("the mock plugin");
    let out = dir.path().join("out");
    let remove = || {
        let _ = std::fs::remove_file(&out);
    };

    println!(
        "{:<40} {:>10} {:>12} {:>7} {:>8}  result",
        "what", "figure", "comparison", "ratio", "budget"
    );
    for (name, input, size) in make_inputs(dir.path()) {
        let facts = TemplateFacts {
            xml: String::new(),
            name: "bench".into(),
            os_name: "Fedora".into(),
            os_version: "14".into(),
            arch: "x86_64".into(),
            disk_size: size,
            install: None,
        };
        let build = |format: &str| {
            let parameters = vec![("format".to_owned(), format.to_owned())];
            mock.build(
                CallContext::quiet("bench"),
                &facts,
                &input,
                &out,
                // The server's rule (jobs: base disk + 1/8 + 64 MiB) for the input.
                size + size / 8 + (64 << 20),
                &parameters,
            )
            .expect("plugin build");
        };
        let plugin_raw = timed(|| build("raw"), remove);
        let cp = timed(
            || {
                run(Command::new("cp")
                    .arg("--sparse=always")
                    .arg(&input)
                    .arg(&out))
            },
            remove,
        );
        let plugin_qcow2 = timed(|| build("qcow2"), remove);
        let convert = timed(
            || {
                run(Command::new("qemu-img")
                    .args(["convert", "-f", "raw", "-O", "qcow2"])
                    .arg(&input)
                    .arg(&out))
            },
            remove,
        );
        // Ratios are speed relative to the comparison: comparison time / our time.
        for (what, ours, theirs, budget) in [
            (format!("raw through a plugin, {name}"), plugin_raw, cp, 0.5),
            (
                format!("qcow2 by a plugin, {name}"),
                plugin_qcow2,
                convert,
                1.0,
            ),
        ] {
            let ratio = theirs.as_secs_f64() / ours.as_secs_f64().max(1e-9);
            println!(
                "{what:<40} {:>9.3}s {:>11.3}s {ratio:>7.2} {:>7}x  {}",
                ours.as_secs_f64(),
                theirs.as_secs_f64(),
                format!("≥{budget}"),
                if ratio >= budget { "met" } else { "MISSED" }
            );
        }
    }
    println!(
        "# comparisons: `cp --sparse=always` and `qemu-img convert -f raw -O qcow2` of the same file"
    );
    // The benchmark hosts the plugins in-process, as the server does: its own peak is the
    // server's data-path (or plugin-call) peak.
    let peak = common::peak_memory_mib(None);
    println!("# peak memory of the process hosting the plugins: {peak:.0} MiB (VmHWM)");
}
