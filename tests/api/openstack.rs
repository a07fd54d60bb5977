//! The openstack plugin against a real Keystone and Glance (installed from PyPI and
//! started by tests/run.sh through tests/emulators/up.sh; their URLs and the test user
//! are in CONDUCTOR_TEST_*). What the plugin made is read back through Glance's own API.

use crate::disks::scattered_disk;
use crate::harness::{Reply, Server, TEST_PLUGINS, build_request, eventually};
use sha2::{Digest, Sha512};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: the OpenStack tests need Keystone and Glance; run them with \
             tests/run.sh, which starts both (tests/emulators/up.sh)"
        )
    })
}

pub(crate) struct Cloud {
    keystone: String,
    glance: String,
    user: String,
    password: String,
    project: String,
    domain: String,
}

fn cloud() -> Cloud {
    Cloud {
        keystone: env("CONDUCTOR_TEST_KEYSTONE"),
        glance: env("CONDUCTOR_TEST_GLANCE"),
        user: env("CONDUCTOR_TEST_OS_USER"),
        password: env("CONDUCTOR_TEST_OS_PASSWORD"),
        project: env("CONDUCTOR_TEST_OS_PROJECT"),
        domain: env("CONDUCTOR_TEST_OS_DOMAIN"),
    }
}

impl Cloud {
    /// A token for the test user, to look at Glance the way a user of the cloud would.
    async fn token(&self) -> String {
        let body = serde_json::json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": self.user, "domain": {"name": self.domain}, "password": self.password}}},
            "scope": {"project": {"name": self.project, "domain": {"name": self.domain}}},
        }});
        let response = reqwest::Client::new()
            .post(format!("{}/auth/tokens", self.keystone))
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("Keystone answers");
        assert_eq!(response.status().as_u16(), 201);
        response
            .headers()
            .get("x-subject-token")
            .expect("a token")
            .to_str()
            .expect("ASCII")
            .to_owned()
    }

    /// Glance's record of an image.
    pub(crate) async fn image(&self, id: &str) -> serde_json::Value {
        let body = self
            .glance(reqwest::Method::GET, &format!("/v2/images/{id}"))
            .await
            .bytes()
            .await
            .expect("body");
        serde_json::from_slice(&body).expect("JSON")
    }

    async fn glance(&self, method: reqwest::Method, path: &str) -> reqwest::Response {
        reqwest::Client::new()
            .request(method, format!("{}{path}", self.glance))
            .header("X-Auth-Token", self.token().await)
            .send()
            .await
            .expect("Glance answers")
    }
}

pub(crate) struct Setup {
    _dir: tempfile::TempDir,
    import: PathBuf,
    work: PathBuf,
    pub(crate) server: Server,
    pub(crate) cloud: Cloud,
}

fn setup() -> Setup {
    setup_with(&[])
}

/// A server with the test plugins, an import directory and `extra` flags, and the cloud.
pub(crate) fn setup_with(extra: &[&str]) -> Setup {
    setup_logging(extra, None)
}

/// As [`setup_with`], with the server's debug log written to `log` when given.
pub(crate) fn setup_logging(extra: &[&str], log: Option<&Path>) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let import = dir.path().join("import");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&import).expect("import dir");
    std::fs::create_dir_all(&work).expect("work dir");
    let data = dir.path().join("data");
    let args: Vec<&str> = [
        "--plugins",
        TEST_PLUGINS,
        "--import-dir",
        import.to_str().expect("utf-8"),
    ]
    .into_iter()
    .chain(extra.iter().copied())
    .collect();
    let server = match log {
        Some(log) => Server::start_logging(&data, &args, log),
        None => Server::start_with(&data, &args),
    };
    Setup {
        _dir: dir,
        import,
        work,
        server,
        cloud: cloud(),
    }
}

/// An openstack provider; `glance` adds the glance_url setting (and with it the grant).
async fn provider(s: &Setup, name: &str, glance: bool) -> String {
    let glance_url = if glance {
        format!("<setting name='glance_url'>{}</setting>", s.cloud.glance)
    } else {
        String::new()
    };
    let reply = s
        .server
        .post(
            "/api/providers",
            &format!(
                "<provider><name>{name}</name><provider_type id='openstack'/><settings>\
                 <setting name='auth_url'>{}</setting><setting name='domain'>{}</setting>{glance_url}\
                 </settings></provider>",
                s.cloud.keystone, s.cloud.domain
            ),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    reply.ids("provider")[0].clone()
}

async fn add_account(s: &Setup, provider: &str, label: &str, password: &str) -> Reply {
    s.server
        .post(
            &format!("/api/providers/{provider}/provider_accounts"),
            &format!(
                "<provider_account><label>{label}</label><credentials>\
                 <username>{}</username><password>{password}</password><project>{}</project>\
                 </credentials></provider_account>",
                s.cloud.user, s.cloud.project
            ),
        )
        .await
}

/// A provider with an account in the default environment; answers the account label.
pub(crate) async fn ready_account(s: &Setup, name: &str, glance: bool) -> String {
    let id = provider(s, name, glance).await;
    let label = format!("{name}-acc");
    let account = add_account(s, &id, &label, &s.cloud.password).await;
    assert_eq!(account.status, 201, "{}", account.body);
    let account = account.ids("provider_account")[0].clone();
    let joined = s
        .server
        .put(
            &format!("/api/pool_families/1/provider_accounts/{account}"),
            "",
        )
        .await;
    assert!(joined.status < 300, "{}", joined.body);
    label
}

fn template(size: &str) -> String {
    format!(
        "<template><name>os-test</name><os><name>Fedora</name><version>14</version><arch>x86_64</arch>\
         <install type='url'><url>http://example.org/os/</url></install></os><disk><size>{size}</size></disk></template>"
    )
}

/// Builds for `targets` from a scattered disk; answers the target images by target.
async fn build(s: &Setup, targets: &str) -> (String, Vec<(String, String)>) {
    let base = s.import.join("base.raw");
    if !base.exists() {
        scattered_disk(&base, 600 << 20);
    }
    let extra = format!("<base_image>file://{}</base_image>", base.display());
    let reply = s
        .server
        .post(
            "/api/images",
            &build_request(targets, &template("600MiB"), &extra),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let image = reply.ids("image")[0].clone();
    let mut built = Vec::new();
    for ti in reply.ids("target_image") {
        let done = s
            .server
            .wait_terminal(&format!("/api/target_images/{ti}"))
            .await;
        assert_eq!(done.text("status"), "COMPLETE", "{}", done.body);
        built.push((done.text("target"), ti));
    }
    (image, built)
}

async fn push(s: &Setup, what: &str, accounts: &str, parameters: &str) -> Vec<String> {
    let reply = s
        .server
        .post(
            "/api/provider_images",
            &format!(
                "<provider_image><provider_account>{accounts}</provider_account>{what}\
                 {parameters}</provider_image>"
            ),
        )
        .await;
    assert!(reply.status < 300, "{}", reply.body);
    reply.ids("provider_image")
}

/// Pushes one target image to the account and waits for the push to end; answers the
/// provider image's id and its last document.
async fn push_one(s: &Setup, ti: &str, account: &str, parameters: &str) -> (String, Reply) {
    let pi = push(
        s,
        &format!("<target_image_id>{ti}</target_image_id>"),
        account,
        parameters,
    )
    .await[0]
        .clone();
    let done = s
        .server
        .wait_terminal(&format!("/api/provider_images/{pi}"))
        .await;
    (pi, done)
}

fn virtual_size(path: &Path) -> u64 {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .output()
        .expect("qemu-img (tests/run.sh installs qemu-utils)");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    info["virtual-size"].as_u64().expect("virtual-size")
}

#[tokio::test]
async fn an_image_pushed_to_openstack_is_active_in_glance_with_the_same_bytes() {
    let s = setup();
    let account = ready_account(&s, "os", true).await;
    let (_, built) = build(&s, "openstack").await;
    let ti = built[0].1.clone();
    let (pi, done) = push_one(&s, &ti, &account, "").await;
    assert_eq!(done.text("status"), "COMPLETE", "{}", done.body);
    let id = done.text("target_identifier");

    // Glance holds it, active, with our bytes: the same SHA-512 and virtual size.
    let ours = s.work.join("ours.qcow2");
    let bytes = s.server.download(&ti).await;
    std::fs::write(&ours, &bytes).expect("write");
    let record = s.cloud.image(&id).await;
    assert_eq!(record["status"], "active", "{record}");
    assert_eq!(record["disk_format"], "qcow2", "{record}");
    assert_eq!(record["os_hash_algo"], "sha512", "{record}");
    let sha512: String = Sha512::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(record["os_hash_value"], sha512.as_str(), "{record}");
    assert_eq!(record["virtual_size"].as_u64(), Some(virtual_size(&ours)));
    assert_eq!(virtual_size(&ours), 600 << 20);
    assert_eq!(record["min_disk"].as_u64(), Some(1), "{record}");
    assert_eq!(record["conductor_target_image"], ti.as_str(), "{record}");

    // Downloaded from Glance, it is the same image as ours.
    let theirs = s.work.join("theirs.qcow2");
    let data = s
        .cloud
        .glance(reqwest::Method::GET, &format!("/v2/images/{id}/file"))
        .await
        .bytes()
        .await
        .expect("image data");
    std::fs::write(&theirs, &data).expect("write");
    let (same, text) = crate::disks::qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        ours.to_str().expect("utf-8"),
        theirs.to_str().expect("utf-8"),
    ]);
    assert!(same, "{text}");

    // Deleting the provider image deletes it in Glance.
    let deleted = s.server.delete(&format!("/api/provider_images/{pi}")).await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    eventually(Duration::from_secs(60), async || {
        let status = s
            .cloud
            .glance(reqwest::Method::GET, &format!("/v2/images/{id}"))
            .await
            .status()
            .as_u16();
        if status == 404 {
            Ok(())
        } else {
            Err(format!("Glance still has {id} ({status})"))
        }
    })
    .await;
}

#[tokio::test]
async fn a_wrong_password_is_refused_with_keystones_reason() {
    let s = setup();
    let id = provider(&s, "os-wrong", true).await;
    let reply = add_account(&s, &id, "wrong", "not-the-password").await;
    assert_eq!(reply.status, 422, "{}", reply.body);
    assert!(
        reply
            .body
            .contains("Login credentials are invalid for this Provider")
            && reply.body.contains("Keystone refused the credentials")
            && reply.body.contains("requires authentication"),
        "{}",
        reply.body
    );
}

#[tokio::test]
async fn glance_refusing_the_format_fails_the_push_with_its_words() {
    let s = setup();
    let account = ready_account(&s, "os-format", true).await;
    let (_, built) = build(&s, "openstack").await;
    // The image is qcow2; Glance is told it is VMDK and checks.
    let (pi, done) = push_one(
        &s,
        &built[0].1,
        &account,
        "<parameters><parameter name='disk_format'>vmdk</parameter></parameters>",
    )
    .await;
    assert_eq!(done.text("status"), "FAILED", "{}", done.body);
    let error = done.text("error");
    assert!(
        error.contains("415")
            && error.contains("Image disk_format vmdk does not match stream data qcow2"),
        "{error}"
    );
    // The image record the push made in Glance was removed again.
    let listed: serde_json::Value = serde_json::from_slice(
        &s.cloud
            .glance(reqwest::Method::GET, "/v2/images?name=os-test")
            .await
            .bytes()
            .await
            .expect("body"),
    )
    .expect("JSON");
    let left: Vec<&serde_json::Value> = listed["images"]
        .as_array()
        .expect("images")
        .iter()
        .filter(|i| i["conductor_provider_image"] == pi.as_str())
        .collect();
    assert!(left.is_empty(), "left in Glance: {left:?}");
}

#[tokio::test]
async fn a_catalog_endpoint_outside_the_grant_is_refused() {
    let s = setup();
    // No glance_url: the plugin takes Glance from Keystone's catalog, whose host the
    // provider's settings do not name.
    let account = ready_account(&s, "os-catalog", false).await;
    let (_, built) = build(&s, "openstack").await;
    let (_, done) = push_one(&s, &built[0].1, &account, "").await;
    assert_eq!(done.text("status"), "FAILED", "{}", done.body);
    let glance = s.cloud.glance.trim_start_matches("http://");
    assert!(
        done.text("error").contains(&format!(
            "tried to reach {glance}, which its provider does not grant"
        )),
        "{}",
        done.body
    );
}

#[tokio::test]
async fn one_build_pushed_to_ec2_and_openstack_in_one_request_completes_for_both() {
    let s = setup();
    let os = ready_account(&s, "os-both", true).await;
    let ec2 = crate::ec2::ready_account(&s.server, "ec2-both").await.1;
    let (image, built) = build(&s, "ec2,openstack").await;
    let mut targets: Vec<&str> = built.iter().map(|(t, _)| t.as_str()).collect();
    targets.sort();
    assert_eq!(targets, ["ec2", "openstack"]);
    let pis = push(
        &s,
        &format!("<image_id>{image}</image_id>"),
        &format!("{ec2},{os}"),
        "",
    )
    .await;
    assert_eq!(pis.len(), 2);
    for pi in pis {
        let done = s
            .server
            .wait_terminal(&format!("/api/provider_images/{pi}"))
            .await;
        assert_eq!(done.text("status"), "COMPLETE", "{}", done.body);
        let id = done.text("target_identifier");
        assert!(
            id.starts_with("ami-") || id.len() == 36,
            "an AMI or a Glance image id: {}",
            done.body
        );
    }
}
