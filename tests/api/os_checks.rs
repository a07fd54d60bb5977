//! What is in an installed image and whether it boots: a Debian build with
//! `verify=boot` passes its check (UEFI, and BIOS for the same disk given as a base
//! image), and its SBOM lists what dpkg has in the image (read by the test from the
//! image itself) and passes SPDX's own validator; an image whose kernel the template's
//! commands break fails its check (the firmware gives up) with the console's last
//! lines, and a push of it is refused unless the push says otherwise; a check is a
//! stage of its own (percent and activity) and a cancel ends it.
//!
//! The validator is spdx-tools from PyPI, in the virtualenv tests/emulators/up.sh makes
//! (CONDUCTOR_TEST_SPDX names its `pyspdxtools`).

use crate::client::conductor;
use crate::harness::{Reply, Server, build_request};
use crate::os_builds::{
    BUILD_LIMIT, TURN, cache, cancel, debian, download_to, machine_mirror, processes_running,
    read_in_image, start,
};
use std::collections::BTreeSet;

fn validator() -> String {
    std::env::var("CONDUCTOR_TEST_SPDX").expect(
        "CONDUCTOR_TEST_SPDX names spdx-tools' pyspdxtools; run the tests with tests/run.sh, \
         which makes it (tests/emulators/up.sh)",
    )
}

const VERIFY: &str = "<parameters><parameter name='verify'>boot</parameter></parameters>";

/// Posts a build with a boot check and answers its one target image's path.
async fn checked_build(server: &Server, template: &str) -> String {
    let reply = server
        .post("/api/images", &build_request("mock", template, VERIFY))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    format!("/api/target_images/{}", reply.ids("target_image")[0])
}

/// The `<boot_check>` of a finished target image: result, firmware and what went wrong.
fn boot_check(done: &Reply) -> (String, String, String) {
    let doc = done.doc();
    let check = doc
        .descendants()
        .find(|n| n.has_tag_name("boot_check"))
        .unwrap_or_else(|| panic!("<boot_check> in {}", done.body));
    let attribute = |name: &str| check.attribute(name).unwrap_or_default().to_owned();
    (
        attribute("result"),
        attribute("firmware"),
        check.text().unwrap_or_default().to_owned(),
    )
}

/// `(name, version)` of every package dpkg's status file marks installed.
fn installed(status: &str) -> BTreeSet<(String, String)> {
    status
        .split("\n\n")
        .filter(|stanza| stanza.lines().any(|l| l == "Status: install ok installed"))
        .filter_map(|stanza| {
            let field = |name: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_owned())
            };
            Some((field("Package:")?, field("Version:")?))
        })
        .collect()
}

#[tokio::test]
async fn a_checked_debian_build_boots_and_its_sbom_lists_what_dpkg_has() {
    let _turn = TURN.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let import = dir.path().join("import");
    std::fs::create_dir_all(&import).expect("import dir");
    let import_arg = import.display().to_string();
    let server = Server::start_with(
        &dir.path().join("data"),
        &["--os-cache", &cache(), "--import-dir", &import_arg],
    );
    let template = debian(
        "checked",
        &machine_mirror(),
        "<packages><package name='hello'/></packages>",
    );
    let ti = checked_build(&server, &template).await;
    let done = server.wait_terminal_within(&ti, BUILD_LIMIT).await;
    assert_eq!(done.text("status"), "COMPLETE", "{}", done.body);
    let doc = done.doc();
    let element = |name: &str| {
        doc.descendants()
            .find(|n| n.has_tag_name(name))
            .unwrap_or_else(|| panic!("<{name}> in {}", done.body))
    };
    let (result, firmware, _) = boot_check(&done);
    assert_eq!(
        (result.as_str(), firmware.as_str()),
        ("passed", "uefi"),
        "{}",
        done.body
    );
    assert!(
        done.text("activity").contains("the boot check passed"),
        "{}",
        done.body
    );
    let console = server.get(&format!("{ti}/console")).await;
    assert_eq!(console.status, 200);
    assert!(console.body.contains("login:"), "{}", console.body);
    let log = server.get(&format!("{ti}/log")).await.body;
    assert!(log.contains("== the boot check passed"), "{log}");

    // The SBOM: what dpkg has in the image, as the test reads it from the image.
    let sbom = server.get(&format!("{ti}/sbom")).await;
    assert_eq!(sbom.status, 200, "{}", sbom.body);
    let document: serde_json::Value = serde_json::from_str(&sbom.body).expect("JSON");
    let listed: BTreeSet<(String, String)> = document["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter(|p| p["SPDXID"] != "SPDXRef-Image")
        .map(|p| {
            (
                p["name"].as_str().expect("name").to_owned(),
                p["versionInfo"].as_str().expect("version").to_owned(),
            )
        })
        .collect();
    let image = import.join("image.raw");
    download_to(&server, &ti, &image).await;
    let in_image = installed(&read_in_image(&image, "/var/lib/dpkg/status"));
    assert!(in_image.len() > 100, "{in_image:?}");
    assert_eq!(listed, in_image);
    assert!(listed.iter().any(|(name, _)| name == "hello"));
    assert_eq!(
        element("sbom").attribute("packages"),
        Some(listed.len().to_string().as_str())
    );
    let comment = document["creationInfo"]["comment"]
        .as_str()
        .expect("comment");
    assert!(
        comment.contains(&machine_mirror()) && comment.contains("<name>checked</name>"),
        "{comment}"
    );

    // SPDX's own validator accepts it.
    let file = dir.path().join("sbom.spdx.json");
    std::fs::write(&file, &sbom.body).expect("write the SBOM");
    let validated = std::process::Command::new(validator())
        .arg("-i")
        .arg(&file)
        .output()
        .expect("run pyspdxtools");
    assert!(
        validated.status.success(),
        "{}{}",
        String::from_utf8_lossy(&validated.stdout),
        String::from_utf8_lossy(&validated.stderr)
    );

    // An image whose firmware the server does not know (a base image from elsewhere)
    // is checked with the PC BIOS: the same disk boots through syslinux.
    let reply = server
        .post(
            "/api/images",
            &build_request(
                "mock",
                &crate::harness::template("from-base"),
                &format!(
                    "<base_image>file://{}</base_image>{VERIFY}",
                    image.display()
                ),
            ),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let from_base = format!("/api/target_images/{}", reply.ids("target_image")[0]);
    let done = server.wait_terminal_within(&from_base, BUILD_LIMIT).await;
    let (result, firmware, _) = boot_check(&done);
    assert_eq!(
        (result.as_str(), firmware.as_str()),
        ("passed", "bios"),
        "{}",
        done.body
    );
    // No manifest: the server did not install this image's OS.
    server
        .get(&format!("{from_base}/sbom"))
        .await
        .assert_error(404, "NotRecorded");

    // The command line compares two images package by package.
    let id = ti.rsplit('/').next().expect("id");
    let diff = conductor(&server, &["image", "diff", id, id]);
    let said = String::from_utf8_lossy(&diff.stdout);
    assert!(diff.status.success(), "{said}");
    assert!(
        said.contains(&format!("hold the same {} packages", listed.len())),
        "{said}"
    );
    let diff = conductor(&server, &["--output", "json", "image", "diff", id, id]);
    assert!(diff.status.success());
    let changes: serde_json::Value = serde_json::from_slice(&diff.stdout).expect("JSON");
    assert_eq!(changes, serde_json::json!([]));
}

#[tokio::test]
async fn an_image_whose_kernel_is_broken_fails_its_check_and_is_not_pushed() {
    let _turn = TURN.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // The firmware gives up on the broken kernel and falls back to its shell, which the
    // check sees: it fails then, well before this deadline.
    let server = Server::start_with(
        &dir.path().join("data"),
        &["--os-cache", &cache(), "--boot-check-timeout", "200"],
    );
    let template = debian(
        "broken",
        &machine_mirror(),
        "<packages><package name='hello'/></packages>\
         <commands><command name='break'>for k in /boot/vmlinuz-*; do echo not a kernel > \"$k\"; done</command></commands>",
    );
    let ti = checked_build(&server, &template).await;
    let done = server.wait_terminal_within(&ti, BUILD_LIMIT).await;
    // The image is built and kept; its check says it does not boot.
    assert_eq!(done.text("status"), "COMPLETE", "{}", done.body);
    let (result, _, detail) = boot_check(&done);
    assert_eq!(result, "failed", "{}", done.body);
    assert!(
        detail.contains("the console says \"UEFI Interactive Shell\""),
        "{detail}"
    );
    // The lines quoted are the console's own (served whole at …/console).
    let console = server.get(&format!("{ti}/console")).await.body;
    let quoted: Vec<&str> = detail.lines().skip(1).filter(|l| l.len() > 10).collect();
    assert!(
        quoted.iter().any(|line| console.contains(line)),
        "{detail}\n----\n{console}"
    );

    // A push of it is refused, unless the push says to go on.
    let id = ti.rsplit('/').next().expect("id");
    let push = |extra: &str| {
        format!(
            "<provider_image><provider_account>mock-acc</provider_account>\
             <target_image_id>{id}</target_image_id>{extra}</provider_image>"
        )
    };
    let refused = server.post("/api/provider_images", &push("")).await;
    let message = refused.assert_error(400, "ParameterDataIncorrect");
    assert!(message.contains("boot check"), "{message}");
    assert!(
        server
            .get("/api/provider_images")
            .await
            .ids("provider_image")
            .is_empty()
    );
    let forced = server
        .post(
            "/api/provider_images",
            &push("<parameters><parameter name='boot_check'>ignore</parameter></parameters>"),
        )
        .await;
    assert_eq!(forced.status, 200, "{}", forced.body);
}

#[tokio::test]
async fn a_boot_check_is_a_stage_of_its_own_and_a_cancel_ends_it() {
    let _turn = TURN.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(&dir.path().join("data"));
    let template = debian(
        "cancelled",
        &machine_mirror(),
        "<packages><package name='hello'/></packages>",
    );
    let ti = checked_build(&server, &template).await;
    server
        .wait_for_activity(&ti, "booting the image to check it", BUILD_LIMIT)
        .await;
    let during = server.get(&ti).await;
    let percent: u8 = during.text("percent_complete").parse().expect("percent");
    assert!((90..100).contains(&percent), "{}", during.body);
    cancel(&server, &ti).await;
    crate::harness::eventually(
        std::time::Duration::from_secs(10),
        async || match processes_running("file=/check/disk").as_slice() {
            [] => Ok(()),
            left => Err(format!("qemu still runs: {left:?}")),
        },
    )
    .await;
}

/// The operator's default (`--verify boot`) checks builds that have something to boot;
/// a check asked of a blank disk is refused, and the default leaves blank disks alone.
/// A base image that is not bootable fails its check as soon as the PC BIOS says so.
#[tokio::test]
async fn the_operators_default_checks_what_can_boot_and_a_blank_disk_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let import = dir.path().join("import");
    let import_arg = import.display().to_string();
    let server = Server::start_with(
        &dir.path().join("data"),
        &["--verify", "boot", "--import-dir", &import_arg],
    );
    // Fedora 14 is not an OS this server installs: the mock target builds a blank disk.
    let blank = crate::harness::template("blank");
    let refused = server
        .post("/api/images", &build_request("mock", &blank, VERIFY))
        .await;
    let message = refused.assert_error(400, "ParameterDataIncorrect");
    assert!(
        message.contains("verify=boot needs an image with an operating system"),
        "{message}"
    );
    let reply = server
        .post("/api/images", &build_request("mock", &blank, ""))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let ti = format!("/api/target_images/{}", reply.ids("target_image")[0]);
    let done = server.wait_terminal(&ti).await;
    assert_eq!(done.text("status"), "COMPLETE", "{}", done.body);
    assert!(!done.body.contains("boot_check"), "{}", done.body);

    // A base image gets the default check; this one holds no boot loader.
    let base = crate::harness::base_image(&import);
    let reply = server
        .post("/api/images", &build_request("mock", &blank, &base))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let ti = format!("/api/target_images/{}", reply.ids("target_image")[0]);
    let done = server.wait_terminal_within(&ti, BUILD_LIMIT).await;
    assert_eq!(done.text("status"), "COMPLETE", "{}", done.body);
    let (result, firmware, detail) = boot_check(&done);
    assert_eq!(
        (result.as_str(), firmware.as_str()),
        ("failed", "bios"),
        "{}",
        done.body
    );
    assert!(detail.contains("No bootable device"), "{detail}");
}
