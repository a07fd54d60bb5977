//! The plugin template (examples/provider-template), built by the build like every test
//! plugin: it loads, and a build, push, import and delete go through it; and copied out
//! of the repository, it builds against the packaged SDK.

use crate::harness::{Server, TEST_PLUGINS, base_image, build_request, eventually, template};
use std::path::Path;
use std::process::Command;

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

/// Runs cargo (the one that built the tests) in `dir` with `args`, without what the
/// outer build set for itself; fails the test with cargo's output if it fails.
fn cargo(dir: &Path, args: &[&str]) {
    let mut command = Command::new(env!("CARGO"));
    command.current_dir(dir).args(args);
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
    ] {
        command.env_remove(var);
    }
    let output = command.output().expect("run cargo");
    assert!(
        output.status.success(),
        "cargo {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A plugin author outside this repository: the SDK as `cargo package` makes it (its WIT
/// inside), and the template copied away from the workspace, with the changes its
/// README asks for. It builds, and the server loads what it built.
#[tokio::test]
async fn the_plugin_template_builds_outside_the_repository_against_the_packaged_sdk() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root");
    let dir = tempfile::tempdir().expect("tempdir");
    let packaged = dir.path().join("package");
    cargo(
        root,
        &[
            "package",
            "-p",
            "conductor-plugin-sdk",
            "--no-verify",
            "--allow-dirty",
            "--offline",
            "--target-dir",
            packaged.to_str().expect("utf-8"),
        ],
    );
    let crate_file = packaged.join("package").join(format!(
        "conductor-plugin-sdk-{}.crate",
        env!("CARGO_PKG_VERSION")
    ));
    let unpacked = Command::new("tar")
        .arg("xzf")
        .arg(&crate_file)
        .arg("-C")
        .arg(dir.path())
        .status()
        .expect("tar");
    assert!(unpacked.success(), "unpacking {}", crate_file.display());
    let sdk = dir.path().join(format!(
        "conductor-plugin-sdk-{}",
        env!("CARGO_PKG_VERSION")
    ));
    assert!(
        sdk.join("wit/provider.wit").exists(),
        "the packaged SDK holds its WIT"
    );

    // The copy, made its own workspace, as examples/provider-template/README.md says.
    let mycloud = dir.path().join("mycloud");
    std::fs::create_dir_all(mycloud.join("src")).expect("mkdir");
    let template = root.join("examples/provider-template");
    std::fs::copy(template.join("src/lib.rs"), mycloud.join("src/lib.rs")).expect("copy");
    let manifest = std::fs::read_to_string(template.join("Cargo.toml")).expect("manifest");
    let manifest = manifest
        .replace("conductor-plugin-template", "conductor-plugin-mycloud")
        .replace("edition.workspace = true", "edition = \"2024\"")
        .replace(
            "rust-version.workspace = true",
            &format!("rust-version = \"{}\"", env!("CARGO_PKG_RUST_VERSION")),
        )
        .replace("license.workspace = true", "license = \"Apache-2.0\"")
        .replace("version.workspace = true", "version = \"0.1.0\"")
        .replace(
            "path = \"../../plugins/sdk\"",
            &format!("path = \"{}\"", sdk.display()),
        )
        .replace("[lints]\nworkspace = true\n", "")
        + "\n[workspace]\n";
    assert!(!manifest.contains(".workspace"), "{manifest}");
    std::fs::write(mycloud.join("Cargo.toml"), manifest).expect("write the manifest");
    // The workspace's lock file pins what the SDK was tested with, and lets cargo work
    // from the local registry alone.
    std::fs::copy(root.join("Cargo.lock"), mycloud.join("Cargo.lock")).expect("lock file");
    let target = env!("CONDUCTOR_WASM_TARGET_DIR");
    cargo(
        &mycloud,
        &[
            "build",
            "--release",
            "--offline",
            "--target",
            "wasm32-wasip2",
            "--target-dir",
            target,
        ],
    );
    let built = Path::new(target).join("wasm32-wasip2/release/conductor_plugin_mycloud.wasm");
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("mkdir");
    std::fs::copy(&built, plugins.join("mycloud.wasm")).expect("copy the plugin");

    let server = Server::start_with(
        &dir.path().join("data"),
        &["--plugins", plugins.to_str().expect("utf-8")],
    );
    let kind = server.get("/api/provider_types/template").await;
    assert_eq!(kind.status, 200, "{}", kind.body);
    assert_eq!(kind.text("format"), "qcow2");
}
