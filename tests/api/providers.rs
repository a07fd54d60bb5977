//! Providers, accounts, environments (pool families), import, and deletes that reach
//! the provider.

use crate::harness::{Reply, Server, build_request, template};

/// The `<message>`s of a 422 `<errors>` reply.
fn problems(reply: &Reply) -> Vec<String> {
    assert_eq!(reply.status, 422, "{}", reply.body);
    let doc = reply.doc();
    assert_eq!(doc.root_element().tag_name().name(), "errors");
    doc.descendants()
        .filter(|n| n.has_tag_name("message"))
        .map(|n| n.text().unwrap_or("").to_owned())
        .collect()
}

#[tokio::test]
async fn providers_are_created_validated_updated_and_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let created = server
        .post("/api/providers.xml", "<provider><name>mock2</name><url>http://localhost:3002/api</url><provider_type id='mock'/></provider>")
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.text("name"), "mock2");
    assert_eq!(created.text("provider_type"), "mock");
    assert_eq!(created.text("url"), "http://localhost:3002/api");
    let id = created.ids("provider")[0].clone();
    // The output form of the type, and Conductor's create-only alias, are accepted too.
    let text_form = server
        .post(
            "/api/providers",
            "<provider><name>mock3</name><provider_type>mock</provider_type></provider>",
        )
        .await;
    assert_eq!(text_form.status, 201, "{}", text_form.body);
    let alias = server
        .post("/api/providers", "<provider><name>tb2</name><provider_type_deltacloud_driver>testbed</provider_type_deltacloud_driver></provider>")
        .await;
    assert_eq!(alias.status, 201, "{}", alias.body);

    for (body, expected) in [
        (
            "<provider><provider_type id='mock'/></provider>",
            vec!["Provider name can't be blank"],
        ),
        (
            "<provider><name>mock2</name><provider_type id='mock'/></provider>",
            vec!["Provider name has already been taken"],
        ),
        (
            "<provider><name>bad/name</name><provider_type id='mock'/></provider>",
            vec!["Provider name is invalid (letters, digits, spaces, '-' and '_' only)"],
        ),
        (
            "<provider><name>x</name></provider>",
            vec!["Provider Type can't be blank"],
        ),
        (
            "<provider><name>x</name><provider_type id='nope'/></provider>",
            vec!["Provider type does not exist"],
        ),
        (
            "<provider><name>x</name><provider_type id='mock'/><settings><setting name='region'>r</setting></settings></provider>",
            vec!["Setting region is not used by provider type mock (it uses: images)"],
        ),
        (
            "<provider></provider>",
            vec![
                "Provider name can't be blank",
                "Provider Type can't be blank",
            ],
        ),
    ] {
        let reply = server.post("/api/providers", body).await;
        assert_eq!(problems(&reply), expected, "{body}");
    }
    let reply = server.post("/api/providers", "not xml").await;
    assert_eq!(reply.status, 422);

    let updated = server
        .put(
            &format!("/api/providers/{id}.xml"),
            "<provider><name>mock-renamed</name></provider>",
        )
        .await;
    assert_eq!(updated.status, 200, "{}", updated.body);
    assert_eq!(updated.text("name"), "mock-renamed");
    assert_eq!(updated.text("url"), "http://localhost:3002/api");
    let refused = server
        .put(
            &format!("/api/providers/{id}"),
            "<provider><provider_type id='testbed'/></provider>",
        )
        .await;
    assert_eq!(problems(&refused), ["Provider type cannot be changed"]);

    let listed = server.get("/api/providers.xml").await;
    let names: Vec<String> = listed
        .doc()
        .root_element()
        .children()
        .filter(|n| n.has_tag_name("provider"))
        .filter_map(|n| {
            n.children()
                .find(|c| c.has_tag_name("name"))
                .and_then(|c| c.text())
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(names, ["mock", "mock-renamed", "mock3", "tb2", "testbed"]);

    let deleted = server.delete(&format!("/api/providers/{id}")).await;
    assert_eq!(deleted.status, 204);
    assert_eq!(deleted.body, "");
    server
        .get(&format!("/api/providers/{id}"))
        .await
        .assert_error(404, "RecordNotFound");
    server
        .put("/api/providers/99", "<provider/>")
        .await
        .assert_error(404, "RecordNotFound");
    server
        .delete("/api/providers/99")
        .await
        .assert_error(404, "RecordNotFound");
}

#[tokio::test]
async fn accounts_need_the_types_credentials_and_the_plugins_approval() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let account = |label: &str, creds: &str| {
        format!(
            "<provider_account><label>{label}</label><provider id='1'/><credentials>{creds}</credentials></provider_account>"
        )
    };
    let created = server
        .post(
            "/api/provider_accounts.xml",
            &account("acc1", "<username>u</username><password>p</password>"),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.text("name"), "acc1");
    assert_eq!(created.text("provider"), "mock");
    assert_eq!(created.text("username"), "u");
    assert_eq!(created.text("password"), "p");
    let id = created.ids("provider_account")[0].clone();
    // New accounts join the default environment.
    let env = server.get("/api/environments/default").await;
    let labels: Vec<&str> = env
        .doc()
        .descendants()
        .filter(|n| n.has_tag_name("account"))
        .filter_map(|n| n.attribute("name"))
        .map(|s| if s == "acc1" { "acc1" } else { "other" })
        .collect();
    assert!(labels.contains(&"acc1"));

    let nested = server
        .post("/api/providers/1/provider_accounts", "<provider_account><label>acc2</label><credentials><username>u</username><password>p</password></credentials></provider_account>")
        .await;
    assert_eq!(nested.status, 201, "{}", nested.body);

    for (body, expected) in [
        (account("", "<username>u</username><password>p</password>"), vec!["Label can't be blank".to_owned()]),
        (account("acc1", "<username>u</username><password>p</password>"), vec!["Label has already been taken".into()]),
        (account("acc3", "<username>u</username>"), vec!["Password can't be blank".into()]),
        (account("acc3", "<username>u</username><password>p</password><token>t</token>"), vec!["Unknown credential token for provider type mock (it takes: username, password)".into()]),
        (account("acc3", "<username>u</username><password>invalid</password>"), vec!["Login credentials are invalid for this Provider: the mock provider refuses the password 'invalid'".into()]),
        ("<provider_account><label>acc3</label><provider id='1'/></provider_account>".into(), vec!["Credentials can't be blank".into(), "Username can't be blank".into(), "Password can't be blank".into()]),
    ] {
        let reply = server.post("/api/provider_accounts", &body).await;
        assert_eq!(problems(&reply), expected, "{body}");
    }
    server
        .post(
            "/api/provider_accounts",
            "<provider_account><label>x</label><provider id='77'/></provider_account>",
        )
        .await
        .assert_error(404, "RecordNotFound");

    // The list never shows credentials; the detail does, to an administrator.
    let listed = server.get("/api/provider_accounts").await;
    assert!(!listed.body.contains("<password>"));
    assert_eq!(
        server
            .get(&format!("/api/provider_accounts/{id}"))
            .await
            .text("password"),
        "p"
    );
    assert_eq!(
        server
            .get("/api/providers/1/provider_accounts.xml")
            .await
            .ids("provider_account")
            .len(),
        3
    );

    // An update changes what it names and keeps the rest.
    let updated = server.put(&format!("/api/provider_accounts/{id}"), "<provider_account><credentials><password>p2</password></credentials><priority>5</priority></provider_account>").await;
    assert_eq!(updated.status, 200, "{}", updated.body);
    assert_eq!(updated.text("username"), "u");
    assert_eq!(updated.text("password"), "p2");
    assert_eq!(updated.text("priority"), "5");
    let refused = server.put(&format!("/api/provider_accounts/{id}"), "<provider_account><credentials><password>invalid</password></credentials></provider_account>").await;
    assert_eq!(problems(&refused).len(), 1);
    assert_eq!(
        server
            .get(&format!("/api/provider_accounts/{id}"))
            .await
            .text("password"),
        "p2"
    );

    let deleted = server
        .delete(&format!("/api/provider_accounts/{id}.xml"))
        .await;
    assert_eq!(deleted.status, 204);
    server
        .get(&format!("/api/provider_accounts/{id}"))
        .await
        .assert_error(404, "RecordNotFound");
}

#[tokio::test]
async fn environments_scope_builds_pushes_and_imports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let created = server
        .post(
            "/api/pool_families.xml",
            "<pool_family><name>team b</name><description>B</description></pool_family>",
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let env = created
        .doc()
        .root_element()
        .attribute("id")
        .expect("id")
        .to_owned();
    assert_eq!(
        problems(
            &server
                .post(
                    "/api/pool_families",
                    "<pool_family><name>team b</name></pool_family>"
                )
                .await
        ),
        ["Name has already been taken"]
    );
    assert_eq!(
        problems(
            &server
                .post(
                    "/api/pool_families",
                    "<pool_family><name></name></pool_family>"
                )
                .await
        ),
        ["Name can't be blank"]
    );
    assert_eq!(
        server.get("/api/pool_families").await.ids("pool_family"),
        ["1", env.as_str()]
    );

    // Nothing can be built in an environment without accounts.
    let body = format!(
        "<image><targets>mock</targets><tdl>{}</tdl><environment>team b</environment></image>",
        template("b")
    );
    let refused = server.post("/api/images", &body).await;
    assert_eq!(
        refused.assert_error(400, "ParameterDataIncorrect"),
        "Target mock has no Provider Accounts in this Environment. Valid targets include ."
    );

    // mock-acc (id 1) joins the environment; membership answers 204 / 404.
    assert_eq!(
        server
            .get(&format!("/api/pool_families/{env}/provider_accounts/1"))
            .await
            .status,
        404
    );
    assert_eq!(
        server
            .put(
                &format!("/api/pool_families/{env}/provider_accounts/1.xml"),
                ""
            )
            .await
            .status,
        204
    );
    assert_eq!(
        server
            .put(&format!("/api/pool_families/{env}/provider_accounts/1"), "")
            .await
            .status,
        204
    );
    assert_eq!(
        server
            .get(&format!("/api/pool_families/{env}/provider_accounts/1"))
            .await
            .status,
        204
    );
    assert_eq!(
        server
            .get(&format!("/api/pool_families/{env}/provider_accounts"))
            .await
            .ids("provider_account"),
        ["1"]
    );
    server
        .put(
            &format!("/api/pool_families/{env}/provider_accounts/99"),
            "",
        )
        .await
        .assert_error(404, "RecordNotFound");

    let built = server.post("/api/images", &body).await;
    assert_eq!(built.status, 200, "{}", built.body);
    let image = built
        .doc()
        .root_element()
        .attribute("id")
        .expect("id")
        .to_owned();
    let ti = built.ids("target_image")[0].clone();
    server
        .wait_terminal(&format!("/api/target_images/{ti}"))
        .await;
    assert_eq!(
        server
            .get("/api/environments/team%20b/images.xml")
            .await
            .ids("image"),
        [image.as_str()]
    );

    // testbed-acc is not in the environment: the push is refused and nothing is pushed.
    let push = format!(
        "<provider_image><provider_account>mock-acc,testbed-acc</provider_account><image_id>{image}</image_id></provider_image>"
    );
    let refused = server.post("/api/provider_images", &push).await;
    assert_eq!(
        refused.assert_error(400, "ParameterDataIncorrect"),
        "Provider Account testbed-acc is not in this Environment. Valid accounts include mock-acc."
    );
    assert!(
        server
            .get("/api/provider_images")
            .await
            .ids("provider_image")
            .is_empty()
    );

    // An environment with images, and the default one, cannot be deleted.
    assert_eq!(
        server
            .delete(&format!("/api/pool_families/{env}"))
            .await
            .assert_error(409, "Error"),
        format!("There are following associated images: b ({image}). Delete them first.")
    );
    server
        .delete("/api/pool_families/1")
        .await
        .assert_error(409, "Error");
    assert_eq!(
        server.delete(&format!("/api/images/{image}")).await.status,
        200
    );
    assert_eq!(
        server
            .put(
                &format!("/api/pool_families/{env}"),
                "<pool_family><name>team c</name></pool_family>"
            )
            .await
            .text("name"),
        "team c"
    );
    assert_eq!(
        server
            .delete(&format!("/api/pool_families/{env}/provider_accounts/1"))
            .await
            .status,
        204
    );
    assert_eq!(
        server
            .delete(&format!("/api/pool_families/{env}"))
            .await
            .status,
        204
    );
    server
        .get(&format!("/api/pool_families/{env}"))
        .await
        .assert_error(404, "RecordNotFound");
}

/// Builds and pushes an image for mock; returns (target image id, provider image id,
/// target identifier).
async fn pushed(server: &Server) -> (String, String, String) {
    let built = server
        .post("/api/images", &build_request("mock", &template("imp"), ""))
        .await;
    let ti = built.ids("target_image")[0].clone();
    server
        .wait_terminal(&format!("/api/target_images/{ti}"))
        .await;
    let reply = server
        .post("/api/provider_images", &format!("<provider_image><provider_account>mock-acc</provider_account><target_image_id>{ti}</target_image_id></provider_image>"))
        .await;
    let pi = reply.ids("provider_image")[0].clone();
    let done = server
        .wait_terminal(&format!("/api/provider_images/{pi}"))
        .await;
    assert_eq!(done.text("status"), "COMPLETE");
    (ti, pi, done.text("target_identifier"))
}

pub(crate) fn import_body(account: &str, identifier: &str, env: &str) -> String {
    format!(
        "<?xml version='1.0' encoding='UTF-8'?><image><target_identifier>{identifier}</target_identifier>\
         <image_descriptor>&lt;image&gt;&lt;name&gt;imported&lt;/name&gt;&lt;/image&gt;</image_descriptor>\
         <provider_account_name>{account}</provider_account_name><environment>{env}</environment></image>"
    )
}

#[tokio::test]
async fn an_image_on_a_provider_can_be_imported_and_unknown_ones_cannot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let (_, _, identifier) = pushed(&server).await;
    let reply = server
        .post(
            "/api/images.xml",
            &import_body("mock-acc", &identifier, "default"),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    // Exactly one build / target image / provider image, as Conductor's client needs.
    assert_eq!(reply.ids("build").len(), 1);
    assert_eq!(reply.ids("target_image").len(), 1);
    assert_eq!(reply.ids("provider_image").len(), 1);
    let image = reply
        .doc()
        .root_element()
        .attribute("id")
        .expect("id")
        .to_owned();
    let pi = reply.ids("provider_image")[0].clone();
    let shown = server.get(&format!("/api/images/{image}")).await;
    assert_eq!(shown.text("name"), "imported");
    let pushed = server.get(&format!("/api/provider_images/{pi}")).await;
    assert_eq!(pushed.text("status"), "COMPLETE");
    assert_eq!(pushed.text("target_identifier"), identifier);

    // Descriptors as elements work too.
    let element_form = format!(
        "<image><target_identifier>{identifier}</target_identifier><image_descriptor><image><name>again</name></image></image_descriptor><provider_account_name>mock-acc</provider_account_name><environment>default</environment></image>"
    );
    assert_eq!(server.post("/api/images", &element_form).await.status, 200);

    let cases = [
        (
            import_body("mock-acc", "Mock_mock_nothing", "default"),
            404,
            "ImageNotFound",
            "Could not find Image Mock_mock_nothing on Provider",
        ),
        (
            import_body("nobody", &identifier, "default"),
            404,
            "ProviderAccountNotFound",
            "Could not find Provider Account for name nobody",
        ),
        (
            import_body("mock-acc", &identifier, "nowhere"),
            400,
            "ParameterDataIncorrect",
            "Environment nowhere was not found.",
        ),
        (
            import_body("mock-acc", "", "default"),
            400,
            "InsufficientParametersSupplied",
            "No target identifier given",
        ),
    ];
    for (body, status, code, message) in cases {
        assert_eq!(
            server
                .post("/api/images", &body)
                .await
                .assert_error(status, code),
            message
        );
    }
}

#[tokio::test]
async fn deleting_a_provider_image_deletes_it_on_the_provider() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let (_, pi, identifier) = pushed(&server).await;
    // An account with provider images cannot be deleted.
    let refused = server.delete("/api/provider_accounts/1").await;
    assert_eq!(
        refused.assert_error(409, "Error"),
        format!("There are following associated provider images: {identifier}. Delete them first.")
    );
    let deleted = server
        .delete(&format!("/api/provider_images/{pi}.xml"))
        .await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    assert_eq!(deleted.text("target_identifier"), identifier);
    let outcome = deleted.doc();
    let content = outcome
        .descendants()
        .find(|n| n.has_tag_name("provider_content"))
        .expect("content");
    let status = content
        .children()
        .find(|n| n.has_tag_name("status"))
        .and_then(|n| n.text());
    assert_eq!(status, Some("DELETED"));
    // The mock provider no longer has it: importing it fails.
    let reply = server
        .post(
            "/api/images",
            &import_body("mock-acc", &identifier, "default"),
        )
        .await;
    reply.assert_error(404, "ImageNotFound");
    assert_eq!(server.delete("/api/provider_accounts/1").await.status, 204);
}

#[tokio::test]
async fn deleting_an_image_deletes_its_provider_images_on_the_provider() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let (ti, _, identifier) = pushed(&server).await;
    let build = server
        .get(&format!("/api/target_images/{ti}"))
        .await
        .ids("build")[0]
        .clone();
    let image = server
        .get(&format!("/api/builds/{build}"))
        .await
        .text("image");
    let deleted = server.delete(&format!("/api/images/{image}")).await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    assert_eq!(deleted.text("target_identifier"), identifier);
    assert!(
        deleted
            .body
            .contains("<status>DELETED</status>\n<error></error>"),
        "{}",
        deleted.body
    );
    server
        .post(
            "/api/images",
            &import_body("mock-acc", &identifier, "default"),
        )
        .await
        .assert_error(404, "ImageNotFound");
}
