//! The job engine: retries, cancel, limits, crash and shutdown survival, plugins loaded
//! without a restart, and webhooks.

use crate::harness::{Server, TEST_PLUGINS, build_request, template};
use std::time::{Duration, Instant};

fn slow(ms: u32) -> String {
    format!("<parameters><parameter name='delay_ms'>{ms}</parameter></parameters>")
}

async fn build(server: &Server, extra: &str) -> String {
    let reply = server
        .post(
            "/api/images",
            &build_request("mock", &template("job"), extra),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.ids("target_image")[0].clone()
}

pub(crate) async fn wait_for(
    server: &Server,
    path: &str,
    what: &str,
    ok: impl Fn(&crate::harness::Reply) -> bool,
) -> crate::harness::Reply {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let reply = server.get(path).await;
        if ok(&reply) {
            return reply;
        }
        assert!(
            Instant::now() < deadline,
            "{path} never {what}: {}",
            reply.body
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_provider_that_is_unavailable_twice_is_retried_until_it_works() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let ti = build(&server, "").await;
    server
        .wait_terminal(&format!("/api/target_images/{ti}"))
        .await;
    let body = format!(
        "<provider_image><provider_account>mock-acc</provider_account><target_image_id>{ti}</target_image_id>\
         <parameters><parameter name='fail'>unavailable:2</parameter></parameters></provider_image>"
    );
    let reply = server.post("/api/provider_images", &body).await;
    let pi = reply.ids("provider_image")[0].clone();
    let path = format!("/api/provider_images/{pi}");
    let retrying = wait_for(&server, &path, "retried", |r| {
        r.text("activity").contains("retrying")
    })
    .await;
    assert!(
        retrying
            .text("activity")
            .contains("the mock provider is unavailable"),
        "{}",
        retrying.body
    );
    let done = server.wait_terminal(&path).await;
    assert_eq!(done.text("status"), "COMPLETE", "{}", done.body);
}

#[tokio::test]
async fn a_running_build_can_be_cancelled_and_a_finished_one_cannot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let ti = build(&server, &slow(20_000)).await;
    let path = format!("/api/target_images/{ti}");
    wait_for(&server, &path, "ran", |r| {
        r.text("status") == "BUILDING" && r.text("percent_complete") != "0"
    })
    .await;
    let started = Instant::now();
    let cancelled = server.post(&format!("{path}/cancel"), "").await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.body);
    assert_eq!(cancelled.text("status"), "CANCELLED");
    // The plugin call stops promptly, and the status stays CANCELLED.
    let done = server.wait_terminal(&path).await;
    assert_eq!(done.text("status"), "CANCELLED");
    assert!(started.elapsed() < Duration::from_secs(10));
    let again = server.post(&format!("{path}/cancel.xml"), "").await;
    assert_eq!(
        again.assert_error(400, "ParameterDataIncorrect"),
        format!("TargetImage {ti} is CANCELLED and cannot be cancelled")
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("blobs"))
            .expect("blobs")
            .count(),
        0
    );
    server
        .post("/api/provider_images/x/cancel", "")
        .await
        .assert_error(404, "ProviderImageNotFound");
}

#[tokio::test]
async fn builds_beyond_the_per_target_limit_wait_their_turn() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_with(
        dir.path(),
        &["--plugins", TEST_PLUGINS, "--max-per-target", "1"],
    );
    let mut tis = Vec::new();
    for _ in 0..3 {
        tis.push(build(&server, &slow(1500)).await);
    }
    let mut saw_waiting = false;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut building = 0;
        let mut complete = 0;
        for ti in &tis {
            let now = server.get(&format!("/api/target_images/{ti}")).await;
            match now.text("status").as_str() {
                "BUILDING" => building += 1,
                "COMPLETE" => complete += 1,
                _ if now
                    .text("activity")
                    .contains("at most 1 build(s) for target mock") =>
                {
                    saw_waiting = true
                }
                _ => {}
            }
        }
        assert!(building <= 1, "{building} builds of mock ran at once");
        if complete == tis.len() {
            break;
        }
        assert!(Instant::now() < deadline, "builds never finished");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(saw_waiting, "no build said it was waiting for the limit");
}

#[tokio::test]
async fn jobs_survive_a_crash_with_twenty_builds_and_pushes_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let mut tis = Vec::new();
    let mut pis = Vec::new();
    for _ in 0..10 {
        let ti = build(&server, &slow(1500)).await;
        let push = format!(
            "<provider_image><provider_account>mock-acc</provider_account><target_image_id>{ti}</target_image_id>{}</provider_image>",
            slow(500)
        );
        let reply = server.post("/api/provider_images", &push).await;
        pis.push(reply.ids("provider_image")[0].clone());
        tis.push(ti);
    }
    wait_for(
        &server,
        &format!("/api/target_images/{}", tis[0]),
        "started",
        |r| r.text("status") == "BUILDING",
    )
    .await;
    server.kill();

    let server = Server::start(dir.path());
    for ti in &tis {
        let done = server
            .wait_terminal(&format!("/api/target_images/{ti}"))
            .await;
        let status = done.text("status");
        assert!(
            status == "COMPLETE" || (status == "FAILED" && !done.text("error").is_empty()),
            "{}",
            done.body
        );
    }
    for pi in &pis {
        let done = server
            .wait_terminal(&format!("/api/provider_images/{pi}"))
            .await;
        let status = done.text("status");
        assert!(
            status == "COMPLETE" || (status == "FAILED" && !done.text("error").is_empty()),
            "{}",
            done.body
        );
    }
    // No record lost, and every blob belongs to a target image.
    assert_eq!(
        server
            .get("/api/target_images")
            .await
            .ids("target_image")
            .len(),
        10
    );
    assert_eq!(
        server
            .get("/api/provider_images")
            .await
            .ids("provider_image")
            .len(),
        10
    );
    let listed = server.get("/api/target_images").await;
    let referenced: std::collections::HashSet<String> = listed
        .doc()
        .descendants()
        .filter(|n| n.has_tag_name("data"))
        .filter_map(|n| n.attribute("digest").map(crate::harness::blob_name))
        .collect();
    for blob in std::fs::read_dir(dir.path().join("blobs")).expect("blobs") {
        let name = blob
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        assert!(referenced.contains(&name), "orphaned blob {name}");
    }
}

#[tokio::test]
async fn sigterm_interrupts_running_jobs_which_resume_at_the_next_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let ti = build(&server, &slow(20_000)).await;
    let path = format!("/api/target_images/{ti}");
    wait_for(&server, &path, "ran", |r| {
        r.text("status") == "BUILDING" && r.text("percent_complete") != "0"
    })
    .await;
    let stopped = Instant::now();
    server.stop();
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        stopped.elapsed()
    );

    let server = Server::start(dir.path());
    // Right after the start the job may already run again; before, it says why it waits.
    let now = server.get(&path).await;
    assert!(
        ["PENDING", "BUILDING"].contains(&now.text("status").as_str()),
        "{}",
        now.body
    );
    let done = server.wait_terminal(&path).await;
    assert_eq!(done.text("status"), "COMPLETE", "{}", done.body);
}

#[tokio::test]
async fn a_plugin_added_to_the_folder_is_loaded_on_a_rescan() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    let server = Server::start_with(
        &dir.path().join("data"),
        &["--plugins", plugins.to_str().expect("utf-8")],
    );
    server
        .get("/api/provider_types/testbed")
        .await
        .assert_error(404, "RecordNotFound");
    std::fs::copy(
        format!("{TEST_PLUGINS}/testbed.wasm"),
        plugins.join("testbed.wasm"),
    )
    .expect("copy plugin");
    let rescanned = server.post("/api/provider_types/rescan", "").await;
    assert_eq!(rescanned.status, 200, "{}", rescanned.body);
    assert_eq!(
        rescanned.ids("provider_type"),
        ["ec2", "mock", "openstack", "testbed"]
    );
    assert_eq!(server.get("/api/provider_types/testbed").await.status, 200);
    // A file that is not a plugin is reported, and the others stay loaded.
    std::fs::write(plugins.join("broken.wasm"), b"not wasm").expect("write");
    let refused = server.post("/api/provider_types/rescan", "").await;
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert!(refused.body.contains("broken.wasm"), "{}", refused.body);
    assert_eq!(server.get("/api/provider_types/testbed").await.status, 200);
}

#[tokio::test]
async fn a_webhook_receives_every_status_of_a_build_in_order() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tempdir");
    // The receiver listens on 127.0.0.1, which hooks reach only when the operator
    // allows it.
    let server = Server::start_with(
        dir.path(),
        &["--plugins", TEST_PLUGINS, "--fetch-allow", "127.0.0.1"],
    );
    // A receiver that records each POSTed document's <status>.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hook_url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    let n = stream.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buffer.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buffer);
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let length = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if body.len() >= length {
                            let _ = tx.send(body.to_owned());
                            let _ = stream
                                .write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                                .await;
                            buffer.clear();
                        }
                    }
                }
            });
        }
    });
    let created = server
        .raw(
            server
                .request(reqwest::Method::POST, "/api/hooks")
                .basic_auth("admin", Some(crate::harness::PASSWORD))
                .header("Content-Type", "application/x-www-form-urlencoded")
                .body(format!(
                    "hook%5Buri%5D={}&hook%5Bversion%5D=1",
                    hook_url.replace(':', "%3A").replace('/', "%2F")
                )),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.text("uri"), hook_url);
    assert_eq!(server.get("/api/hooks").await.ids("hook").len(), 1);
    // Conductor's rules: version 1 only (501), a uri is required (400).
    assert_eq!(
        server
            .post(
                "/api/hooks",
                "<hook><uri>http://x/</uri><version>2</version></hook>"
            )
            .await
            .status,
        501
    );
    assert_eq!(
        server
            .post("/api/hooks", "<hook><version>1</version></hook>")
            .await
            .status,
        400
    );

    let ti = build(&server, &slow(1000)).await;
    let done = server
        .wait_terminal(&format!("/api/target_images/{ti}"))
        .await;
    assert_eq!(done.text("status"), "COMPLETE");
    let mut statuses: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while statuses.last().map(String::as_str) != Some("COMPLETE") {
        let left = deadline.saturating_duration_since(Instant::now());
        let body = tokio::time::timeout(left, rx.recv())
            .await
            .expect("webhook deliveries")
            .expect("receiver");
        let doc = roxmltree::Document::parse(&body).expect("XML");
        assert_eq!(doc.root_element().attribute("id"), Some(ti.as_str()));
        let status = doc
            .descendants()
            .find(|n| n.has_tag_name("status"))
            .and_then(|n| n.text())
            .unwrap_or("")
            .to_owned();
        if statuses.last() != Some(&status) {
            statuses.push(status);
        }
    }
    assert_eq!(statuses, ["NEW", "BUILDING", "COMPLETE"]);
    let hook = server.get("/api/hooks").await.ids("hook")[0].clone();
    assert_eq!(
        server.delete(&format!("/api/hooks/{hook}")).await.status,
        204
    );
    assert_eq!(
        server.delete(&format!("/api/hooks/{hook}")).await.status,
        404
    );
}
