//! What survives a restart: every record, and jobs that were running when the server
//! stopped.

use crate::harness::{Server, build_request, template};

#[tokio::test]
async fn a_restart_keeps_every_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let reply = server
        .post(
            "/api/images",
            &build_request("mock,testbed", &template("kept"), ""),
        )
        .await;
    let image = reply
        .doc()
        .root_element()
        .attribute("id")
        .expect("id")
        .to_owned();
    let tis = reply.ids("target_image");
    for ti in &tis {
        server
            .wait_terminal(&format!("/api/target_images/{ti}"))
            .await;
    }
    let push = server
        .post(
            "/api/provider_images",
            &format!("<provider_image><provider_account>mock-acc,testbed-acc</provider_account><image_id>{image}</image_id></provider_image>"),
        )
        .await;
    for pi in push.ids("provider_image") {
        server
            .wait_terminal(&format!("/api/provider_images/{pi}"))
            .await;
    }
    let paths = [
        "/api/images".to_owned(),
        format!("/api/images/{image}"),
        "/api/builds".to_owned(),
        "/api/target_images".to_owned(),
        "/api/provider_images".to_owned(),
        "/api/environments/default".to_owned(),
        "/api/provider_accounts".to_owned(),
    ];
    let mut before = Vec::new();
    for path in &paths {
        before.push(server.get(path).await.body.replace(&server.url, "URL"));
    }
    server.stop();

    let server = Server::start(dir.path());
    for (path, old) in paths.iter().zip(before) {
        let now = server.get(path).await;
        assert_eq!(now.status, 200);
        assert_eq!(now.body.replace(&server.url, "URL"), old, "{path}");
    }
}

#[tokio::test]
async fn a_build_interrupted_by_a_crash_runs_again_after_the_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let reply = server
        .post(
            "/api/images",
            &build_request(
                "mock",
                &template("interrupted"),
                "<parameters><parameter name='delay_ms'>4000</parameter></parameters>",
            ),
        )
        .await;
    let ti = reply.ids("target_image")[0].clone();
    // Wait until the build is under way, then pull the plug.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let now = server.get(&format!("/api/target_images/{ti}")).await;
        if now.text("status") == "BUILDING" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "build never started");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    server.kill();

    let server = Server::start(dir.path());
    let done = server
        .wait_terminal(&format!("/api/target_images/{ti}"))
        .await;
    assert_eq!(done.text("status"), "COMPLETE", "{}", done.body);
    // No work directory is left behind, and the image has its final name.
    let work: Vec<_> = std::fs::read_dir(dir.path().join("work"))
        .expect("work dir")
        .collect();
    assert!(work.is_empty());
    assert_eq!(
        std::fs::read_dir(dir.path().join("blobs"))
            .expect("blobs")
            .count(),
        1
    );
}
