//! Every error code of reference/conductor-api.md §6.5 that the image routes can give,
//! in Conductor's `<error>` document, and that a refused request changes nothing.

use crate::harness::{Server, build_request, template};

const UNKNOWN: &str = "0191d2a6-9a5e-7cc4-9d0a-1f5a2b3c4d5e";

#[tokio::test]
async fn build_requests_fail_with_conductors_codes_and_store_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let cases: Vec<(String, u16, &str, &str)> = vec![
        (
            String::new(),
            400,
            "InsufficientParametersSupplied",
            "Please specify a type, build or import",
        ),
        (
            "<xml></xml>".into(),
            400,
            "InsufficientParametersSupplied",
            "Please specify a type, build or import",
        ),
        (
            "<image><targets>mock</targets></image>".into(),
            400,
            "InsufficientParametersSupplied",
            "Please specify a type, build or import",
        ),
        (
            "<image><targets>mock".into(),
            400,
            "InsufficientParametersSupplied",
            "Please specify a type, build or import",
        ),
        (
            build_request("mock", "<template><os/></template>", ""),
            400,
            "ParameterDataIncorrect",
            "Invalid Image Template: ",
        ),
        (
            build_request("mock", "", ""),
            400,
            "ParameterDataIncorrect",
            "Invalid Image Template: ",
        ),
        (
            build_request("mock", "<template/><template/>", ""),
            400,
            "ParameterDataIncorrect",
            "Invalid Image Template: <tdl> must hold exactly one <template>",
        ),
        (
            format!(
                "<image><targets>mock</targets><tdl>{}</tdl><environment>nowhere</environment></image>",
                template("t")
            ),
            400,
            "ParameterDataIncorrect",
            "Environment nowhere was not found.",
        ),
        (
            build_request("bogus", &template("t"), ""),
            404,
            "TargetNotFound",
            "Could not find Target bogus",
        ),
        (
            build_request("bogus,mock,other", &template("t"), ""),
            404,
            "TargetNotFound",
            "Could not find Target other",
        ),
        (
            build_request("", &template("t"), ""),
            400,
            "ParameterDataIncorrect",
            "No targets given",
        ),
        (
            format!(
                "<image><targets>mock</targets><tdl>{}</tdl><parameters><parameter>x</parameter></parameters></image>",
                template("t")
            ),
            400,
            "ParameterDataIncorrect",
            "each <parameter> needs a name attribute",
        ),
    ];
    for (body, status, code, message) in cases {
        let reply = server.post("/api/images.xml", &body).await;
        let got = reply.assert_error(status, code);
        assert!(got.starts_with(message), "{body}: {got}");
    }
    // Validation problems are named.
    let reply = server
        .post(
            "/api/images",
            &build_request("mock", "<template><os/></template>", ""),
        )
        .await;
    assert!(
        reply
            .assert_error(400, "ParameterDataIncorrect")
            .contains("Name is not set.")
    );
    assert!(server.get("/api/images").await.ids("image").is_empty());
    assert!(server.get("/api/builds").await.ids("build").is_empty());
}

#[tokio::test]
async fn lookups_of_unknown_ids_fail_with_the_codes_of_each_route() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    for id in [UNKNOWN, "1234"] {
        let cases = [
            (
                "GET",
                format!("/api/images/{id}"),
                404,
                "ImageNotFound",
                format!("Could not find Image {id}"),
            ),
            (
                "DELETE",
                format!("/api/images/{id}.xml"),
                404,
                "ImageNotFound",
                format!("Could not find Image {id}"),
            ),
            (
                "GET",
                format!("/api/images/{id}/builds"),
                400,
                "ImageNotFound",
                format!("Could not find Image {id}"),
            ),
            (
                "GET",
                format!("/api/builds/{id}"),
                404,
                "BuildNotFound",
                format!("Could not find Build {id}"),
            ),
            (
                "DELETE",
                format!("/api/builds/{id}"),
                404,
                "BuildNotFound",
                format!("Could not find Build {id}"),
            ),
            (
                "GET",
                format!("/api/builds/{id}/target_images"),
                400,
                "BuildNotFound",
                format!("Could not find Build {id}"),
            ),
            (
                "GET",
                format!("/api/target_images/{id}"),
                404,
                "TargetImageStatusNotFound",
                format!("Could not find status for TargetImage {id}"),
            ),
            (
                "DELETE",
                format!("/api/target_images/{id}"),
                404,
                "TargetImageNotFound",
                format!("Could not find TargetImage {id}"),
            ),
            (
                "GET",
                format!("/api/target_images/{id}/provider_images"),
                400,
                "TargetImageNotFound",
                format!("Could not find TargetImage {id}"),
            ),
            (
                "GET",
                format!("/api/provider_images/{id}"),
                404,
                "ProviderImageStatusNotFound",
                format!("Could not find status for ProviderImage {id}"),
            ),
            (
                "DELETE",
                format!("/api/provider_images/{id}"),
                404,
                "ProviderImageNotFound",
                format!("Could not find ProviderImage {id}"),
            ),
            (
                "GET",
                format!("/api/environments/{id}"),
                404,
                "RecordNotFound",
                format!("Couldn't find Environment with id={id}"),
            ),
            (
                "GET",
                format!("/api/provider_types/{id}"),
                404,
                "RecordNotFound",
                format!("Couldn't find ProviderType with id={id}"),
            ),
        ];
        for (method, path, status, code, message) in cases {
            let reply = match method {
                "GET" => server.get(&path).await,
                _ => server.delete(&path).await,
            };
            assert_eq!(reply.assert_error(status, code), message, "{method} {path}");
        }
    }
    server
        .get("/api/no_such_thing")
        .await
        .assert_error(404, "RecordNotFound");
}

#[tokio::test]
async fn push_requests_fail_with_conductors_codes_and_dispatch_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let reply = server
        .post("/api/images", &build_request("mock", &template("p"), ""))
        .await;
    let image = reply
        .doc()
        .root_element()
        .attribute("id")
        .expect("id")
        .to_owned();
    let ti = reply.ids("target_image")[0].clone();
    server
        .wait_terminal(&format!("/api/target_images/{ti}"))
        .await;
    let testbed_only = server
        .post("/api/images", &build_request("testbed", &template("q"), ""))
        .await;
    let testbed_ti = testbed_only.ids("target_image")[0].clone();

    let cases = [
        (String::new(), 400, "InsufficientParametersSupplied", "No Provider Account given".to_owned()),
        (format!("<provider_image><image_id>{image}</image_id></provider_image>"), 400, "InsufficientParametersSupplied", "No Provider Account given".into()),
        ("<provider_image><provider_account>mock-acc</provider_account></provider_image>".into(), 400, "InsufficientParametersSupplied", "Invalid Parameters: No Image, Build or TargetImage provided in request".into()),
        (format!("<provider_image><provider_account>mock-acc</provider_account><image_id>{UNKNOWN}</image_id></provider_image>"), 404, "ImageNotFound", format!("Could not find Image {UNKNOWN}")),
        (format!("<provider_image><provider_account>mock-acc</provider_account><build_id>{UNKNOWN}</build_id></provider_image>"), 404, "BuildNotFound", format!("Could not find Build {UNKNOWN}")),
        ("<provider_image><provider_account>mock-acc</provider_account><target_image_id>nope</target_image_id></provider_image>".into(), 404, "TargetImageNotFound", "Could not find TargetImage nope".into()),
        // Every account is checked before anything is pushed: the valid first one is not sent.
        (format!("<provider_image><provider_account>mock-acc,nobody</provider_account><image_id>{image}</image_id></provider_image>"), 404, "ProviderAccountNotFound", "Could not find Provider Account for name nobody".into()),
        (format!("<provider_image><provider_account>mock-acc,testbed-acc</provider_account><image_id>{image}</image_id></provider_image>"), 404, "TargetImageNotFound", "Could not find an appropriate target image for account testbed-acc".into()),
        (format!("<provider_image><provider_account>mock-acc</provider_account><target_image_id>{testbed_ti}</target_image_id></provider_image>"), 404, "TargetImageNotFound", "Could not find an appropriate target image for account mock-acc".into()),
    ];
    for (body, status, code, message) in cases {
        let reply = server.post("/api/provider_images.xml", &body).await;
        assert_eq!(reply.assert_error(status, code), message, "{body}");
    }
    assert!(
        server
            .get("/api/provider_images")
            .await
            .ids("provider_image")
            .is_empty()
    );

    // An empty account list is accepted and pushes nothing, as in Conductor.
    let empty = server
        .post("/api/provider_images", &format!("<provider_image><provider_account></provider_account><image_id>{image}</image_id></provider_image>"))
        .await;
    assert_eq!(empty.status, 200);
    assert!(empty.ids("provider_image").is_empty());
}

#[tokio::test]
async fn a_target_without_an_account_in_the_environment_cannot_be_built() {
    let dir = tempfile::tempdir().expect("tempdir");
    // First start without the test plugins: only mock gets a starting account.
    let server = Server::start_with(dir.path(), &[]);
    drop(server);
    let server = Server::start(dir.path());
    let reply = server
        .post("/api/images", &build_request("testbed", &template("t"), ""))
        .await;
    let message = reply.assert_error(400, "ParameterDataIncorrect");
    assert_eq!(
        message,
        "Target testbed has no Provider Accounts in this Environment. Valid targets include mock."
    );
    // The 400 for a known target wins over the 404 for an unknown one, as in Conductor.
    let reply = server
        .post(
            "/api/images",
            &build_request("bogus,testbed", &template("t"), ""),
        )
        .await;
    reply.assert_error(400, "ParameterDataIncorrect");
}

#[tokio::test]
async fn oversized_bodies_are_refused() {
    use base64::Engine as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    // The server answers from the headers alone, before the body is sent, so speak raw
    // HTTP: a client library would see its upload cut off instead of the reply.
    let address = server.url.trim_start_matches("http://");
    let auth = base64::engine::general_purpose::STANDARD
        .encode(format!("admin:{}", crate::harness::PASSWORD));
    let refusal = async |path: &str| {
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Basic {auth}\r\nContent-Length: {}\r\n\r\n<image>",
            4 << 20
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send headers");
        let mut reply = vec![0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(30), stream.read(&mut reply))
            .await
            .expect("the server answered without waiting for the body")
            .expect("read reply");
        String::from_utf8_lossy(&reply[..n]).into_owned()
    };
    let reply = refusal("/api/images").await;
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains("<code>RequestTooLarge</code>"), "{reply}");
    // A client that asked for JSON gets the refusal in JSON.
    let reply = refusal("/api/images.json").await;
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains("\"code\":\"RequestTooLarge\""), "{reply}");
    assert!(server.get("/api/images").await.ids("image").is_empty());
}
