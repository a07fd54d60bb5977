//! Real disk images: base disks (blank, or named by URL, raw or qcow2), every format a
//! plugin writes judged by qemu-img, the blob store, and downloads.

use crate::harness::{Server, TEST_PLUGINS, blob_name, build_request, sparse_digest};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn template(name: &str, size: &str) -> String {
    format!(
        "<template><name>{name}</name><os><name>Fedora</name><version>14</version><arch>x86_64</arch>\
         <install type='url'><url>http://example.org/os/</url></install></os><disk><size>{size}</size></disk></template>"
    )
}

pub(crate) fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is installed (tests/run.sh installs qemu-utils)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A sparse raw disk with data scattered over it: unaligned, across a 64 KiB cluster
/// boundary, across a 512 MiB boundary, and in the last bytes.
pub(crate) fn scattered_disk(path: &Path, size: u64) {
    let file = std::fs::File::create(path).expect("create disk");
    file.set_len(size).expect("size");
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    };
    for (offset, length) in [
        (4096, 8192),
        ((1 << 20) + 12345, 100_000),
        ((512 << 20) - 3000, 70_000),
        (size - 777, 777),
    ] {
        file.write_all_at(&noise(length), offset)
            .expect("write data");
    }
    file.sync_all().expect("sync");
}

fn digest_of(path: &Path) -> String {
    sparse_digest(&std::fs::read(path).expect("read"))
}

struct Setup {
    _dir: tempfile::TempDir,
    data: PathBuf,
    import: PathBuf,
    server: Server,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let import = dir.path().join("import");
    std::fs::create_dir_all(&import).expect("import dir");
    let server = Server::start_with(
        &data,
        &[
            "--plugins",
            TEST_PLUGINS,
            "--import-dir",
            import.to_str().expect("utf-8"),
            // The qcow2-by-URL test serves its image from 127.0.0.1, which only an
            // operator's allow list opens to base image downloads.
            "--fetch-allow",
            "127.0.0.1",
        ],
    );
    Setup {
        _dir: dir,
        data,
        import,
        server,
    }
}

/// Builds with mock in `format` from an optional base image URL; returns the target
/// image id once COMPLETE.
async fn build(server: &Server, format: &str, base: Option<&str>, size: &str) -> String {
    let extra = format!(
        "<parameters><parameter name='format'>{format}</parameter></parameters>{}",
        base.map(|u| format!("<base_image>{u}</base_image>"))
            .unwrap_or_default()
    );
    let reply = server
        .post(
            "/api/images",
            &build_request("mock", &template("disk", size), &extra),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let ti = reply.ids("target_image")[0].clone();
    let done = server
        .wait_terminal(&format!("/api/target_images/{ti}"))
        .await;
    assert_eq!(done.text("status"), "COMPLETE", "{}", done.body);
    assert_eq!(done.text("format"), format);
    ti
}

#[tokio::test]
async fn every_format_holds_the_same_data_as_its_base_disk() {
    let s = setup();
    let scattered = s.import.join("scattered.raw");
    scattered_disk(&scattered, 600 << 20);
    let blank = s.import.join("blank.raw");
    std::fs::File::create(&blank)
        .expect("blank")
        .set_len(1 << 30)
        .expect("size");
    for format in ["raw", "qcow2", "vmdk"] {
        for (base, url) in [
            // A blank base disk made by the server from the template's size (1 GiB)...
            (&blank, None),
            // ...and a disk with data, named by a file:// URL in the import directory.
            (&scattered, Some(format!("file://{}", scattered.display()))),
        ] {
            let ti = build(&s.server, format, url.as_deref(), "1").await;
            let out = s.import.join(format!("out-{ti}.{format}"));
            std::fs::write(&out, s.server.download(&ti).await).expect("write download");
            let out = out.to_str().expect("utf-8");
            if format != "raw" {
                let (ok, text) = qemu_img(&["check", "-f", format, out]);
                assert!(ok, "qemu-img check {format}: {text}");
            }
            let (ok, text) = qemu_img(&[
                "compare",
                "-f",
                "raw",
                "-F",
                format,
                base.to_str().expect("utf-8"),
                out,
            ]);
            assert!(ok, "qemu-img compare {format} from {url:?}: {text}");
        }
    }
}

/// Serves one file over HTTP on loopback, for as long as the returned task lives.
async fn serve_file(path: PathBuf) -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/base.qcow2", listener.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut request = vec![0u8; 4096];
            let _ = stream.read(&mut request).await;
            let body = tokio::fs::read(&path).await.expect("read served file");
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(&body).await;
        }
    });
    (url, task)
}

#[tokio::test]
async fn a_qcow2_base_disk_given_by_url_is_read_correctly() {
    let s = setup();
    let raw = s.import.join("source.raw");
    scattered_disk(&raw, 600 << 20);
    // Compressed clusters, so the reader's inflate path is exercised too.
    let qcow2 = s.import.join("source.qcow2");
    let (ok, text) = qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().expect("utf-8"),
        qcow2.to_str().expect("utf-8"),
    ]);
    assert!(ok, "{text}");
    let (url, _server) = serve_file(qcow2.clone()).await;
    let ti = build(&s.server, "raw", Some(&url), "1").await;
    let shown = s.server.get(&format!("/api/target_images/{ti}")).await;
    let doc = shown.doc();
    let base = doc
        .descendants()
        .find(|n| n.has_tag_name("base_image"))
        .expect("base_image");
    assert_eq!(base.attribute("digest"), Some(digest_of(&qcow2).as_str()));
    assert_eq!(base.text(), Some(url.as_str()));
    let out = s.import.join("out.raw");
    std::fs::write(&out, s.server.download(&ti).await).expect("write download");
    let (ok, text) = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        raw.to_str().expect("utf-8"),
        out.to_str().expect("utf-8"),
    ]);
    assert!(ok, "{text}");
}

#[tokio::test]
async fn blobs_are_content_addressed_stored_once_collected_and_served_by_range() {
    let s = setup();
    let first = build(&s.server, "qcow2", None, "1").await;
    let second = build(&s.server, "qcow2", None, "1").await;
    let blobs_dir = s.data.join("blobs");
    let blobs: Vec<PathBuf> = std::fs::read_dir(&blobs_dir)
        .expect("blobs")
        .map(|e| e.expect("entry").path())
        .collect();
    // Identical images are stored once, under the digest of their bytes.
    assert_eq!(blobs.len(), 1);
    let name = blobs[0]
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert_eq!(blob_name(&digest_of(&blobs[0])), name);
    let shown = s.server.get(&format!("/api/target_images/{first}")).await;
    let doc = shown.doc();
    let data = doc
        .descendants()
        .find(|n| n.has_tag_name("data"))
        .expect("data link");
    assert_eq!(
        data.attribute("digest"),
        Some(digest_of(&blobs[0]).as_str())
    );
    // The plain SHA-256 is shown only for bodies stored before the sparse digest.
    assert_eq!(data.attribute("sha256"), None);

    // Ranges.
    let whole = std::fs::read(&blobs[0]).expect("blob");
    let ranged = s
        .server
        .request(
            reqwest::Method::GET,
            &format!("/api/target_images/{first}/data"),
        )
        .basic_auth("admin", Some(crate::harness::PASSWORD))
        .header("Range", "bytes=100-199")
        .send()
        .await
        .expect("range");
    assert_eq!(ranged.status().as_u16(), 206);
    assert_eq!(
        ranged
            .headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok()),
        Some(format!("bytes 100-199/{}", whole.len()).as_str())
    );
    assert_eq!(
        ranged.bytes().await.expect("body").as_ref(),
        &whole[100..200]
    );
    let beyond = s
        .server
        .request(
            reqwest::Method::GET,
            &format!("/api/target_images/{first}/data"),
        )
        .basic_auth("admin", Some(crate::harness::PASSWORD))
        .header("Range", format!("bytes={}-", whole.len()))
        .send()
        .await
        .expect("range");
    assert_eq!(beyond.status().as_u16(), 416);

    // A blob stays while any target image uses it, and goes with the last one.
    assert_eq!(
        s.server
            .delete(&format!("/api/target_images/{first}"))
            .await
            .status,
        200
    );
    assert!(blobs[0].exists());
    assert_eq!(
        s.server
            .delete(&format!("/api/target_images/{second}"))
            .await
            .status,
        200
    );
    assert!(!blobs[0].exists());
    s.server
        .get(&format!("/api/target_images/{first}/data"))
        .await
        .assert_error(404, "TargetImageNotFound");
}

#[tokio::test]
async fn base_images_outside_the_import_directory_are_refused() {
    let s = setup();
    let reply = s
        .server
        .post(
            "/api/images",
            &build_request(
                "mock",
                &template("x", "1"),
                "<base_image>file:///etc/passwd</base_image>",
            ),
        )
        .await;
    let message = reply.assert_error(400, "ParameterDataIncorrect");
    assert!(
        message.contains("is not a file in the import directory"),
        "{message}"
    );
    let reply = s
        .server
        .post(
            "/api/images",
            &build_request(
                "mock",
                &template("x", "1"),
                "<base_image>ftp://host/x</base_image>",
            ),
        )
        .await;
    reply.assert_error(400, "ParameterDataIncorrect");
}

#[tokio::test]
async fn a_killed_build_leaves_no_blob_under_a_final_name() {
    let s = setup();
    let source = s.import.join("data.raw");
    scattered_disk(&source, 600 << 20);
    let extra = format!(
        "<parameters><parameter name='format'>qcow2</parameter><parameter name='delay_ms'>5000</parameter></parameters><base_image>file://{}</base_image>",
        source.display()
    );
    let reply = s
        .server
        .post(
            "/api/images",
            &build_request("mock", &template("k", "1"), &extra),
        )
        .await;
    let ti = reply.ids("target_image")[0].clone();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let now = s.server.get(&format!("/api/target_images/{ti}")).await;
        if now.text("status") == "BUILDING" && now.text("percent_complete") != "0" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never started: {}",
            now.body
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let Setup {
        _dir,
        data,
        import,
        server,
    } = s;
    server.kill();
    let blobs_dir = data.join("blobs");
    assert_eq!(std::fs::read_dir(&blobs_dir).expect("blobs").count(), 0);

    let server = Server::start_with(
        &data,
        &[
            "--plugins",
            TEST_PLUGINS,
            "--import-dir",
            import.to_str().expect("utf-8"),
        ],
    );
    let done = server
        .wait_terminal(&format!("/api/target_images/{ti}"))
        .await;
    assert_eq!(done.text("status"), "COMPLETE", "{}", done.body);
    let blobs: Vec<PathBuf> = std::fs::read_dir(&blobs_dir)
        .expect("blobs")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(blobs.len(), 1);
    assert_eq!(
        blob_name(&digest_of(&blobs[0])),
        blobs[0].file_name().expect("name").to_string_lossy()
    );
    assert_eq!(
        std::fs::read_dir(data.join("work")).expect("work").count(),
        0
    );
    let (ok, text) = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        source.to_str().expect("utf-8"),
        blobs[0].to_str().expect("utf-8"),
    ]);
    assert!(ok, "{text}");
}
