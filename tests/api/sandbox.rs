//! The plugin sandbox: a hostile plugin (tests/plugins/hostile) that loops, hoards
//! memory, panics, floods, writes past its disk or sleeps fails its own job with a reason
//! a user can read, while a mock build beside it completes and the API keeps answering;
//! and a plugin reaches only the hosts its provider grants.

use crate::harness::{
    Reply, Server, TEST_PLUGINS, base_image, build_request, refused_at_start, template,
};
use std::time::{Duration, Instant};

/// The hostile type's limits in most tests: little memory, a short deadline, and a fuel
/// budget large enough that only the fuel test (which sets its own) runs out of it.
const LIMITS: &str = "hostile:memory=64MiB,timeout=3s,fuel=1000000000000";

/// The flood tests' limits: the floods end by themselves in a few seconds (more in a
/// debug build on a busy machine), which a plugin waiting on a database commit for each
/// report or line would not do in hours.
const FLOODS: &str = "hostile:memory=64MiB,timeout=20s";

/// The longest a GET may take while a hostile plugin runs. A plugin that held the
/// runtime would hold a GET until its deadline (20 s and more); five seconds leaves room
/// for two busy cores under the whole suite without letting that pass.
const PROMPT: Duration = Duration::from_secs(5);

fn sandbox_plugins() -> String {
    format!("{TEST_PLUGINS}/sandbox")
}

fn start(dir: &std::path::Path, limits: &str) -> Server {
    Server::start_with(
        dir,
        &["--plugins", &sandbox_plugins(), "--plugin-limit", limits],
    )
}

fn parameters(pairs: &[(&str, &str)]) -> String {
    let inner: String = pairs
        .iter()
        .map(|(name, value)| format!("<parameter name='{name}'>{value}</parameter>"))
        .collect();
    format!("<parameters>{inner}</parameters>")
}

/// Starts a build for `target`; returns the target image's path.
async fn build(server: &Server, target: &str, pairs: &[(&str, &str)]) -> String {
    let extra = if pairs.is_empty() {
        String::new()
    } else {
        parameters(pairs)
    };
    let reply = server
        .post(
            "/api/images",
            &build_request(target, &template("sandbox"), &extra),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    format!("/api/target_images/{}", reply.ids("target_image")[0])
}

/// Polls `path` until it is terminal, failing if any GET takes longer than [`PROMPT`].
async fn watch(server: &Server, path: &str) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let asked = Instant::now();
        let reply = server.get(path).await;
        let took = asked.elapsed();
        assert!(took < PROMPT, "GET {path} took {took:?}");
        assert_eq!(reply.status, 200, "{}", reply.body);
        if ["COMPLETE", "FAILED", "CANCELLED"].contains(&reply.text("status").as_str()) {
            return reply;
        }
        assert!(
            Instant::now() < deadline,
            "{path} never ended: {}",
            reply.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts a slow mock build, then the hostile job `start` starts, watches the hostile
/// job to its end with the API answering promptly, and checks the mock build completed.
/// Returns the hostile job's last reply.
async fn beside_a_mock_build(
    server: &Server,
    start: impl std::future::Future<Output = String>,
) -> Reply {
    let mock = build(server, "mock", &[("delay_ms", "2000")]).await;
    let hostile = start.await;
    let ended = watch(server, &hostile).await;
    let mock = watch(server, &mock).await;
    assert_eq!(mock.text("status"), "COMPLETE", "{}", mock.body);
    ended
}

/// Builds `hostile` with `mode` beside a mock build; asserts it FAILED with `reason` in
/// its error, and returns the error.
async fn fails_with(server: &Server, mode: &str, reason: &str) -> String {
    let ended = beside_a_mock_build(server, build(server, "hostile", &[("mode", mode)])).await;
    assert_eq!(ended.text("status"), "FAILED", "{}", ended.body);
    let error = ended.text("error");
    assert!(error.contains(reason), "mode={mode}: {error}");
    error
}

#[tokio::test]
async fn an_endless_loop_is_stopped_at_the_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path(), LIMITS);
    fails_with(
        &server,
        "loop",
        "the plugin ran past its time limit of 3s and was stopped",
    )
    .await;
}

#[tokio::test]
async fn a_long_sleep_in_a_host_call_is_stopped_at_the_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path(), LIMITS);
    let started = Instant::now();
    fails_with(
        &server,
        "sleep",
        "the plugin ran past its time limit of 3s and was stopped",
    )
    .await;
    // The plugin asked for an hour; the deadline, not the sleep, ended it.
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test]
async fn a_plugin_that_hoards_memory_runs_out_at_its_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path(), LIMITS);
    fails_with(
        &server,
        "memory",
        "the plugin ran out of memory (limit 64 MiB)",
    )
    .await;
}

#[tokio::test]
async fn a_panic_fails_only_its_own_build() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path(), LIMITS);
    // The panic's own message, from the plugin's stderr, is the reason.
    let error = fails_with(&server, "panic", "the plugin crashed: panicked at").await;
    assert!(
        error.contains("the hostile plugin panics as its mode=panic parameter asks"),
        "{error}"
    );
}

/// One call fills a MiB of its memory with a marker byte; the calls after it, given the
/// memory slot it left (the pool hands a plugin back its last slot), must find every page
/// of it zeroed. Run in turn, so that the slot is free for the next.
async fn nothing_is_left_for_the_next_call(reset: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("server.log");
    let server = Server::start_logging(
        &dir.path().join("data"),
        &[
            "--plugins",
            &sandbox_plugins(),
            "--plugin-limit",
            LIMITS,
            "--plugin-memory-reset",
            reset,
        ],
        &log,
    );
    // The negative control: a server that silently fell back to releasing pages would
    // pass the checks below without testing the scan at all.
    let said = std::fs::read_to_string(&log).expect("log");
    assert_eq!(
        said.contains("plugin memory reset: scan"),
        reset == "scan",
        "the server does not run with --plugin-memory-reset {reset}:\n{said}"
    );
    let remembered = watch(
        &server,
        &build(&server, "hostile", &[("mode", "remember")]).await,
    )
    .await;
    assert_eq!(remembered.text("status"), "COMPLETE", "{}", remembered.body);
    for _ in 0..3 {
        let snooped = watch(
            &server,
            &build(&server, "hostile", &[("mode", "snoop")]).await,
        )
        .await;
        assert_eq!(snooped.text("status"), "COMPLETE", "{}", snooped.body);
    }
}

#[tokio::test]
async fn a_call_finds_nothing_an_earlier_call_left_in_memory() {
    nothing_is_left_for_the_next_call("release").await;
}

#[tokio::test]
async fn a_call_finds_nothing_an_earlier_call_left_when_written_pages_are_scanned() {
    nothing_is_left_for_the_next_call("scan").await;
}

#[tokio::test]
async fn a_plugin_out_of_fuel_is_stopped() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A budget a loop spends in a fraction of a second, and a deadline it never meets.
    let server = start(
        dir.path(),
        "hostile:memory=64MiB,timeout=60s,fuel=100000000",
    );
    fails_with(
        &server,
        "loop",
        "the plugin used up its budget of 100000000 fuel units",
    )
    .await;
}

#[tokio::test]
async fn a_progress_flood_is_held_to_the_pace_of_progress_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path(), FLOODS);
    // The plugin ends by itself within the deadline: two million reports, 100 % among
    // them, would take hours if each were a database commit.
    fails_with(
        &server,
        "progress-flood",
        "sent 2000000 progress reports as mode=progress-flood asks",
    )
    .await;
}

#[tokio::test]
async fn a_log_flood_is_cut_off_after_a_thousand_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("conductor.log");
    let server = Server::start_logging(
        &dir.path().join("data"),
        &["--plugins", &sandbox_plugins(), "--plugin-limit", FLOODS],
        &log,
    );
    fails_with(
        &server,
        "log-flood",
        "wrote 1000000 log lines as mode=log-flood asks",
    )
    .await;
    let written = std::fs::read_to_string(&log).expect("the server's log");
    let lines = written
        .lines()
        .filter(|l| l.contains("hostile log flood"))
        .count();
    assert_eq!(lines, 1000);
    assert_eq!(
        written
            .lines()
            .filter(|l| l.contains("further log lines dropped"))
            .count(),
        1
    );
}

#[tokio::test]
async fn a_write_past_the_image_limit_is_refused_and_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path(), LIMITS);
    // The template's disk is 64 MiB: 64 + 8 + 64 MiB may be written.
    let error = fails_with(&server, "huge-write", "image size limit of 136 MiB").await;
    assert!(
        error.contains("base disk's size plus an eighth, plus 64 MiB"),
        "{error}"
    );
}

#[tokio::test]
async fn a_hostile_push_fails_only_itself_and_a_behaving_build_completes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path(), LIMITS);
    // Without a mode the hostile plugin behaves.
    let built = beside_a_mock_build(&server, build(&server, "hostile", &[])).await;
    assert_eq!(built.text("status"), "COMPLETE", "{}", built.body);
    let ti = built
        .doc()
        .root_element()
        .attribute("id")
        .expect("id")
        .to_owned();
    let push = async {
        let body = format!(
            "<provider_image><provider_account>hostile-acc</provider_account>\
             <target_image_id>{ti}</target_image_id>{}</provider_image>",
            parameters(&[("mode", "loop")])
        );
        let reply = server.post("/api/provider_images", &body).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        format!("/api/provider_images/{}", reply.ids("provider_image")[0])
    };
    let pushed = beside_a_mock_build(&server, push).await;
    assert_eq!(pushed.text("status"), "FAILED", "{}", pushed.body);
    assert!(
        pushed.text("error").contains("time limit of 3s"),
        "{}",
        pushed.body
    );
}

/// Counts the HTTP requests that reach a loopback listener, answering each with 204.
async fn listener() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request).await;
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = stream
                .write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                .await;
        }
    });
    (address, count)
}

#[tokio::test]
async fn a_plugin_reaches_only_the_hosts_its_provider_grants() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reach = format!("{TEST_PLUGINS}/reach");
    let import = tempfile::tempdir().expect("import dir");
    let server = Server::start_with(
        dir.path(),
        &[
            "--plugins",
            &reach,
            "--import-dir",
            import.path().to_str().expect("utf-8"),
        ],
    );
    // A provider whose url names the listener grants it: the account check gets through.
    // (Types that reach a cloud get no provider at the first start; an operator makes one.)
    let (address, count) = listener().await;
    let provider = server
        .post(
            "/api/providers",
            &format!("<provider><name>reach2</name><url>http://{address}/</url><provider_type id='reach'/></provider>"),
        )
        .await;
    assert_eq!(provider.status, 201, "{}", provider.body);
    let id = provider.ids("provider")[0].clone();
    let account = server
        .post(
            &format!("/api/providers/{id}/provider_accounts"),
            "<provider_account><label>granted</label><credentials></credentials></provider_account>",
        )
        .await;
    assert_eq!(account.status, 201, "{}", account.body);
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
    let account_id = account.ids("provider_account")[0].clone();
    let joined = server
        .put(
            &format!("/api/pool_families/1/provider_accounts/{account_id}"),
            "",
        )
        .await;
    assert!(joined.status < 300, "{}", joined.body);

    // A build has no provider, so nothing is granted: the request is refused before any
    // connection, and the job says which host was refused.
    // (A cloud target builds this template's OS only from a base image.)
    let base = base_image(import.path());
    let started = async {
        let reply = server
            .post(
                "/api/images",
                &build_request("reach", &template("sandbox"), &base),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        format!("/api/target_images/{}", reply.ids("target_image")[0])
    };
    let ended = beside_a_mock_build(&server, started).await;
    assert_eq!(ended.text("status"), "FAILED", "{}", ended.body);
    let error = ended.text("error");
    assert!(
        error.contains(
            "tried to reach 127.0.0.1:9, which its provider does not grant (granted: none)"
        ),
        "{error}"
    );

    // A provider that names no url grants nothing: its account check is refused, and
    // said so.
    let bare = server
        .post(
            "/api/providers",
            "<provider><name>reach3</name><provider_type id='reach'/></provider>",
        )
        .await;
    assert_eq!(bare.status, 201, "{}", bare.body);
    let bare = bare.ids("provider")[0].clone();
    let refused = server
        .post(
            &format!("/api/providers/{bare}/provider_accounts"),
            "<provider_account><label>refused</label><credentials></credentials></provider_account>",
        )
        .await;
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert!(refused.body.contains("does not grant"), "{}", refused.body);
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
    // A plugin that crashes after the refusal is refused for the refusal, not "crashed":
    // every call is judged the same way, the account check included.
    let crashed = server
        .post(
            &format!("/api/providers/{bare}/provider_accounts"),
            "<provider_account><label>panic-after-refusal</label><credentials></credentials></provider_account>",
        )
        .await;
    assert_eq!(crashed.status, 422, "{}", crashed.body);
    assert!(crashed.body.contains("does not grant"), "{}", crashed.body);
    assert!(!crashed.body.contains("crashed"), "{}", crashed.body);
    assert_eq!(server.get("/api").await.status, 200);
}

#[test]
fn a_bad_plugin_limit_stops_the_server_before_it_starts() {
    let stderr = refused_at_start(&["--plugin-limit", "hostile:memory=lots"]);
    assert!(
        stderr.contains("memory must be a number of bytes or of KiB, MiB or GiB"),
        "{stderr}"
    );
}

#[test]
fn an_unknown_memory_reset_stops_the_server_before_it_starts() {
    let stderr = refused_at_start(&["--plugin-memory-reset", "fast"]);
    assert!(
        stderr.contains("'fast' is not a memory reset: release or scan"),
        "{stderr}"
    );
}
