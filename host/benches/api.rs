//! The API against its budgets (DESIGN.md §8), on this machine, in one run:
//! - `GET /api/images/:id` throughput against an axum handler that returns the same
//!   bytes from memory (budget ≥ 50 %), both driven by `wrk` the same way;
//! - `GET /api/images` with 10,000 images, median latency (budget ≤ 20 ms);
//! - API p99 latency while 50 mock builds run, against the idle p99 (budget ≤ 50 ms);
//! - the server's peak memory (VmHWM) over the whole run.
//!
//! Needs `wrk` (Debian package `wrk`). Run: `cargo bench --bench api`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PASSWORD: &str = "bench-password";
const AUTH: &str = "Authorization: Basic YWRtaW46YmVuY2gtcGFzc3dvcmQ="; // admin:bench-password
const IMAGES: usize = 10_000;

struct Wrk {
    requests_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Runs wrk and reads its summary.
fn wrk(url: &str, connections: u32, seconds: u32) -> Wrk {
    let threads = connections.clamp(1, 2);
    let out = Command::new("wrk")
        .args([
            &format!("-t{threads}"),
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
            "-H",
            AUTH,
            url,
        ])
        .output()
        .expect("wrk is installed (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |prefix: &str| -> f64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .map(to_ms_or_number)
            .unwrap_or_else(|| panic!("wrk printed no {prefix}: {text}"))
    };
    assert!(!text.contains("Non-2xx"), "wrk saw errors: {text}");
    Wrk {
        requests_per_second: field("Requests/sec:"),
        p50_ms: field("50%"),
        p99_ms: field("99%"),
    }
}

/// wrk prints latencies as `812.00us`, `1.20ms`, `2.00s`.
fn to_ms_or_number(text: &str) -> f64 {
    let number = |s: &str| s.parse::<f64>().unwrap_or(f64::NAN);
    if let Some(v) = text.strip_suffix("us") {
        number(v) / 1000.0
    } else if let Some(v) = text.strip_suffix("ms") {
        number(v)
    } else if let Some(v) = text.strip_suffix('s') {
        number(v) * 1000.0
    } else {
        number(text)
    }
}

fn start(data: &std::path::Path, args: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_conductor"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .args(args)
        .env("CONDUCTOR_ADMIN_PASSWORD", PASSWORD)
        .env("CONDUCTOR_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start conductor");
    let stdout = child.stdout.take().expect("stdout");
    let mut url = String::new();
    for line in BufReader::new(stdout).lines() {
        if let Some(u) = line.expect("read").strip_prefix("conductor listening on ") {
            url = u.to_owned();
            break;
        }
    }
    (child, url)
}

fn line(what: &str, figure: String, comparison: String, ratio: f64, budget: &str, met: bool) {
    println!(
        "{what:<46} {figure:>12} {comparison:>16} {ratio:>7.2} {budget:>9}  {}",
        if met { "met" } else { "MISSED" }
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut server, url) = start(dir.path(), &["--workers", "50"]);
    let pid = server.id();
    let client = reqwest::Client::new();
    println!(
        "# conductor API benchmark (cargo bench --bench api); load from wrk -t2 on the same machine"
    );
    println!(
        "{:<46} {:>12} {:>16} {:>7} {:>9}  result",
        "what", "figure", "comparison", "ratio", "budget"
    );

    // 10,000 images, imported from a mock provider that holds them (imports are the
    // cheapest way to make many real records through the API).
    let ids: Vec<String> = (0..IMAGES).map(|n| format!("seed-{n}")).collect();
    let seeded = Instant::now();
    let image_ids: Vec<String> = runtime.block_on(async {
        // Ten providers hold a thousand images each: a provider's settings value is
        // capped at 16 Ki characters, as any stored value is.
        for k in 0..10 {
            let held: Vec<&str> = ids.iter().skip(k).step_by(10).map(String::as_str).collect();
            let provider = format!(
                "<provider><name>seed{k}</name><provider_type id='mock'/><settings><setting name='images'>{}</setting></settings></provider>",
                held.join(",")
            );
            let p = client.post(format!("{url}/api/providers")).basic_auth("admin", Some(PASSWORD)).body(provider).send().await.expect("provider");
            assert_eq!(p.status().as_u16(), 201);
            let text = p.text().await.expect("body");
            let pid = text.split("id=\"").nth(1).and_then(|s| s.split('"').next()).unwrap_or("").to_owned();
            let a = client
                .post(format!("{url}/api/providers/{pid}/provider_accounts"))
                .basic_auth("admin", Some(PASSWORD))
                .body(format!("<provider_account><label>seed{k}-acc</label><credentials><username>u</username><password>p</password></credentials></provider_account>"))
                .send()
                .await
                .expect("account");
            assert_eq!(a.status().as_u16(), 201);
        }
        let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
        let mut tasks = Vec::new();
        for (n, id) in ids.iter().enumerate() {
            let (client, url, id) = (client.clone(), url.clone(), id.clone());
            let account = format!("seed{}-acc", n % 10);
            let permit = semaphore.clone().acquire_owned().await.expect("permit");
            tasks.push(tokio::spawn(async move {
                let body = format!(
                    "<image><target_identifier>{id}</target_identifier><image_descriptor><image><name>{id}</name></image></image_descriptor><provider_account_name>{account}</provider_account_name><environment>default</environment></image>"
                );
                let reply = client.post(format!("{url}/api/images")).basic_auth("admin", Some(PASSWORD)).body(body).send().await.expect("import");
                assert_eq!(reply.status().as_u16(), 200);
                let text = reply.text().await.expect("body");
                drop(permit);
                text.split("id=\"").nth(1).and_then(|s| s.split('"').next()).unwrap_or("").to_owned()
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("task"));
        }
        out
    });
    println!(
        "# seeded {IMAGES} images in {:.1}s",
        seeded.elapsed().as_secs_f64()
    );

    // One image: the server against the same bytes served from memory.
    let one = format!("{url}/api/images/{}", image_ids[IMAGES / 2]);
    let body = runtime.block_on(async {
        client
            .get(&one)
            .basic_auth("admin", Some(PASSWORD))
            .send()
            .await
            .expect("get")
            .text()
            .await
            .expect("text")
    });
    let echo_url = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("addr");
        let app = axum::Router::new().route(
            "/api/images/{id}",
            axum::routing::get(move || {
                let body = body.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/xml; charset=utf-8",
                        )],
                        body,
                    )
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{address}/api/images/x")
    });
    let ours = wrk(&one, 16, 8);
    let theirs = wrk(&echo_url, 16, 8);
    let ratio = ours.requests_per_second / theirs.requests_per_second;
    line(
        "GET /api/images/:id throughput",
        format!("{:.0}/s", ours.requests_per_second),
        format!("{:.0}/s echo", theirs.requests_per_second),
        ratio,
        "≥0.5x",
        ratio >= 0.5,
    );

    let list = wrk(&format!("{url}/api/images"), 1, 8);
    line(
        "GET /api/images, 10,000 images, p50",
        format!("{:.1}ms", list.p50_ms),
        "-".into(),
        20.0 / list.p50_ms,
        "≤20ms",
        list.p50_ms <= 20.0,
    );

    // p99 idle, then with 50 builds running.
    let idle = wrk(&one, 4, 5);
    runtime.block_on(async {
        for n in 0..50 {
            let body = format!(
                "<image><targets>mock</targets><tdl><template><name>load{n}</name><os><name>Fedora</name><version>14</version><arch>x86_64</arch><install type='url'><url>http://x/</url></install></os><disk><size>256MiB</size></disk></template></tdl><parameters><parameter name='delay_ms'>15000</parameter></parameters></image>"
            );
            let reply = client.post(format!("{url}/api/images")).basic_auth("admin", Some(PASSWORD)).body(body).send().await.expect("build");
            assert_eq!(reply.status().as_u16(), 200);
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    let busy = wrk(&one, 4, 5);
    line(
        "API p99 while 50 builds run",
        format!("{:.1}ms", busy.p99_ms),
        format!("{:.1}ms idle", idle.p99_ms),
        50.0 / busy.p99_ms,
        "≤50ms",
        busy.p99_ms <= 50.0,
    );
    println!(
        "# peak memory of the server over the run: {:.0} MiB (VmHWM)",
        common::peak_memory_mib(Some(pid))
    );
    let _ = server.kill();
    let _ = server.wait();
}
