//! Building images: the request forms, following a build to COMPLETE or FAILED, the
//! records it leaves, and deleting them.

use crate::harness::{Server, build_request, template};

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[tokio::test]
async fn the_three_tdl_forms_build_to_complete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let tdl = template("forms");
    for body in [
        build_request("mock", &tdl, ""),
        build_request("mock", &escape(&tdl), ""),
        build_request("mock", &format!("<![CDATA[{tdl}]]>"), ""),
    ] {
        let reply = server.post("/api/images.xml", &body).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let doc = reply.doc();
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "image");
        let image_id = root.attribute("id").expect("image id");
        assert_eq!(
            root.attribute("href"),
            Some(format!("{}/api/images/{image_id}", server.url).as_str())
        );
        let tis = reply.ids("target_image");
        assert_eq!(tis.len(), 1);
        assert_eq!(reply.text("status"), "NEW");
        assert_eq!(reply.text("target"), "mock");

        let done = server
            .wait_terminal(&format!("/api/target_images/{}.xml", tis[0]))
            .await;
        assert_eq!(done.text("status"), "COMPLETE", "{}", done.body);
        assert_eq!(done.text("percent_complete"), "100");
        assert_eq!(done.text("format"), "raw");
        // The template asks for an OS install from a URL; the server says it did not.
        assert!(
            done.text("activity").contains("base disk is blank"),
            "{}",
            done.body
        );
        assert_eq!(done.text("error"), "");
        // The template's disk size, as a sparse file.
        assert_eq!(done.text("virtual_size"), (64u64 << 20).to_string());
    }
    let images = server.get("/api/images").await;
    assert_eq!(images.ids("image").len(), 3);
}

#[tokio::test]
async fn an_image_shows_its_template_facts_and_builds_at_every_route() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let reply = server
        .post(
            "/api/images",
            &build_request("mock", &template("shown"), ""),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let image = reply
        .doc()
        .root_element()
        .attribute("id")
        .expect("id")
        .to_owned();
    let build = reply.ids("build")[0].clone();
    let ti = reply.ids("target_image")[0].clone();
    server
        .wait_terminal(&format!("/api/target_images/{ti}"))
        .await;

    let shown = server.get(&format!("/api/images/{image}.xml")).await;
    assert_eq!(shown.status, 200);
    assert_eq!(shown.text("name"), "shown");
    assert_eq!(shown.text("environment"), "default");
    assert_eq!(shown.text("description"), "a test image");
    assert_eq!(shown.text("os"), "Fedora");
    assert_eq!(shown.text("os_version"), "14");
    assert_eq!(shown.text("arch"), "x86_64");
    assert_eq!(shown.ids("build"), [build.as_str()]);
    let in_env = server
        .get(&format!("/api/environments/default/images/{image}"))
        .await;
    assert_eq!(in_env.body, shown.body);

    let builds = server.get(&format!("/api/images/{image}/builds.xml")).await;
    assert_eq!(builds.ids("build"), [build.as_str()]);
    assert_eq!(builds.text("image"), image);
    let one = server.get(&format!("/api/builds/{build}")).await;
    assert_eq!(one.ids("build"), [build.as_str()]);
    let nested = server
        .get(&format!("/api/images/{image}/builds/{build}.xml"))
        .await;
    assert_eq!(nested.body, one.body);

    let tis = server
        .get(&format!("/api/builds/{build}/target_images"))
        .await;
    assert_eq!(tis.ids("target_image"), [ti.as_str()]);
    assert_eq!(tis.text("object_type"), "target_image");
    let nested_ti = server
        .get(&format!("/api/builds/{build}/target_images/{ti}.xml"))
        .await;
    assert_eq!(nested_ti.status, 200);
    assert_eq!(nested_ti.text("status"), "COMPLETE");
    let all = server.get("/api/target_images").await;
    assert_eq!(all.ids("target_image"), [ti.as_str()]);

    // A nested id under the wrong parent is not found.
    let other = server
        .post(
            "/api/images",
            &build_request("mock", &template("other"), ""),
        )
        .await;
    let other_image = other
        .doc()
        .root_element()
        .attribute("id")
        .expect("id")
        .to_owned();
    let wrong = server
        .get(&format!("/api/images/{other_image}/builds/{build}"))
        .await;
    wrong.assert_error(404, "BuildNotFound");
}

#[tokio::test]
async fn a_forced_failure_ends_failed_with_the_plugins_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let body = build_request(
        "mock",
        &template("failing"),
        "<parameters><parameter name='fail'>build</parameter></parameters>",
    );
    let reply = server.post("/api/images", &body).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let ti = reply.ids("target_image")[0].clone();
    let done = server
        .wait_terminal(&format!("/api/target_images/{ti}"))
        .await;
    assert_eq!(done.text("status"), "FAILED");
    assert_eq!(
        done.text("error"),
        "mock build failed as requested by the fail=build parameter"
    );
}

#[tokio::test]
async fn a_plugin_that_traps_fails_only_its_own_build() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let trap = build_request(
        "mock",
        &template("trapping"),
        "<parameters><parameter name='fail'>trap</parameter></parameters>",
    );
    let reply = server.post("/api/images", &trap).await;
    let trapped = reply.ids("target_image")[0].clone();
    let fine = server
        .post("/api/images", &build_request("mock", &template("fine"), ""))
        .await;
    let fine = fine.ids("target_image")[0].clone();
    let done = server
        .wait_terminal(&format!("/api/target_images/{trapped}"))
        .await;
    assert_eq!(done.text("status"), "FAILED");
    assert!(
        done.text("error").starts_with("the plugin crashed"),
        "{}",
        done.body
    );
    let other = server
        .wait_terminal(&format!("/api/target_images/{fine}"))
        .await;
    assert_eq!(other.text("status"), "COMPLETE");
}

#[tokio::test]
async fn a_build_for_several_targets_makes_one_target_image_each() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let reply = server
        .post(
            "/api/images",
            &build_request("mock, testbed", &template("two"), ""),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let targets: Vec<String> = reply
        .doc()
        .descendants()
        .filter(|n| n.has_tag_name("target"))
        .map(|n| n.text().unwrap_or("").to_owned())
        .collect();
    assert_eq!(targets, ["mock", "testbed"]);
    for ti in reply.ids("target_image") {
        let done = server
            .wait_terminal(&format!("/api/target_images/{ti}"))
            .await;
        assert_eq!(done.text("status"), "COMPLETE", "{}", done.body);
    }
}

#[tokio::test]
async fn progress_is_visible_while_a_build_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let body = build_request(
        "mock",
        &template("slow"),
        "<parameters><parameter name='delay_ms'>3000</parameter></parameters>",
    );
    let reply = server.post("/api/images", &body).await;
    let ti = reply.ids("target_image")[0].clone();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut seen_running = false;
    loop {
        let now = server.get(&format!("/api/target_images/{ti}")).await;
        let status = now.text("status");
        if status == "BUILDING" {
            let percent: u8 = now.text("percent_complete").parse().expect("a number");
            if percent > 0 && percent < 100 {
                seen_running = true;
                assert!(!now.text("activity").is_empty());
            }
        }
        if status == "COMPLETE" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "build never completed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        seen_running,
        "never saw BUILDING with a percent between 0 and 100"
    );
}

#[tokio::test]
async fn deleting_an_image_removes_everything_below_it_and_the_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let reply = server
        .post("/api/images", &build_request("mock", &template("gone"), ""))
        .await;
    let image = reply
        .doc()
        .root_element()
        .attribute("id")
        .expect("id")
        .to_owned();
    let build = reply.ids("build")[0].clone();
    let ti = reply.ids("target_image")[0].clone();
    server
        .wait_terminal(&format!("/api/target_images/{ti}"))
        .await;
    let push = server
        .post(
            "/api/provider_images",
            &format!("<provider_image><target_image_id>{ti}</target_image_id><provider_account>mock-acc</provider_account></provider_image>"),
        )
        .await;
    let pi = push.ids("provider_image")[0].clone();
    let pushed = server
        .wait_terminal(&format!("/api/provider_images/{pi}"))
        .await;
    let identifier = pushed.text("target_identifier");
    let blobs = || {
        std::fs::read_dir(dir.path().join("blobs"))
            .expect("blobs")
            .count()
    };
    assert_eq!(blobs(), 1);

    let deleted = server.delete(&format!("/api/images/{image}.xml")).await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    assert_eq!(deleted.text("status"), "DELETED");
    assert_eq!(deleted.text("provider"), "mock");
    assert_eq!(deleted.text("target_identifier"), identifier);

    server
        .get(&format!("/api/images/{image}"))
        .await
        .assert_error(404, "ImageNotFound");
    server
        .get(&format!("/api/builds/{build}"))
        .await
        .assert_error(404, "BuildNotFound");
    server
        .get(&format!("/api/target_images/{ti}"))
        .await
        .assert_error(404, "TargetImageStatusNotFound");
    server
        .get(&format!("/api/provider_images/{pi}"))
        .await
        .assert_error(404, "ProviderImageStatusNotFound");
    assert_eq!(blobs(), 0);
    assert_eq!(
        server
            .get("/api/provider_images")
            .await
            .ids("provider_image")
            .len(),
        0
    );
}

#[tokio::test]
async fn deleting_a_build_or_target_image_keeps_what_is_above_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let reply = server
        .post(
            "/api/images",
            &build_request("mock,testbed", &template("partial"), ""),
        )
        .await;
    let image = reply
        .doc()
        .root_element()
        .attribute("id")
        .expect("id")
        .to_owned();
    let build = reply.ids("build")[0].clone();
    let tis = reply.ids("target_image");
    for ti in &tis {
        server
            .wait_terminal(&format!("/api/target_images/{ti}"))
            .await;
    }
    let deleted = server
        .delete(&format!("/api/builds/{build}/target_images/{}", tis[0]))
        .await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    assert_eq!(deleted.text("status"), "DELETED");
    // The reply's <content> is never empty-tagged: Conductor's client needs text in it.
    assert!(
        deleted.body.contains("<content>\n</content>"),
        "{}",
        deleted.body
    );
    assert_eq!(
        server
            .get(&format!("/api/builds/{build}/target_images"))
            .await
            .ids("target_image"),
        [tis[1].clone()]
    );

    // Shown twice before the delete (the second answer comes from what the server
    // kept) and once after it: the delete is a write, so that answer is rendered anew.
    for _ in 0..2 {
        let before = server.get(&format!("/api/images/{image}")).await;
        assert_eq!(before.ids("build"), std::slice::from_ref(&build));
    }
    let deleted = server
        .delete(&format!("/api/images/{image}/builds/{build}.xml"))
        .await;
    assert_eq!(deleted.status, 200);
    assert_eq!(
        deleted.doc().root_element().attribute("href"),
        Some(format!("{}/api/builds/{build}", server.url).as_str())
    );
    let shown = server.get(&format!("/api/images/{image}")).await;
    assert_eq!(shown.status, 200);
    assert!(shown.ids("build").is_empty());
}
