//! The ec2 plugin against a real EC2/EBS emulator (moto, started by tests/run.sh through
//! tests/emulators/up.sh; its URL is in CONDUCTOR_TEST_MOTO). The tests read what the
//! plugin made back through the emulator's own EC2 and EBS APIs.

use crate::disks::scattered_disk;
use crate::harness::{Reply, Server, TEST_PLUGINS, build_request, eventually};
use crate::jobs::wait_for;
use crate::providers::import_body;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The emulator's URL. Missing means the tests were started without the emulators:
/// that is a failure, not a reason to skip.
fn moto() -> String {
    std::env::var("CONDUCTOR_TEST_MOTO").expect(
        "CONDUCTOR_TEST_MOTO names the EC2/EBS emulator; run the tests with tests/run.sh, \
         which starts it (tests/emulators/up.sh)",
    )
}

/// The account moto puts everything in.
const MOTO_ACCOUNT: &str = "123456789012";

/// A request to the emulator for `service`. moto routes a request by the credential
/// scope of its Authorization header and checks no signature by default.
fn emulator(service: &str, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .request(method, format!("{}{path}", moto()))
        .header(
            "Authorization",
            format!(
                "AWS4-HMAC-SHA256 Credential=AKIDTESTS/20261127/us-east-1/{service}/aws4_request, \
                 SignedHeaders=host, Signature=00"
            ),
        )
}

/// An EC2 query call to the emulator; answers the status and the XML.
async fn ec2_call(params: &[(&str, &str)]) -> (u16, String) {
    let mut form = String::from("Version=2016-11-15");
    for (k, v) in params {
        form.push_str(&format!("&{k}={v}"));
    }
    let response = emulator("ec2", reqwest::Method::POST, "/")
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .expect("the emulator answers");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

/// The texts of every element named `name` in an XML document.
fn texts(xml: &str, name: &str) -> Vec<String> {
    let doc = roxmltree::Document::parse(xml).expect("XML");
    doc.descendants()
        .filter(|n| n.tag_name().name() == name)
        .map(|n| n.text().unwrap_or("").trim().to_owned())
        .collect()
}

struct Setup {
    _dir: tempfile::TempDir,
    import: PathBuf,
    server: Server,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let import = dir.path().join("import");
    std::fs::create_dir_all(&import).expect("import dir");
    let server = Server::start_with(
        &dir.path().join("data"),
        &[
            "--plugins",
            TEST_PLUGINS,
            "--import-dir",
            import.to_str().expect("utf-8"),
        ],
    );
    Setup {
        _dir: dir,
        import,
        server,
    }
}

/// Creates an ec2 provider aimed at `endpoint`; answers its id.
async fn provider(server: &Server, name: &str, endpoint: &str) -> String {
    let reply = server
        .post(
            "/api/providers",
            &format!(
                "<provider><name>{name}</name><provider_type id='ec2'/><settings>\
                 <setting name='region'>us-east-1</setting><setting name='endpoint'>{endpoint}</setting>\
                 </settings></provider>"
            ),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    reply.ids("provider")[0].clone()
}

/// Points the provider at another endpoint.
async fn move_endpoint(server: &Server, provider: &str, endpoint: &str) {
    let moved = server
        .put(
            &format!("/api/providers/{provider}"),
            &format!("<provider><settings><setting name='endpoint'>{endpoint}</setting></settings></provider>"),
        )
        .await;
    assert_eq!(moved.status, 200, "{}", moved.body);
}

/// An endpoint nobody listens on: a port the system handed out and that is closed again.
fn closed_endpoint() -> String {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}", silent.local_addr().expect("address"));
    drop(silent);
    endpoint
}

/// Asks for an account with these keys on the provider.
async fn add_account(server: &Server, provider: &str, label: &str, secret: &str) -> Reply {
    server
        .post(
            &format!("/api/providers/{provider}/provider_accounts"),
            &format!(
                "<provider_account><label>{label}</label><credentials>\
                 <username>AKIDCONDUCTORTEST</username><password>{secret}</password>\
                 <account_id>{MOTO_ACCOUNT}</account_id></credentials></provider_account>"
            ),
        )
        .await
}

/// A provider and an account in the default environment; answers the account's label.
pub(crate) async fn ready_account(server: &Server, name: &str) -> (String, String) {
    let provider = provider(server, name, &moto()).await;
    let label = format!("{name}-acc");
    let account = add_account(server, &provider, &label, "secret-key").await;
    assert_eq!(account.status, 201, "{}", account.body);
    let id = account.ids("provider_account")[0].clone();
    let joined = server
        .put(&format!("/api/pool_families/1/provider_accounts/{id}"), "")
        .await;
    assert!(joined.status < 300, "{}", joined.body);
    (provider, label)
}

fn template(size: &str) -> String {
    format!(
        "<template><name>ec2-test</name><os><name>Fedora</name><version>14</version><arch>x86_64</arch>\
         <install type='url'><url>http://example.org/os/</url></install></os><disk><size>{size}</size></disk></template>"
    )
}

/// Builds for ec2 from `base` (a file in the import directory); answers the target image.
async fn build(server: &Server, base: &Path, size: &str) -> String {
    let extra = format!("<base_image>file://{}</base_image>", base.display());
    let reply = server
        .post(
            "/api/images",
            &build_request("ec2", &template(size), &extra),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let ti = reply.ids("target_image")[0].clone();
    let done = server
        .wait_terminal(&format!("/api/target_images/{ti}"))
        .await;
    assert_eq!(done.text("status"), "COMPLETE", "{}", done.body);
    assert_eq!(done.text("format"), "raw");
    ti
}

pub(crate) async fn push(server: &Server, ti: &str, account: &str) -> String {
    let reply = server
        .post(
            "/api/provider_images",
            &format!(
                "<provider_image><provider_account>{account}</provider_account>\
                 <target_image_id>{ti}</target_image_id></provider_image>"
            ),
        )
        .await;
    assert!(reply.status < 300, "{}", reply.body);
    reply.ids("provider_image")[0].clone()
}

/// Asserts that the snapshot holds every non-zero block of an image of `size` bytes, and
/// only those, each equal to the image's; `read(start, buffer)` fills `buffer` with the
/// image's bytes from `start`. Answers the snapshot's block size.
pub(crate) async fn assert_snapshot_holds(
    snapshot: &str,
    size: u64,
    read: impl Fn(u64, &mut [u8]),
) -> u64 {
    let (block_size, blocks) = snapshot_blocks(snapshot).await;
    // The image's block `i`, padded with zeros past its end.
    let block = |i: u64| {
        let mut data = vec![0u8; block_size as usize];
        let len = block_size.min(size - i * block_size) as usize;
        read(i * block_size, &mut data[..len]);
        data
    };
    let held: Vec<u64> = blocks.iter().map(|(i, _)| *i).collect();
    let expected: Vec<u64> = (0..size.div_ceil(block_size))
        .filter(|&i| block(i).iter().any(|&b| b != 0))
        .collect();
    assert_eq!(
        held, expected,
        "the snapshot holds every non-zero block, and only those"
    );
    for (index, data) in &blocks {
        assert!(
            *data == block(*index),
            "block {index} differs from the image"
        );
    }
    block_size
}

/// The snapshot the plugin tagged as holding `ami`.
pub(crate) async fn snapshot_of(ami: &str) -> String {
    let (status, xml) = ec2_call(&[
        ("Action", "DescribeSnapshots"),
        ("Filter.1.Name", "tag:conductor:ami"),
        ("Filter.1.Value.1", ami),
    ])
    .await;
    assert_eq!(status, 200, "{xml}");
    let ids = texts(&xml, "snapshotId");
    assert_eq!(ids.len(), 1, "one snapshot is tagged for {ami}: {xml}");
    ids[0].clone()
}

/// Every block the emulator holds for the snapshot, by index, read through the EBS API.
async fn snapshot_blocks(snapshot: &str) -> (u64, Vec<(u64, Vec<u8>)>) {
    let mut blocks = Vec::new();
    let mut next: Option<String> = None;
    let mut block_size;
    loop {
        let mut path = format!("/snapshots/{snapshot}/blocks?maxResults=1000");
        if let Some(token) = &next {
            path.push_str(&format!("&pageToken={token}"));
        }
        let listed = emulator("ebs", reqwest::Method::GET, &path)
            .send()
            .await
            .expect("ListSnapshotBlocks")
            .bytes()
            .await
            .expect("body");
        let listed: serde_json::Value = serde_json::from_slice(&listed).expect("JSON");
        block_size = listed["BlockSize"].as_u64().expect("BlockSize");
        for block in listed["Blocks"].as_array().expect("Blocks") {
            let index = block["BlockIndex"].as_u64().expect("BlockIndex");
            let token = block["BlockToken"].as_str().expect("BlockToken");
            let data = emulator(
                "ebs",
                reqwest::Method::GET,
                &format!("/snapshots/{snapshot}/blocks/{index}?blockToken={token}"),
            )
            .send()
            .await
            .expect("GetSnapshotBlock")
            .bytes()
            .await
            .expect("block data");
            blocks.push((index, data.to_vec()));
        }
        next = listed["NextToken"].as_str().map(str::to_owned);
        if next.is_none() {
            break;
        }
    }
    // EBS lists blocks by index; moto lists them in the order they arrived, which with
    // several uploads in flight on a busy machine is not always the same.
    blocks.sort_by_key(|(index, _)| *index);
    (block_size, blocks)
}

#[tokio::test]
async fn an_image_pushed_to_ec2_becomes_an_ami_whose_snapshot_holds_its_bytes() {
    let s = setup();
    let (_, account) = ready_account(&s.server, "ec2-moto").await;
    // A cloud boots what it is given: an OS this server does not install (Fedora) builds
    // for ec2 only from a base image, and is refused at once without one.
    let refused = s
        .server
        .post(
            "/api/images",
            &build_request("ec2", &template("600MiB"), ""),
        )
        .await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    let message = refused.text("message");
    assert!(
        message.contains("cannot install Fedora 14 x86_64: it installs")
            && message.contains("<base_image>"),
        "{message}"
    );
    // Data scattered over a sparse disk, and a stretch of allocated zeros, which the
    // plugin must leave out like the holes.
    let base = s.import.join("scattered.raw");
    scattered_disk(&base, 600 << 20);
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&base)
            .expect("open");
        file.write_all_at(&vec![0u8; 4 << 20], 100 << 20)
            .expect("zeros");
    }
    let ti = build(&s.server, &base, "600MiB").await;
    let pi = push(&s.server, &ti, &account).await;
    let done = s
        .server
        .wait_terminal(&format!("/api/provider_images/{pi}"))
        .await;
    assert_eq!(done.text("status"), "COMPLETE", "{}", done.body);
    let ami = done.text("target_identifier");
    assert!(ami.starts_with("ami-"), "{}", done.body);

    // The AMI exists, and its snapshot holds exactly the image's non-zero blocks.
    let (status, xml) = ec2_call(&[("Action", "DescribeImages"), ("ImageId.1", &ami)]).await;
    assert_eq!(status, 200, "{xml}");
    assert_eq!(texts(&xml, "imageId"), std::slice::from_ref(&ami));
    assert!(texts(&xml, "name")[0].starts_with("ec2-test"), "{xml}");
    let snapshot = snapshot_of(&ami).await;
    let (_, xml) = ec2_call(&[("Action", "DescribeSnapshots"), ("SnapshotId.1", &snapshot)]).await;
    assert_eq!(
        texts(&xml, "volumeSize"),
        ["1"],
        "600 MiB needs a 1 GiB volume: {xml}"
    );
    let image = s.server.download(&ti).await;
    assert_eq!(image.len(), 600 << 20);
    let block_size = assert_snapshot_holds(&snapshot, image.len() as u64, |start, data| {
        let start = start as usize;
        data.copy_from_slice(&image[start..start + data.len()]);
    })
    .await;
    assert_eq!(block_size, 512 << 10);

    // Deleting the provider image removes the AMI and its snapshot from the cloud.
    let deleted = s.server.delete(&format!("/api/provider_images/{pi}")).await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    eventually(Duration::from_secs(60), async || {
        let (_, images) = ec2_call(&[("Action", "DescribeImages"), ("ImageId.1", &ami)]).await;
        let (_, snapshots) =
            ec2_call(&[("Action", "DescribeSnapshots"), ("SnapshotId.1", &snapshot)]).await;
        if !texts(&images, "imageId").is_empty() || !texts(&snapshots, "snapshotId").is_empty() {
            return Err(format!(
                "after the delete, still there: {images} {snapshots}"
            ));
        }
        assert!(
            snapshots.contains("InvalidSnapshot.NotFound"),
            "{snapshots}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn an_account_whose_keys_belong_to_another_account_is_refused() {
    let s = setup();
    let id = provider(&s.server, "ec2-keys", &moto()).await;
    let reply = s
        .server
        .post(
            &format!("/api/providers/{id}/provider_accounts"),
            "<provider_account><label>elsewhere</label><credentials>\
             <username>AKIDCONDUCTORTEST</username><password>secret</password>\
             <account_id>999999999999</account_id></credentials></provider_account>",
        )
        .await;
    assert_eq!(reply.status, 422, "{}", reply.body);
    assert!(
        reply
            .body
            .contains("the access key belongs to AWS account 123456789012, not to the account number 999999999999 given"),
        "{}",
        reply.body
    );
    // Nothing was made.
    let accounts = s
        .server
        .get(&format!("/api/providers/{id}/provider_accounts"))
        .await;
    assert!(
        accounts.ids("provider_account").is_empty(),
        "{}",
        accounts.body
    );
}

#[tokio::test]
async fn a_push_to_an_endpoint_that_does_not_answer_is_retried_then_fails() {
    let s = setup();
    let (provider_id, account) = ready_account(&s.server, "ec2-gone").await;
    let base = s.import.join("small.raw");
    scattered_disk(&base, 600 << 20);
    let ti = build(&s.server, &base, "600MiB").await;
    // The endpoint moves to a port nobody listens on.
    move_endpoint(&s.server, &provider_id, &closed_endpoint()).await;
    let pi = push(&s.server, &ti, &account).await;
    let path = format!("/api/provider_images/{pi}");
    let retrying = wait_for(&s.server, &path, "retried", |r| {
        r.text("activity").contains("retrying")
    })
    .await;
    assert!(
        retrying.text("activity").contains("connection refused"),
        "{}",
        retrying.body
    );
    let done = s.server.wait_terminal(&path).await;
    assert_eq!(done.text("status"), "FAILED", "{}", done.body);
    assert!(
        done.text("error").contains("connection refused"),
        "{}",
        done.body
    );
}

#[tokio::test]
async fn an_import_finds_an_ami_or_says_why_it_could_not() {
    let s = setup();
    let (provider_id, account) = ready_account(&s.server, "ec2-import").await;
    let import = async |identifier: &str| {
        s.server
            .post("/api/images", &import_body(&account, identifier, "default"))
            .await
    };
    // An AMI registered on the emulator directly is imported.
    let (status, xml) = ec2_call(&[
        ("Action", "RegisterImage"),
        ("Name", "registered-elsewhere"),
        ("RootDeviceName", "/dev/xvda"),
        ("Architecture", "x86_64"),
    ])
    .await;
    assert_eq!(status, 200, "{xml}");
    let ami = texts(&xml, "imageId").remove(0);
    let imported = import(&ami).await;
    assert_eq!(imported.status, 200, "{}", imported.body);
    let pi = imported.ids("provider_image")[0].clone();
    let shown = s.server.get(&format!("/api/provider_images/{pi}")).await;
    assert_eq!(shown.text("target_identifier"), ami, "{}", shown.body);

    let missing = import("ami-00000000deadbeef").await;
    assert_eq!(missing.status, 404, "{}", missing.body);
    assert_eq!(missing.text("code"), "ImageNotFound");
    assert_eq!(
        missing.text("message"),
        "Could not find Image ami-00000000deadbeef on Provider"
    );

    // The signature-checking emulator knows nothing of this account's key.
    let checking =
        std::env::var("CONDUCTOR_TEST_MOTO_AUTH").expect("CONDUCTOR_TEST_MOTO_AUTH (tests/run.sh)");
    move_endpoint(&s.server, &provider_id, &checking).await;
    let refused = import(&ami).await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert_eq!(refused.text("code"), "ParameterDataIncorrect");
    assert!(
        refused.text("message").starts_with(&format!(
            "Provider Account {account}: the provider refused its credentials: "
        )),
        "{}",
        refused.body
    );

    // A provider nobody answers for: still Conductor's 404, with the reason.
    move_endpoint(&s.server, &provider_id, &closed_endpoint()).await;
    let unreachable = import(&ami).await;
    assert_eq!(unreachable.status, 404, "{}", unreachable.body);
    assert!(
        unreachable.text("message").starts_with(&format!(
            "Could not find Image {ami} on Provider: the lookup failed: "
        )) && unreachable.text("message").contains("connection refused"),
        "{}",
        unreachable.body
    );
    // Nothing was recorded by the failed imports.
    let images = s.server.get("/api/images").await;
    assert_eq!(images.ids("image").len(), 1, "{}", images.body);
}

#[tokio::test]
async fn a_host_outside_the_grant_is_refused_and_the_job_says_so() {
    let s = setup();
    // An endpoint the ec2 plugin does not declare: the account check cannot reach it.
    let outside = "http://192.0.2.10:8773";
    let id = provider(&s.server, "ec2-outside", outside).await;
    let refused = add_account(&s.server, &id, "outside", "secret").await;
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert!(refused.body.contains("192.0.2.10:8773"), "{}", refused.body);

    // A push to a provider moved there after its account was made fails, and says why.
    let (provider_id, account) = ready_account(&s.server, "ec2-moved").await;
    let base = s.import.join("small.raw");
    scattered_disk(&base, 600 << 20);
    let ti = build(&s.server, &base, "600MiB").await;
    let moved = s
        .server
        .put(
            &format!("/api/providers/{provider_id}"),
            &format!("<provider><settings><setting name='endpoint'>{outside}</setting></settings></provider>"),
        )
        .await;
    assert_eq!(moved.status, 200, "{}", moved.body);
    let pi = push(&s.server, &ti, &account).await;
    let done = s
        .server
        .wait_terminal(&format!("/api/provider_images/{pi}"))
        .await;
    assert_eq!(done.text("status"), "FAILED", "{}", done.body);
    assert!(
        done.text("error")
            .contains("tried to reach 192.0.2.10:8773, which its provider does not grant"),
        "{}",
        done.body
    );
}

#[tokio::test]
async fn keys_are_checked_by_their_signature_and_wrong_ones_refused() {
    // The emulator that checks signatures, with the IAM key tests/emulators/up.sh made.
    let checking = std::env::var("CONDUCTOR_TEST_MOTO_AUTH")
        .expect("CONDUCTOR_TEST_MOTO_AUTH names the signature-checking emulator (tests/run.sh)");
    let key = std::env::var("CONDUCTOR_TEST_MOTO_AUTH_KEY").expect("its access key");
    let secret = std::env::var("CONDUCTOR_TEST_MOTO_AUTH_SECRET").expect("its secret key");
    let s = setup();
    let id = provider(&s.server, "ec2-signed", &checking).await;
    let account = |label: &str, secret: &str| {
        format!(
            "<provider_account><label>{label}</label><credentials>\
             <username>{key}</username><password>{secret}</password>\
             <account_id>{MOTO_ACCOUNT}</account_id></credentials></provider_account>"
        )
    };
    let path = format!("/api/providers/{id}/provider_accounts");
    let wrong = s
        .server
        .post(&path, &account("wrong", "not-the-secret"))
        .await;
    assert_eq!(wrong.status, 422, "{}", wrong.body);
    assert!(
        wrong
            .body
            .contains("Login credentials are invalid for this Provider")
            && wrong.body.contains("SignatureDoesNotMatch"),
        "{}",
        wrong.body
    );
    // The right secret signs requests the emulator accepts.
    let right = s.server.post(&path, &account("right", &secret)).await;
    assert_eq!(right.status, 201, "{}", right.body);
    let listed = s.server.get(&path).await;
    assert_eq!(listed.ids("provider_account").len(), 1, "{}", listed.body);
}
