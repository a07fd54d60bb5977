//! What a tenant, or anyone who can reach the port, must not be able to do to the server
//! or to other tenants (docs/security.md): make the server fetch internal URLs, fill its
//! disk or database from a small request, hold workers hostage, starve other
//! environments, read hooks, wedge a job, take another environment's cloud image, learn
//! about the server's files, read other local users' data.
//!
//! A small HTTP server on 127.0.0.1 stands in for an internal service.

use crate::harness::{PASSWORD, Reply, Server, build_request, eventually, template};
use reqwest::Method;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

const USER_PASSWORD: &str = "password-123";

/// How the stand-in service answers.
#[derive(Clone)]
enum Serve {
    /// 200 with this body.
    Body(Vec<u8>),
    /// A redirect to this URL.
    Redirect(String),
    /// Headers promising `len` bytes, then one byte a second.
    Trickle(usize),
}

/// A service on `host`:0 answering every request the same way. Counts requests; says
/// whether a trickled transfer found its connection closed by the other side.
struct Service {
    url: String,
    hits: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
}

fn service(host: &str, serve: Serve) -> Service {
    let listener = TcpListener::bind((host, 0)).expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let hits = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicBool::new(false));
    let (counter, closed_flag) = (hits.clone(), closed.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            counter.fetch_add(1, Ordering::SeqCst);
            let serve = serve.clone();
            let closed_flag = closed_flag.clone();
            std::thread::spawn(move || {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request);
                match serve {
                    Serve::Body(body) => {
                        let _ = write!(
                            stream,
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = stream.write_all(&body);
                    }
                    Serve::Redirect(to) => {
                        let _ = write!(
                            stream,
                            "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        );
                    }
                    Serve::Trickle(len) => {
                        let _ = write!(
                            stream,
                            "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
                        );
                        // Bounded: at most two minutes of trickling.
                        for _ in 0..120 {
                            if stream
                                .write_all(b"x")
                                .and_then(|()| stream.flush())
                                .is_err()
                            {
                                closed_flag.store(true, Ordering::SeqCst);
                                return;
                            }
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    }
                }
            });
        }
    });
    Service { url, hits, closed }
}

fn with_base(url: &str) -> String {
    build_request(
        "mock",
        &template("base"),
        &format!("<base_image>{url}</base_image>"),
    )
}

fn job_gauge(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains("kind=\"build\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn internal_addresses_are_refused_as_base_images_in_every_spelling() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let secret = service("127.0.0.1", Serve::Body(b"internal secret".to_vec()));
    let port = secret.url.rsplit(':').next().expect("port").to_owned();
    let own = server.url.trim_start_matches("http://").to_owned();
    for url in [
        format!("{}/anything", secret.url),
        format!("http://localhost:{port}/anything"),
        format!("http://[::ffff:127.0.0.1]:{port}/anything"),
        format!("http://2130706433:{port}/anything"),
        format!("http://0x7f.1:{port}/anything"),
        format!("http://[::1]:{port}/anything"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        format!("http://{own}/metrics"),
    ] {
        let reply = server.post("/api/images", &with_base(&url)).await;
        let message = reply.assert_error(400, "ParameterDataIncorrect");
        assert!(message.contains("not a public address"), "{url}: {message}");
    }
    assert_eq!(secret.hits.load(Ordering::SeqCst), 0, "nothing was fetched");
    let images = server.get("/api/images").await;
    assert!(images.ids("image").is_empty(), "nothing was stored");
}

/// An operator allows one internal host (127.0.0.2); it redirects to another (127.0.0.1),
/// which is refused at the redirect: the build fails at once (no retries) and the
/// second service is never asked.
#[tokio::test]
async fn a_redirect_to_an_internal_address_is_refused_and_not_retried() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = service("127.0.0.1", Serve::Body(b"internal secret".to_vec()));
    let hop = service(
        "127.0.0.2",
        Serve::Redirect(format!("{}/secret", secret.url)),
    );
    let server = Server::start_with(
        dir.path(),
        &[
            "--plugins",
            crate::harness::TEST_PLUGINS,
            "--fetch-allow",
            "127.0.0.2",
        ],
    );
    let reply = server
        .post("/api/images", &with_base(&format!("{}/disk.raw", hop.url)))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let ti = reply.ids("target_image")[0].clone();
    let done = server
        .wait_terminal(&format!("/api/target_images/{ti}"))
        .await;
    assert_eq!(done.text("status"), "FAILED");
    let error = done.text("error");
    assert!(
        error.contains("refused") && error.contains("not a public address"),
        "{error}"
    );
    assert_eq!(secret.hits.load(Ordering::SeqCst), 0);
    assert_eq!(
        hop.hits.load(Ordering::SeqCst),
        1,
        "a refusal is not retried"
    );
}

#[tokio::test]
async fn an_allowed_host_is_fetched_within_the_size_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let small = service("127.0.0.1", Serve::Body(vec![7u8; 1 << 20]));
    let large = service("127.0.0.1", Serve::Body(vec![7u8; 3 << 20]));
    let server = Server::start_with(
        dir.path(),
        &[
            "--plugins",
            crate::harness::TEST_PLUGINS,
            "--fetch-allow",
            "127.0.0.1",
            "--max-image-size",
            "2MiB",
        ],
    );
    let build = |url: String| {
        let server = &server;
        async move {
            let reply = server.post("/api/images", &with_base(&url)).await;
            assert_eq!(reply.status, 200, "{}", reply.body);
            let ti = reply.ids("target_image")[0].clone();
            server
                .wait_terminal(&format!("/api/target_images/{ti}"))
                .await
        }
    };
    let ok = build(format!("{}/small.raw", small.url)).await;
    assert_eq!(ok.text("status"), "COMPLETE", "{}", ok.body);
    let refused = build(format!("{}/large.raw", large.url)).await;
    assert_eq!(refused.text("status"), "FAILED");
    let error = refused.text("error");
    assert!(error.contains("larger than the 2097152 bytes"), "{error}");

    // The template's disk size is held to the same limit, at request time.
    let big = template("big").replace("64MiB", "16T");
    let reply = server
        .post("/api/images", &build_request("mock", &big, ""))
        .await;
    let message = reply.assert_error(400, "ParameterDataIncorrect");
    assert!(
        message.contains("2097152 bytes this server allows"),
        "{message}"
    );
}

/// A base image served one byte a second: cancel ends the download at the socket, the
/// job stops running, and the worker is free for the next build.
#[tokio::test]
async fn cancel_reaches_a_download_that_trickles() {
    let dir = tempfile::tempdir().expect("tempdir");
    let slow = service("127.0.0.1", Serve::Trickle(1 << 20));
    let server = Server::start_with(
        dir.path(),
        &[
            "--plugins",
            crate::harness::TEST_PLUGINS,
            "--fetch-allow",
            "127.0.0.1",
            "--workers",
            "1",
        ],
    );
    let reply = server
        .post("/api/images", &with_base(&format!("{}/slow.raw", slow.url)))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let ti = reply.ids("target_image")[0].clone();
    let path = format!("/api/target_images/{ti}");
    server
        .wait_for_activity(&path, "fetching the base image", Duration::from_secs(30))
        .await;
    let cancel = server.post(&format!("{path}/cancel"), "").await;
    assert!((200..300).contains(&cancel.status), "{}", cancel.body);
    let done = server.wait_terminal(&path).await;
    assert_eq!(done.text("status"), "CANCELLED");
    eventually(Duration::from_secs(10), async || {
        let metrics = server.get("/metrics").await.body;
        match job_gauge(&metrics, "conductor_jobs_running") {
            0.0 => Ok(()),
            n => Err(format!("{n} build(s) still running after the cancel")),
        }
    })
    .await;
    eventually(Duration::from_secs(10), async || {
        if slow.closed.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err("the download's connection is still open".into())
        }
    })
    .await;
    // The one worker is free: a blank build completes.
    let next = server
        .post("/api/images", &build_request("mock", &template("next"), ""))
        .await;
    let next_ti = next.ids("target_image")[0].clone();
    let next_done = server
        .wait_terminal(&format!("/api/target_images/{next_ti}"))
        .await;
    assert_eq!(next_done.text("status"), "COMPLETE");
}

/// A qcow2 file of 256 KiB whose every L2 entry names one data cluster: it would have
/// become a 1 GiB disk of data.
fn qcow2_bomb() -> Vec<u8> {
    const CLUSTER: usize = 1 << 16;
    let mut file = vec![0u8; 4 * CLUSTER];
    let put32 =
        |f: &mut Vec<u8>, at: usize, v: u32| f[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 =
        |f: &mut Vec<u8>, at: usize, v: u64| f[at..at + 8].copy_from_slice(&v.to_be_bytes());
    file[..4].copy_from_slice(b"QFI\xfb");
    put32(&mut file, 4, 2); // version
    put32(&mut file, 20, 16); // cluster_bits
    put64(&mut file, 24, 1 << 30); // virtual size
    put32(&mut file, 36, 2); // L1 entries
    put64(&mut file, 40, CLUSTER as u64); // L1 table offset
    put64(&mut file, CLUSTER, 2 * CLUSTER as u64);
    put64(&mut file, CLUSTER + 8, 2 * CLUSTER as u64);
    for entry in 0..CLUSTER / 8 {
        put64(&mut file, 2 * CLUSTER + entry * 8, 3 * CLUSTER as u64);
    }
    file[3 * CLUSTER..].fill(0xAB);
    file
}

#[tokio::test]
async fn a_qcow2_bomb_and_an_oversized_virtual_disk_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let import = dir.path().join("import");
    std::fs::create_dir(&import).expect("import dir");
    let bomb = import.join("bomb.qcow2");
    std::fs::write(&bomb, qcow2_bomb()).expect("write");
    let data = dir.path().join("data");
    let server = Server::start_with(
        &data,
        &[
            "--plugins",
            crate::harness::TEST_PLUGINS,
            "--import-dir",
            import.to_str().expect("utf-8"),
        ],
    );
    let build = async |extra_args: &Server| {
        let reply = extra_args
            .post(
                "/api/images",
                &with_base(&format!("file://{}", bomb.display())),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let ti = reply.ids("target_image")[0].clone();
        extra_args
            .wait_terminal(&format!("/api/target_images/{ti}"))
            .await
    };
    let done = build(&server).await;
    assert_eq!(done.text("status"), "FAILED");
    assert!(
        done.text("error").contains("mapped more than once"),
        "{}",
        done.body
    );
    server.kill();

    // Its virtual size alone is over a limit of 512 MiB.
    let server = Server::start_with(
        &data,
        &[
            "--plugins",
            crate::harness::TEST_PLUGINS,
            "--import-dir",
            import.to_str().expect("utf-8"),
            "--max-image-size",
            "512MiB",
        ],
    );
    let done = build(&server).await;
    assert_eq!(done.text("status"), "FAILED");
    assert!(done.text("error").contains("virtual size"), "{}", done.body);
    let blobs: Vec<_> = std::fs::read_dir(data.join("blobs"))
        .expect("blobs")
        .collect();
    assert!(blobs.is_empty(), "nothing was stored");
}

/// A disk the file system refuses (here: larger than the process may write) fails the
/// build with the reason instead of leaving it BUILDING for ever.
#[tokio::test]
async fn a_disk_the_file_system_refuses_fails_the_build() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_limited(
        dir.path(),
        &["--plugins", crate::harness::TEST_PLUGINS],
        1 << 30,
    );
    let big = template("too-big").replace("64MiB", "4G");
    let reply = server
        .post("/api/images", &build_request("mock", &big, ""))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let ti = reply.ids("target_image")[0].clone();
    let done = server
        .wait_terminal(&format!("/api/target_images/{ti}"))
        .await;
    assert_eq!(done.text("status"), "FAILED");
    assert!(done.text("error").contains("base disk"), "{}", done.body);
}

async fn user(server: &Server, name: &str, role: &str) {
    let reply = server
        .post(
            "/api/users",
            &format!(
                "<user><name>{name}</name><password>{USER_PASSWORD}</password><roles>{role}</roles></user>"
            ),
        )
        .await;
    assert!((200..300).contains(&reply.status), "{}", reply.body);
}

async fn as_user(server: &Server, name: &str, method: Method, path: &str, body: &str) -> Reply {
    server
        .as_user(name, USER_PASSWORD, method, path, body)
        .await
}

#[tokio::test]
async fn hooks_are_for_administrators_and_internal_hooks_need_the_operator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    user(&server, "nobody", "").await;
    let refused = server
        .post(
            "/api/hooks",
            "<hook><uri>http://127.0.0.1:1/secret-token</uri><version>1</version></hook>",
        )
        .await;
    let message = refused.assert_error(400, "ParameterDataIncorrect");
    assert!(message.contains("not a public address"), "{message}");
    let created = server
        .post(
            "/api/hooks",
            "<hook><uri>https://hooks.example.com/secret-token</uri><version>1</version></hook>",
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.ids("hook")[0].clone();
    for path in ["/api/hooks".to_owned(), format!("/api/hooks/{id}")] {
        let reply = as_user(&server, "nobody", Method::GET, &path, "").await;
        reply.assert_error(403, "PermissionDenied");
        assert!(!reply.body.contains("secret-token"));
    }
    assert!(server.get("/api/hooks").await.body.contains("secret-token"));
}

/// A viewer learns nothing about the server's files: the refusal comes before the path
/// is looked at. An image admin learns only that the path is not a file in the import
/// directory, whether it exists or not.
#[tokio::test]
async fn permission_is_checked_before_anything_is_said_about_a_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let import = dir.path().join("import");
    std::fs::create_dir(&import).expect("import dir");
    let server = Server::start_with(
        &dir.path().join("data"),
        &[
            "--plugins",
            crate::harness::TEST_PLUGINS,
            "--import-dir",
            import.to_str().expect("utf-8"),
        ],
    );
    user(
        &server,
        "viewer",
        "<role environment='default'>viewer</role>",
    )
    .await;
    user(
        &server,
        "builder",
        "<role environment='default'>image_admin</role>",
    )
    .await;
    for path in ["/etc/passwd", "/no/such/file"] {
        let body = with_base(&format!("file://{path}"));
        let viewer = as_user(&server, "viewer", Method::POST, "/api/images", &body).await;
        viewer.assert_error(403, "PermissionDenied");
        let builder = as_user(&server, "builder", Method::POST, "/api/images", &body).await;
        let message = builder.assert_error(400, "ParameterDataIncorrect");
        assert_eq!(
            message.replace(path, "PATH"),
            "base image PATH is not a file in the import directory"
        );
        assert!(!message.contains(import.to_str().expect("utf-8")));
    }
}

/// Two environments with a mock account each and an image admin in each.
async fn two_environments(server: &Server) {
    for name in ["alpha", "beta"] {
        let reply = server
            .post(
                "/api/pool_families",
                &format!("<pool_family><name>{name}</name></pool_family>"),
            )
            .await;
        assert!((200..300).contains(&reply.status), "{}", reply.body);
        let reply = server
            .post(
                "/api/provider_accounts",
                &format!(
                    "<provider_account><label>{name}-acc</label><provider id='1'/><environment>{name}</environment>\
                     <credentials><username>u</username><password>p</password></credentials></provider_account>"
                ),
            )
            .await;
        assert!((200..300).contains(&reply.status), "{}", reply.body);
        user(
            server,
            &format!("{name}-admin"),
            &format!("<role environment='{name}'>image_admin</role>"),
        )
        .await;
    }
}

fn build_in(env: &str, name: &str, delay_ms: u32) -> String {
    format!(
        "<image><targets>mock</targets><tdl>{}</tdl><environment>{env}</environment>\
         <parameters><parameter name='delay_ms'>{delay_ms}</parameter></parameters></image>",
        template(name)
    )
}

#[tokio::test]
async fn an_identifier_another_environment_pushed_cannot_be_imported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    two_environments(&server).await;
    let built = as_user(
        &server,
        "alpha-admin",
        Method::POST,
        "/api/images",
        &build_in("alpha", "a", 0),
    )
    .await;
    assert_eq!(built.status, 200, "{}", built.body);
    let ti = built.ids("target_image")[0].clone();
    server
        .wait_terminal(&format!("/api/target_images/{ti}"))
        .await;
    let pushed = as_user(
        &server,
        "alpha-admin",
        Method::POST,
        "/api/provider_images",
        &format!("<provider_image><target_image_id>{ti}</target_image_id><provider_account>alpha-acc</provider_account></provider_image>"),
    )
    .await;
    assert_eq!(pushed.status, 200, "{}", pushed.body);
    let pi = pushed.ids("provider_image")[0].clone();
    let done = server
        .wait_terminal(&format!("/api/provider_images/{pi}"))
        .await;
    let identifier = done.text("target_identifier");
    assert!(!identifier.is_empty(), "{}", done.body);

    let import = |account: &str, env: &str| {
        format!(
            "<image><provider_account_name>{account}</provider_account_name><target_identifier>{identifier}</target_identifier>\
             <image_descriptor><image><name>taken</name></image></image_descriptor><environment>{env}</environment></image>"
        )
    };
    let refused = as_user(
        &server,
        "beta-admin",
        Method::POST,
        "/api/images",
        &import("beta-acc", "beta"),
    )
    .await;
    let message = refused.assert_error(409, "ParameterDataIncorrect");
    assert!(
        message.contains("belongs to another environment"),
        "{message}"
    );
    // Its own environment may import it again.
    let again = as_user(
        &server,
        "alpha-admin",
        Method::POST,
        "/api/images",
        &import("alpha-acc", "alpha"),
    )
    .await;
    assert_eq!(again.status, 200, "{}", again.body);
    let beta_images = as_user(&server, "beta-admin", Method::GET, "/api/images", "").await;
    assert!(beta_images.ids("image").is_empty());
}

#[tokio::test]
async fn quotas_refuse_what_an_environment_may_not_hold() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    two_environments(&server).await;
    let quota = "<quota><images>2</images><queued_jobs>1</queued_jobs></quota>";
    let refused = as_user(
        &server,
        "alpha-admin",
        Method::PUT,
        "/api/environments/alpha/quota",
        quota,
    )
    .await;
    refused.assert_error(403, "PermissionDenied");
    let set = server.put("/api/environments/alpha/quota", quota).await;
    assert_eq!(set.status, 200, "{}", set.body);
    assert_eq!(set.text("images"), "2");
    assert_eq!(set.text("running_jobs"), "");

    // One job at a time may be queued: a second build while the first runs is 429.
    let first = as_user(
        &server,
        "alpha-admin",
        Method::POST,
        "/api/images",
        &build_in("alpha", "one", 1500),
    )
    .await;
    assert_eq!(first.status, 200, "{}", first.body);
    let busy = as_user(
        &server,
        "alpha-admin",
        Method::POST,
        "/api/images",
        &build_in("alpha", "two", 0),
    )
    .await;
    let message = busy.assert_error(429, "QuotaExceeded");
    assert!(message.contains("1 queued jobs"), "{message}");
    // Another environment is not held to alpha's quota.
    let other = as_user(
        &server,
        "beta-admin",
        Method::POST,
        "/api/images",
        &build_in("beta", "b", 0),
    )
    .await;
    assert_eq!(other.status, 200, "{}", other.body);

    let ti = first.ids("target_image")[0].clone();
    server
        .wait_terminal(&format!("/api/target_images/{ti}"))
        .await;
    let second = as_user(
        &server,
        "alpha-admin",
        Method::POST,
        "/api/images",
        &build_in("alpha", "two", 0),
    )
    .await;
    assert_eq!(second.status, 200, "{}", second.body);
    let ti = second.ids("target_image")[0].clone();
    server
        .wait_terminal(&format!("/api/target_images/{ti}"))
        .await;
    // Two images are all alpha may hold.
    let third = as_user(
        &server,
        "alpha-admin",
        Method::POST,
        "/api/images",
        &build_in("alpha", "three", 0),
    )
    .await;
    let message = third.assert_error(413, "QuotaExceeded");
    assert!(message.contains("2 images"), "{message}");

    // Stored bytes: alpha's two images are 64 MiB each; a quota below that refuses more.
    let bytes = "<quota><stored_bytes>1048576</stored_bytes></quota>";
    server.put("/api/environments/alpha/quota", bytes).await;
    let usage = server.get("/api/environments/alpha/quota").await;
    assert_eq!(usage.text("images"), "");
    let over = as_user(
        &server,
        "alpha-admin",
        Method::POST,
        "/api/images",
        &build_in("alpha", "four", 0),
    )
    .await;
    let message = over.assert_error(413, "QuotaExceeded");
    assert!(message.contains("1048576"), "{message}");
    let listed = server.get("/api/images").await;
    assert_eq!(listed.ids("image").len(), 3, "nothing refused was stored");

    let bad = server
        .put(
            "/api/environments/alpha/quota",
            "<quota><images>-1</images></quota>",
        )
        .await;
    assert_eq!(bad.status, 422, "{}", bad.body);
}

/// With two workers and the default fair share (every worker but one), one
/// environment's queue of slow builds leaves a worker for another environment's build.
#[tokio::test]
async fn one_environment_cannot_take_every_worker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_with(
        dir.path(),
        &["--plugins", crate::harness::TEST_PLUGINS, "--workers", "2"],
    );
    two_environments(&server).await;
    let mut alpha = Vec::new();
    for n in 0..4 {
        let reply = as_user(
            &server,
            "alpha-admin",
            Method::POST,
            "/api/images",
            &build_in("alpha", &format!("a{n}"), 4000),
        )
        .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        alpha.push(reply.ids("target_image")[0].clone());
    }
    // The fair share holds alpha's later builds back, saying why.
    server
        .wait_for_activity(
            &format!("/api/target_images/{}", alpha[3]),
            "of this environment run at once",
            Duration::from_secs(20),
        )
        .await;
    let beta = as_user(
        &server,
        "beta-admin",
        Method::POST,
        "/api/images",
        &build_in("beta", "b", 0),
    )
    .await;
    let beta_ti = beta.ids("target_image")[0].clone();
    let done = server
        .wait_terminal(&format!("/api/target_images/{beta_ti}"))
        .await;
    assert_eq!(done.text("status"), "COMPLETE");
    // beta's build finished while alpha still had builds waiting or running.
    let mut unfinished = 0;
    for ti in &alpha {
        let status = server
            .get(&format!("/api/target_images/{ti}"))
            .await
            .text("status");
        unfinished += usize::from(status != "COMPLETE");
    }
    assert!(
        unfinished >= 2,
        "beta waited for alpha's queue ({unfinished} of alpha's unfinished)"
    );
}

#[tokio::test]
async fn templates_and_lists_are_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let long = template("long").replace("a test image", &"d".repeat(5000));
    let reply = server
        .post("/api/images", &build_request("mock", &long, ""))
        .await;
    let message = reply.assert_error(400, "ParameterDataIncorrect");
    assert!(
        message.contains("description is longer than 4096"),
        "{message}"
    );
    let huge = template("huge").replace(
        "</template>",
        &format!(
            "<files><file name='/x'>{}</file></files></template>",
            "x".repeat(300 << 10)
        ),
    );
    let reply = server
        .post("/api/images", &build_request("mock", &huge, ""))
        .await;
    let message = reply.assert_error(400, "ParameterDataIncorrect");
    assert!(
        message.contains("longer than the 262144 bytes"),
        "{message}"
    );

    for n in 0..3 {
        let reply = server
            .post(
                "/api/images",
                &build_request("mock", &template(&format!("i{n}")), ""),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    let all = server.get("/api/images").await;
    assert_eq!(
        all.ids("image").len(),
        3,
        "a client that asks no page gets every image"
    );
    let response = server
        .request(Method::GET, "/api/images?page=2&per_page=2")
        .basic_auth("admin", Some(PASSWORD))
        .send()
        .await
        .expect("request");
    assert_eq!(
        response
            .headers()
            .get("x-total-count")
            .and_then(|v| v.to_str().ok()),
        Some("3")
    );
    let body = response.text().await.expect("body");
    assert_eq!(body.matches("<image ").count(), 1, "{body}");
    let page_one = server.get("/api/images?page=1&per_page=2").await;
    assert_eq!(page_one.ids("image").len(), 2);
    assert_eq!(
        [page_one.ids("image"), roxmltree_ids(&body)].concat().len(),
        3
    );
    server
        .get("/api/images?page=x")
        .await
        .assert_error(400, "ParameterDataIncorrect");
    // The other top-level lists page the same way.
    for (path, element) in [
        ("/api/builds", "build"),
        ("/api/target_images", "target_image"),
    ] {
        let response = server
            .request(Method::GET, &format!("{path}?page=1&per_page=2"))
            .basic_auth("admin", Some(PASSWORD))
            .send()
            .await
            .expect("request");
        assert_eq!(
            response
                .headers()
                .get("x-total-count")
                .and_then(|v| v.to_str().ok()),
            Some("3"),
            "{path}"
        );
        let body = response.text().await.expect("body");
        assert_eq!(
            body.matches(&format!("<{element} ")).count(),
            2,
            "{path}: {body}"
        );
        assert_eq!(server.get(path).await.ids(element).len(), 3, "{path}");
    }
    let none = server.get("/api/provider_images?page=2").await;
    assert!(none.ids("provider_image").is_empty());
}

fn roxmltree_ids(body: &str) -> Vec<String> {
    Reply {
        status: 200,
        body: body.to_owned(),
        content_type: String::new(),
    }
    .ids("image")
}

#[tokio::test]
async fn the_data_directory_is_the_servers_alone() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    // A data directory an earlier release left open to everyone.
    std::fs::create_dir(&data).expect("data");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let server = Server::start(&data);
    let reply = server
        .post(
            "/api/images",
            &build_request("mock", &template("private"), ""),
        )
        .await;
    let ti = reply.ids("target_image")[0].clone();
    server
        .wait_terminal(&format!("/api/target_images/{ti}"))
        .await;
    let mode = |path: &std::path::Path| {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("blobs")), 0o700);
    for file in std::fs::read_dir(data.join("blobs")).expect("blobs") {
        let path = file.expect("entry").path();
        assert_eq!(
            mode(&path) & 0o077,
            0,
            "{} is readable by others",
            path.display()
        );
    }
    for name in ["conductor.redb", "credentials.key"] {
        assert_eq!(mode(&data.join(name)) & 0o077, 0, "{name}");
    }
}

/// Account labels are unique within an environment only: an environment's administrator
/// cannot find out which labels other environments use, and pushes name accounts within
/// the image's environment.
#[tokio::test]
async fn account_labels_reveal_nothing_about_other_environments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    two_environments(&server).await;
    for name in ["alpha", "beta"] {
        user(
            &server,
            &format!("{name}-owner"),
            &format!("<role environment='{name}'>admin</role>"),
        )
        .await;
    }
    let account = |env: &str| {
        format!(
            "<provider_account><label>shared</label><provider id='1'/><environment>{env}</environment>\
             <credentials><username>u</username><password>p</password></credentials></provider_account>"
        )
    };
    let a = as_user(
        &server,
        "alpha-owner",
        Method::POST,
        "/api/provider_accounts",
        &account("alpha"),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let b = as_user(
        &server,
        "beta-owner",
        Method::POST,
        "/api/provider_accounts",
        &account("beta"),
    )
    .await;
    assert_eq!(b.status, 201, "beta may use a label alpha uses: {}", b.body);
    let again = as_user(
        &server,
        "alpha-owner",
        Method::POST,
        "/api/provider_accounts",
        &account("alpha"),
    )
    .await;
    assert_eq!(again.status, 422, "{}", again.body);
    assert!(again.body.contains("taken"), "{}", again.body);
    // Both accounts in one environment would make the label ambiguous there.
    let b_id = b.ids("provider_account")[0].clone();
    let alpha_id = server
        .get("/api/environments/alpha")
        .await
        .ids("environment")[0]
        .clone();
    let joined = server
        .put(
            &format!("/api/pool_families/{alpha_id}/provider_accounts/{b_id}"),
            "",
        )
        .await;
    assert_eq!(joined.status, 422, "{}", joined.body);

    // A push by label names the account of the image's environment, even for a global
    // administrator who sees both.
    let built = as_user(
        &server,
        "beta-admin",
        Method::POST,
        "/api/images",
        &build_in("beta", "b", 0),
    )
    .await;
    let ti = built.ids("target_image")[0].clone();
    server
        .wait_terminal(&format!("/api/target_images/{ti}"))
        .await;
    let pushed = server
        .post(
            "/api/provider_images",
            &format!("<provider_image><target_image_id>{ti}</target_image_id><provider_account>shared</provider_account></provider_image>"),
        )
        .await;
    assert_eq!(pushed.status, 200, "{}", pushed.body);
    let pi = pushed.ids("provider_image")[0].clone();
    let done = server
        .wait_terminal(&format!("/api/provider_images/{pi}"))
        .await;
    assert_eq!(done.text("status"), "COMPLETE", "{}", done.body);
}

/// Bytes the server process has read through system calls (files, sockets, pipes).
fn bytes_read(server: &Server) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{}/io", server.pid())).expect("/proc io");
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("rchar")
}

/// CPU time the server process has used, user and system, in seconds.
fn cpu_seconds(server: &Server) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", server.pid())).expect("stat");
    // Fields after the command's closing parenthesis; utime and stime are 14 and 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("stat")
        .1
        .split_whitespace()
        .collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let tick = |i: usize| fields[i - 3].parse::<f64>().expect("ticks");
    (tick(14) + tick(15)) / ticks
}

/// A 64 GiB disk that is almost all holes is built, stored and named without the server
/// reading or hashing its zeros: the whole build reads less than 1 GiB and uses less
/// than 8 s of CPU (hashing 64 GiB takes 30 CPU-seconds even with SHA instructions: this
/// bounds work, not speed), and the stored body stays sparse.
#[tokio::test]
async fn a_large_sparse_image_is_stored_without_reading_its_holes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_with(dir.path(), &["--plugins", crate::harness::TEST_PLUGINS]);
    let (before, cpu_before) = (bytes_read(&server), cpu_seconds(&server));
    let big = template("big").replace("64MiB", "64G");
    let reply = server
        .post("/api/images", &build_request("mock", &big, ""))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let ti = format!("/api/target_images/{}", reply.ids("target_image")[0]);
    let done = server.wait_terminal(&ti).await;
    assert_eq!(done.text("status"), "COMPLETE", "{}", done.body);
    assert_eq!(done.text("virtual_size"), (64u64 << 30).to_string());
    let read = bytes_read(&server) - before;
    assert!(read < 1 << 30, "the server read {read} bytes");
    let cpu = cpu_seconds(&server) - cpu_before;
    assert!(cpu < 8.0, "the server used {cpu} CPU-seconds");

    let doc = done.doc();
    let digest = doc
        .descendants()
        .find(|n| n.has_tag_name("data"))
        .and_then(|n| n.attribute("digest"))
        .expect("digest");
    let blob = dir
        .path()
        .join("blobs")
        .join(crate::harness::blob_name(digest));
    let stored = std::fs::metadata(&blob).expect("the blob");
    use std::os::unix::fs::MetadataExt;
    assert!(
        stored.blocks() * 512 < 1 << 30,
        "{} bytes allocated",
        stored.blocks() * 512
    );
    // The tail of the body is served as zeros.
    let tail = server
        .request(Method::GET, &format!("{ti}/data"))
        .basic_auth("admin", Some(PASSWORD))
        .header("Range", format!("bytes={}-", stored.len() - 4096))
        .send()
        .await
        .expect("range");
    assert_eq!(tail.status(), 206);
    assert!(tail.bytes().await.expect("body").iter().all(|&b| b == 0));
}
