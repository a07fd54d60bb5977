//! Real operating systems in the images: a Debian template builds a disk that boots
//! (under qemu with TCG and OVMF, no network), with its package, file and commands; the
//! failures name their cause; cancel and crashes leave nothing behind; a template's
//! commands see neither the network nor the server's files.
//!
//! The mirror is the one this machine's apt sources name (nothing here names a host).
//! Installed trees and downloaded packages are cached under target/ for every server of
//! the run, and these tests take turns, so the run makes one cold install.

use crate::harness::{Server, build_request, eventually};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One OS test at a time: they share the cache, and two cold installs at once would
/// only slow each other down.
pub(crate) static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A builds' own deadline: a cold install on two busy cores takes minutes.
pub(crate) const BUILD_LIMIT: Duration = Duration::from_secs(20 * 60);

pub(crate) fn cache() -> String {
    concat!(env!("CARGO_TARGET_TMPDIR"), "/os-cache").to_owned()
}

pub(crate) fn start(data: &Path) -> Server {
    Server::start_with(data, &["--os-cache", &cache()])
}

/// The Debian mirror this machine installs from: the first `deb` URI of its apt sources
/// that is not a security archive.
pub(crate) fn machine_mirror() -> String {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let name = file.to_string_lossy().into_owned();
        let uris: Vec<String> = if name.ends_with(".sources") {
            text.lines()
                .filter_map(|l| l.strip_prefix("URIs:"))
                .flat_map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
                .collect()
        } else if name.ends_with(".list") {
            text.lines()
                .filter(|l| l.starts_with("deb "))
                .filter_map(|l| l.split_whitespace().find(|w| w.contains("://")))
                .map(str::to_owned)
                .collect()
        } else {
            continue;
        };
        if let Some(uri) = uris
            .into_iter()
            .find(|u| u.contains("debian") && !u.contains("security"))
        {
            return uri;
        }
    }
    panic!("this machine's apt sources name no Debian mirror");
}

/// A Debian 12 template: a 2 GiB disk, root's password, and what the test adds. Its
/// description is new every time, and so is its root password's hash, so a disk an
/// earlier run left in the shared cache is never reused: customization happens anew.
pub(crate) fn debian(name: &str, mirror: &str, extra: &str) -> String {
    let run = uuid::Uuid::now_v7();
    format!(
        "<template><name>{name}</name><description>run {run}</description><os><name>Debian</name>\
         <version>12</version><arch>x86_64</arch><install type='url'><url>{mirror}</url></install>\
         <rootpw>s3cret-{run}</rootpw></os>{extra}<disk><size>2G</size></disk></template>"
    )
}

/// Posts a build and answers its one target image's path.
pub(crate) async fn build(server: &Server, targets: &str, template: &str) -> String {
    let reply = server
        .post("/api/images", &build_request(targets, template, ""))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    format!("/api/target_images/{}", reply.ids("target_image")[0])
}

/// Cancels a running build and waits until it says CANCELLED.
pub(crate) async fn cancel(server: &Server, ti: &str) {
    let cancel = server.post(&format!("{ti}/cancel"), "").await;
    assert!((200..300).contains(&cancel.status), "{}", cancel.body);
    assert_eq!(
        server
            .wait_terminal_within(ti, BUILD_LIMIT)
            .await
            .text("status"),
        "CANCELLED"
    );
}

/// Streams a target image to a file.
pub(crate) async fn download_to(server: &Server, ti: &str, path: &Path) {
    use tokio::io::AsyncWriteExt;
    let mut response = server
        .request(reqwest::Method::GET, &format!("{ti}/data"))
        .basic_auth("admin", Some(crate::harness::PASSWORD))
        .send()
        .await
        .expect("download");
    assert_eq!(response.status().as_u16(), 200);
    let mut file = tokio::fs::File::create(path).await.expect("image file");
    while let Some(chunk) = response.chunk().await.expect("chunk") {
        file.write_all(&chunk).await.expect("write");
    }
    file.flush().await.expect("flush");
}

/// A file of the image's root filesystem (the second partition, after 1 MiB and the
/// 256 MiB EFI system partition), read with debugfs: no mount needed.
pub(crate) fn read_in_image(image: &Path, path: &str) -> String {
    let output = std::process::Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(format!("{}?offset={}", image.display(), 257u64 << 20))
        .output()
        .expect("debugfs (e2fsprogs)");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The firmware a boot uses: OVMF, or qemu's own BIOS (SeaBIOS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Firmware {
    Uefi,
    Bios,
}

/// Boots the image under qemu (TCG, no network, the disk read-only) until the
/// serial console shows `marker`; answers the console's output.
fn boot_until(image: &Path, firmware: Firmware, marker: &str, limit: Duration) -> String {
    let dir = image.parent().expect("dir");
    let console = dir.join(format!("console-{firmware:?}.log"));
    let mut qemu = std::process::Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-cpu", "max", "-machine", "q35"])
        .args(["-smp", "1", "-m", "1024", "-nodefaults", "-display", "none"])
        .args(["-no-reboot", "-nic", "none"]);
    if firmware == Firmware::Uefi {
        let vars = dir.join("vars.fd");
        std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars).expect("OVMF (package ovmf)");
        qemu.arg("-drive")
            .arg("if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd")
            .arg("-drive")
            .arg(format!("if=pflash,format=raw,file={}", vars.display()));
    }
    let mut qemu = qemu
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,snapshot=on",
            image.display()
        ))
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 (package qemu-system-x86)");
    let deadline = Instant::now() + limit;
    let output = loop {
        let output =
            String::from_utf8_lossy(&std::fs::read(&console).unwrap_or_default()).into_owned();
        if output.contains(marker) || Instant::now() > deadline {
            break output;
        }
        if let Ok(Some(status)) = qemu.try_wait() {
            panic!("{firmware:?}: qemu stopped ({status}) before the marker:\n{output}");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let _ = qemu.kill();
    let _ = qemu.wait();
    output
}

/// Processes whose command line holds `words`, other than this test's own.
pub(crate) fn processes_running(words: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(words) {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

fn is_empty_dir(path: &Path) -> bool {
    std::fs::read_dir(path)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
}

#[tokio::test]
async fn a_debian_template_builds_an_image_that_boots_with_its_package_file_and_commands() {
    let _turn = TURN.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = start(&data);
    // A service of the host's, as an emulator's port would be: a command must not reach it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let port = listener.local_addr().expect("port").port();
    let key = data.join("credentials.key");
    assert!(
        key.exists(),
        "the server keeps its credentials key at {}",
        key.display()
    );
    let probe = format!(
        "bash -c 'if (echo > /dev/tcp/127.0.0.1/{port}) 2>/dev/null; then echo network=reached; else echo network=refused; fi' > /etc/isolation\n\
         if [ -e {key} ]; then echo key=visible >> /etc/isolation; else echo key=absent >> /etc/isolation; fi",
        key = key.display()
    );
    // A unit that prints what the test looks for on the serial console at boot.
    let extra = format!(
        "<packages><package name='hello'/></packages>\
         <files><file name='/etc/conductor-file'>from-a-file</file>\
         <file name='/etc/systemd/system/marker.service'>[Unit]\nAfter=multi-user.target\n\
         [Service]\nType=oneshot\nExecStart=/bin/sh /usr/local/bin/marker\n\
         [Install]\nWantedBy=multi-user.target\n</file>\
         <file name='/usr/local/bin/marker'>echo \"CONDUCTOR-MARKER $(cat /etc/conductor-file) \
         $(cat /etc/isolation | tr '\\n' ' ') pw=$(grep ^root: /etc/shadow | cut -c6-8) \
         hello=$(hello)\" > /dev/ttyS0\n</file></files>\
         <commands><command name='probe'>{probe}</command>\
         <command name='marker'>systemctl enable marker.service</command></commands>"
    );
    let template = debian("booting", &machine_mirror(), &extra);
    let ti = build(&server, "mock", &template).await;
    let done = server.wait_terminal_within(&ti, BUILD_LIMIT).await;
    assert_eq!(done.text("status"), "COMPLETE", "{}", done.body);
    assert!(
        done.text("activity").contains("Debian 12 (bookworm)"),
        "{}",
        done.body
    );

    // The build log is kept and served: every step's command line and output.
    let log = server.get(&format!("{ti}/log")).await;
    assert_eq!(log.status, 200);
    assert!(
        log.body.contains(" mkfs.ext4 -q -F -L root"),
        "{}",
        log.body
    );
    assert!(
        log.body.contains("the template's command 'marker'"),
        "{}",
        log.body
    );

    let image = dir.path().join("image.raw");
    download_to(&server, &ti, &image).await;
    assert_eq!(
        read_in_image(&image, "/etc/machine-id"),
        "",
        "an empty machine-id"
    );
    assert_eq!(
        read_in_image(&image, "/etc/cloud/cloud.cfg"),
        "",
        "the mock target boots nothing and needs no cloud-init"
    );
    let fstab = read_in_image(&image, "/etc/fstab");
    assert!(fstab.contains("LABEL=root / ext4"), "{fstab}");
    let shadow = read_in_image(&image, "/etc/shadow");
    assert!(
        shadow.lines().any(|l| l.starts_with("root:$6$")) && !shadow.contains("s3cret-"),
        "root's password is stored hashed: {shadow}"
    );

    // The same disk boots under UEFI (systemd-boot) and BIOS (syslinux).
    for firmware in [Firmware::Uefi, Firmware::Bios] {
        let console = boot_until(
            &image,
            firmware,
            "CONDUCTOR-MARKER",
            Duration::from_secs(600),
        );
        let line = console
            .lines()
            .find(|l| l.starts_with("CONDUCTOR-MARKER"))
            .unwrap_or_else(|| panic!("{firmware:?}: no marker on the console:\n{console}"));
        assert!(line.contains("from-a-file"), "the template's file: {line}");
        assert!(line.contains("hello=Hello, world!"), "the package: {line}");
        assert!(line.contains("pw=$6$"), "{line}");
        assert!(
            line.contains("network=refused"),
            "a command reached the host: {line}"
        );
        assert!(
            line.contains("key=absent"),
            "a command saw the server's files: {line}"
        );
    }
    drop(listener);
}

#[tokio::test]
async fn a_missing_package_a_failing_command_and_an_unallowed_mirror_say_why() {
    let _turn = TURN.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(&dir.path().join("data"));
    let mirror = machine_mirror();

    let refused = server
        .post(
            "/api/images",
            &build_request(
                "mock",
                &debian("elsewhere", "http://mirror.invalid/debian", ""),
                "",
            ),
        )
        .await;
    let message = refused.assert_error(400, "ParameterDataIncorrect");
    assert!(
        message.contains("not a mirror this server installs from"),
        "{message}"
    );

    let missing = debian(
        "missing",
        &mirror,
        "<packages><package name='conductor-no-such-package'/></packages>",
    );
    let ti = build(&server, "mock", &missing).await;
    let failed = server.wait_terminal_within(&ti, BUILD_LIMIT).await;
    assert_eq!(failed.text("status"), "FAILED", "{}", failed.body);
    assert!(
        failed
            .text("error")
            .contains("no such package on the mirror: conductor-no-such-package"),
        "{}",
        failed.body
    );

    let breaking = debian(
        "breaking",
        &mirror,
        "<commands><command name='breaks'>echo about to fail\nexit 3</command></commands>",
    );
    let ti = build(&server, "mock", &breaking).await;
    let failed = server.wait_terminal_within(&ti, BUILD_LIMIT).await;
    assert_eq!(failed.text("status"), "FAILED", "{}", failed.body);
    let error = failed.text("error");
    assert!(
        error.contains("the template's command 'breaks' failed (exit status 3)"),
        "{error}"
    );
    assert!(error.contains("about to fail"), "{error}");
}

#[tokio::test]
async fn cancel_during_an_install_leaves_no_process_and_no_work_directory() {
    let _turn = TURN.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = start(&data);
    let template = debian(
        "cancelled",
        &machine_mirror(),
        "<commands><command name='long'>sleep 6011</command></commands>",
    );
    let ti = build(&server, "mock", &template).await;
    server
        .wait_for_activity(&ti, "command 'long'", BUILD_LIMIT)
        .await;
    // The activity is set just before the command starts.
    eventually(Duration::from_secs(30), async || {
        if processes_running("sleep 6011").is_empty() {
            Err("the command is not running".to_owned())
        } else {
            Ok(())
        }
    })
    .await;
    cancel(&server, &ti).await;
    eventually(Duration::from_secs(10), async || {
        let left = processes_running("sleep 6011");
        if left.is_empty() && is_empty_dir(&data.join("os-work")) {
            Ok(())
        } else {
            Err(format!(
                "left behind: {left:?}, work: {:?}",
                std::fs::read_dir(data.join("os-work")).map(|d| d.count())
            ))
        }
    })
    .await;
}

#[tokio::test]
async fn a_build_killed_during_its_install_runs_again_at_the_next_start_and_completes() {
    let _turn = TURN.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = start(&data);
    let template = debian(
        "crashed",
        &machine_mirror(),
        "<commands><command name='slow'>sleep 7.0013; echo slept &gt; /etc/slept</command></commands>",
    );
    let ti = build(&server, "mock", &template).await;
    server
        .wait_for_activity(&ti, "command 'slow'", BUILD_LIMIT)
        .await;
    server.kill();
    // Nothing the install started outlives the server.
    eventually(Duration::from_secs(10), async || {
        let left = processes_running("sleep 7.0013");
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("left behind: {left:?}"))
        }
    })
    .await;
    let server = start(&data);
    let done = server.wait_terminal_within(&ti, BUILD_LIMIT).await;
    assert_eq!(done.text("status"), "COMPLETE", "{}", done.body);
    assert!(is_empty_dir(&data.join("os-work")));
    let log = server.get(&format!("{ti}/log")).await.body;
    assert!(log.contains("attempt 2"), "{log}");
}

/// One install serves every target of a build: ec2 (raw) and openstack (qcow2) images
/// hold the same disk, and each cloud, pushed to, holds the image's bytes.
#[tokio::test]
async fn one_install_serves_ec2_and_openstack_and_each_cloud_holds_the_image() {
    use sha2::{Digest, Sha512};
    let _turn = TURN.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let server_log = dir.path().join("server.log");
    let s = crate::openstack::setup_logging(&["--os-cache", &cache()], Some(&server_log));
    let server = &s.server;
    let openstack = crate::openstack::ready_account(&s, "os-debian", true).await;
    let (_, ec2) = crate::ec2::ready_account(server, "ec2-debian").await;
    let template = debian(
        "clouds",
        &machine_mirror(),
        "<commands><command name='mark'>echo clouds &gt; /etc/clouds</command></commands>",
    );
    let reply = server
        .post(
            "/api/images",
            &build_request("ec2,openstack", &template, ""),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let mut built = Vec::new();
    for id in reply.ids("target_image") {
        let ti = format!("/api/target_images/{id}");
        let done = server.wait_terminal_within(&ti, BUILD_LIMIT).await;
        assert_eq!(done.text("status"), "COMPLETE", "{}", done.body);
        let log = server.get(&format!("{ti}/log")).await.body;
        built.push((done.text("target"), id, log));
    }
    built.sort();
    let reused = built
        .iter()
        .filter(|(_, _, log)| log.contains("reusing the disk"))
        .count();
    assert_eq!(reused, 1, "one target made the disk, the other reused it");
    let disk_of = |log: &str| {
        log.lines()
            .find_map(|l| {
                l.strip_prefix("made the disk ")
                    .or_else(|| l.strip_prefix("reusing the disk "))
            })
            .map(|k| k.chars().take(64).collect::<String>())
    };
    assert!(disk_of(&built[0].2).is_some(), "{}", built[0].2);
    assert_eq!(disk_of(&built[0].2), disk_of(&built[1].2), "the same disk");

    let (ec2_ti, os_ti) = (&built[0].1, &built[1].1);
    let raw = dir.path().join("ec2.raw");
    let qcow2 = dir.path().join("openstack.qcow2");
    download_to(server, &format!("/api/target_images/{ec2_ti}"), &raw).await;
    download_to(server, &format!("/api/target_images/{os_ti}"), &qcow2).await;
    let (same, text) = crate::disks::qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        raw.to_str().expect("utf-8"),
        qcow2.to_str().expect("utf-8"),
    ]);
    assert!(same, "{text}");
    // Both clouds need cloud-init (and sshd) at first boot: the install holds them.
    for (_, _, log) in &built {
        assert!(
            log.contains("the ec2 target needs cloud-init in the image"),
            "the log names what the targets need: {log}"
        );
    }
    let cloud_cfg = read_in_image(&raw, "/etc/cloud/cloud.cfg");
    assert!(cloud_cfg.contains("cloud_init_modules"), "{cloud_cfg}");
    assert!(
        read_in_image(&raw, "/lib/systemd/system/ssh.service").contains("sshd"),
        "openssh-server is installed"
    );

    // EC2: the AMI's snapshot holds exactly the image's non-zero blocks.
    let pi = crate::ec2::push(server, ec2_ti, &ec2).await;
    let done = server
        .wait_terminal_within(&format!("/api/provider_images/{pi}"), BUILD_LIMIT)
        .await;
    assert_eq!(done.text("status"), "COMPLETE", "{}", done.body);
    // The image boots with UEFI and BIOS, so the AMI may use either.
    let logged = std::fs::read_to_string(&server_log).expect("the server's log");
    assert!(
        logged.contains("with boot mode uefi-preferred"),
        "the plugin registers the AMI as the image boots"
    );
    let snapshot = crate::ec2::snapshot_of(&done.text("target_identifier")).await;
    let image = std::fs::File::open(&raw).expect("image");
    let size = image.metadata().expect("size").len();
    crate::ec2::assert_snapshot_holds(&snapshot, size, |start, data| {
        use std::os::unix::fs::FileExt;
        image.read_exact_at(data, start).expect("read");
    })
    .await;

    // OpenStack: Glance's image is ours, byte for byte.
    let pi = crate::ec2::push(server, os_ti, &openstack).await;
    let done = server
        .wait_terminal_within(&format!("/api/provider_images/{pi}"), BUILD_LIMIT)
        .await;
    assert_eq!(done.text("status"), "COMPLETE", "{}", done.body);
    let record = s.cloud.image(&done.text("target_identifier")).await;
    assert_eq!(record["status"], "active", "{record}");
    // What Nova needs to start it: UEFI on q35, and the OS it holds.
    assert_eq!(record["hw_firmware_type"], "uefi", "{record}");
    assert_eq!(record["hw_machine_type"], "q35", "{record}");
    assert_eq!(record["os_distro"], "debian", "{record}");
    assert_eq!(record["os_version"], "12", "{record}");
    let ours: String = Sha512::digest(std::fs::read(&qcow2).expect("qcow2"))
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(record["os_hash_value"], ours.as_str(), "{record}");
}
