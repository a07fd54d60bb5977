//! A data directory written by an earlier release opens with everything intact.
//!
//! `tests/fixtures/upgrade-0.1.0/` holds a data directory (database, credentials key,
//! blobs) written by version 0.1.0 of the server (row layouts as released at a0af52c,
//! plus the quota table added after it): an environment with a user, an account with
//! credentials, a hook, a built and pushed image, and a build that was running when the
//! server was killed. It was made by
//! `CONDUCTOR_MAKE_UPGRADE_FIXTURE=1 cargo test --test api -- --ignored make_upgrade_fixture`;
//! every later version, whatever it changes in how rows are stored, must keep reading
//! it. (The key is a test key, made for the fixture.)

use crate::harness::{PASSWORD, Server, TEST_PLUGINS, template};
use reqwest::Method;
use std::path::{Path, PathBuf};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/upgrade-0.1.0"
);
const CAROL: &str = "carol-password";

fn small(name: &str) -> String {
    template(name).replace("64MiB", "1MiB")
}

fn build_in_team(name: &str, delay_ms: u32) -> String {
    format!(
        "<image><targets>mock</targets><tdl>{}</tdl><environment>team</environment>\
         <parameters><parameter name='delay_ms'>{delay_ms}</parameter></parameters></image>",
        small(name)
    )
}

/// Writes the fixture with the server built from this checkout.
#[tokio::test]
#[ignore = "writes tests/fixtures/upgrade-0.1.0; run by hand for a release"]
async fn make_upgrade_fixture() {
    if std::env::var_os("CONDUCTOR_MAKE_UPGRADE_FIXTURE").is_none() {
        return;
    }
    let data = PathBuf::from(FIXTURE);
    let _ = std::fs::remove_dir_all(&data);
    // The hook names a closed port on this machine, which only an allowed address may.
    let server = Server::start_with(
        &data,
        &["--plugins", TEST_PLUGINS, "--fetch-allow", "127.0.0.1"],
    );
    let ok = |reply: crate::harness::Reply| {
        assert!((200..300).contains(&reply.status), "{}", reply.body);
        reply
    };
    ok(server
        .post(
            "/api/pool_families",
            "<pool_family><name>team</name><description>the team</description></pool_family>",
        )
        .await);
    ok(server
        .post(
            "/api/provider_accounts",
            "<provider_account><label>team-acc</label><provider id='1'/><environment>team</environment>\
             <credentials><username>team-user</username><password>team-secret</password></credentials></provider_account>",
        )
        .await);
    ok(server
        .post(
            "/api/users",
            &format!("<user><name>carol</name><password>{CAROL}</password><roles><role environment='team'>image_admin</role></roles></user>"),
        )
        .await);
    ok(server
        .post(
            "/api/hooks",
            "<hook><uri>http://127.0.0.1:9/conductor</uri><version>1</version></hook>",
        )
        .await);
    let built = ok(server.post("/api/images", &build_in_team("kept", 0)).await);
    let ti = built.ids("target_image")[0].clone();
    server
        .wait_terminal(&format!("/api/target_images/{ti}"))
        .await;
    let pushed = ok(server
        .post(
            "/api/provider_images",
            &format!("<provider_image><target_image_id>{ti}</target_image_id><provider_account>team-acc</provider_account></provider_image>"),
        )
        .await);
    let pi = pushed.ids("provider_image")[0].clone();
    server
        .wait_terminal(&format!("/api/provider_images/{pi}"))
        .await;
    // A build still running when the server dies: its job row is left for the next start.
    ok(server
        .post("/api/images", &build_in_team("interrupted", 3000))
        .await);
    server.kill();
    // Compiled plugins are the machine's, not data.
    let _ = std::fs::remove_dir_all(data.join("plugin-cache"));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create");
    for entry in std::fs::read_dir(from).expect("read fixture") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

#[tokio::test]
async fn a_data_directory_of_release_0_1_0_opens_with_everything_intact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    copy_dir(Path::new(FIXTURE), &data);
    let server = Server::start_with(&data, &["--plugins", TEST_PLUGINS]);
    assert_eq!(
        server
            .as_user("admin", "wrong", Method::GET, "/api/images", "")
            .await
            .status,
        401,
        "users' password hashes are read, not ignored"
    );
    let carol = server
        .as_user("carol", CAROL, Method::GET, "/api/images", "")
        .await;
    assert_eq!(carol.status, 200, "{}", carol.body);
    let as_admin = |path: String| {
        let server = &server;
        async move {
            let reply = server
                .as_user("admin", PASSWORD, Method::GET, &path, "")
                .await;
            assert_eq!(reply.status, 200, "{path}: {}", reply.body);
            reply
        }
    };

    let images = as_admin("/api/images".into()).await;
    let names: Vec<String> = images
        .doc()
        .descendants()
        .filter(|n| n.has_tag_name("name"))
        .filter_map(|n| n.text().map(str::to_owned))
        .collect();
    assert_eq!(names, ["kept", "interrupted"], "{}", images.body);
    assert_eq!(
        carol.ids("image"),
        images.ids("image"),
        "carol sees team's images"
    );
    assert_eq!(as_admin("/api/builds".into()).await.ids("build").len(), 2);

    let environment = as_admin("/api/environments/team".into()).await;
    assert_eq!(environment.text("description"), "the team");
    assert!(
        environment.body.contains("team-acc"),
        "{}",
        environment.body
    );

    // The account's credentials still open with the stored key.
    let accounts = as_admin("/api/provider_accounts".into()).await;
    let account = accounts
        .ids("provider_account")
        .last()
        .expect("accounts")
        .clone();
    let shown = as_admin(format!("/api/provider_accounts/{account}")).await;
    assert_eq!(shown.text("name"), "team-acc");
    assert_eq!(shown.text("username"), "team-user");
    assert_eq!(shown.text("password"), "team-secret");

    assert!(
        as_admin("/api/hooks".into())
            .await
            .body
            .contains("http://127.0.0.1:9/conductor")
    );

    // The pushed image, and its target image's body, intact.
    let pushed = as_admin("/api/provider_images".into()).await;
    let pi = pushed.ids("provider_image")[0].clone();
    let pi = as_admin(format!("/api/provider_images/{pi}")).await;
    assert_eq!(pi.text("status"), "COMPLETE");
    assert!(!pi.text("target_identifier").is_empty());
    let targets = as_admin("/api/target_images".into()).await;
    let (mut complete, mut old_bodies) = (0, 0);
    for ti in targets.ids("target_image") {
        let done = server
            .wait_terminal(&format!("/api/target_images/{ti}"))
            .await;
        // The interrupted build's job was stored: it runs again and completes.
        assert_eq!(done.text("status"), "COMPLETE", "{}", done.body);
        let digest = done
            .doc()
            .descendants()
            .find(|n| n.has_tag_name("data"))
            .map(|n| {
                let digest = n.attribute("digest").map(str::to_owned);
                (digest, n.attribute("sha256").map(str::to_owned))
            });
        if let Some((digest, sha256)) = digest {
            let body = server.download(&ti).await;
            let digest = digest.expect("a digest");
            match digest.strip_prefix("sha256:") {
                // A body the previous release stored keeps the plain SHA-256 it is
                // named by, and shows it as before.
                Some(hex) => {
                    use sha2::Digest;
                    let got: String = sha2::Sha256::digest(&body)
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect();
                    assert_eq!(got, hex);
                    assert_eq!(sha256.as_deref(), Some(hex));
                    old_bodies += 1;
                }
                None => assert_eq!(crate::harness::sparse_digest(&body), digest),
            }
            complete += 1;
        }
    }
    assert_eq!(complete, 2, "{}", targets.body);
    // The pushed image's body was stored by the previous release; the interrupted
    // build's is stored now.
    assert_eq!(old_bodies, 1, "{}", targets.body);
}
