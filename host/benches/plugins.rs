//! Start-up and plugin-call figures against the budgets of DESIGN.md §8:
//! - start with cached plugins: from spawning `conductor serve` on a data directory
//!   whose plugin cache is warm to the first answered request (budget ≤ 200 ms);
//! - plugin instantiate + trivial call: a fresh store and instance from the pooling
//!   allocator, then `check-account` on the mock plugin (budget ≤ 15 µs), with the
//!   default memory reset (`release`) and with `--plugin-memory-reset scan`.
//!
//! Run: `cargo bench --bench plugins`.

mod common;

use conductor::plugins::{CallContext, Limits, MemoryReset, Plugins, Target};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const STARTS: usize = 7;
const CALLS: usize = 2000;

/// Spawns the server, waits for its address, and times until `GET /api` is answered.
fn one_start(data: &std::path::Path) -> Duration {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_conductor"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .env("CONDUCTOR_ADMIN_PASSWORD", "bench")
        .env("CONDUCTOR_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start conductor");
    let stdout = child.stdout.take().expect("stdout");
    let mut address = String::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read");
        if let Some(url) = line.strip_prefix("conductor listening on http://") {
            address = url.to_owned();
            break;
        }
    }
    let mut stream = std::net::TcpStream::connect(&address).expect("connect");
    // admin:bench
    stream
        .write_all(b"GET /api HTTP/1.1\r\nHost: x\r\nAuthorization: Basic YWRtaW46YmVuY2g=\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("reply");
    let elapsed = started.elapsed();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let _ = child.kill();
    let _ = child.wait();
    elapsed
}

fn line(what: &str, figure: String, comparison: &str, ratio: f64, budget: &str, met: bool) {
    println!(
        "{what:<44} {figure:>10} {comparison:>14} {ratio:>7.2} {budget:>9}  {}",
        if met { "met" } else { "MISSED" }
    );
}

/// Microseconds per `check-account` call of the mock plugin, a new instance each, with
/// plugin memory reset the way `reset` says.
fn per_call(reset: MemoryReset) -> f64 {
    let plugins = Plugins::new(Limits::default(), &[], reset, None, None).expect("engine");
    plugins.load_bundled().expect("bundled");
    let mock = plugins.get("mock").expect("mock");
    let target = Target {
        provider_name: "mock".into(),
        settings: Vec::new(),
        account_name: "bench".into(),
        credentials: vec![
            ("username".into(), "u".into()),
            ("password".into(), "p".into()),
        ],
    };
    for _ in 0..100 {
        mock.check_account(CallContext::quiet("bench"), &target)
            .expect("warm-up call");
    }
    let started = Instant::now();
    for _ in 0..CALLS {
        mock.check_account(CallContext::quiet("bench"), &target)
            .expect("call");
    }
    (started.elapsed() / CALLS as u32).as_secs_f64() * 1e6
}

fn main() {
    println!("# conductor start-up and plugin-call benchmark (cargo bench --bench plugins)");
    println!(
        "{:<44} {:>10} {:>14} {:>7} {:>9}  result",
        "what", "figure", "comparison", "ratio", "budget"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    // The first start compiles the bundled plugins into the cache.
    let cold = one_start(dir.path());
    let mut warm: Vec<Duration> = (0..STARTS).map(|_| one_start(dir.path())).collect();
    warm.sort();
    let median = warm[STARTS / 2];
    line(
        "start with cached plugins to first answer",
        format!("{:.1}ms", median.as_secs_f64() * 1e3),
        &format!("{:.1}ms cold", cold.as_secs_f64() * 1e3),
        200.0 / (median.as_secs_f64() * 1e3),
        "≤200ms",
        median <= Duration::from_millis(200),
    );

    // The default reset, which the budget is for, then the single-tenant one.
    for reset in [MemoryReset::Release, MemoryReset::Scan] {
        let micros = per_call(reset);
        line(
            &format!("plugin instantiate + trivial call, {reset:?}"),
            format!("{micros:.1}µs"),
            "5µs wasmtime",
            15.0 / micros,
            "≤15µs",
            micros <= 15.0,
        );
    }
    println!(
        "# ratio = budget / figure (≥ 1 meets the budget); {STARTS} warm starts, {CALLS} calls"
    );
    // The benchmark hosts the plugins in-process, as the server does: its own peak is the
    // server's data-path (or plugin-call) peak.
    let peak = common::peak_memory_mib(None);
    println!("# peak memory of the process hosting the plugins: {peak:.0} MiB (VmHWM)");
}
