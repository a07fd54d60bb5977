//! Replays every HTTP exchange that aeolus-cli recorded from a real Conductor
//! (tests/fixtures/aeolus-cli/**/*.yml, VCR cassettes), one fresh server per cassette.
//!
//! For each cassette the world the recording assumes is built through the API (derived
//! from the recorded replies where they show it), then each recorded request is sent with
//! the recorded ids swapped for the ids of the records made here. The reply must have the
//! recorded status and, as XML, the same elements in the same order with the same values.
//! Every allowed difference is an entry of [`NORMALISATIONS`], and each entry cites the row
//! of docs/compatibility.md that lists it as a deviation (or says why it is not one).

use crate::harness::{Reply, Server, TEST_PLUGINS};
use roxmltree::{Document, Node};
use std::collections::{BTreeSet, HashMap};

const CASSETTES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/aeolus-cli");

// ---- what may differ, in one place ----

/// One allowed difference between a recorded exchange and ours.
enum Norm {
    /// An attribute whose value is never compared.
    IgnoredAttribute(&'static str),
    /// An attribute holding a record id: it must be the id of the record made here in
    /// place of the recorded one, or any non-empty value when no record stands for it
    /// (ids in create replies are new on both sides). We may add it where the recording
    /// has none.
    IdAttribute(&'static str),
    /// Text that is a UUID, or a prefix and a UUID (`Mock_mock_<uuid>`). A whole id follows
    /// the `IdAttribute` rule; after a prefix, the prefix must be equal and the rest any
    /// UUID, since the provider made that identifier.
    IdText,
    /// `<child>` of `<parent>` that only we send: skipped when the recording has no such
    /// child there.
    Added {
        parent: &'static str,
        child: &'static str,
    },
    /// `<child>` of `<parent>` that only the recording has: skipped when we send none.
    Dropped {
        parent: &'static str,
        child: &'static str,
    },
    /// The recording's `<recorded>` child of `<parent>` is our `<ours>`.
    Renamed {
        parent: &'static str,
        recorded: &'static str,
        ours: &'static str,
    },
    /// The text `recorded` of an `<element>` is our `ours`.
    Synonym {
        element: &'static str,
        recorded: &'static str,
        ours: &'static str,
    },
    /// `<child>` of `<parent>` is empty in the recording and may have a value here.
    Filled {
        parent: &'static str,
        child: &'static str,
    },
    /// In a reply to a POST, `<element>` holds the live status of a job just started: any
    /// of `ours` where the recording has any of `recorded`.
    Live {
        element: &'static str,
        recorded: &'static [&'static str],
        ours: &'static [&'static str],
    },
    /// The `<item>` children of `<list>` are paired by the text of their `<key>` child;
    /// items only one side has are skipped, but at least one must pair.
    Keyed {
        list: &'static str,
        item: &'static str,
        key: &'static str,
    },
    /// In a request body, `recorded` is sent as `ours`. With `old_shape` the recorded
    /// request is also sent unchanged first, and must be refused with 400.
    Request {
        recorded: &'static str,
        ours: &'static str,
        old_shape: bool,
    },
}

/// Every allowed difference. "Row N" is the row of docs/compatibility.md.
const NORMALISATIONS: &[Norm] = &[
    // hrefs carry each server's address and mount prefix (reference §1.1), and delete
    // replies point at the resource itself rather than at /api/images (row 6).
    Norm::IgnoredAttribute("href"),
    // Ids are made by each server (reference §1.1); this is not a deviation.
    Norm::IdAttribute("id"),
    // Record ids in text (`<image type='xs:string'>`, `<template>`) and the UUID part of
    // mock target identifiers, which the provider makes (not a deviation).
    Norm::IdText,
    // Row 1: one upper-case status vocabulary with one terminal value.
    Norm::Synonym {
        element: "status",
        recorded: "COMPLETED",
        ours: "COMPLETE",
    },
    // Row 1.
    Norm::Synonym {
        element: "status",
        recorded: "New",
        ours: "NEW",
    },
    // Rows 1 and 4: build and push replies carry the live status of jobs just started,
    // which depends on timing on both sides; it must be present and not FAILED.
    Norm::Live {
        element: "status",
        recorded: &["New", "NEW", "PENDING", "BUILDING", "PUSHING", "COMPLETED"],
        ours: &["NEW", "PENDING", "BUILDING", "PUSHING", "COMPLETE"],
    },
    // Row 5: progress, target and disk details of target images.
    Norm::Added {
        parent: "target_image",
        child: "percent_complete",
    },
    // Row 5.
    Norm::Added {
        parent: "target_image",
        child: "status_detail",
    },
    // Row 5.
    Norm::Added {
        parent: "target_image",
        child: "target",
    },
    // Row 5.
    Norm::Added {
        parent: "target_image",
        child: "format",
    },
    // Row 5.
    Norm::Added {
        parent: "target_image",
        child: "size",
    },
    // Row 5.
    Norm::Added {
        parent: "target_image",
        child: "virtual_size",
    },
    // Row 5: the link to a built image's file.
    Norm::Added {
        parent: "target_image",
        child: "data",
    },
    // Row 5: progress and account of provider images.
    Norm::Added {
        parent: "provider_image",
        child: "percent_complete",
    },
    // Row 5.
    Norm::Added {
        parent: "provider_image",
        child: "status_detail",
    },
    // Row 5.
    Norm::Added {
        parent: "provider_image",
        child: "account",
    },
    // Row 7: `<status>DELETED</status>` in the provider-image delete reply.
    Norm::Added {
        parent: "provider_image",
        child: "status",
    },
    // Row 16: provider types are the loaded plugins, not Conductor's seeded eight; a
    // recorded type is compared when a plugin of that driver is loaded here.
    Norm::Keyed {
        list: "provider_types",
        item: "provider_type",
        key: "deltacloud_driver",
    },
    // Row 18: an imported image's arch is the one its provider reports.
    Norm::Filled {
        parent: "image",
        child: "arch",
    },
    // Row 18: an import whose descriptor names nothing takes the provider's name.
    Norm::Filled {
        parent: "image",
        child: "name",
    },
    // Row 19: the 2011 recordings' images have no `<environment>`.
    Norm::Added {
        parent: "image",
        child: "environment",
    },
    // Row 19: the 2011 import reply's target image has no `<status>`.
    Norm::Added {
        parent: "target_image",
        child: "status",
    },
    // Row 19: the 2011 account list carried credentials.
    Norm::Dropped {
        parent: "provider_account",
        child: "provider_credentials",
    },
    // Row 19: the 2011 target-image list had an empty `<provider_image>` for the list.
    Norm::Renamed {
        parent: "target_image",
        recorded: "provider_image",
        ours: "provider_images",
    },
    // Row 19: the 2011 import request named the provider and the driver, where Conductor
    // from Dec 2011 on (and today's aeolus-cli) names the account and the environment.
    Norm::Request {
        recorded: "<target_name>ec2</target_name>",
        ours: "",
        old_shape: true,
    },
    // Row 19 (as above); ec2-acc is the account of ec2-us-east-1 in these recordings.
    Norm::Request {
        recorded: "<provider_name>ec2-us-east-1</provider_name>",
        ours: "<provider_account_name>ec2-acc</provider_account_name><environment>default</environment>",
        old_shape: true,
    },
    // Row 19: the 2011 client sent the descriptor file's name; today's sends its content
    // (tests/fixtures/aeolus-cli-requests/26-import-descfile).
    Norm::Request {
        recorded: "<image_descriptor>spec/sample_data/image_description.xml</image_descriptor>",
        ours: "<image_descriptor>&lt;image&gt;\n  &lt;name&gt;Test Image&lt;/name&gt;\n&lt;/image&gt;</image_descriptor>",
        old_shape: true,
    },
    // Row 20: provider-side deletes report their outcome per provider image.
    Norm::Added {
        parent: "provider_content",
        child: "status",
    },
    // Row 20.
    Norm::Added {
        parent: "provider_content",
        child: "error",
    },
    // Row 21: providers carry their plugin's settings.
    Norm::Added {
        parent: "provider",
        child: "settings",
    },
    // Stand-in, no row: the recordings build for ec2 with an account that holds AMIs
    // by recorded ids, which no emulator can be made to hold; the `testbed` test plugin
    // builds what they build for ec2, so the replay needs no cloud. The ec2 plugin
    // itself is tested against its emulator in tests/api/ec2.rs.
    Norm::Request {
        recorded: "<targets>ec2</targets>",
        ours: "<targets>testbed</targets>",
        old_shape: false,
    },
    // Stand-in, as above.
    Norm::Request {
        recorded: "<targets>ec2,mock</targets>",
        ours: "<targets>testbed,mock</targets>",
        old_shape: false,
    },
    // Stand-in, as above.
    Norm::Synonym {
        element: "target",
        recorded: "ec2",
        ours: "testbed",
    },
    // Stand-in, no row: the recordings' ec2 provider (ec2-us-east-1, account ec2-acc) is
    // a provider of that name of type mock, whose `images` setting holds the images the
    // recordings import (AMI ids an emulator cannot be made to hold).
    Norm::Synonym {
        element: "provider_type",
        recorded: "ec2",
        ours: "mock",
    },
];

fn ignored_attribute(name: &str) -> bool {
    NORMALISATIONS
        .iter()
        .any(|n| matches!(n, Norm::IgnoredAttribute(a) if *a == name))
}

fn id_attribute(name: &str) -> bool {
    NORMALISATIONS
        .iter()
        .any(|n| matches!(n, Norm::IdAttribute(a) if *a == name))
}

fn added(parent: &str, child: &str) -> bool {
    NORMALISATIONS
        .iter()
        .any(|n| matches!(n, Norm::Added { parent: p, child: c } if *p == parent && *c == child))
}

fn dropped(parent: &str, child: &str) -> bool {
    NORMALISATIONS
        .iter()
        .any(|n| matches!(n, Norm::Dropped { parent: p, child: c } if *p == parent && *c == child))
}

fn same_name(parent: &str, recorded: &str, ours: &str) -> bool {
    recorded == ours
        || NORMALISATIONS.iter().any(|n| {
            matches!(n, Norm::Renamed { parent: p, recorded: r, ours: o }
                if *p == parent && *r == recorded && *o == ours)
        })
}

fn keyed(list: &str) -> Option<(&'static str, &'static str)> {
    NORMALISATIONS.iter().find_map(|n| match n {
        Norm::Keyed { list: l, item, key } if *l == list => Some((*item, *key)),
        _ => None,
    })
}

/// The request body to send for a recorded one, and whether the recorded one has a
/// shape that is refused here.
fn rewrite_request(body: &str) -> (String, bool) {
    let mut out = body.to_owned();
    let mut old = false;
    for n in NORMALISATIONS {
        if let Norm::Request {
            recorded,
            ours,
            old_shape,
        } = n
            && out.contains(recorded)
        {
            out = out.replace(recorded, ours);
            old |= old_shape;
        }
    }
    (out, old)
}

// ---- comparing replies ----

/// `8-4-4-4-12` hexadecimal digits.
fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Every UUID in `s`, in order.
fn uuids(s: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut i = 0;
    while i + 36 <= s.len() {
        match s.get(i..i + 36) {
            Some(window) if is_uuid(window) => {
                found.push(window.to_owned());
                i += 36;
            }
            _ => i += 1,
        }
    }
    found
}

/// The element's own text, trimmed; whitespace between elements carries no meaning.
fn own_text(node: Node) -> String {
    node.children()
        .filter(Node::is_text)
        .filter_map(|t| t.text())
        .collect::<String>()
        .trim()
        .to_owned()
}

fn child_text(node: Node, name: &str) -> String {
    node.children()
        .find(|c| c.has_tag_name(name))
        .map(own_text)
        .unwrap_or_default()
}

fn elements<'a, 'i>(node: Node<'a, 'i>) -> Vec<Node<'a, 'i>> {
    node.children().filter(Node::is_element).collect()
}

/// Compares one recorded reply with ours and collects what differs.
struct Comparison<'m> {
    ids: &'m HashMap<String, String>,
    /// A reply to a POST, where statuses are live.
    live: bool,
    problems: Vec<String>,
}

impl Comparison<'_> {
    fn id_matches(&self, recorded: &str, ours: &str) -> bool {
        match self.ids.get(recorded) {
            Some(mine) => mine == ours,
            None => !ours.is_empty(),
        }
    }

    fn id_text_matches(&self, recorded: &str, ours: &str) -> bool {
        let Some(split) = recorded.len().checked_sub(36) else {
            return false;
        };
        let (Some(prefix), Some(id)) = (recorded.get(..split), recorded.get(split..)) else {
            return false;
        };
        if !is_uuid(id) {
            return false;
        }
        if prefix.is_empty() {
            return is_uuid(ours) && self.id_matches(recorded, ours);
        }
        ours.strip_prefix(prefix).is_some_and(is_uuid)
    }

    fn text_matches(&self, parent: &str, element: &str, recorded: &str, ours: &str) -> bool {
        recorded == ours
            || NORMALISATIONS.iter().any(|n| match n {
                Norm::Synonym {
                    element: e,
                    recorded: r,
                    ours: o,
                } => *e == element && *r == recorded && *o == ours,
                Norm::Live {
                    element: e,
                    recorded: r,
                    ours: o,
                } => self.live && *e == element && r.contains(&recorded) && o.contains(&ours),
                Norm::Filled {
                    parent: p,
                    child: c,
                } => *p == parent && *c == element && recorded.is_empty() && !ours.is_empty(),
                Norm::IdText => self.id_text_matches(recorded, ours),
                _ => false,
            })
    }

    fn element(&mut self, path: &str, recorded: Node, ours: Node) {
        let name = recorded.tag_name().name();
        let path = format!("{path}/{name}");
        for a in recorded.attributes() {
            let mine = ours.attribute(a.name());
            let ok = if ignored_attribute(a.name()) {
                true
            } else if id_attribute(a.name()) {
                mine.is_some_and(|m| self.id_matches(a.value(), m))
            } else {
                mine == Some(a.value())
            };
            if !ok {
                self.problems.push(format!(
                    "{path}@{}: recorded {:?}, ours {mine:?}",
                    a.name(),
                    a.value()
                ));
            }
        }
        for a in ours.attributes() {
            if recorded.attribute(a.name()).is_none()
                && !ignored_attribute(a.name())
                && !id_attribute(a.name())
            {
                self.problems
                    .push(format!("{path}@{}: only ours has it", a.name()));
            }
        }
        let parent = recorded
            .parent_element()
            .map(|p| p.tag_name().name())
            .unwrap_or("");
        let (r, o) = (own_text(recorded), own_text(ours));
        if !self.text_matches(parent, name, &r, &o) {
            self.problems
                .push(format!("{path}: recorded text {r:?}, ours {o:?}"));
        }
        match keyed(name) {
            Some((item, key)) => self.keyed(&path, recorded, ours, item, key),
            None => self.children(&path, recorded, ours),
        }
    }

    /// Children in order; our additions and the recording's dropped elements are
    /// skipped only where the other side has no element of that name.
    fn children(&mut self, path: &str, recorded: Node, ours: Node) {
        let parent = recorded.tag_name().name();
        let (rs, os) = (elements(recorded), elements(ours));
        let name = |n: &Node| n.tag_name().name().to_owned();
        let (mut i, mut j) = (0, 0);
        while i < rs.len() || j < os.len() {
            match (rs.get(i), os.get(j)) {
                (Some(r), Some(o)) if same_name(parent, &name(r), &name(o)) => {
                    self.element(path, *r, *o);
                    i += 1;
                    j += 1;
                }
                (_, Some(o))
                    if added(parent, &name(o)) && !rs.iter().any(|r| name(r) == name(o)) =>
                {
                    j += 1;
                }
                (Some(r), _)
                    if dropped(parent, &name(r)) && !os.iter().any(|o| name(o) == name(r)) =>
                {
                    i += 1;
                }
                (r, o) => {
                    self.problems.push(format!(
                        "{path}: recorded <{}> where ours has <{}>",
                        r.map(name).unwrap_or_else(|| "nothing".into()),
                        o.map(name).unwrap_or_else(|| "nothing".into()),
                    ));
                    return;
                }
            }
        }
    }

    fn keyed(&mut self, path: &str, recorded: Node, ours: Node, item: &str, key: &str) {
        let rs: Vec<Node> = recorded
            .children()
            .filter(|c| c.has_tag_name(item))
            .collect();
        let os: Vec<Node> = ours.children().filter(|c| c.has_tag_name(item)).collect();
        let mut paired = 0;
        for r in &rs {
            if let Some(o) = os
                .iter()
                .find(|o| child_text(**o, key) == child_text(*r, key))
            {
                self.element(path, *r, *o);
                paired += 1;
            }
        }
        if paired == 0 && !rs.is_empty() {
            self.problems
                .push(format!("{path}: no recorded <{item}> is here"));
        }
    }
}

/// What differs between a recorded reply body and ours, beyond the normalisations.
fn differences(
    recorded: &str,
    ours: &str,
    ids: &HashMap<String, String>,
    live: bool,
) -> Vec<String> {
    if recorded.trim().is_empty() || ours.trim().is_empty() {
        return if recorded.trim().is_empty() == ours.trim().is_empty() {
            Vec::new()
        } else {
            vec!["one body is empty, the other is not".into()]
        };
    }
    let recorded = Document::parse(recorded).expect("the recorded reply is XML");
    let ours = match Document::parse(ours) {
        Ok(doc) => doc,
        Err(e) => return vec![format!("our reply is not XML: {e}")],
    };
    let (r, o) = (recorded.root_element(), ours.root_element());
    if r.tag_name().name() != o.tag_name().name() {
        return vec![format!(
            "root: recorded <{}>, ours <{}>",
            r.tag_name().name(),
            o.tag_name().name()
        )];
    }
    let mut comparison = Comparison {
        ids,
        live,
        problems: Vec::new(),
    };
    comparison.element("", r, o);
    comparison.problems
}

// ---- the cassettes ----

/// One recorded HTTP exchange.
#[derive(Default, Debug)]
struct Exchange {
    method: String,
    user: String,
    password: String,
    /// Everything after the host, e.g. `/conductor/api/images.xml`.
    path: String,
    body: String,
    status: u16,
    reply: String,
}

impl Exchange {
    /// Sent to Conductor's API, rather than fetched by the client for itself.
    fn is_api(&self) -> bool {
        self.path.starts_with("/conductor/api")
    }

    fn reply_doc(&self) -> Document<'_> {
        Document::parse(&self.reply).expect("the recorded reply is XML")
    }
}

/// A block scalar (`|`, `|+`, `|-`) starting at `lines[*i]`, with its indentation
/// removed; leaves `*i` on the first line after it.
fn block(lines: &[&str], i: &mut usize, key_indent: usize) -> String {
    let indent_of = |l: &str| l.len() - l.trim_start().len();
    let indent = lines[*i..]
        .iter()
        .find(|l| !l.is_empty())
        .map(|l| indent_of(l))
        .unwrap_or(0);
    if indent <= key_indent {
        return String::new();
    }
    let mut out = Vec::new();
    while let Some(line) = lines.get(*i) {
        if !line.is_empty() && indent_of(line) < indent {
            break;
        }
        out.push(line.get(indent..).unwrap_or(""));
        *i += 1;
    }
    out.join("\n")
}

/// A plain or double-quoted scalar.
fn scalar(value: &str) -> String {
    match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(quoted) => quoted
            .replace("\\n", "\n")
            .replace("\\\"", "\"")
            .replace("\\\\", "\\"),
        None => value.to_owned(),
    }
}

/// Reads a VCR cassette. Its layout is regular (two-space indents, Ruby struct tags),
/// so a reader of the few keys used is enough and no YAML library is needed.
fn parse_cassette(text: &str) -> Vec<Exchange> {
    let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
    let mut exchanges: Vec<Exchange> = Vec::new();
    let mut in_response = false;
    let mut i = 0;
    while let Some(line) = lines.get(i) {
        i += 1;
        if line.starts_with("- ") {
            exchanges.push(Exchange::default());
            in_response = false;
            continue;
        }
        let Some(x) = exchanges.last_mut() else {
            continue;
        };
        if line.starts_with("  request:") {
            in_response = false;
        } else if line.starts_with("  response:") {
            in_response = true;
        } else if let Some(method) = line.strip_prefix("    method: :") {
            x.method = method.to_uppercase();
        } else if let Some(uri) = line.strip_prefix("    uri: ") {
            let rest = uri.split_once("://").map(|(_, r)| r).unwrap_or(uri);
            let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
            x.path = format!("/{path}");
            if let Some((userinfo, _)) = authority.split_once('@') {
                let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                x.user = user.to_owned();
                x.password = password.to_owned();
            }
        } else if let Some(code) = line.strip_prefix("      code: ") {
            x.status = code.trim().parse().expect("a numeric status code");
        } else if let Some(value) = line.strip_prefix("    body:") {
            let value = value.trim();
            let body = if value.starts_with('|') {
                block(&lines, &mut i, 4)
            } else {
                scalar(value)
            };
            if in_response {
                x.reply = body;
            } else {
                x.body = body;
            }
        }
    }
    exchanges
}

struct Cassette {
    name: &'static str,
    exchanges: Vec<Exchange>,
}

impl Cassette {
    fn load(name: &'static str) -> Cassette {
        let path = format!("{CASSETTES}/{name}");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let exchanges = parse_cassette(&text);
        assert!(
            exchanges.iter().any(Exchange::is_api),
            "{name}: no exchange with the API"
        );
        for x in &exchanges {
            assert!(
                !x.method.is_empty() && x.status != 0,
                "{name}: incomplete {x:?}"
            );
        }
        Cassette { name, exchanges }
    }

    fn api(&self) -> impl Iterator<Item = &Exchange> {
        self.exchanges.iter().filter(|x| x.is_api())
    }

    /// The first exchange with this method.
    fn first(&self, method: &str) -> &Exchange {
        self.api()
            .find(|x| x.method == method)
            .unwrap_or_else(|| panic!("{}: no {method}", self.name))
    }

    /// The first UUID in the path of the first exchange with the API.
    fn path_id(&self) -> String {
        let x = self.api().next().expect("an exchange with the API");
        uuids(&x.path)
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("{}: no id in {}", self.name, x.path))
    }
}

// ---- building the world a recording assumes ----

/// An image's template fields, as a recorded `<image>` shows them.
struct Fields {
    name: String,
    description: String,
    os: String,
    os_version: String,
    arch: String,
    environment: String,
}

impl Fields {
    /// The template every build request of these recordings sends
    /// (build_command/build.yml).
    fn tmpl1() -> Fields {
        Fields {
            name: "tmpl1".into(),
            description: "foo".into(),
            os: "Fedora".into(),
            os_version: "14".into(),
            arch: "x86_64".into(),
            environment: "default".into(),
        }
    }

    fn of(image: Node) -> Fields {
        let environment = child_text(image, "environment");
        Fields {
            name: child_text(image, "name"),
            description: child_text(image, "description"),
            os: child_text(image, "os"),
            os_version: child_text(image, "os_version"),
            arch: child_text(image, "arch"),
            environment: if environment.is_empty() {
                "default".into()
            } else {
                environment
            },
        }
    }

    /// The template, with a small disk so that builds are quick; the recordings show
    /// no disk size.
    fn tdl(&self) -> String {
        format!(
            "<template><name>{}</name><description>{}</description><os><name>{}</name>\
             <version>{}</version><arch>{}</arch><rootpw>password</rootpw>\
             <install type='url'><url>http://download.fedoraproject.org/pub/fedora/linux/releases/14/Fedora/x86_64/os/</url></install>\
             </os><disk><size>1MiB</size></disk></template>",
            escape(&self.name),
            escape(&self.description),
            escape(&self.os),
            escape(&self.os_version),
            escape(&self.arch)
        )
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
}

/// The records one build made.
struct Built {
    image: String,
    build: String,
    target_images: Vec<String>,
}

/// The records one import made.
struct Imported {
    image: String,
    build: String,
    target_image: String,
    provider_image: String,
}

/// A fresh server, and which record of ours stands for which recorded id.
struct World {
    server: Server,
    ids: HashMap<String, String>,
    // Dropped after the server, which stops first.
    _dir: tempfile::TempDir,
}

/// The account the recordings use on each provider.
fn account_of(provider: &str) -> &'static str {
    match provider {
        "mock" => "mock-acc",
        "testbed" => "testbed-acc",
        "ec2-us-east-1" => "ec2-acc",
        other => panic!("no account is known for provider {other}"),
    }
}

fn root_id(reply: &Reply) -> String {
    reply
        .doc()
        .root_element()
        .attribute("id")
        .unwrap_or_else(|| panic!("no id in {}", reply.body))
        .to_owned()
}

impl World {
    fn start() -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        // The recordings authenticate as admin:password.
        let server = Server::start_as(dir.path(), &["--plugins", TEST_PLUGINS], "password");
        World {
            server,
            ids: HashMap::new(),
            _dir: dir,
        }
    }

    /// Records that our `ours` stands for the recording's `recorded`.
    fn map(&mut self, recorded: &str, ours: &str) {
        let previous = self.ids.insert(recorded.to_owned(), ours.to_owned());
        assert!(
            previous.is_none_or(|p| p == ours),
            "{recorded} stands for two records"
        );
    }

    fn swap(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for (recorded, ours) in &self.ids {
            out = out.replace(recorded, ours);
        }
        out
    }

    async fn complete(&self, path: &str) {
        let reply = self.server.wait_terminal(path).await;
        assert_eq!(reply.text("status"), "COMPLETE", "{path}: {}", reply.body);
    }

    /// Builds an image from these template fields for one target, without waiting.
    async fn build(&self, fields: &Fields, target: &str) -> Built {
        let body = format!(
            "<image><targets>{target}</targets><tdl>{}</tdl><environment>{}</environment></image>",
            fields.tdl(),
            escape(&fields.environment)
        );
        let reply = self.server.post("/api/images", &body).await;
        assert_eq!(reply.status, 200, "build: {}", reply.body);
        Built {
            image: root_id(&reply),
            build: reply.ids("build")[0].clone(),
            target_images: reply.ids("target_image"),
        }
    }

    /// Builds for mock and waits until the target image is complete.
    async fn built(&self, fields: &Fields) -> Built {
        let built = self.build(fields, "mock").await;
        for ti in &built.target_images {
            self.complete(&format!("/api/target_images/{ti}")).await;
        }
        built
    }

    async fn push(&self, target_image: &str, account: &str) -> String {
        let reply = self
            .server
            .post(
                "/api/provider_images",
                &format!(
                    "<provider_image><target_image_id>{target_image}</target_image_id>\
                     <provider_account>{account}</provider_account></provider_image>"
                ),
            )
            .await;
        assert_eq!(reply.status, 200, "push: {}", reply.body);
        let pi = reply.ids("provider_image")[0].clone();
        self.complete(&format!("/api/provider_images/{pi}")).await;
        pi
    }

    async fn import(&self, account: &str, identifier: &str, name: &str) -> Imported {
        let reply = self
            .server
            .post(
                "/api/images",
                &format!(
                    "<image><target_identifier>{identifier}</target_identifier>\
                     <image_descriptor><image><name>{}</name></image></image_descriptor>\
                     <provider_account_name>{account}</provider_account_name>\
                     <environment>default</environment></image>",
                    escape(name)
                ),
            )
            .await;
        assert_eq!(reply.status, 200, "import: {}", reply.body);
        Imported {
            image: root_id(&reply),
            build: reply.ids("build")[0].clone(),
            target_image: reply.ids("target_image")[0].clone(),
            provider_image: reply.ids("provider_image")[0].clone(),
        }
    }

    /// Deletes the providers (and accounts) every new server starts with, for recordings
    /// that list providers or accounts.
    async fn without_seeded_providers(&self) {
        let list = self.server.get("/api/providers").await;
        for id in list.ids("provider") {
            let reply = self.server.delete(&format!("/api/providers/{id}")).await;
            assert_eq!(reply.status, 204, "delete provider {id}: {}", reply.body);
        }
    }

    /// A provider as recorded, of the stand-in type for ec2 (see NORMALISATIONS), holding
    /// these images; returns its id.
    async fn provider(
        &self,
        name: &str,
        recorded_type: &str,
        url: &str,
        region: &str,
        images: &[String],
    ) -> String {
        let kind = match recorded_type {
            "ec2" | "mock" => "mock",
            other => panic!("no stand-in for provider type {other}"),
        };
        let mut body = format!(
            "<provider><name>{name}</name><provider_type id='{kind}'/>\
             <url>{url}</url><deltacloud_provider>{region}</deltacloud_provider>"
        );
        if !images.is_empty() {
            body += &format!(
                "<settings><setting name='images'>{}</setting></settings>",
                images.join(",")
            );
        }
        body += "</provider>";
        let reply = self.server.post("/api/providers", &body).await;
        assert_eq!(reply.status, 201, "provider {name}: {}", reply.body);
        root_id(&reply)
    }

    async fn account(&self, provider_id: &str, label: &str) {
        let reply = self
            .server
            .post(
                &format!("/api/providers/{provider_id}/provider_accounts"),
                &format!(
                    "<provider_account><label>{label}</label><credentials>\
                     <username>u</username><password>p</password></credentials></provider_account>"
                ),
            )
            .await;
        assert_eq!(reply.status, 201, "account {label}: {}", reply.body);
    }

    /// ec2-us-east-1 with account ec2-acc, holding these images.
    async fn ec2_stand_in(&self, images: &[String]) {
        let id = self
            .provider("ec2-us-east-1", "ec2", "", "us-east-1", images)
            .await;
        self.account(&id, "ec2-acc").await;
    }

    /// One image per recorded `<image>`: built from a template with its fields, or, when
    /// it has no OS (Conductor knew no template for it), imported through ec2-us-east-1.
    async fn images_as_listed(&mut self, list: &Exchange) {
        let doc = list.reply_doc();
        let images: Vec<Node> = doc
            .root_element()
            .children()
            .filter(|n| n.has_tag_name("image"))
            .collect();
        let imports: Vec<String> = (1..=images.len()).map(|n| format!("ami-{n:08x}")).collect();
        if images.iter().any(|i| child_text(*i, "os").is_empty()) {
            self.ec2_stand_in(&imports).await;
        }
        for (n, image) in images.iter().enumerate() {
            let fields = Fields::of(*image);
            let builds: Vec<&str> = image
                .descendants()
                .filter(|b| b.has_tag_name("build"))
                .filter_map(|b| b.attribute("id"))
                .collect();
            assert!(builds.len() <= 1, "an image with several builds");
            let recorded = image.attribute("id").expect("image id");
            let (ours, build) = if fields.os.is_empty() {
                let imported = self.import("ec2-acc", &imports[n], &fields.name).await;
                (imported.image, imported.build)
            } else {
                let built = self.build(&fields, "mock").await;
                if builds.is_empty() {
                    // An image whose only build was deleted.
                    for ti in &built.target_images {
                        self.complete(&format!("/api/target_images/{ti}")).await;
                    }
                    let reply = self
                        .server
                        .delete(&format!("/api/builds/{}", built.build))
                        .await;
                    assert_eq!(reply.status, 200, "delete build: {}", reply.body);
                }
                (built.image, built.build)
            };
            self.map(recorded, &ours);
            if let Some(b) = builds.first() {
                self.map(b, &build);
            }
        }
    }

    /// One push to the provider's account for each `<provider_content>` of a recorded
    /// delete reply.
    async fn pushes_for_content(&self, target_image: &str, delete: &Exchange) {
        let doc = delete.reply_doc();
        for content in doc
            .descendants()
            .filter(|n| n.has_tag_name("provider_content"))
        {
            let provider = child_text(content, "provider");
            self.push(target_image, account_of(&provider)).await;
        }
    }

    /// A built, pushed target image as a recorded `<target_image>` shows it.
    async fn target_image_as_shown(&mut self, shown: &Exchange) {
        let doc = shown.reply_doc();
        let ti = doc.root_element();
        let built = self.built(&Fields::tmpl1()).await;
        self.map(ti.attribute("id").expect("id"), &built.target_images[0]);
        if let Some(build) = ti.children().find(|n| n.has_tag_name("build")) {
            self.map(build.attribute("id").expect("id"), &built.build);
        }
        for pi in ti
            .descendants()
            .filter(|n| n.has_tag_name("provider_image"))
        {
            // The recordings of target images show pushes to mock only.
            let ours = self.push(&built.target_images[0], "mock-acc").await;
            if let Some(id) = pi.attribute("id") {
                self.map(id, &ours);
            }
        }
    }

    /// A built image pushed to the recorded provider, as a recorded `<provider_image>`
    /// shows it.
    async fn provider_image_as_shown(&mut self, shown: &Exchange) {
        let doc = shown.reply_doc();
        let pi = doc.root_element();
        let built = self.built(&Fields::tmpl1()).await;
        let provider = child_text(pi, "provider");
        let ours = self
            .push(&built.target_images[0], account_of(&provider))
            .await;
        self.map(pi.attribute("id").expect("id"), &ours);
        if let Some(ti) = pi.children().find(|n| n.has_tag_name("target_image")) {
            self.map(ti.attribute("id").expect("id"), &built.target_images[0]);
        }
    }

    /// Builds the world the cassette's recording assumes.
    async fn prepare(&mut self, c: &Cassette) {
        match c.name {
            // The seeded world: the mock and testbed providers and accounts, and an
            // `admin` whose password is `password`.
            "base_command/invalid_credentials.yml"
            | "build_command/build.yml"
            | "build_command/build_url.yml"
            | "build_command/multiple_build.yml"
            | "delete_command/delete_build_not_found.yml"
            | "delete_command/delete_image_not_found.yml"
            | "delete_command/delete_provider_image_not_found.yml"
            | "delete_command/delete_target_image_not_found.yml"
            | "list_command/list_all_targets.yml" => {}
            "delete_command/delete_build.yml" => {
                let shown = c.first("GET").reply_doc();
                let build = shown.root_element();
                let built = self.built(&Fields::tmpl1()).await;
                self.map(build.attribute("id").expect("id"), &built.build);
                self.map(&child_text(build, "image"), &built.image);
                self.pushes_for_content(&built.target_images[0], c.first("DELETE"))
                    .await;
            }
            "delete_command/delete_image.yml" => {
                let shown = c.first("GET").reply_doc();
                let image = shown.root_element();
                let built = self.built(&Fields::of(image)).await;
                self.map(image.attribute("id").expect("id"), &built.image);
                for b in image.descendants().filter(|n| n.has_tag_name("build")) {
                    self.map(b.attribute("id").expect("id"), &built.build);
                }
                self.pushes_for_content(&built.target_images[0], c.first("DELETE"))
                    .await;
            }
            "delete_command/delete_image_no_provider_content.yml" => {
                let built = self.built(&Fields::tmpl1()).await;
                self.map(&c.path_id(), &built.image);
            }
            "delete_command/delete_target_image.yml" | "status_command/targetimage.yml" => {
                self.target_image_as_shown(c.first("GET")).await;
            }
            "delete_command/delete_provider_image.yml" | "status_command/providerimage.yml" => {
                self.provider_image_as_shown(c.first("GET")).await;
            }
            "import_command/import_image_default.yml"
            | "import_command/import_image_description_file.yml" => {
                // The image the recording imports exists on ec2-us-east-1.
                let body = &c.first("POST").body;
                let doc = Document::parse(body).expect("the recorded request is XML");
                let identifier = child_text(doc.root_element(), "target_identifier");
                self.ec2_stand_in(&[identifier]).await;
            }
            "list_command/default_environment.yml"
            | "list_command/empty_environment.yml"
            | "list_command/list_all_images.yml" => {
                self.images_as_listed(c.first("GET")).await;
            }
            "list_command/list_all_accounts.yml" => {
                self.without_seeded_providers().await;
                let doc = c.first("GET").reply_doc();
                for account in doc
                    .descendants()
                    .filter(|n| n.has_tag_name("provider_account"))
                {
                    let provider = self
                        .provider(
                            &child_text(account, "provider"),
                            &child_text(account, "provider_type"),
                            "",
                            "",
                            &[],
                        )
                        .await;
                    self.account(&provider, &child_text(account, "name")).await;
                }
            }
            "list_command/list_all_builds_for_image.yml" => {
                let built = self.build(&Fields::tmpl1(), "mock").await;
                self.map(&c.path_id(), &built.image);
                let doc = c.first("GET").reply_doc();
                for b in doc.descendants().filter(|n| n.has_tag_name("build")) {
                    self.map(b.attribute("id").expect("id"), &built.build);
                }
            }
            "list_command/list_all_provider_images_for_target_image.yml" => {
                // Imports, as the recorded target identifiers (ami-…) say; the second
                // exchange lists the accounts, so only the recorded one exists.
                self.without_seeded_providers().await;
                let doc = c.first("GET").reply_doc();
                let pis: Vec<Node> = doc
                    .descendants()
                    .filter(|n| n.has_tag_name("provider_image"))
                    .collect();
                let identifiers: Vec<String> = pis
                    .iter()
                    .map(|pi| child_text(*pi, "target_identifier"))
                    .collect();
                self.ec2_stand_in(&identifiers).await;
                let target_image = c.path_id();
                for (pi, identifier) in pis.iter().zip(&identifiers) {
                    let provider = child_text(*pi, "provider");
                    let imported = self
                        .import(account_of(&provider), identifier, identifier)
                        .await;
                    self.map(&target_image, &imported.target_image);
                    self.map(pi.attribute("id").expect("id"), &imported.provider_image);
                }
            }
            "list_command/list_all_providers.yml" => {
                self.without_seeded_providers().await;
                let doc = c.first("GET").reply_doc();
                for p in doc.descendants().filter(|n| n.has_tag_name("provider")) {
                    self.provider(
                        &child_text(p, "name"),
                        &child_text(p, "provider_type"),
                        &child_text(p, "url"),
                        &child_text(p, "deltacloud_provider"),
                        &[],
                    )
                    .await;
                }
            }
            "list_command/list_all_target_images_for_build.yml" => {
                // Listed target images are finished ones.
                let built = self.built(&Fields::tmpl1()).await;
                self.map(&c.path_id(), &built.build);
                let doc = c.first("GET").reply_doc();
                let recorded: Vec<&str> = doc
                    .root_element()
                    .children()
                    .filter(|n| n.has_tag_name("target_image"))
                    .filter_map(|n| n.attribute("id"))
                    .collect();
                for (r, ours) in recorded.iter().zip(&built.target_images) {
                    self.map(r, ours);
                }
            }
            "list_command/test_cloud_environment.yml" => {
                // The environment exists and holds nothing, while default holds an
                // image, so the list shows the filter at work.
                let path = &c.first("GET").path;
                let name = path
                    .split("/environments/")
                    .nth(1)
                    .and_then(|rest| rest.split('/').next())
                    .expect("an environment in the path")
                    .replace("%20", " ");
                let reply = self
                    .server
                    .post(
                        "/api/pool_families",
                        &format!("<pool_family><name>{name}</name></pool_family>"),
                    )
                    .await;
                assert_eq!(reply.status, 201, "environment: {}", reply.body);
                self.build(&Fields::tmpl1(), "mock").await;
            }
            "push_command/multiple_push_build_id.yml"
            | "push_command/multiple_push_image_id.yml"
            | "push_command/multiple_push_target_image_id.yml" => {
                let built = self.built(&Fields::tmpl1()).await;
                let body = &c.first("POST").body;
                let doc = Document::parse(body).expect("the recorded request is XML");
                let request = doc.root_element();
                for (field, ours) in [
                    ("image_id", &built.image),
                    ("build_id", &built.build),
                    ("target_image_id", &built.target_images[0]),
                ] {
                    let recorded = child_text(request, field);
                    if !recorded.is_empty() {
                        self.map(&recorded, ours);
                    }
                }
            }
            other => panic!("{other}: no world is known for this cassette"),
        }
    }

    async fn send(&self, x: &Exchange, path: &str, body: &str) -> Reply {
        let method = reqwest::Method::from_bytes(x.method.as_bytes()).expect("a method");
        let mut request = self
            .server
            .request(method, path)
            .basic_auth(&x.user, Some(&x.password));
        // As aeolus-cli sends them (../shared/reference/aeolus-cli-client.md §4).
        request = if x.method == "POST" {
            request
                .header("Content-Type", "application/xml")
                .header("Accept", "*/*")
                .body(body.to_owned())
        } else {
            request.header("Accept", "application/xml")
        };
        self.server.raw(request).await
    }

    /// Sends every recorded request to the API and compares the replies.
    async fn replay(&self, c: &Cassette) {
        let mut failures = Vec::new();
        for x in c.api() {
            let path = self.swap(&x.path);
            let recorded_body = self.swap(&x.body);
            let (body, old_shape) = rewrite_request(&recorded_body);
            if old_shape {
                let reply = self.send(x, &path, &recorded_body).await;
                if reply.status != 400 {
                    failures.push(format!(
                        "{} {path}: the recorded request has a shape Conductor dropped in \
                         2011 (row 19) and should be refused with 400, got {}:\n{}",
                        x.method, reply.status, reply.body
                    ));
                }
            }
            let reply = self.send(x, &path, &body).await;
            let mut problems = Vec::new();
            if reply.status != x.status {
                problems.push(format!(
                    "status: recorded {}, ours {}",
                    x.status, reply.status
                ));
            }
            problems.extend(differences(
                &x.reply,
                &reply.body,
                &self.ids,
                x.method == "POST",
            ));
            if !problems.is_empty() {
                failures.push(format!(
                    "{} {path}\n  - {}\n--- recorded reply:\n{}\n--- our reply:\n{}",
                    x.method,
                    problems.join("\n  - "),
                    x.reply,
                    reply.body
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "{}: the replies differ from the recording:\n{}",
            c.name,
            failures.join("\n\n")
        );
    }
}

async fn replay(name: &'static str) {
    let cassette = Cassette::load(name);
    let mut world = World::start();
    world.prepare(&cassette).await;
    world.replay(&cassette).await;
}

macro_rules! cassettes {
    ($($test:ident => $file:literal,)*) => {
        /// Every cassette a test below replays.
        const REPLAYED: &[&str] = &[$($file),*];
        $(
            #[tokio::test]
            async fn $test() {
                replay($file).await;
            }
        )*
    };
}

cassettes! {
    invalid_credentials => "base_command/invalid_credentials.yml",
    build => "build_command/build.yml",
    build_url => "build_command/build_url.yml",
    multiple_build => "build_command/multiple_build.yml",
    delete_build => "delete_command/delete_build.yml",
    delete_build_not_found => "delete_command/delete_build_not_found.yml",
    delete_image => "delete_command/delete_image.yml",
    delete_image_no_provider_content => "delete_command/delete_image_no_provider_content.yml",
    delete_image_not_found => "delete_command/delete_image_not_found.yml",
    delete_provider_image => "delete_command/delete_provider_image.yml",
    delete_provider_image_not_found => "delete_command/delete_provider_image_not_found.yml",
    delete_target_image => "delete_command/delete_target_image.yml",
    delete_target_image_not_found => "delete_command/delete_target_image_not_found.yml",
    import_image_default => "import_command/import_image_default.yml",
    import_image_description_file => "import_command/import_image_description_file.yml",
    default_environment => "list_command/default_environment.yml",
    empty_environment => "list_command/empty_environment.yml",
    list_all_accounts => "list_command/list_all_accounts.yml",
    list_all_builds_for_image => "list_command/list_all_builds_for_image.yml",
    list_all_images => "list_command/list_all_images.yml",
    list_all_provider_images_for_target_image => "list_command/list_all_provider_images_for_target_image.yml",
    list_all_providers => "list_command/list_all_providers.yml",
    list_all_target_images_for_build => "list_command/list_all_target_images_for_build.yml",
    list_all_targets => "list_command/list_all_targets.yml",
    test_cloud_environment => "list_command/test_cloud_environment.yml",
    multiple_push_build_id => "push_command/multiple_push_build_id.yml",
    multiple_push_image_id => "push_command/multiple_push_image_id.yml",
    multiple_push_target_image_id => "push_command/multiple_push_target_image_id.yml",
    status_providerimage => "status_command/providerimage.yml",
    status_targetimage => "status_command/targetimage.yml",
}

/// A cassette added to the fixtures without a replay here would go unchecked.
#[test]
fn covers_every_cassette() {
    let mut found = BTreeSet::new();
    for group in std::fs::read_dir(CASSETTES).expect("tests/fixtures/aeolus-cli is readable") {
        let group = group.expect("entry").path();
        if !group.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&group).expect("a cassette folder") {
            let file = file.expect("entry").path();
            if file.extension().is_some_and(|e| e == "yml") {
                let relative = file
                    .strip_prefix(CASSETTES)
                    .expect("inside the fixtures")
                    .to_string_lossy()
                    .into_owned();
                found.insert(relative);
            }
        }
    }
    let replayed: BTreeSet<String> = REPLAYED.iter().map(|s| (*s).to_owned()).collect();
    assert_eq!(found, replayed);
}

/// The reader of cassettes keeps block scalars whole and reads quoted ones.
#[test]
fn reads_cassettes() {
    let text = "---\n- !ruby/struct:VCR::HTTPInteraction \n  request: !ruby/struct:VCR::Request \n    method: :delete\n    uri: https://admin:pw@localhost:443/conductor/api/images/1.xml\n    body: \n    headers:\n      accept:\n      - application/xml\n  response: !ruby/struct:VCR::Response\n    status: !ruby/struct:VCR::ResponseStatus\n      code: 200\n      message: OK\n    body: |+\n      <a>\n        <b>x</b>\n      \n      </a>\n\n    http_version: \"1.1\"\n- !ruby/struct:VCR::HTTPInteraction\n  request: !ruby/struct:VCR::Request\n    method: :get\n    uri: https://admin:wrong@localhost/conductor/api\n    body:\n  response: !ruby/struct:VCR::Response\n    status: !ruby/struct:VCR::ResponseStatus\n      code: 401\n    body: \" \"\n";
    let exchanges = parse_cassette(text);
    assert_eq!(exchanges.len(), 2);
    let (a, b) = (&exchanges[0], &exchanges[1]);
    assert_eq!(
        (a.method.as_str(), a.user.as_str(), a.password.as_str()),
        ("DELETE", "admin", "pw")
    );
    assert_eq!(a.path, "/conductor/api/images/1.xml");
    assert_eq!((a.status, a.body.as_str()), (200, ""));
    assert_eq!(a.reply, "<a>\n  <b>x</b>\n\n</a>\n");
    assert_eq!(
        (b.status, b.reply.as_str(), b.password.as_str()),
        (401, " ", "wrong")
    );
}

/// The comparison finds what it should, and lets through only what the table allows.
#[test]
fn comparison_finds_differences() {
    let (a, b, c) = (
        "11111111-1111-1111-1111-111111111111",
        "22222222-2222-2222-2222-222222222222",
        "33333333-3333-3333-3333-333333333333",
    );
    let ids = HashMap::from([(a.to_owned(), b.to_owned())]);
    let same = |recorded: &str, ours: &str, live: bool| {
        let found = differences(recorded, ours, &ids, live);
        assert!(found.is_empty(), "{recorded} / {ours}: {found:?}");
    };
    let differ = |recorded: &str, ours: &str, live: bool| {
        let found = differences(recorded, ours, &ids, live);
        assert!(
            !found.is_empty(),
            "{recorded} / {ours}: no difference found"
        );
    };
    let ti = |inner: &str| format!("<target_image>{inner}</target_image>");
    same(
        &ti("<status>COMPLETED</status>"),
        &ti("<status>COMPLETE</status>"),
        false,
    );
    differ(
        &ti("<status>COMPLETE</status>"),
        &ti("<status>FAILED</status>"),
        false,
    );
    // Live statuses only in replies to a POST, and never FAILED.
    same(
        &ti("<status>New</status>"),
        &ti("<status>BUILDING</status>"),
        true,
    );
    differ(
        &ti("<status>New</status>"),
        &ti("<status>BUILDING</status>"),
        false,
    );
    differ(
        &ti("<status>New</status>"),
        &ti("<status>FAILED</status>"),
        true,
    );
    // Additions are skipped only where listed and where the recording has none.
    same(
        &ti("<status>NEW</status>"),
        &ti("<status>NEW</status><percent_complete>0</percent_complete>"),
        false,
    );
    differ(
        &ti("<status>NEW</status>"),
        &ti("<status>NEW</status><colour>red</colour>"),
        false,
    );
    differ(
        &ti("<target>mock</target>"),
        &ti("<target>testbed</target>"),
        false,
    );
    // Missing, reordered and renamed elements.
    differ(
        "<image><name>x</name><os>y</os></image>",
        "<image><name>x</name></image>",
        false,
    );
    differ(
        "<image><name>x</name><os>y</os></image>",
        "<image><os>y</os><name>x</name></image>",
        false,
    );
    // Ids: the record that stands for the recorded one, or any id where none does.
    same(
        &format!("<build id='{a}'><image type='xs:string'>{a}</image></build>"),
        &format!("<build id='{b}'><image type='xs:string'>{b}</image></build>"),
        false,
    );
    differ(
        &format!("<build id='{a}'></build>"),
        &format!("<build id='{c}'></build>"),
        false,
    );
    differ(
        &format!("<build><image>{a}</image></build>"),
        &format!("<build><image>{c}</image></build>"),
        false,
    );
    same(
        &format!("<build id='{c}'></build>"),
        &format!("<build id='{a}'></build>"),
        false,
    );
    same(
        &format!(
            "<provider_content><target_identifier>Mock_mock_{c}</target_identifier></provider_content>"
        ),
        &format!(
            "<provider_content><target_identifier>Mock_mock_{a}</target_identifier></provider_content>"
        ),
        false,
    );
    differ(
        &format!(
            "<provider_content><target_identifier>Mock_mock_{c}</target_identifier></provider_content>"
        ),
        &format!(
            "<provider_content><target_identifier>Mock_ec2_{a}</target_identifier></provider_content>"
        ),
        false,
    );
    // Other attributes are compared.
    differ(
        "<builds type='xs:list'></builds>",
        "<builds type='array'></builds>",
        false,
    );
    // A value may fill an empty recorded one where listed, never the other way round.
    same(
        "<image><arch></arch></image>",
        "<image><arch>x86_64</arch></image>",
        false,
    );
    differ(
        "<image><arch>x86_64</arch></image>",
        "<image><arch></arch></image>",
        false,
    );
    same(" ", "", false);
    differ(" ", "<error></error>", false);
}
