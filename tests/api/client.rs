//! The command-line client (`conductor image|provider|account …`) run as a separate
//! process against a running server, the way a user runs it; and JSON answers.

use crate::harness::{PASSWORD, Server, eventually};
use std::process::{Command, Output};

const TEMPLATE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../examples/templates/fedora.tdl"
);

/// Runs the client with the server's URL and the admin's password in its environment.
pub(crate) fn conductor(server: &Server, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_conductor"))
        .args(args)
        .env("CONDUCTOR_URL", &server.url)
        .env("CONDUCTOR_USER", "admin")
        .env("CONDUCTOR_PASSWORD", PASSWORD)
        .env_remove("CONDUCTOR_CLIENT_CONFIG")
        .env("HOME", "/nonexistent")
        .output()
        .expect("run the conductor client")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        stdout(&output),
        String::from_utf8_lossy(&output.stderr)
    );
    stdout(&output)
}

fn json(output: Output) -> serde_json::Value {
    let text = ok(output);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test]
async fn the_client_builds_waits_pushes_lists_and_deletes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let s = &server;
    // The client is another process; the test waits for it as a user's shell would.
    let built = conductor(
        s,
        &[
            "image",
            "build",
            "--template",
            TEMPLATE,
            "--targets",
            "mock",
            "--param",
            "delay_ms=1000",
            "--wait",
        ],
    );
    let text = ok(built);
    // One line naming the image, then the table of how each target image ended.
    let image = text
        .lines()
        .find_map(|l| l.strip_prefix("image "))
        .expect("the new image's id")
        .trim()
        .to_owned();
    let ended = text
        .lines()
        .find(|l| l.starts_with("target image"))
        .expect("a row per target image");
    assert!(
        ended.contains("mock") && ended.contains("COMPLETE"),
        "{text}"
    );
    // --wait prints the build log's milestones as they come; `image log` prints it all.
    assert!(
        text.contains("== the mock plugin built a raw image"),
        "{text}"
    );
    let ti = ended.split_whitespace().nth(2).expect("target image id");
    let log = ok(conductor(s, &["image", "log", ti, "--follow"]));
    assert!(
        log.contains(&format!("== build of target image {ti} for mock")),
        "{log}"
    );
    assert!(log.contains("a blank base disk of"), "{log}");

    // Push to the seeded account, following it too.
    let pushed = ok(conductor(
        s,
        &["image", "push", &image, "--accounts", "mock-acc", "--wait"],
    ));
    // First the line naming the new provider image, last the table row of how it ended.
    let row = pushed
        .lines()
        .rfind(|l| l.starts_with("provider image"))
        .expect("a row per provider image");
    assert!(
        row.contains("mock-acc") && row.contains("COMPLETE"),
        "{pushed}"
    );

    // The table lists it; JSON is JSON, with the same fields as the XML.
    let listed = ok(conductor(s, &["image", "list"]));
    assert!(listed.starts_with("ID"), "{listed}");
    assert!(listed.contains(&image), "{listed}");
    let value = json(conductor(s, &["--output", "json", "image", "list"]));
    let images = value["images"].as_array().expect("an array of images");
    assert_eq!(images.len(), 1);
    assert_eq!(images[0]["id"], image.as_str());
    assert_eq!(images[0]["os"], "Fedora");
    let status = json(conductor(
        s,
        &["--output", "json", "image", "status", &image],
    ));
    let states: Vec<&str> = status
        .as_array()
        .expect("one document per target and provider image")
        .iter()
        .map(|doc| {
            doc.as_object()
                .and_then(|o| o.values().next())
                .and_then(|r| r["status"].as_str())
                .unwrap_or("")
        })
        .collect();
    assert_eq!(states, ["COMPLETE", "COMPLETE"]);
    let xml = ok(conductor(s, &["--output", "xml", "image", "show", &image]));
    assert!(roxmltree::Document::parse(&xml).is_ok(), "{xml}");
    // A build asked for in XML answers the server's XML document.
    let xml = ok(conductor(
        s,
        &[
            "--output",
            "xml",
            "image",
            "build",
            "--template",
            TEMPLATE,
            "--targets",
            "mock",
        ],
    ));
    let doc = roxmltree::Document::parse(&xml).unwrap_or_else(|e| panic!("{e}: {xml}"));
    assert_eq!(doc.root_element().tag_name().name(), "image");
    let second = doc
        .root_element()
        .attribute("id")
        .expect("the image's id")
        .to_owned();
    ok(conductor(s, &["image", "delete", &second]));

    // Delete, and it is gone.
    ok(conductor(s, &["image", "delete", &image]));
    let value = json(conductor(s, &["--output", "json", "image", "list"]));
    assert_eq!(value["images"], serde_json::json!([]), "{value}");
}

#[tokio::test]
async fn the_client_prints_the_servers_code_and_message_and_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let missing = conductor(&server, &["image", "show", "no-such-image"]);
    assert!(!missing.status.success());
    let said = String::from_utf8_lossy(&missing.stderr);
    assert!(said.contains("error: ImageNotFound: "), "{said}");
    let refused = conductor(&server, &["--password", "wrong", "image", "list"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("refused the credentials"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // A provider and an account through the client; a refused one shows the reasons.
    let made = json(conductor(
        &server,
        &[
            "--output",
            "json",
            "provider",
            "create",
            "--name",
            "mock-two",
            "--type",
            "mock",
            "--setting",
            "images=Mock_held_1",
        ],
    ));
    let id = made["provider"]["id"].as_str().expect("an id").to_owned();
    let bad = conductor(
        &server,
        &[
            "account",
            "create",
            "--provider",
            &id,
            "--label",
            "x",
            "--credential",
            "username=u",
            "--credential",
            "password=invalid",
        ],
    );
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("refused (422)"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let providers = ok(conductor(&server, &["provider", "list"]));
    assert!(providers.contains("mock-two"), "{providers}");
    // What a provider type takes: ec2's settings, and its credentials with the optional
    // x509 pair.
    let types = ok(conductor(&server, &["provider", "types"]));
    assert!(
        types
            .lines()
            .any(|l| l.starts_with("ec2 ") && l.contains("Amazon EC2")),
        "{types}"
    );
    let ec2 = ok(conductor(&server, &["provider", "type", "ec2"]));
    assert!(ec2.contains("provider settings: region, endpoint"), "{ec2}");
    let row = |cells: &[&str]| {
        ec2.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == cells)
    };
    assert!(
        row(&["account_id", "account_number", "text", "yes"]),
        "{ec2}"
    );
    assert!(row(&["x509private", "key", "file", "no"]), "{ec2}");

    // An account in the default environment, and an image it holds imported.
    ok(conductor(
        &server,
        &[
            "account",
            "create",
            "--provider",
            &id,
            "--label",
            "two-acc",
            "--credential",
            "username=u",
            "--credential",
            "password=p",
            "--environment",
            "1",
        ],
    ));
    ok(conductor(
        &server,
        &[
            "image",
            "import",
            "--identifier",
            "Mock_held_1",
            "--account",
            "two-acc",
            "--name",
            "held",
        ],
    ));
    let listed = ok(conductor(&server, &["image", "list"]));
    assert!(listed.contains("held"), "{listed}");

    // Server and credentials from a client config file alone.
    let file = dir.path().join("client.toml");
    std::fs::write(
        &file,
        format!(
            "server = \"{}\"\nuser = \"admin\"\npassword = \"{PASSWORD}\"\n",
            server.url
        ),
    )
    .expect("write the client config");
    let listed = Command::new(env!("CARGO_BIN_EXE_conductor"))
        .args([
            "--client-config",
            file.to_str().expect("utf-8"),
            "provider",
            "list",
        ])
        .env_remove("CONDUCTOR_URL")
        .env_remove("CONDUCTOR_PASSWORD")
        .output()
        .expect("run the client");
    assert!(ok(listed).contains("mock-two"));
}

#[tokio::test]
async fn json_is_served_for_a_json_suffix_or_accept_header() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let by_suffix = server.get("/api/provider_types/mock.json").await;
    assert_eq!(by_suffix.status, 200);
    assert!(by_suffix.content_type.starts_with("application/json"));
    let value: serde_json::Value = serde_json::from_str(&by_suffix.body).expect("JSON");
    assert_eq!(value["provider_type"]["deltacloud_driver"], "mock");
    let by_header = server
        .raw(
            server
                .request(reqwest::Method::GET, "/api/images/nope")
                .basic_auth("admin", Some(PASSWORD))
                .header("Accept", "application/json"),
        )
        .await;
    assert_eq!(by_header.status, 404);
    let value: serde_json::Value = serde_json::from_str(&by_header.body).expect("JSON");
    assert_eq!(value["error"]["code"], "ImageNotFound");
    // XML stays the default.
    let xml = server.get("/api/provider_types/mock").await;
    assert!(xml.content_type.starts_with("application/xml"));
}

#[tokio::test]
async fn health_metrics_request_ids_and_json_logs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("server.log");
    let server = Server::start_logging(&dir.path().join("data"), &["--log-format", "json"], &log);
    // Health needs no credentials.
    let health = reqwest::get(format!("{}/healthz", server.url))
        .await
        .expect("healthz");
    assert_eq!(health.status().as_u16(), 200);
    assert_eq!(health.text().await.expect("body"), "ok\n");

    // The client's request id comes back, and tags the server's log lines.
    let tagged = reqwest::Client::new()
        .get(format!("{}/api/images", server.url))
        .basic_auth("admin", Some(PASSWORD))
        .header("X-Request-Id", "trace-me-42")
        .send()
        .await
        .expect("request");
    assert_eq!(tagged.headers()["x-request-id"], "trace-me-42");
    let fresh = server
        .raw(server.request(reqwest::Method::GET, "/api"))
        .await;
    assert_eq!(fresh.status, 401);
    let given = reqwest::Client::new()
        .get(format!("{}/api", server.url))
        .send()
        .await
        .expect("request");
    let id = given.headers()["x-request-id"].to_str().expect("ASCII");
    assert!(uuid_like(id), "{id}");

    // A build shows in the metrics: the request, the job, the plugin call.
    let reply = server
        .post(
            "/api/images",
            &crate::harness::build_request("mock", &crate::harness::template("m"), ""),
        )
        .await;
    let ti = reply.ids("target_image")[0].clone();
    let done = server
        .wait_terminal(&format!("/api/target_images/{ti}"))
        .await;
    assert_eq!(done.text("status"), "COMPLETE");
    // The job's counters are written just after its status, so they are polled for.
    let metrics_url = format!("{}/metrics", server.url);
    eventually(std::time::Duration::from_secs(10), async || {
        let metrics = reqwest::get(&metrics_url)
            .await
            .expect("metrics")
            .text()
            .await
            .expect("body");
        for line in [
            "conductor_http_requests_total{method=\"POST\",status=\"200\"} 1",
            "conductor_jobs_finished_total{kind=\"build\",outcome=\"ok\"} 1",
            "conductor_plugin_calls_total{target=\"mock\",call=\"build\"} 1",
            "conductor_job_duration_seconds_count{kind=\"build\"} 1",
            "conductor_jobs_running{kind=\"build\"} 0",
            "conductor_jobs_waiting{kind=\"build\"} 0",
        ] {
            if !metrics.contains(line) {
                return Err(format!("no {line} in:\n{metrics}"));
            }
        }
        Ok(())
    })
    .await;

    // Every log line is a JSON object, and the tagged request's lines carry its id.
    eventually(std::time::Duration::from_secs(10), async || {
        let text = std::fs::read_to_string(&log).expect("log");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        if lines.iter().any(|l| l.to_string().contains("trace-me-42")) {
            Ok(())
        } else {
            Err(format!("no log line carries the request id:\n{text}"))
        }
    })
    .await;
}

fn uuid_like(id: &str) -> bool {
    id.len() == 36 && id.bytes().filter(|&b| b == b'-').count() == 4
}
