//! How the server is run: TLS, settings from a config file under flags and environment
//! variables, and a stop that lets requests in flight finish.

use crate::harness::{PASSWORD, Server, build_request, refused_at_start, template};
use std::time::Duration;

/// A self-signed certificate for 127.0.0.1, written where `--tls-cert` and `--tls-key`
/// can read it.
struct Certificate {
    pem: String,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

impl Certificate {
    fn new(dir: &std::path::Path) -> Certificate {
        let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("a self-signed certificate");
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, made.cert.pem()).expect("write cert");
        std::fs::write(&key, made.signing_key.serialize_pem()).expect("write key");
        Certificate {
            pem: made.cert.pem(),
            cert,
            key,
        }
    }

    fn args(&self) -> [&str; 4] {
        [
            "--tls-cert",
            self.cert.to_str().expect("utf-8"),
            "--tls-key",
            self.key.to_str().expect("utf-8"),
        ]
    }

    /// A client that trusts this certificate.
    fn trusting(&self) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(self.pem.as_bytes()).expect("PEM"))
    }
}

/// Builds a 64 MiB image, starts downloading it, sends SIGTERM after the first chunk and
/// reads on: the whole image arrives, no new connection is taken, and the server exits.
async fn a_download_outlives_the_stop_signal(tls: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let certificate = Certificate::new(dir.path());
    let tls_args = certificate.args();
    let mut server = Server::start_with(
        &dir.path().join("data"),
        if tls { &tls_args[..] } else { &[] },
    );
    let client = certificate.trusting().build().expect("client");
    let built = client
        .post(format!("{}/api/images", server.url))
        .basic_auth("admin", Some(PASSWORD))
        .body(build_request("mock", &template("draining"), ""))
        .send()
        .await
        .expect("build")
        .text()
        .await
        .expect("body");
    let ti = built
        .split("<target_image href=")
        .nth(1)
        .and_then(|rest| rest.split("id=\"").nth(1))
        .and_then(|rest| rest.split('"').next())
        .expect("a target image id")
        .to_owned();
    crate::harness::eventually(Duration::from_secs(60), async || {
        let shown = client
            .get(format!("{}/api/target_images/{ti}", server.url))
            .basic_auth("admin", Some(PASSWORD))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())?;
        if shown.contains("<status>COMPLETE</status>") {
            Ok(())
        } else {
            Err(format!("the build did not complete: {shown}"))
        }
    })
    .await;

    let mut download = client
        .get(format!("{}/api/target_images/{ti}/data", server.url))
        .basic_auth("admin", Some(PASSWORD))
        .send()
        .await
        .expect("download");
    assert_eq!(download.status().as_u16(), 200);
    let mut received = download
        .chunk()
        .await
        .expect("a first chunk")
        .map_or(0, |c| c.len());
    server.signal_stop();
    // While the answer waits on the socket buffers, the server acts on the signal: its
    // port stops taking connections.
    let address = server.url.split("://").nth(1).expect("a URL").to_owned();
    crate::harness::eventually(
        Duration::from_secs(20),
        async || match std::net::TcpStream::connect(&address) {
            Ok(_) => Err("a new connection is still accepted after the stop signal".into()),
            Err(_) => Ok(()),
        },
    )
    .await;
    while let Some(chunk) = download.chunk().await.expect("the rest of the image") {
        received += chunk.len();
    }
    assert_eq!(received, 64 << 20, "the download was cut short");
    let exited = server.wait_exit(Duration::from_secs(40));
    assert!(exited.is_some_and(|s| s.success()), "{exited:?}");
}

#[tokio::test]
async fn a_download_in_flight_finishes_after_a_stop_signal() {
    a_download_outlives_the_stop_signal(false).await;
}

#[tokio::test]
async fn a_download_in_flight_finishes_after_a_stop_signal_over_tls() {
    a_download_outlives_the_stop_signal(true).await;
}

#[tokio::test]
async fn with_a_certificate_the_api_is_served_over_tls_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certificate = Certificate::new(dir.path());
    let server = Server::start_with(&dir.path().join("data"), &certificate.args());
    assert!(
        server.url.starts_with("https://127.0.0.1:"),
        "{}",
        server.url
    );
    let trusting = certificate.trusting().build().expect("client");
    let answer = trusting
        .get(format!("{}/api/images", server.url))
        .basic_auth("admin", Some(PASSWORD))
        .send()
        .await
        .expect("an HTTPS answer");
    assert_eq!(answer.status().as_u16(), 200);
    let body = answer.text().await.expect("body");
    assert!(body.contains("<images"), "{body}");
    // A client that does not trust the certificate gets no answer; plain HTTP neither.
    assert!(
        reqwest::get(format!("{}/api", server.url)).await.is_err(),
        "an untrusted certificate was accepted"
    );
    let plain = server.url.replacen("https://", "http://", 1);
    let refused = reqwest::Client::new()
        .get(format!("{plain}/api"))
        .timeout(std::time::Duration::from_secs(5))
        .send()
        .await;
    assert!(
        refused.is_err() || refused.is_ok_and(|r| !r.status().is_success()),
        "plain HTTP was served"
    );
}

#[test]
fn a_certificate_that_cannot_be_read_stops_the_server_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = dir.path().join("cert.pem");
    std::fs::write(&cert, "not a certificate").expect("write");
    let cert = cert.to_str().expect("utf-8");
    // Nothing is set up: no data directory, no admin made.
    let said = refused_at_start(&["--tls-cert", cert, "--tls-key", cert]);
    assert!(said.contains("cert.pem"), "{said}");
}

#[tokio::test]
async fn a_second_server_on_the_same_data_stops_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let first = Server::start(&data);
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_conductor"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .env("CONDUCTOR_ADMIN_PASSWORD", "x")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run conductor");
    // It must stop by itself; if it ran on, the lock would have failed.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = second.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = second.kill();
            panic!("a second server started on a data directory in use");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success());
    let mut said = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().expect("stderr"), &mut said)
        .expect("stderr");
    assert!(
        said.contains("another conductor server is using this database"),
        "{said}"
    );
    // The first one goes on answering.
    assert_eq!(first.get("/api/images").await.status, 200);
}

#[tokio::test]
async fn a_config_file_sets_what_flags_and_the_environment_do_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("conductor.toml");
    std::fs::write(
        &file,
        "external_url = \"https://images.example.com\"\nworkers = 2\n\
         plugin_limits = [\"mock:timeout=30s\", \"*:memory=128MiB\"]\n",
    )
    .expect("write config");
    let from_file = Server::start_with(
        &dir.path().join("one"),
        &["--config", file.to_str().expect("utf-8")],
    );
    let entry = from_file.get("/api").await;
    assert!(
        entry.body.contains("https://images.example.com/api/images"),
        "{}",
        entry.body
    );
    // A flag wins over the file.
    let flagged = Server::start_with(
        &dir.path().join("two"),
        &[
            "--config",
            file.to_str().expect("utf-8"),
            "--external-url",
            "https://flag.example.com",
        ],
    );
    let entry = flagged.get("/api").await;
    assert!(
        entry.body.contains("https://flag.example.com/api/images"),
        "{}",
        entry.body
    );

    // An unknown setting stops the server and names itself.
    std::fs::write(&file, "listne = \"127.0.0.1:0\"\n").expect("write config");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_conductor"))
        .args(["serve", "--config"])
        .arg(&file)
        .env("CONDUCTOR_ADMIN_PASSWORD", "x")
        .output()
        .expect("run conductor");
    assert!(!output.status.success());
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(said.contains("unknown setting 'listne'"), "{said}");
}
