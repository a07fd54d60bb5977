//! Starts the real `conductor` binary on port 0 with a temporary data directory and
//! talks to it over HTTP. No sleeps: waits poll a condition until a deadline.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const PASSWORD: &str = "test-password";
/// Test-only plugins (`testbed`), built by host/build.rs. Its subfolders `sandbox`
/// (`hostile`) and `refused` (`reach`) hold the sandbox tests' plugins.
pub const TEST_PLUGINS: &str = env!("CONDUCTOR_TEST_PLUGINS");
/// The compiled plugins every test server shares (`--plugin-cache`).
const PLUGIN_CACHE: &str = concat!(env!("CARGO_TARGET_TMPDIR"), "/plugin-cache");

pub struct Server {
    child: Child,
    pub url: String,
    password: String,
    client: reqwest::Client,
}

pub struct Reply {
    pub status: u16,
    pub body: String,
    pub content_type: String,
}

impl Reply {
    /// The body as an XML document; panics with the body when it is not one.
    pub fn doc(&self) -> roxmltree::Document<'_> {
        roxmltree::Document::parse(&self.body)
            .unwrap_or_else(|e| panic!("not XML ({e}): {:?}", self.body))
    }

    /// The text of the first element with this name.
    pub fn text(&self, name: &str) -> String {
        let doc = self.doc();
        doc.descendants()
            .find(|n| n.has_tag_name(name))
            .map(|n| n.text().unwrap_or("").to_owned())
            .unwrap_or_else(|| panic!("no <{name}> in {}", self.body))
    }

    /// `id` attributes of every element with this name, in document order. Only a
    /// successful reply has any to give: an error document has none, so a test that
    /// checks that something is absent would pass on a 500.
    pub fn ids(&self, name: &str) -> Vec<String> {
        assert!(
            (200..300).contains(&self.status),
            "ids of <{name}> asked of a {} reply: {}",
            self.status,
            self.body
        );
        self.doc()
            .descendants()
            .filter(|n| n.has_tag_name(name))
            .filter_map(|n| n.attribute("id").map(str::to_owned))
            .collect()
    }

    /// Asserts an `<error>` reply with this status and code; returns the message.
    pub fn assert_error(&self, status: u16, code: &str) -> String {
        assert_eq!(self.status, status, "status of {}", self.body);
        assert_eq!(self.text("code"), code, "code of {}", self.body);
        self.text("message")
    }
}

impl Server {
    /// Starts a server on a new data directory with the test plugins loaded.
    pub fn start(data: &Path) -> Server {
        Server::start_with(data, &["--plugins", TEST_PLUGINS])
    }

    pub fn start_with(data: &Path, args: &[&str]) -> Server {
        Server::start_as(data, args, PASSWORD)
    }

    /// Starts a server whose bootstrap admin has this password.
    pub fn start_as(data: &Path, args: &[&str], password: &str) -> Server {
        Server::spawn(data, args, password, None, None)
    }

    /// Starts a server that logs everything (debug level) into `log`.
    pub fn start_logging(data: &Path, args: &[&str], log: &Path) -> Server {
        Server::spawn(data, args, PASSWORD, Some(log), None)
    }

    /// Starts a server that may write no file larger than `max_file` bytes (as on a file
    /// system that refuses a size), with SIGXFSZ ignored so such a write fails instead of
    /// killing it.
    pub fn start_limited(data: &Path, args: &[&str], max_file: u64) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_conductor"));
        // SAFETY: only async-signal-safe calls (signal, setrlimit) between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                let limit = libc::rlimit {
                    rlim_cur: max_file,
                    rlim_max: max_file,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Server::spawn_command(command, data, args, PASSWORD, None)
    }

    /// Starts a server whose soft limit of open files is `open_files` when it starts.
    pub fn start_with_open_files(data: &Path, args: &[&str], open_files: u64) -> Server {
        Server::spawn(data, args, PASSWORD, None, Some(open_files))
    }

    fn spawn(
        data: &Path,
        args: &[&str],
        password: &str,
        log: Option<&Path>,
        open_files: Option<u64>,
    ) -> Server {
        use std::os::unix::process::CommandExt as _;
        let mut command = Command::new(env!("CARGO_BIN_EXE_conductor"));
        if let Some(open_files) = open_files {
            // SAFETY: between fork and exec only getrlimit and setrlimit run, which are
            // async-signal-safe and touch nothing but their arguments.
            unsafe {
                command.pre_exec(move || {
                    let mut limit = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                        limit.rlim_cur = open_files.min(limit.rlim_max);
                        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
                    }
                    Ok(())
                });
            }
        }
        Server::spawn_command(command, data, args, password, log)
    }

    fn spawn_command(
        mut command: Command,
        data: &Path,
        args: &[&str],
        password: &str,
        log: Option<&Path>,
    ) -> Server {
        let stderr = match log {
            Some(path) => Stdio::from(std::fs::File::create(path).expect("create the log file")),
            None => Stdio::inherit(),
        };
        // One folder of compiled plugins for every server of the suite: each compiles
        // what is not there yet (about 1.5 s for the bundled plugins in a debug build),
        // and the rest start at once. A test that names its own keeps it.
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data)
            .args(args);
        if !args.contains(&"--plugin-cache") {
            command.args(["--plugin-cache", PLUGIN_CACHE]);
        }
        let mut child = command
            .env("CONDUCTOR_ADMIN_PASSWORD", password)
            .env(
                "CONDUCTOR_LOG",
                if log.is_some() { "debug" } else { "warn" },
            )
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start conductor");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("conductor listening on ") {
                    let _ = tx.send(url.to_owned());
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("conductor printed its address");
        Server {
            child,
            url,
            password: password.to_owned(),
            // The server closes a connection idle for its keep-alive timeout (5 s by
            // default); a request sent on one it is closing just then fails, and a POST is
            // not retried. Idle connections are dropped here well before.
            client: reqwest::Client::builder()
                .pool_idle_timeout(Duration::from_secs(2))
                .build()
                .expect("HTTP client"),
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        let response = request.send().await.expect("request reached the server");
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = response.text().await.expect("response body");
        Reply {
            status,
            body,
            content_type,
        }
    }

    /// The `host:port` the server listens on, for clients that speak TCP themselves.
    pub fn address(&self) -> &str {
        self.url
            .split_once("://")
            .map_or(&self.url, |(_, address)| address)
    }

    /// The server's process id, to read what it holds from /proc.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, format!("{}{path}", self.url))
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(
            self.request(reqwest::Method::GET, path)
                .basic_auth("admin", Some(&self.password))
                .header("Accept", "application/xml"),
        )
        .await
    }

    pub async fn post(&self, path: &str, body: &str) -> Reply {
        self.send(
            self.request(reqwest::Method::POST, path)
                .basic_auth("admin", Some(&self.password))
                .header("Content-Type", "application/xml")
                .body(body.to_owned()),
        )
        .await
    }

    pub async fn put(&self, path: &str, body: &str) -> Reply {
        self.send(
            self.request(reqwest::Method::PUT, path)
                .basic_auth("admin", Some(&self.password))
                .header("Content-Type", "application/xml")
                .body(body.to_owned()),
        )
        .await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.send(
            self.request(reqwest::Method::DELETE, path)
                .basic_auth("admin", Some(&self.password)),
        )
        .await
    }

    /// A request as another user.
    pub async fn as_user(
        &self,
        user: &str,
        password: &str,
        method: reqwest::Method,
        path: &str,
        body: &str,
    ) -> Reply {
        let mut request = self
            .request(method, path)
            .basic_auth(user, Some(password))
            .header("Accept", "application/xml");
        if !body.is_empty() {
            request = request
                .header("Content-Type", "application/xml")
                .body(body.to_owned());
        }
        self.send(request).await
    }

    pub async fn raw(&self, request: reqwest::RequestBuilder) -> Reply {
        self.send(request).await
    }

    /// The bytes of a built target image, from `GET /api/target_images/:id/data`.
    pub async fn download(&self, ti: &str) -> Vec<u8> {
        let response = self
            .request(
                reqwest::Method::GET,
                &format!("/api/target_images/{ti}/data"),
            )
            .basic_auth("admin", Some(&self.password))
            .send()
            .await
            .expect("download");
        assert_eq!(response.status().as_u16(), 200);
        response.bytes().await.expect("body").to_vec()
    }

    /// Polls `GET path` until `<status>` is terminal; returns the last reply.
    pub async fn wait_terminal(&self, path: &str) -> Reply {
        self.wait_terminal_within(path, Duration::from_secs(120))
            .await
    }

    /// Polls `GET path` until `<status>` is terminal, for at most `limit`.
    pub async fn wait_terminal_within(&self, path: &str, limit: Duration) -> Reply {
        let deadline = Instant::now() + limit;
        loop {
            let reply = self.get(path).await;
            assert_eq!(reply.status, 200, "{path}: {}", reply.body);
            let status = reply.text("status");
            if ["COMPLETE", "FAILED", "CANCELLED"].contains(&status.as_str()) {
                return reply;
            }
            assert!(
                Instant::now() < deadline,
                "{path} still {status} after {} s",
                limit.as_secs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls `GET path` until `status_detail/activity` holds `words`, for at most
    /// `limit`; fails at once if the job ends first.
    pub async fn wait_for_activity(&self, path: &str, words: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let reply = self.get(path).await;
            if reply.text("activity").contains(words) {
                return;
            }
            assert!(
                !["COMPLETE", "FAILED", "CANCELLED"].contains(&reply.text("status").as_str()),
                "{path} ended before '{words}': {}",
                reply.body
            );
            assert!(
                Instant::now() < deadline,
                "{path} never '{words}': {}",
                reply.body
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the server the hard way, as a crash or power cut would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and returns at once, so a test can watch what the server does while
    /// it stops.
    pub fn signal_stop(&self) {
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }

    /// Waits up to `limit` for the server to exit; answers its exit status, or `None`
    /// if it is still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server with SIGTERM and waits for it to exit.
    pub fn stop(mut self) {
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TDL template with this name, as aeolus-cli's example has it, with a 64 MiB disk:
/// small, so that hashing the built image costs the tests little.
pub fn template(name: &str) -> String {
    format!(
        "<template><name>{name}</name><description>a test image</description>\
         <os><name>Fedora</name><version>14</version><arch>x86_64</arch><rootpw>password</rootpw>\
         <install type='url'><url>http://download.fedoraproject.org/pub/fedora/linux/releases/14/Fedora/x86_64/os/</url></install></os>\
         <disk><size>64MiB</size></disk></template>"
    )
}

/// A build request with the template as child elements.
pub fn build_request(targets: &str, template: &str, extra: &str) -> String {
    format!(
        "<?xml version='1.0' encoding='UTF-8'?><image><targets>{targets}</targets><tdl>{template}</tdl>\
         <environment>default</environment>{extra}</image>"
    )
}

/// Writes a disk (sparse, 600 MiB, data scattered over it) into `import`, a server's
/// `--import-dir`, and answers the `<base_image>` element naming it: a cloud target
/// builds an OS this server does not install only from a base image.
pub fn base_image(import: &Path) -> String {
    std::fs::create_dir_all(import).expect("import dir");
    let path = import.join("base.raw");
    crate::disks::scattered_disk(&path, 600 << 20);
    format!("<base_image>file://{}</base_image>", path.display())
}

/// The digest the server gives a body, written out over every byte from the definition
/// in the README ("Disk images") rather than taken from the server's code: `sparse-sha256:<hex>`.
pub fn sparse_digest(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(b"conductor sparse-sha256 v1\0");
    for (i, block) in bytes.chunks(64 << 10).enumerate() {
        if block.iter().any(|&b| b != 0) {
            hasher.update((i as u64).to_be_bytes());
            hasher.update(block);
        }
    }
    hasher.update((bytes.len() as u64).to_be_bytes());
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sparse-sha256:{hex}")
}

/// The name of the file under `data/blobs` that holds a body with this digest: the plain
/// SHA-256 for bodies stored before the sparse digest, `sparse-sha256-<hex>` after.
pub fn blob_name(digest: &str) -> String {
    match digest.strip_prefix("sha256:") {
        Some(hex) => hex.to_owned(),
        None => digest.replace(':', "-"),
    }
}

/// Runs `check` until it answers `Ok`, every 100 ms; after `limit` the test fails with
/// the last `Err`. For what a server or a cloud does after answering (a delete on the
/// provider, a log line written).
pub async fn eventually(limit: Duration, mut check: impl AsyncFnMut() -> Result<(), String>) {
    let deadline = Instant::now() + limit;
    loop {
        match check().await {
            Ok(()) => return,
            Err(why) => assert!(Instant::now() < deadline, "{why}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `conductor serve` with `args` on a fresh data directory; asserts it stopped
/// without setting anything up, and answers what it said on stderr.
pub fn refused_at_start(args: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_conductor"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path().join("data"))
        .args(args)
        .env("CONDUCTOR_ADMIN_PASSWORD", "x")
        .output()
        .expect("run conductor");
    assert!(!output.status.success());
    assert!(!dir.path().join("data").exists(), "nothing was set up");
    String::from_utf8_lossy(&output.stderr).into_owned()
}
