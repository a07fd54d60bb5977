//! The requests today's aeolus-cli sends (tests/fixtures/aeolus-cli-requests), sent
//! as recorded, with the recorded ids swapped for ids of records this server made, and
//! the replies checked for the shapes the client needs
//! (../shared/reference/aeolus-cli-client.md §5).

use crate::harness::{Reply, Server, build_request, template};
use std::collections::HashMap;

const FIXTURES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/aeolus-cli-requests"
);

struct Recorded {
    file: String,
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: String,
    status: u16,
}

fn recorded() -> Vec<Recorded> {
    let mut files: Vec<_> = std::fs::read_dir(FIXTURES)
        .expect("tests/fixtures/aeolus-cli-requests is readable")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    let mut all = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read fixture");
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            let headers = v["headers"]
                .as_object()
                .expect("headers")
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
                .collect();
            all.push(Recorded {
                file: file
                    .file_name()
                    .expect("name")
                    .to_string_lossy()
                    .into_owned(),
                method: v["method"].as_str().expect("method").to_owned(),
                path: v["path"].as_str().expect("path").to_owned(),
                headers,
                body: v["body"].as_str().unwrap_or("").to_owned(),
                status: v["status"].as_u64().expect("status") as u16,
            });
        }
    }
    all
}

async fn build(server: &Server, targets: &str) -> (String, String, Vec<String>) {
    let reply = server
        .post("/api/images", &build_request(targets, &template("cli"), ""))
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
        server
            .wait_terminal(&format!("/api/target_images/{ti}"))
            .await;
    }
    (image, build, tis)
}

async fn push(server: &Server, ti: &str) -> String {
    let reply = server
        .post("/api/provider_images", &format!("<provider_image><provider_account>mock-acc</provider_account><target_image_id>{ti}</target_image_id></provider_image>"))
        .await;
    let pi = reply.ids("provider_image")[0].clone();
    server
        .wait_terminal(&format!("/api/provider_images/{pi}"))
        .await;
    pi
}

fn children<'a>(reply: &'a roxmltree::Document<'a>, name: &str) -> Vec<roxmltree::Node<'a, 'a>> {
    reply
        .descendants()
        .filter(|n| n.has_tag_name(name))
        .collect()
}

fn check_shape(r: &Recorded, reply: &Reply, accounts_providers: &[String]) {
    let what = format!("{} {} {}", r.file, r.method, r.path);
    assert!(!(300..400).contains(&reply.status), "{what}: redirected");
    if reply.status == 401 {
        return;
    }
    let doc = reply.doc();
    let root = doc.root_element().tag_name().name().to_owned();
    // Every <status> a reply carries is non-empty.
    for status in children(&doc, "status") {
        assert!(
            !status.text().unwrap_or("").trim().is_empty(),
            "{what}: empty <status>"
        );
    }
    match r.file.as_str() {
        f if f < "11" => {
            // Lists: the plural root, with singular children.
            assert!(root.ends_with('s'), "{what}: root {root}");
            let singular = root.trim_end_matches('s');
            for child in doc.root_element().children().filter(|n| n.is_element()) {
                assert_eq!(child.tag_name().name(), singular, "{what}");
            }
            if root == "provider_images" {
                for p in children(&doc, "provider") {
                    let name = p.text().unwrap_or("").to_owned();
                    assert!(
                        accounts_providers.contains(&name),
                        "{what}: provider {name} has no account"
                    );
                }
            }
        }
        f if f < "14" => {
            assert_eq!(root, "image", "{what}");
            assert_eq!(children(&doc, "build").len(), 1, "{what}");
            assert!(!children(&doc, "target_image").is_empty(), "{what}");
        }
        f if f < "17" => {
            assert_eq!(root, "provider_images", "{what}");
            let labels = r
                .body
                .split("<provider_account>")
                .nth(1)
                .and_then(|s| s.split('<').next())
                .unwrap_or("");
            assert_eq!(
                children(&doc, "provider_image").len(),
                labels.split(',').count(),
                "{what}"
            );
        }
        f if f < "19" => {
            assert!(!children(&doc, "status").is_empty(), "{what}: no <status>");
        }
        f if f < "24" => {
            // The client crashes on an empty-tag or missing <content>.
            assert!(reply.body.contains("<content>\n"), "{what}: {}", reply.body);
        }
        f if f < "25" => {
            assert_eq!(reply.text("code"), "ImageNotFound", "{what}");
        }
        _ => {
            assert_eq!(children(&doc, "build").len(), 1, "{what}");
            assert_eq!(children(&doc, "target_image").len(), 1, "{what}");
            assert_eq!(children(&doc, "provider_image").len(), 1, "{what}");
        }
    }
}

#[tokio::test]
async fn the_requests_of_todays_aeolus_cli_get_the_replies_it_needs() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The recordings authenticate as admin:password.
    let server = Server::start_as(
        dir.path(),
        &["--plugins", crate::harness::TEST_PLUGINS],
        "password",
    );

    // The world the recordings assume: an ec2-acc account whose provider holds
    // ami-5592553c. No emulator can be made to hold an AMI of a given id, so the mock
    // plugin stands in for ec2 here; tests/api/ec2.rs tests the ec2 plugin itself.
    let provider = server
        .post("/api/providers", "<provider><name>ec2-us-east-1</name><provider_type id='mock'/><settings><setting name='images'>ami-5592553c</setting></settings></provider>")
        .await;
    assert_eq!(provider.status, 201, "{}", provider.body);
    let pid = provider.ids("provider")[0].clone();
    let account = server
        .post(&format!("/api/providers/{pid}/provider_accounts"), "<provider_account><label>ec2-acc</label><credentials><username>u</username><password>p</password></credentials></provider_account>")
        .await;
    assert_eq!(account.status, 201, "{}", account.body);

    let (image, build_id, tis) = build(&server, "mock").await;
    let pi = push(&server, &tis[0]).await;
    let (deleted_image, _, deleted_tis) = build(&server, "mock").await;
    push(&server, &deleted_tis[0]).await;
    let (bare_image, _, _) = build(&server, "mock").await;
    let (_, deleted_build, _) = build(&server, "mock").await;
    let (_, _, lone_tis) = build(&server, "mock").await;
    let (_, _, pushed_tis) = build(&server, "mock").await;
    let deleted_pi = push(&server, &pushed_tis[0]).await;

    let ids: HashMap<&str, &str> = HashMap::from([
        ("7e6d409b-11d5-446d-99e8-656deb4f28ca", image.as_str()),
        ("3eeb6c8f-9dd0-4a5b-bd13-e96daef435f9", build_id.as_str()),
        ("d7cab2b2-eeb8-459e-b739-a1844a5d5a62", tis[0].as_str()),
        ("b4b340dc-0efc-4830-8c59-411c9a3e0aba", image.as_str()),
        ("8f4a6c21-ea48-4e9a-9be9-4c6a5ea7e5ba", build_id.as_str()),
        ("7c8b9d0c-2e84-4b6c-9e6d-5d1e9f9b3a11", tis[0].as_str()),
        ("3a105ed3-20e6-410a-815d-f0ac756f2473", tis[0].as_str()),
        ("1ad1ca1d-d6d8-4892-a255-c4d49c03ed9b", pi.as_str()),
        (
            "55bc53d9-7310-4cff-8c26-99823d79dfa6",
            deleted_image.as_str(),
        ),
        ("5f32b61f-1aad-495e-8ad7-45783ee802c5", bare_image.as_str()),
        (
            "becc269c-8a02-4f6a-9132-2af3cb580b2b",
            deleted_build.as_str(),
        ),
        ("ef7ee9be-5f3c-4695-969a-7c3fa996c048", lone_tis[0].as_str()),
        ("20bb51cb-a289-4331-9e56-26196df62ca8", deleted_pi.as_str()),
    ]);
    let swap = |text: &str| {
        let mut out = text.to_owned();
        for (old, new) in &ids {
            out = out.replace(old, new);
        }
        out
    };
    let accounts = server.get("/api/provider_accounts.xml").await;
    let providers: Vec<String> = accounts
        .doc()
        .descendants()
        .filter(|n| n.has_tag_name("provider"))
        .map(|n| n.text().unwrap_or("").to_owned())
        .collect();

    let mut sent = 0;
    for r in recorded() {
        // Fetching a template from a URL is the client's own business.
        if !r.path.starts_with("/conductor/api") {
            continue;
        }
        let mut body = swap(&r.body);
        // The stand-in world has no ec2 account: `-T mock,ec2` builds mock and testbed,
        // and `-T ec2` builds mock. Everything else of these requests is as recorded.
        body = body
            .replace(
                "<targets>mock,ec2</targets>",
                "<targets>mock,testbed</targets>",
            )
            .replace("<targets>ec2</targets>", "<targets>mock</targets>");
        let method = reqwest::Method::from_bytes(r.method.as_bytes()).expect("method");
        let mut request = server.request(method, &swap(&r.path));
        for (name, value) in &r.headers {
            if !["Host", "Content-Length", "Connection"].contains(&name.as_str()) {
                request = request.header(name.as_str(), value.as_str());
            }
        }
        if !body.is_empty() {
            request = request.body(body);
        }
        let reply = server.raw(request).await;
        // No recording answered `list --environments`; a real reply is 200.
        let expected = if r.file.starts_with("10-") {
            200
        } else {
            r.status
        };
        assert_eq!(
            reply.status, expected,
            "{} {} {}: {}",
            r.file, r.method, r.path, reply.body
        );
        check_shape(&r, &reply, &providers);
        sent += 1;
    }
    assert_eq!(sent, 28);
}
