//! Hostile request bodies against every route that reads XML: entity-expansion and
//! external-entity attacks, deep nesting, oversized text and lists, bytes that are not
//! UTF-8, and empty bodies. Each must be refused with the route's 4xx in the route's
//! documented error format, promptly, and leave every collection as it was.
//!
//! Each route's body has a slot for the hostile part inside an otherwise usable request,
//! and a control request with a harmless slot shows which answer the route gives once
//! the body is read; so a refusal is known to come from the hostile part, not from a
//! request that was broken anyway.

mod fuzz;

use crate::harness::{PASSWORD, Reply, Server, template};
use std::time::Duration;

/// Every reply here takes milliseconds; the margin is for a loaded CI machine, and a
/// parser stuck in quadratic work (seconds per request before the caps) still fails.
const DEADLINE: Duration = Duration::from_secs(10);
const UNKNOWN_UUID: &str = "0191d2a6-9a5e-7cc4-9d0a-1f5a2b3c4d5e";

/// How a route reports a failure.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Format {
    /// `<error><code>CODE</code><message/></error>`.
    Error(&'static str),
    /// 422 `<errors><error><message/></error>…</errors>`.
    Errors,
    /// No body at all (hooks, as Conductor answered).
    Empty,
}

/// A route that reads an XML body.
struct Route {
    label: &'static str,
    method: reqwest::Method,
    path: &'static str,
    /// The body with `{prolog}` where a DTD goes and `{slot}` where the hostile part
    /// goes.
    body: String,
    /// What the control request (a harmless slot, no prolog) gets: status and a
    /// fragment of the body.
    control: (u16, &'static str),
    /// How the route answers a body the XML parser refuses: status, format, and the
    /// message it gives when that message does not name the problem.
    refused: (u16, Format, Option<&'static str>),
}

/// The hostile parts.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Attack {
    BillionLaughs,
    ExternalEntity,
    DeepNesting,
    HugeText,
    HugeList,
    TooManyNodes,
    TooManyAttributes,
    ControlCharacter,
    NotUtf8,
    Empty,
}

const ATTACKS: [Attack; 10] = [
    Attack::BillionLaughs,
    Attack::ExternalEntity,
    Attack::DeepNesting,
    Attack::HugeText,
    Attack::HugeList,
    Attack::TooManyNodes,
    Attack::TooManyAttributes,
    Attack::ControlCharacter,
    Attack::NotUtf8,
    Attack::Empty,
];

/// The classic: ten entities, each ten of the one before, 10⁹ "lol"s if expanded.
fn billion_laughs() -> String {
    let mut dtd = String::from("<!DOCTYPE lolz [<!ENTITY lol0 \"lol\">");
    for level in 1..10 {
        let previous = format!("&lol{};", level - 1).repeat(10);
        dtd.push_str(&format!("<!ENTITY lol{level} \"{previous}\">"));
    }
    dtd + "]>"
}

impl Attack {
    /// The DTD that goes before the root, and the part that goes in the slot.
    fn parts(self) -> (String, Vec<u8>) {
        let slot = |s: String| (String::new(), s.into_bytes());
        match self {
            Attack::BillionLaughs => (billion_laughs(), b"&lol9;".to_vec()),
            Attack::ExternalEntity => (
                "<!DOCTYPE r [<!ENTITY x SYSTEM \"file:///etc/passwd\">]>".to_owned(),
                b"&x;".to_vec(),
            ),
            Attack::DeepNesting => slot("<a>".repeat(10_000) + &"</a>".repeat(10_000)),
            Attack::HugeText => slot("x".repeat(2 << 20)),
            Attack::HugeList => slot("<parameter name='p'>v</parameter>".repeat(100_000)),
            Attack::TooManyNodes => slot("<p/>".repeat(100_001)),
            // As many as fit in a body: quick-xml's duplicate check is quadratic, and
            // without a cap this one tag cost seconds of CPU.
            Attack::TooManyAttributes => {
                let attributes: String = (0..100_000).map(|i| format!(" a{i:x}=''")).collect();
                slot(format!("<a{attributes}/>"))
            }
            // A control character would make every later response that shows the
            // stored text unreadable to XML clients.
            Attack::ControlCharacter => slot("a&#1;b".to_owned()),
            Attack::NotUtf8 => (String::new(), vec![b'a', 0xff, 0xfe, 0xc3, 0x28]),
            Attack::Empty => slot(String::new()),
        }
    }

    /// What the XML parser says about it, for routes that pass its message on.
    fn named(self) -> &'static str {
        match self {
            Attack::BillionLaughs | Attack::ExternalEntity => "DTD",
            Attack::DeepNesting => "nested deeper than 64 levels",
            Attack::HugeText | Attack::HugeList => "larger than",
            Attack::TooManyNodes => "more than 100000 elements",
            Attack::TooManyAttributes => "more than 64 attributes",
            Attack::ControlCharacter => "U+0001",
            Attack::NotUtf8 => "not UTF-8",
            Attack::Empty => "holds no XML element",
        }
    }
}

fn routes() -> Vec<Route> {
    use reqwest::Method;
    let tdl = template("hostile");
    let image = (
        400,
        Format::Error("InsufficientParametersSupplied"),
        Some("Please specify a type, build or import"),
    );
    let errors = (422, Format::Errors, None);
    vec![
        Route {
            label: "build",
            method: Method::POST,
            path: "/api/images",
            body: format!(
                "{{prolog}}<image><targets>bogus</targets><tdl>{tdl}</tdl>\
                 <environment>default</environment><description>{{slot}}</description></image>"
            ),
            control: (404, "Could not find Target bogus"),
            refused: image,
        },
        Route {
            label: "import",
            method: Method::POST,
            path: "/api/images",
            body: "{prolog}<image><provider_account_name>nope</provider_account_name>\
                   <target_identifier>{slot}</target_identifier>\
                   <image_descriptor><image><name>n</name></image></image_descriptor></image>"
                .to_owned(),
            control: (404, "Could not find Provider Account for name nope"),
            refused: image,
        },
        Route {
            label: "provider image",
            method: Method::POST,
            path: "/api/provider_images",
            body: format!(
                "{{prolog}}<provider_image><provider_account>{{slot}}</provider_account>\
                 <target_image_id>{UNKNOWN_UUID}</target_image_id></provider_image>"
            ),
            control: (404, "Could not find TargetImage"),
            refused: (
                400,
                Format::Error("InsufficientParametersSupplied"),
                Some("No Provider Account given"),
            ),
        },
        Route {
            label: "new provider",
            method: Method::POST,
            path: "/api/providers",
            body: "{prolog}<provider><name>{slot}</name><settings><setting/></settings></provider>"
                .to_owned(),
            control: (422, "each &lt;setting&gt; needs a name attribute"),
            refused: errors,
        },
        Route {
            label: "provider update",
            method: Method::PUT,
            path: "/api/providers/1",
            body: "{prolog}<provider><name>{slot}</name><settings><setting/></settings></provider>"
                .to_owned(),
            control: (422, "each &lt;setting&gt; needs a name attribute"),
            refused: errors,
        },
        Route {
            label: "new account",
            method: Method::POST,
            path: "/api/provider_accounts",
            body: "{prolog}<provider_account><label>{slot}</label><provider id='99'/></provider_account>"
                .to_owned(),
            control: (404, "RecordNotFound"),
            refused: errors,
        },
        Route {
            label: "account update",
            method: Method::PUT,
            path: "/api/provider_accounts/1",
            body: "{prolog}<provider_account><label>{slot}</label><priority>1000</priority></provider_account>"
                .to_owned(),
            control: (422, "Priority must be between -100 and 100"),
            refused: errors,
        },
        Route {
            label: "new pool family",
            method: Method::POST,
            path: "/api/pool_families",
            body: "{prolog}<pool_family><name>bad/name</name><description>{slot}</description></pool_family>"
                .to_owned(),
            control: (422, "Name is invalid"),
            refused: errors,
        },
        Route {
            label: "pool family update",
            method: Method::PUT,
            path: "/api/pool_families/1",
            body: "{prolog}<pool_family><name>bad/name</name><description>{slot}</description></pool_family>"
                .to_owned(),
            control: (422, "Name is invalid"),
            refused: errors,
        },
        Route {
            label: "hook",
            method: Method::POST,
            path: "/api/hooks",
            // Version 2 is refused with 501 once the body is read, so the control
            // stores nothing.
            body: "{prolog}<hook><uri>http://hook.invalid/{slot}</uri><version>2</version></hook>"
                .to_owned(),
            control: (501, ""),
            refused: (400, Format::Empty, None),
        },
    ]
}

/// What a route must answer to an attack: status, format and a fragment of the
/// message.
fn expected(route: &Route, attack: Attack) -> (u16, Format, &'static str) {
    if matches!(attack, Attack::HugeText | Attack::HugeList) {
        // The router refuses an oversized body before any handler sees it, in the API's
        // error format, hooks included.
        return (413, Format::Error("RequestTooLarge"), attack.named());
    }
    let (status, format, message) = route.refused;
    (status, format, message.unwrap_or(attack.named()))
}

/// Puts the attack into the route's body.
fn hostile_body(template: &str, attack: Attack) -> Vec<u8> {
    if attack == Attack::Empty {
        return Vec::new();
    }
    let (prolog, slot) = attack.parts();
    fill(template, &prolog, &slot)
}

fn fill(template: &str, prolog: &str, slot: &[u8]) -> Vec<u8> {
    let with_prolog = template.replace("{prolog}", prolog);
    let (before, after) = with_prolog.split_once("{slot}").expect("a slot");
    [before.as_bytes(), slot, after.as_bytes()].concat()
}

/// Sends a body through reqwest, or, when it is over the server's 1 MiB limit, as raw
/// HTTP: the server answers an oversized body from its Content-Length alone, and a
/// client library would see its upload cut off instead of the reply.
async fn send(server: &Server, method: reqwest::Method, path: &str, body: Vec<u8>) -> Reply {
    if body.len() > 1 << 20 {
        return raw_http(server, method.as_str(), path, &body, false).await;
    }
    let request = server
        .request(method, path)
        .basic_auth("admin", Some(PASSWORD))
        .header("Content-Type", "application/xml")
        .body(body);
    tokio::time::timeout(DEADLINE, server.raw(request))
        .await
        .unwrap_or_else(|_| panic!("no answer to {path} within {DEADLINE:?}"))
}

/// Speaks HTTP/1.1 over a socket: the headers, then the body (all of it when
/// `chunked`, since the server must read up to its limit to notice; otherwise only the
/// start), then reads the reply until its Content-Length is met or the server closes.
async fn raw_http(server: &Server, method: &str, path: &str, body: &[u8], chunked: bool) -> Reply {
    use base64::Engine as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = server.url.trim_start_matches("http://");
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("admin:{PASSWORD}"));
    let length = if chunked {
        "Transfer-Encoding: chunked".to_owned()
    } else {
        format!("Content-Length: {}", body.len())
    };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Basic {auth}\r\n\
         Content-Type: application/xml\r\n{length}\r\nConnection: close\r\n\r\n"
    );
    let mut sent = head.into_bytes();
    if chunked {
        for chunk in body.chunks(64 << 10) {
            sent.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            sent.extend_from_slice(chunk);
            sent.extend_from_slice(b"\r\n");
        }
        sent.extend_from_slice(b"0\r\n\r\n");
    } else {
        sent.extend_from_slice(&body[..body.len().min(64 << 10)]);
    }
    // The server may answer, and close, before it has read everything; writing goes on
    // beside the reading, and a write cut short by the close is expected.
    let writing = tokio::spawn(async move {
        let _ = writer.write_all(&sent).await;
        writer
    });
    let read = async {
        let mut reply = Vec::new();
        let mut buffer = vec![0u8; 64 << 10];
        loop {
            if let Some(complete) = parse_reply(&reply) {
                return complete;
            }
            match reader.read(&mut buffer).await {
                Ok(0) | Err(_) => {
                    return parse_reply(&reply).unwrap_or_else(|| {
                        panic!("an incomplete reply: {:?}", String::from_utf8_lossy(&reply))
                    });
                }
                Ok(n) => reply.extend_from_slice(&buffer[..n]),
            }
        }
    };
    let reply = tokio::time::timeout(DEADLINE, read)
        .await
        .unwrap_or_else(|_| panic!("no answer to {path} within {DEADLINE:?}"));
    writing.abort();
    reply
}

/// A whole HTTP reply, once `bytes` holds its headers and its Content-Length of body.
fn parse_reply(bytes: &[u8]) -> Option<Reply> {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.get(9..12)?.parse().ok()?;
    let header = |name: &str| {
        head.lines()
            .filter_map(|line| line.split_once(':'))
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.trim().to_owned())
    };
    let length: usize = header("content-length")?.parse().ok()?;
    (body.len() >= length).then(|| Reply {
        status,
        body: body[..length].to_owned(),
        content_type: header("content-type").unwrap_or_default(),
    })
}

/// Asserts a reply's status and format; returns the messages it carries.
fn check_format(reply: &Reply, status: u16, format: Format, what: &str) -> Vec<String> {
    assert_eq!(reply.status, status, "{what}: {}", short(&reply.body));
    match format {
        Format::Empty => {
            assert_eq!(reply.body, "", "{what}");
            Vec::new()
        }
        Format::Error(code) => {
            let doc = reply.doc();
            assert_eq!(doc.root_element().tag_name().name(), "error", "{what}");
            vec![reply.assert_error(status, code)]
        }
        Format::Errors => {
            let doc = reply.doc();
            assert_eq!(doc.root_element().tag_name().name(), "errors", "{what}");
            let messages: Vec<String> = doc
                .descendants()
                .filter(|n| n.has_tag_name("message"))
                .map(|n| n.text().unwrap_or("").to_owned())
                .collect();
            assert!(!messages.is_empty(), "{what}: {}", reply.body);
            messages
        }
    }
}

/// The start of a body, for assertion messages about replies that may be huge.
fn short(body: &str) -> &str {
    let end = body
        .char_indices()
        .nth(300)
        .map_or(body.len(), |(at, _)| at);
    &body[..end]
}

/// Every collection and every record a PUT could change, as the server shows them.
async fn everything(server: &Server) -> Vec<(String, String)> {
    let mut all = Vec::new();
    for path in [
        "/api/images",
        "/api/builds",
        "/api/target_images",
        "/api/provider_images",
        "/api/providers",
        "/api/provider_accounts",
        "/api/pool_families",
        "/api/hooks",
        "/api/providers/1",
        "/api/provider_accounts/1",
        "/api/pool_families/1",
    ] {
        let reply = server.get(path).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
        all.push((path.to_owned(), reply.body));
    }
    all
}

#[tokio::test]
async fn hostile_bodies_are_refused_on_every_route_and_store_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let before = everything(&server).await;
    for route in routes() {
        let what = format!("{} control", route.label);
        let control = fill(&route.body, "", b"ok");
        let reply = send(&server, route.method.clone(), route.path, control).await;
        assert_eq!(reply.status, route.control.0, "{what}: {}", reply.body);
        assert!(
            reply.body.contains(route.control.1),
            "{what}: {}",
            reply.body
        );

        for attack in ATTACKS {
            let what = format!("{} with {attack:?}", route.label);
            let body = hostile_body(&route.body, attack);
            let reply = send(&server, route.method.clone(), route.path, body).await;
            let (status, format, says) = expected(&route, attack);
            let messages = check_format(&reply, status, format, &what);
            if format != Format::Empty {
                assert!(
                    messages.iter().any(|m| m.contains(says)),
                    "{what}: {messages:?} should say {says:?}"
                );
            }
            // Nothing of /etc/passwd may come back, whatever else the reply says.
            assert!(!reply.body.contains("root:"), "{what}: {}", reply.body);
        }
    }
    assert_eq!(
        everything(&server).await,
        before,
        "a refused request changed something"
    );
}

/// A template given as text inside `<tdl>` is parsed by the TDL parser, with its own
/// rules: the attacks go inside the template, where the outer body is fine.
#[tokio::test]
async fn hostile_templates_inside_tdl_text_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let before = everything(&server).await;
    // The DTD goes inside the CDATA, before the template's root.
    let body = |prolog: &str, slot: &[u8]| {
        let tdl = template("hostile").replace(
            "<description>a test image</description>",
            "<description>{slot}</description>",
        );
        let outer =
            format!("<image><targets>bogus</targets><tdl><![CDATA[{prolog}{tdl}]]></tdl></image>");
        fill(&outer, "", slot)
    };
    let reply = send(
        &server,
        reqwest::Method::POST,
        "/api/images",
        body("", b"ok"),
    )
    .await;
    reply.assert_error(404, "TargetNotFound");

    let invalid = Format::Error("ParameterDataIncorrect");
    let cases: [(Attack, u16, Format, &str); 10] = [
        (
            Attack::BillionLaughs,
            400,
            invalid,
            "Invalid Image Template: DTDs are not allowed",
        ),
        (
            Attack::ExternalEntity,
            400,
            invalid,
            "Invalid Image Template: DTDs are not allowed",
        ),
        (
            Attack::DeepNesting,
            400,
            invalid,
            "XML nesting is deeper than 32 levels",
        ),
        (
            Attack::HugeText,
            413,
            Format::Error("RequestTooLarge"),
            "larger than",
        ),
        (
            Attack::HugeList,
            413,
            Format::Error("RequestTooLarge"),
            "larger than",
        ),
        (
            Attack::TooManyNodes,
            400,
            invalid,
            "more than 10000 elements and attributes",
        ),
        (
            Attack::TooManyAttributes,
            400,
            invalid,
            "more than 64 attributes",
        ),
        (
            Attack::ControlCharacter,
            400,
            invalid,
            "character U+0001 is not allowed",
        ),
        // The outer body is refused before the template is read.
        (
            Attack::NotUtf8,
            400,
            Format::Error("InsufficientParametersSupplied"),
            "Please specify a type, build or import",
        ),
        (
            Attack::Empty,
            400,
            invalid,
            "Invalid Image Template: Name is not set.",
        ),
    ];
    for (attack, status, format, says) in cases {
        let what = format!("template with {attack:?}");
        let request = match attack {
            Attack::Empty => b"<image><targets>bogus</targets><tdl></tdl></image>".to_vec(),
            _ => {
                let (prolog, slot) = attack.parts();
                body(&prolog, &slot)
            }
        };
        let reply = send(&server, reqwest::Method::POST, "/api/images", request).await;
        let messages = check_format(&reply, status, format, &what);
        assert!(
            messages.iter().any(|m| m.contains(says)),
            "{what}: {messages:?} should say {says:?}"
        );
    }
    assert_eq!(
        everything(&server).await,
        before,
        "a refused request changed something"
    );
}

/// Lists that fit in a body and under the parser's node cap meet the routes' own
/// limits: at most 64 parameters, and every target must exist.
#[tokio::test]
async fn long_lists_within_the_body_limit_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let before = everything(&server).await;
    let parameters = format!(
        "<parameters>{}</parameters>",
        "<parameter name='p'/>".repeat(45_000)
    );
    let build = crate::harness::build_request("mock", &template("listed"), &parameters);
    let push = format!(
        "<provider_image><provider_account>mock-acc</provider_account>\
         <target_image_id>{UNKNOWN_UUID}</target_image_id>{parameters}</provider_image>"
    );
    for (path, body) in [("/api/images", build), ("/api/provider_images", push)] {
        assert!(body.len() < 1 << 20, "{path}: the body must fit the limit");
        let reply = send(&server, reqwest::Method::POST, path, body.into_bytes()).await;
        let message = reply.assert_error(400, "ParameterDataIncorrect");
        assert_eq!(message, "at most 64 parameters are accepted", "{path}");
    }
    let targets: Vec<String> = (0..10_000).map(|i| format!("t{i}")).collect();
    let body = crate::harness::build_request(&targets.join(","), &template("listed"), "");
    let reply = send(
        &server,
        reqwest::Method::POST,
        "/api/images",
        body.into_bytes(),
    )
    .await;
    // Refused for its length before any target is looked up.
    let message = reply.assert_error(400, "ParameterDataIncorrect");
    assert_eq!(message, "At most 64 targets may be built at once");
    assert_eq!(
        everything(&server).await,
        before,
        "a refused request changed something"
    );
}

// Gaps these tests found outside the parser, now fixed: list lengths, chunked bodies over
// the limit, and control characters in form-encoded hook URIs.

/// A list in one text field multiplies into records and jobs: every item of `<targets>`
/// becomes a target image and a build job, every account of `<provider_account>` a push
/// (duplicates included, as Conductor did). The lists need a cap.
#[tokio::test]
async fn long_target_and_account_lists_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let built = server
        .post(
            "/api/images",
            &crate::harness::build_request("mock", &template("listed"), ""),
        )
        .await;
    assert_eq!(built.status, 200, "{}", built.body);
    let ti = built.ids("target_image")[0].clone();
    server
        .wait_terminal(&format!("/api/target_images/{ti}"))
        .await;
    let before = everything(&server).await;

    let targets = vec!["mock"; 10_000].join(",");
    let body = crate::harness::build_request(&targets, &template("listed"), "");
    let reply = send(
        &server,
        reqwest::Method::POST,
        "/api/images",
        body.into_bytes(),
    )
    .await;
    reply.assert_error(400, "ParameterDataIncorrect");

    let accounts = vec!["mock-acc"; 10_000].join(",");
    let body = format!(
        "<provider_image><provider_account>{accounts}</provider_account>\
         <target_image_id>{ti}</target_image_id></provider_image>"
    );
    let reply = send(
        &server,
        reqwest::Method::POST,
        "/api/provider_images",
        body.into_bytes(),
    )
    .await;
    reply.assert_error(400, "ParameterDataIncorrect");
    assert_eq!(
        everything(&server).await,
        before,
        "a refused request changed something"
    );
}

/// A chunked body has no Content-Length for the router to refuse up front; the body
/// limit then cuts it off, and axum's own plain-text 413 reaches the client instead of
/// the API's `<error>` document.
#[tokio::test]
async fn oversized_chunked_bodies_get_the_error_format() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let before = everything(&server).await;
    let body = fill(
        "<provider><name>{slot}</name></provider>",
        "",
        "x".repeat(2 << 20).as_bytes(),
    );
    let reply = raw_http(&server, "POST", "/api/providers", &body, true).await;
    let messages = check_format(&reply, 413, Format::Error("RequestTooLarge"), "chunked");
    assert!(
        messages.iter().any(|m| m.contains("larger than")),
        "{messages:?}"
    );
    assert_eq!(
        everything(&server).await,
        before,
        "a refused request changed something"
    );
}

/// The form encoding of a hook bypasses the XML parser's character check: a
/// percent-encoded control character is stored in the URI, and from then on every
/// `GET /api/hooks` answers a document XML clients cannot read.
#[tokio::test]
async fn hook_uris_with_control_characters_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let request = server
        .request(reqwest::Method::POST, "/api/hooks")
        .basic_auth("admin", Some(PASSWORD))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("hook[uri]=http%3A%2F%2Fhook.invalid%2Fa%01b&hook[version]=1");
    let reply = server.raw(request).await;
    check_format(&reply, 400, Format::Empty, "form hook");
    let listed = server.get("/api/hooks").await;
    assert!(
        roxmltree::Document::parse(&listed.body).is_ok(),
        "GET /api/hooks is not XML: {:?}",
        listed.body
    );
}

/// Values are capped at 16 Ki characters on the routes that store them: a description or
/// a credential that size is a flood, not a value.
#[tokio::test]
async fn overlong_values_are_refused_and_store_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let before = everything(&server).await;
    let long = "x".repeat(20_000);
    let reply = server
        .post(
            "/api/pool_families",
            &format!("<pool_family><name>ok</name><description>{long}</description></pool_family>"),
        )
        .await;
    assert_eq!(reply.status, 422, "{}", reply.body);
    assert!(
        reply.body.contains("&lt;description&gt; is longer than"),
        "{}",
        reply.body
    );
    let reply = server
        .post(
            "/api/images",
            &crate::harness::build_request(
                "mock",
                &template("long"),
                &format!("<parameters><parameter name='x'>{long}</parameter></parameters>"),
            ),
        )
        .await;
    reply.assert_error(400, "ParameterDataIncorrect");
    assert_eq!(
        everything(&server).await,
        before,
        "a refused request changed something"
    );
}
