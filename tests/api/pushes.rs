//! Pushing target images to provider accounts.

use crate::harness::{Server, build_request, template};

/// Builds an image for `targets` and waits for every target image; returns
/// (image id, build id, target image ids).
async fn built(server: &Server, targets: &str) -> (String, String, Vec<String>) {
    let reply = server
        .post(
            "/api/images",
            &build_request(targets, &template("pushed"), ""),
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
    let tis = reply.ids("target_image");
    for ti in &tis {
        let done = server
            .wait_terminal(&format!("/api/target_images/{ti}"))
            .await;
        assert_eq!(done.text("status"), "COMPLETE");
    }
    (image, build, tis)
}

fn push(selector: &str, id: &str, accounts: &str) -> String {
    format!(
        "<?xml version='1.0' encoding='UTF-8'?><provider_image><provider_account>{accounts}</provider_account><{selector}>{id}</{selector}></provider_image>"
    )
}

#[tokio::test]
async fn push_a_target_image_a_build_and_an_image_to_one_and_several_accounts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let (image, build, tis) = built(&server, "mock,testbed").await;

    for (selector, id, accounts, expected) in [
        (
            "target_image_id",
            tis[0].as_str(),
            "mock-acc",
            vec![("mock", "mock-acc")],
        ),
        (
            "build_id",
            build.as_str(),
            "mock-acc, testbed-acc",
            vec![("mock", "mock-acc"), ("testbed", "testbed-acc")],
        ),
        (
            "image_id",
            image.as_str(),
            "testbed-acc,mock-acc",
            vec![("testbed", "testbed-acc"), ("mock", "mock-acc")],
        ),
        // The same account twice pushes twice, as Conductor did.
        (
            "image_id",
            image.as_str(),
            "mock-acc,mock-acc",
            vec![("mock", "mock-acc"), ("mock", "mock-acc")],
        ),
    ] {
        let reply = server
            .post("/api/provider_images.xml", &push(selector, id, accounts))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let doc = reply.doc();
        assert_eq!(doc.root_element().tag_name().name(), "provider_images");
        let got: Vec<(String, String)> = doc
            .root_element()
            .children()
            .filter(|n| n.has_tag_name("provider_image"))
            .map(|n| {
                let field = |name: &str| {
                    n.children()
                        .find(|c| c.has_tag_name(name))
                        .and_then(|c| c.text())
                        .unwrap_or("")
                        .to_owned()
                };
                assert!(!field("status").is_empty());
                (field("provider"), field("account"))
            })
            .collect();
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(p, a)| (p.to_string(), a.to_string()))
            .collect();
        assert_eq!(got, expected);
        for pi in reply.ids("provider_image") {
            let done = server
                .wait_terminal(&format!("/api/provider_images/{pi}.xml"))
                .await;
            assert_eq!(done.text("status"), "COMPLETE", "{}", done.body);
            let identifier = done.text("target_identifier");
            let provider = done.text("provider");
            let prefix = if provider == "mock" {
                "Mock_mock_"
            } else {
                "Testbed_testbed_"
            };
            assert!(identifier.starts_with(prefix), "{identifier}");
            assert_eq!(done.text("object_type"), "provider_image");
        }
    }
    let listed = server
        .get(&format!("/api/target_images/{}/provider_images", tis[0]))
        .await;
    assert_eq!(listed.ids("provider_image").len(), 5);
    assert_eq!(
        server
            .get("/api/provider_images")
            .await
            .ids("provider_image")
            .len(),
        7
    );
}

#[tokio::test]
async fn a_push_waits_for_its_build_and_a_failed_push_says_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let reply = server
        .post(
            "/api/images",
            &build_request(
                "mock",
                &template("slow"),
                "<parameters><parameter name='delay_ms'>1000</parameter></parameters>",
            ),
        )
        .await;
    let ti = reply.ids("target_image")[0].clone();
    let pushed = server
        .post(
            "/api/provider_images",
            &push("target_image_id", &ti, "mock-acc"),
        )
        .await;
    assert_eq!(pushed.status, 200, "{}", pushed.body);
    let pi = pushed.ids("provider_image")[0].clone();
    let done = server
        .wait_terminal(&format!("/api/provider_images/{pi}"))
        .await;
    assert_eq!(done.text("status"), "COMPLETE", "{}", done.body);

    let failing = format!(
        "<provider_image><provider_account>mock-acc</provider_account><target_image_id>{ti}</target_image_id>\
         <parameters><parameter name='fail'>push</parameter></parameters></provider_image>"
    );
    let reply = server.post("/api/provider_images", &failing).await;
    let pi = reply.ids("provider_image")[0].clone();
    let done = server
        .wait_terminal(&format!("/api/provider_images/{pi}"))
        .await;
    assert_eq!(done.text("status"), "FAILED");
    assert_eq!(
        done.text("error"),
        "mock push failed as requested by the fail=push parameter"
    );
    assert_eq!(done.text("target_identifier"), "");
}

#[tokio::test]
async fn a_push_of_a_failed_build_fails_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let reply = server
        .post(
            "/api/images",
            &build_request(
                "mock",
                &template("broken"),
                "<parameters><parameter name='fail'>build</parameter></parameters>",
            ),
        )
        .await;
    let ti = reply.ids("target_image")[0].clone();
    let pushed = server
        .post(
            "/api/provider_images",
            &push("target_image_id", &ti, "mock-acc"),
        )
        .await;
    let pi = pushed.ids("provider_image")[0].clone();
    let done = server
        .wait_terminal(&format!("/api/provider_images/{pi}"))
        .await;
    assert_eq!(done.text("status"), "FAILED");
    assert!(
        done.text("error")
            .contains("FAILED, so there is nothing to push"),
        "{}",
        done.body
    );
}

#[tokio::test]
async fn deleting_a_provider_image_reports_what_it_was() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let (_, _, tis) = built(&server, "mock").await;
    let reply = server
        .post(
            "/api/provider_images",
            &push("target_image_id", &tis[0], "mock-acc"),
        )
        .await;
    let pi = reply.ids("provider_image")[0].clone();
    let done = server
        .wait_terminal(&format!("/api/provider_images/{pi}"))
        .await;
    let deleted = server
        .delete(&format!(
            "/api/target_images/{}/provider_images/{pi}.xml",
            tis[0]
        ))
        .await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    assert_eq!(
        deleted.text("target_identifier"),
        done.text("target_identifier")
    );
    assert_eq!(deleted.text("provider"), "mock");
    server
        .delete(&format!("/api/provider_images/{pi}"))
        .await
        .assert_error(404, "ProviderImageNotFound");
}
