//! The entry point, collections, suffixes and authentication.

use crate::harness::{PASSWORD, Server};

#[tokio::test]
async fn entry_point_lists_the_collections_with_absolute_hrefs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let reply = server.get("/api").await;
    assert_eq!(reply.status, 200);
    assert!(reply.content_type.starts_with("application/xml"));
    let doc = reply.doc();
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "api");
    assert_eq!(
        root.attribute("href"),
        Some(format!("{}/api", server.url).as_str())
    );
    let names: Vec<&str> = root
        .children()
        .filter(|n| n.is_element())
        .map(|n| n.tag_name().name())
        .collect();
    assert_eq!(
        names,
        [
            "builds",
            "catalogs",
            "deployments",
            "images",
            "pools",
            "pool_families",
            "providers",
            "provider_accounts",
            "provider_images",
            "provider_realms",
            "target_images"
        ]
    );
    let images = root
        .children()
        .find(|n| n.has_tag_name("images"))
        .expect("images link");
    assert_eq!(
        images.attribute("href"),
        Some(format!("{}/api/images", server.url).as_str())
    );
}

#[tokio::test]
async fn empty_collections_answer_an_empty_list_with_or_without_the_xml_suffix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    for (path, root) in [
        ("/api/images", "images"),
        ("/api/images.xml", "images"),
        ("/api/builds", "builds"),
        ("/api/target_images.xml", "target_images"),
        ("/api/provider_images", "provider_images"),
        ("/api/environments/default/images.xml", "images"),
        // An unknown environment lists nothing rather than 404 (the CLI crashes on 404).
        ("/api/environments/Test%20cloud/images.xml", "images"),
    ] {
        let reply = server.get(path).await;
        assert_eq!(reply.status, 200, "{path}");
        let doc = reply.doc();
        assert_eq!(doc.root_element().tag_name().name(), root, "{path}");
        assert_eq!(
            doc.root_element()
                .children()
                .filter(|n| n.is_element())
                .count(),
            0,
            "{path}"
        );
    }
}

#[tokio::test]
async fn other_format_suffixes_are_not_acceptable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    assert_eq!(server.get("/api/images.html").await.status, 406);
    assert_eq!(server.get("/api/images.yaml").await.status, 406);
    // JSON is served (tests/api/client.rs).
    assert_eq!(server.get("/api/images.json").await.status, 200);
}

#[tokio::test]
async fn missing_or_wrong_credentials_get_401_with_an_empty_body() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let cases = [
        server.request(reqwest::Method::GET, "/api/images.xml"),
        server
            .request(reqwest::Method::GET, "/api")
            .basic_auth("admin", Some("wrong")),
        server
            .request(reqwest::Method::GET, "/api/images")
            .basic_auth("nobody", Some(PASSWORD)),
        server
            .request(reqwest::Method::GET, "/api/images")
            .header("Authorization", "Basic !!!"),
        server
            .request(reqwest::Method::POST, "/api/images")
            .body("<image/>"),
        server.request(reqwest::Method::DELETE, "/api/images/x"),
    ];
    for request in cases {
        let reply = server.raw(request).await;
        assert_eq!(reply.status, 401);
        assert_eq!(reply.body.trim(), "");
    }
}

#[tokio::test]
async fn environments_and_provider_types_describe_what_is_loaded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let types = server.get("/api/provider_types.xml").await;
    assert_eq!(types.status, 200);
    let drivers: Vec<String> = types
        .doc()
        .descendants()
        .filter(|n| n.has_tag_name("deltacloud_driver"))
        .map(|n| n.text().unwrap_or("").to_owned())
        .collect();
    assert_eq!(drivers, ["ec2", "mock", "openstack", "testbed"]);

    let mock = server.get("/api/provider_types/mock.xml").await;
    assert_eq!(mock.status, 200);
    let creds: Vec<String> = mock
        .doc()
        .descendants()
        .filter(|n| n.has_tag_name("credential_definition"))
        .map(|n| {
            n.children()
                .find(|c| c.has_tag_name("name"))
                .and_then(|c| c.text())
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert_eq!(creds, ["username", "password"]);

    // Conductor's ec2 credentials, the x509 pair optional.
    let ec2 = server.get("/api/provider_types/ec2.xml").await;
    assert_eq!(ec2.status, 200);
    let creds: Vec<(String, String, String)> = ec2
        .doc()
        .descendants()
        .filter(|n| n.has_tag_name("credential_definition"))
        .map(|n| {
            let field = |name: &str| {
                n.children()
                    .find(|c| c.has_tag_name(name))
                    .and_then(|c| c.text())
                    .unwrap_or("")
                    .to_owned()
            };
            (field("name"), field("label"), field("required"))
        })
        .collect();
    let expected = [
        ("username", "access_key", "true"),
        ("password", "secret_access_key", "true"),
        ("account_id", "account_number", "true"),
        ("x509private", "key", "false"),
        ("x509public", "certificate", "false"),
    ]
    .map(|(a, b, c)| (a.to_owned(), b.to_owned(), c.to_owned()));
    assert_eq!(creds, expected);

    let envs = server.get("/api/environments.xml").await;
    assert_eq!(envs.status, 200);
    assert_eq!(envs.text("name"), "default");
    let env = server.get("/api/environments/default").await;
    assert_eq!(env.status, 200);
    let targets: Vec<&str> = env
        .doc()
        .descendants()
        .filter(|n| n.has_tag_name("target"))
        .filter_map(|n| n.attribute("name"))
        .map(|s| match s {
            "mock" => "mock",
            "testbed" => "testbed",
            _ => "other",
        })
        .collect();
    assert_eq!(targets, ["mock", "testbed"]);
    assert_eq!(
        server.get("/api/environments/1").await.text("name"),
        "default"
    );
}

#[tokio::test]
async fn the_conductor_mount_path_works_and_keeps_it_in_hrefs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let reply = server.get("/conductor/api/images.xml").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let entry = server.get("/conductor/api").await;
    assert_eq!(
        entry.doc().root_element().attribute("href"),
        Some(format!("{}/conductor/api", server.url).as_str())
    );
    // The internal header cannot be forged to change hrefs on plain paths.
    let forged = server
        .raw(
            server
                .request(reqwest::Method::GET, "/api")
                .basic_auth("admin", Some(PASSWORD))
                .header("x-conductor-mount", "1"),
        )
        .await;
    assert_eq!(
        forged.doc().root_element().attribute("href"),
        Some(format!("{}/api", server.url).as_str())
    );
}

#[tokio::test]
async fn the_api_tour_example_runs_against_the_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/api-tour.sh");
    let output = tokio::process::Command::new("bash")
        .arg(script)
        .env("CONDUCTOR_URL", &server.url)
        .env("CONDUCTOR_PASSWORD", PASSWORD)
        .output()
        .await
        .expect("run the example");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Three target images built, and 1 + 2 + 2 provider images pushed.
    let complete = stdout.lines().filter(|l| l.contains(": COMPLETE")).count();
    assert_eq!(complete, 8, "{stdout}");
    assert!(!stdout.contains("FAILED"));
    assert!(server.get("/api/images").await.ids("image").is_empty());
}

#[tokio::test]
async fn providers_accounts_and_nested_provider_image_routes_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let providers = server.get("/api/providers.xml").await;
    assert_eq!(providers.status, 200);
    assert_eq!(providers.ids("provider"), ["1", "2"]);
    assert_eq!(server.get("/api/providers/1").await.text("name"), "mock");
    let accounts = server.get("/api/provider_accounts.xml").await;
    assert_eq!(accounts.ids("provider_account"), ["1", "2"]);
    let account = server.get("/api/provider_accounts/1.xml").await;
    assert_eq!(account.text("name"), "mock-acc");
    assert_eq!(account.text("provider"), "mock");
    assert_eq!(account.text("provider_type"), "mock");
    server
        .get("/api/providers/9")
        .await
        .assert_error(404, "RecordNotFound");
    server
        .get("/api/provider_accounts/x")
        .await
        .assert_error(404, "RecordNotFound");

    let build = crate::harness::build_request("mock", &crate::harness::template("n"), "");
    let reply = server.post("/api/images", &build).await;
    let ti = reply.ids("target_image")[0].clone();
    server
        .wait_terminal(&format!("/api/target_images/{ti}"))
        .await;
    // The id in the URL is ignored for a push, as in Conductor: the body decides.
    let pushed = server
        .post(
            &format!("/api/target_images/{ti}/provider_images.xml"),
            &format!("<provider_image><target_image_id>{ti}</target_image_id><provider_account>mock-acc</provider_account></provider_image>"),
        )
        .await;
    assert_eq!(pushed.status, 200, "{}", pushed.body);
    let pi = pushed.ids("provider_image")[0].clone();
    server
        .wait_terminal(&format!("/api/provider_images/{pi}"))
        .await;
    let nested = server
        .get(&format!("/api/target_images/{ti}/provider_images/{pi}.xml"))
        .await;
    assert_eq!(nested.status, 200);
    assert_eq!(nested.text("status"), "COMPLETE");
    assert_eq!(nested.ids("target_image"), [ti.as_str()]);
}

#[tokio::test]
async fn hrefs_use_the_configured_external_url() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_with(
        dir.path(),
        &["--external-url", "https://images.example.org/conductor/"],
    );
    let entry = server.get("/api").await;
    assert_eq!(
        entry.doc().root_element().attribute("href"),
        Some("https://images.example.org/conductor/api")
    );
}
