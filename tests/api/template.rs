//! The plugin template (examples/provider-template), built by the build like every test
//! plugin: it loads, and a build, push, import and delete go through it.

use crate::harness::{Server, TEST_PLUGINS, base_image, build_request, eventually, template};

#[tokio::test]
async fn the_plugin_template_loads_builds_pushes_and_deletes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let folder = format!("{TEST_PLUGINS}/template");
    let import_dir = tempfile::tempdir().expect("import dir");
    let server = Server::start_with(
        dir.path(),
        &[
            "--plugins",
            &folder,
            "--import-dir",
            import_dir.path().to_str().expect("utf-8"),
        ],
    );
    let kind = server.get("/api/provider_types/template").await;
    assert_eq!(kind.status, 200, "{}", kind.body);
    assert_eq!(kind.text("format"), "qcow2");

    let provider = server
        .post(
            "/api/providers",
            "<provider><name>imaginary</name><provider_type id='template'/></provider>",
        )
        .await;
    assert_eq!(provider.status, 201, "{}", provider.body);
    let id = provider.ids("provider")[0].clone();
    let refused = server
        .post(
            &format!("/api/providers/{id}/provider_accounts"),
            "<provider_account><label>no</label><credentials><username>u</username>\
             <password>invalid</password></credentials></provider_account>",
        )
        .await;
    assert_eq!(refused.status, 422, "{}", refused.body);
    let account = server
        .post(
            &format!("/api/providers/{id}/provider_accounts"),
            "<provider_account><label>imaginary-acc</label><credentials><username>u</username>\
             <password>p</password></credentials></provider_account>",
        )
        .await;
    assert_eq!(account.status, 201, "{}", account.body);
    let account = account.ids("provider_account")[0].clone();
    let joined = server
        .put(
            &format!("/api/pool_families/1/provider_accounts/{account}"),
            "",
        )
        .await;
    assert!(joined.status < 300, "{}", joined.body);

    // A cloud boots what it is given: an OS this server does not install is built for
    // it only from a base image.
    let refused = server
        .post(
            "/api/images",
            &build_request("template", &template("from-the-template"), ""),
        )
        .await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(
        refused
            .text("message")
            .contains("Target template boots the image it is given"),
        "{}",
        refused.body
    );
    let base = base_image(import_dir.path());
    let reply = server
        .post(
            "/api/images",
            &build_request("template", &template("from-the-template"), &base),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let ti = reply.ids("target_image")[0].clone();
    let built = server
        .wait_terminal(&format!("/api/target_images/{ti}"))
        .await;
    assert_eq!(built.text("status"), "COMPLETE", "{}", built.body);
    assert_eq!(built.text("format"), "qcow2");

    let pushed = server
        .post(
            "/api/provider_images",
            &format!(
                "<provider_image><provider_account>imaginary-acc</provider_account>\
                 <target_image_id>{ti}</target_image_id></provider_image>"
            ),
        )
        .await;
    assert!(pushed.status < 300, "{}", pushed.body);
    let pi = pushed.ids("provider_image")[0].clone();
    let done = server
        .wait_terminal(&format!("/api/provider_images/{pi}"))
        .await;
    assert_eq!(done.text("status"), "COMPLETE", "{}", done.body);
    let identifier = done.text("target_identifier");
    assert!(identifier.starts_with("template-"), "{}", done.body);

    // Deleted on the provider, so an import of the same identifier then finds nothing.
    let deleted = server.delete(&format!("/api/provider_images/{pi}")).await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    let import = format!(
        "<image><target_identifier>{identifier}</target_identifier>\
         <provider_account_name>imaginary-acc</provider_account_name>\
         <environment>default</environment>\
         <image_descriptor>&lt;image&gt;&lt;name&gt;again&lt;/name&gt;&lt;/image&gt;</image_descriptor></image>"
    );
    eventually(std::time::Duration::from_secs(30), async || {
        let found = server.post("/api/images", &import).await;
        if found.status == 404 {
            return Ok(());
        }
        // An import that succeeded made a record; remove it before looking again.
        for image in found.ids("image") {
            server.delete(&format!("/api/images/{image}")).await;
        }
        Err(format!("still importable after the delete: {}", found.body))
    })
    .await;
}
