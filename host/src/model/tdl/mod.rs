//! TDL templates. This module owns parsing a TDL document (the Template Description Language
//! that Oz and Image Factory build from) and validating it against the rules of Oz's RELAX NG
//! schema, accepting the union of the current `tdl.rng` and the 2012 copy that aeolus-cli used, so
//! that a bad template is refused with every problem listed before anything is stored or built. It
//! is pure domain logic: it must not import axum, redb or wasmtime.

mod tree;

use tree::{MAX_INPUT, Node, attr, child, count, read_tree, xml_trim};

/// A huge broken document would otherwise produce an error message as large as itself.
const MAX_PROBLEMS: usize = 50;
/// Oz gives a guest a 10 GiB disk when the template names no size.
const DEFAULT_DISK_SIZE: u64 = 10 << 30;
const MAX_DISK_SIZE: u128 = 16 << 40;
/// The current schema's list; the 2012 one (i386, x86_64) is a subset, so this is the union.
const ARCHES: [&str; 7] = [
    "i386", "x86_64", "ppc64", "ppc64le", "aarch64", "armv7l", "s390x",
];

/// The content model of every element that is not plain text, one line each: its path below
/// `<template>`, its attributes (`@`), its child elements, and `#text` if it may hold text. A bare
/// name is required once, `?` means at most once and `*` any number; children may come in any
/// order, as the schema's interleave allows. A child without a line here is a `<text/>` element.
/// Where the two schemas differ a model is their union: rootpw is optional, `@version` is any
/// text, and the 2012 repository elements (clientcert, clientkey, cacert) sit beside the newer
/// ones. `<name>` is optional here only because its absence has its own wording in the API. The
/// install's children depend on its type; without a usable type, both forms are let through
/// rather than all reported as unknown.
const SCHEMA: &str = "
template @version? name? os description? packages? files? commands? precommands? repositories? disk?
os name version arch install rootpw? key? kernelparam? icicle?
os/install @type url? iso? md5sum? sha1sum? sha256sum? extras?
os/install[url] @type url extras?
os/install[iso] @type iso md5sum? sha1sum? sha256sum? extras?
os/install/extras directory* file*
os/install/extras/directory @source @destination
os/install/extras/file @source @destination
os/icicle extra_command
packages package*
packages/package @name repository? file? arguments?
files file*
files/file @name @type? #text
commands command*
commands/command @name @type? @position? #text
precommands command*
precommands/command @name @type? @position? #text
repositories repository*
repositories/repository @name url signed? persisted? sslverify? clientcert? clientkey? cacert?
disk size";

/// A validated template: the parts the server stores and shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub name: String,
    pub description: String, // "" when absent
    pub os_name: String,
    pub os_version: String,
    pub arch: String, // one of ARCHES: "i386", "x86_64", "ppc64", "ppc64le", "aarch64", ...
    /// Size of the root disk in bytes, from `<disk><size>` (Oz's units) or 10 GiB when absent.
    pub disk_size: u64,
    /// How the OS would be installed: Some("url" | "iso") for an install tree, None when the
    /// schema version has none. Both TDL schemas require `<install>`, so `parse` always fills it.
    pub install: Option<String>,
    /// What the template puts into the OS: where it comes from, packages, files, commands.
    pub content: Content,
}

/// What a template asks to be put into the OS it installs (Oz's customizations).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Content {
    /// `<install type='url'><url>`: the package mirror the OS is installed from.
    pub install_url: Option<String>,
    /// `<rootpw>`, as written; `None` leaves root without a password.
    pub root_password: Option<String>,
    /// `<packages>`, by name, in document order.
    pub packages: Vec<String>,
    /// `<repositories>`: extra package sources.
    pub repositories: Vec<Repository>,
    /// `<files>`: written into the OS after its packages.
    pub files: Vec<File>,
    /// `<precommands>`, then `<commands>`: run as root in the OS, in order (by `@position`
    /// when the commands carry one, else as written).
    pub precommands: Vec<Command>,
    pub commands: Vec<Command>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repository {
    pub name: String,
    pub url: String,
    /// `<signed>`: whether the source's packages must be signed (Oz's default: no).
    pub signed: bool,
}

/// The body of a file or command: given in the template, or a URL to fetch it from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Bytes(Vec<u8>),
    Url(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    pub path: String,
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub name: String,
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .problems.join(", "))]
pub struct TdlError {
    pub problems: Vec<String>,
}

/// Parse and validate `xml` (a whole `<template>` document). Collect every problem found (not just
/// the first), each as one short English sentence that names the element or attribute and what is
/// wrong, e.g. "os/arch must be one of i386, x86_64, ..., not 'arm'", "Name is not set.",
/// "unknown element <foo> in <template>", "missing required element <os> in <template>",
/// "XML is not well-formed: ...".
pub fn parse(xml: &str) -> Result<Template, TdlError> {
    let one = |problem: String| TdlError {
        problems: vec![problem],
    };
    if xml.len() > MAX_INPUT {
        let problem = format!("the template is {} bytes, more than 1 MiB", xml.len());
        return Err(one(problem));
    }
    let root = read_tree(xml).map_err(|e| one(e.to_string()))?;
    if root.name != "template" {
        let problem = format!("the root element must be <template>, not <{}>", root.name);
        return Err(one(problem));
    }
    let mut checker = Checker::default();
    checker.walk(&root, "template", "template");
    match (checker.problems, extract(&root)) {
        (problems, _) if !problems.is_empty() => Err(TdlError { problems }),
        (_, Some(template)) => Ok(template),
        // Validation guarantees every part `extract` reads; this only guards against a mismatch.
        (_, None) => Err(one("the template is incomplete".to_owned())),
    }
}

/// Reads the server's facts out of a tree that has passed validation.
fn extract(root: &Node) -> Option<Template> {
    let text = |node: &Node, name: &str| child(node, name).map(|c| xml_trim(&c.text).to_owned());
    let os = child(root, "os")?;
    let disk_size = match child(root, "disk").and_then(|disk| child(disk, "size")) {
        Some(size) => disk_size(&size.text).ok()?,
        None => DEFAULT_DISK_SIZE,
    };
    let install = child(os, "install").and_then(|i| attr(i, "type"));
    Some(Template {
        name: text(root, "name")?,
        description: text(root, "description").unwrap_or_default(),
        os_name: text(os, "name")?,
        os_version: text(os, "version")?,
        arch: text(os, "arch")?,
        disk_size,
        install: install.map(|kind| xml_trim(kind).to_owned()),
        content: content(root, os),
    })
}

/// Reads the customizations out of a validated tree.
fn content(root: &Node, os: &Node) -> Content {
    let text = |node: &Node, name: &str| child(node, name).map(|c| xml_trim(&c.text).to_owned());
    let body = |node: &Node| match attr(node, "type").map(xml_trim) {
        Some("base64") => {
            use base64::Engine as _;
            let compact: String = node.text.split_ascii_whitespace().collect();
            // Validation decoded it the same way (`is_base64`), so this cannot fail.
            Body::Bytes(
                base64::engine::general_purpose::STANDARD
                    .decode(compact)
                    .unwrap_or_default(),
            )
        }
        Some("url") => Body::Url(xml_trim(&node.text).to_owned()),
        _ => Body::Bytes(node.text.clone().into_bytes()),
    };
    let commands = |list: Option<&Node>| {
        let mut commands: Vec<(u64, Command)> = list
            .map(|list| &list.children[..])
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(at, c)| {
                let position = attr(c, "position")
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(at as u64);
                let name = attr(c, "name").unwrap_or_default().to_owned();
                (
                    position,
                    Command {
                        name,
                        body: body(c),
                    },
                )
            })
            .collect();
        commands.sort_by_key(|(position, _)| *position);
        commands.into_iter().map(|(_, c)| c).collect()
    };
    let children = |name: &str| {
        child(root, name)
            .map(|list| list.children.iter().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    Content {
        install_url: child(os, "install").and_then(|i| text(i, "url")),
        root_password: child(os, "rootpw").map(|p| p.text.clone()),
        packages: children("packages")
            .into_iter()
            .filter_map(|p| attr(p, "name").map(|n| xml_trim(n).to_owned()))
            .collect(),
        repositories: children("repositories")
            .into_iter()
            .map(|r| Repository {
                name: attr(r, "name").unwrap_or_default().to_owned(),
                url: text(r, "url").unwrap_or_default(),
                signed: text(r, "signed").is_some_and(|s| {
                    s.eq_ignore_ascii_case("true") || s.eq_ignore_ascii_case("yes")
                }),
            })
            .collect(),
        files: children("files")
            .into_iter()
            .map(|f| File {
                path: attr(f, "name").unwrap_or_default().to_owned(),
                body: body(f),
            })
            .collect(),
        precommands: commands(child(root, "precommands")),
        commands: commands(child(root, "commands")),
    }
}

/// The entries of a content model as (name, at most once, required); see [`SCHEMA`].
fn model<'s>(words: &[&'s str]) -> impl Iterator<Item = (&'s str, bool, bool)> {
    words.iter().map(
        |&word| match (word.strip_suffix('?'), word.strip_suffix('*')) {
            (Some(name), _) => (name, true, false),
            (_, Some(name)) => (name, false, false),
            _ => (word, true, true),
        },
    )
}

/// XSD string patterns (booleans, base64, sizes) see the raw text, so unlike `<value>` choices
/// (compared as tokens) they are not trimmed.
fn is_bool(s: &str) -> bool {
    ["true", "false", "yes", "no"]
        .iter()
        .any(|b| b.eq_ignore_ascii_case(s))
}

/// Whether `s` decodes as the body of a file or command will be decoded (standard
/// alphabet, padded), so a body that passes never turns into nothing.
fn is_base64(s: &str) -> bool {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .is_ok_and(|bytes| !bytes.is_empty())
}

/// Oz's size rule (`oz/TDL.py`) within the schema's pattern: digits, optional spaces, then nothing
/// or G (GiB, Oz's historical default), T (TiB), B (bytes), or an SI (`MB`) or IEC (`MiB`) unit,
/// in any case. A bare `M` matches the schema's pattern but Oz refuses it, so it is refused here.
/// A size in TDL's notation (a bare number is GiB), for flags that take one.
pub fn parse_size(raw: &str) -> Result<u64, SizeError> {
    size("a size", raw)
}

fn disk_size(raw: &str) -> Result<u64, SizeError> {
    size("disk/size", raw)
}

/// Why a size is refused; the first field names what was given (`disk/size`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{0} must be a whole number of GiB or with a unit such as G, T, MB or GiB, not '{1}'")]
    Unparsable(&'static str, String),
    #[error("{0} must be more than zero")]
    Zero(&'static str),
    #[error("{0} must be at most 16 TiB, not '{1}'")]
    TooLarge(&'static str, String),
}

fn size(subject: &'static str, raw: &str) -> Result<u64, SizeError> {
    let number = raw.trim_end_matches(|c: char| !c.is_ascii_digit());
    let unit = raw[number.len()..]
        .trim_start_matches(' ')
        .to_ascii_lowercase();
    let (prefix, suffix) = unit.split_at(unit.chars().next().map_or(0, char::len_utf8));
    let power = "kmgtpezy"
        .find(prefix)
        .and_then(|i| u32::try_from(i + 1).ok());
    let factor: Option<u128> = match (unit.as_str(), power, suffix) {
        ("" | "g", ..) => Some(1 << 30),
        ("t", ..) => Some(1 << 40),
        ("b", ..) => Some(1),
        (_, Some(power), "b") => 1000u128.checked_pow(power),
        (_, Some(power), "ib") => 1024u128.checked_pow(power),
        _ => None,
    };
    let digits = !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit());
    let Some(factor) = factor.filter(|_| digits) else {
        return Err(SizeError::Unparsable(subject, raw.to_owned()));
    };
    let bytes = number
        .parse::<u128>()
        .ok()
        .and_then(|n| n.checked_mul(factor));
    match bytes.map(u64::try_from) {
        Some(Ok(0)) => Err(SizeError::Zero(subject)),
        Some(Ok(bytes)) if u128::from(bytes) <= MAX_DISK_SIZE => Ok(bytes),
        _ => Err(SizeError::TooLarge(subject, raw.to_owned())),
    }
}

/// Walks the tree once, noting every problem, so a user can fix a template in one round trip.
#[derive(Default)]
struct Checker {
    problems: Vec<String>,
}

impl Checker {
    /// Notes a problem once, however often it occurs, and stops listing them after MAX_PROBLEMS.
    fn report(&mut self, problem: String) {
        if self.problems.len() < MAX_PROBLEMS && !self.problems.contains(&problem) {
            self.problems.push(problem);
        } else if self.problems.len() == MAX_PROBLEMS {
            self.problems
                .push("and more problems that are not listed".to_owned());
        }
    }

    /// Checks `node` against its line in [`SCHEMA`] (found by `schema`; `path` adds positions in
    /// lists, for messages), then enters the children its model knows.
    fn walk(&mut self, node: &Node, schema: &str, path: &str) {
        let key = match attr(node, "type").map(xml_trim) {
            Some(kind @ ("url" | "iso")) if schema == "os/install" => format!("{schema}[{kind}]"),
            _ => schema.to_owned(),
        };
        let line = SCHEMA
            .lines()
            .find(|l| l.split(' ').next() == Some(key.as_str()));
        let words = line.map_or(vec!["#text"], |l| l.split(' ').skip(1).collect());
        let (attrs, children): (Vec<&str>, Vec<&str>) =
            words.iter().partition(|w| w.starts_with('@'));
        let attrs: Vec<&str> = attrs.iter().map(|a| &a[1..]).collect();
        for (key, _) in &node.attrs {
            if !model(&attrs).any(|(a, ..)| a == key) {
                self.report(format!("unknown attribute '{key}' on <{path}>"));
            }
        }
        for (name, ..) in model(&attrs).filter(|&(.., required)| required) {
            if attr(node, name).is_none() {
                self.report(format!("missing required attribute '{name}' on <{path}>"));
            }
        }
        for (name, once, required) in model(&children).filter(|(name, ..)| *name != "#text") {
            match count(node, &[name]) {
                0 if required => {
                    self.report(format!("missing required element <{name}> in <{path}>"))
                }
                2.. if once => {
                    self.report(format!("element <{name}> may appear only once in <{path}>"))
                }
                _ => {}
            }
        }
        if !children.contains(&"#text") && !xml_trim(&node.text).is_empty() {
            self.report(format!("<{path}> may not contain text"));
        }
        self.rules(node, schema, path);
        for (i, c) in node.children.iter().enumerate() {
            let Some((_, once, _)) = model(&children).find(|(name, ..)| *name == c.name) else {
                self.report(format!("unknown element <{}> in <{path}>", c.name));
                continue;
            };
            let (schema, mut path) = match schema {
                "template" => (c.name.clone(), c.name.clone()),
                _ => (format!("{schema}/{}", c.name), format!("{path}/{}", c.name)),
            };
            if !once {
                let before = node.children[..i]
                    .iter()
                    .filter(|s| s.name == c.name)
                    .count();
                path = format!("{path}[{}]", before + 1);
            }
            self.walk(c, &schema, &path);
        }
    }

    /// The rules beyond the content model: values, and constraints between siblings.
    fn rules(&mut self, node: &Node, schema: &str, path: &str) {
        let (text, trimmed) = (node.text.as_str(), xml_trim(&node.text));
        let kind = attr(node, "type").map(xml_trim);
        match schema {
            "template" if child(node, "name").is_none_or(|n| xml_trim(&n.text).is_empty()) => {
                self.report("Name is not set.".to_owned());
            }
            "os/name" | "os/version" if trimmed.is_empty() => {
                self.report(format!("{path} must not be empty"));
            }
            // `<value>` choices compare as XSD tokens, so surrounding whitespace is allowed.
            "os/arch" if !ARCHES.contains(&trimmed) => {
                let arches = ARCHES.join(", ");
                self.report(format!("os/arch must be one of {arches}, not '{trimmed}'"));
            }
            "os/install" => {
                if let Some(kind) = kind.filter(|k| !["url", "iso"].contains(k)) {
                    self.report(format!("os/install/@type must be url or iso, not '{kind}'"));
                }
                if count(node, &["md5sum", "sha1sum", "sha256sum"]) > 1 {
                    let problem =
                        "os/install may hold only one of <md5sum>, <sha1sum>, <sha256sum>";
                    self.report(problem.to_owned());
                }
            }
            "os/install/extras" if count(node, &["directory", "file"]) == 0 => {
                self.report("os/install/extras must contain a <directory> or <file>".to_owned());
            }
            // A file may be empty base64 (the current schema's base64_or_empty), a command may not.
            "files/file" | "commands/command" | "precommands/command" => {
                let empty = schema == "files/file" && trimmed.is_empty();
                match kind {
                    None | Some("raw" | "url") => {}
                    Some("base64") if empty || is_base64(text) => {}
                    Some("base64") => self.report(format!(
                        "{path} has type base64 but is not base64 on one line"
                    )),
                    Some(other) => self.report(format!(
                        "{path}/@type must be raw, base64 or url, not '{other}'"
                    )),
                }
                if let Some(position) =
                    attr(node, "position").filter(|p| !p.bytes().all(|b| b.is_ascii_digit()))
                {
                    self.report(format!(
                        "{path}/@position must be a whole number, not '{position}'"
                    ));
                }
            }
            // The 2012 schema ties these pairs together; the current one has neither element, so
            // the union keeps the 2012 rule.
            "repositories/repository" => {
                for (needs, what) in [("clientkey", "clientcert"), ("cacert", "sslverify")] {
                    if child(node, needs).is_some() && child(node, what).is_none() {
                        self.report(format!("{path} has <{needs}> without <{what}>"));
                    }
                }
            }
            "repositories/repository/signed"
            | "repositories/repository/persisted"
            | "repositories/repository/sslverify"
                if !is_bool(text) =>
            {
                self.report(format!(
                    "{path} must be true, false, yes or no, not '{text}'"
                ));
            }
            "disk/size" => {
                if let Err(problem) = disk_size(text) {
                    self.report(problem.to_string());
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tree::{MAX_ATTRIBUTES, MAX_NODES};
    use super::*;

    /// The aeolus-cli fixture template from conductor-api.md §10, with its `<os>` children out of
    /// order.
    const AEOLUS: &str = r#"<template>
  <name>tmpl1</name>
  <description>foo</description>
  <os>
    <rootpw>password</rootpw>
    <name>Fedora</name>
    <arch>x86_64</arch>
    <version>14</version>
    <install type="url"><url>http://download.fedoraproject.org/pub/fedora/linux/releases/14/Fedora/x86_64/os/</url></install>
  </os>
  <repositories>
    <repository name="custom"><url>http://repos.fedorapeople.org/repos/aeolus/demo/webapp/</url><signed>false</signed></repository>
  </repositories>
</template>"#;

    /// A valid template that uses every element of both schemas, in no particular order, with
    /// references, CDATA, a comment and an XML declaration.
    const EVERYTHING: &str = r#"<?xml version="1.0"?>
<!-- a comment -->
<template version="1.0">
  <disk><size>20</size></disk>
  <name>all &amp; more&#33;</name>
  <os><name>Mageia</name><version>9</version><arch> aarch64 </arch><kernelparam>quiet</kernelparam>
    <key>K</key><icicle><extra_command>rpm -qa</extra_command></icicle>
    <install type="iso"><iso>http://x/a.iso</iso><sha256sum>http://x/a.sum</sha256sum>
      <extras><directory source="http://x/d" destination="d"/><file source="s" destination="f"/></extras></install>
  </os>
  <packages><package name="httpd"><arguments>-y</arguments><repository>r</repository></package><package name="vim"/></packages>
  <files><file name="/a">raw</file><file name="/b" type="base64">aGVsbG8=</file><file name="/c" type="base64"/>
    <file name="/d" type="url">file:///x</file></files>
  <commands><command name="c" position="1"><![CDATA[echo <hi>]]></command><command name="d" type="base64">ZWNobw==</command></commands>
  <precommands><command name="p">true</command></precommands>
  <repositories><repository name="r"><url>http://r/</url><persisted>YES</persisted><sslverify>No</sslverify>
    <cacert>CA</cacert><clientcert>C</clientcert><clientkey>K</clientkey><signed>True</signed></repository></repositories>
</template>"#;

    const OS: &str = "<name>F</name><version>1</version><arch>i386</arch>";
    const INSTALL: &str = "<install type='url'><url>u</url></install>";

    /// One case a line: a fragment, then ` => ` and the problems it must produce, joined. The
    /// fragment is added to a valid template; one that starts with `<os>` replaces its `<os>`
    /// instead, and there `OS` stands for valid name, version and arch elements and `INSTALL` for a
    /// valid install.
    const CASES: &str = "
<foo/> => unknown element <foo> in <template>
<description><b/></description> => unknown element <b> in <description>
<disk a='1'><size>1</size></disk> => unknown attribute 'a' on <disk>
<description/><description/> => element <description> may appear only once in <template>
<files>x</files> => <files> may not contain text
<packages><package/></packages> => missing required attribute 'name' on <packages/package[1]>
<os><name>X</name><version>1</version></os> => missing required element <arch> in <os>, missing required element <install> in <os>
<os><name>F</name><version>1</version><arch>arm</arch>INSTALL</os> => os/arch must be one of i386, x86_64, ppc64, ppc64le, aarch64, armv7l, s390x, not 'arm'
<os><name/><version>1</version><arch>i386</arch>INSTALL</os> => os/name must not be empty
<os>OS<install type='ftp'><url/></install></os> => os/install/@type must be url or iso, not 'ftp'
<os>OS<install><url/></install></os> => missing required attribute 'type' on <os/install>
<os>OS<install type='iso'><url/></install></os> => missing required element <iso> in <os/install>, unknown element <url> in <os/install>
<os>OS<install type='iso'><iso/><md5sum/><sha1sum/></install></os> => os/install may hold only one of <md5sum>, <sha1sum>, <sha256sum>
<os>OS<install type='url'><url/><extras/></install></os> => os/install/extras must contain a <directory> or <file>
<os>OS<install type='url'><url/><icicle/></install></os> => unknown element <icicle> in <os/install>
<files><file name='a' type='base64'>no base64!</file></files> => files/file[1] has type base64 but is not base64 on one line
<files><file name='a' type='base64'>aGVsbG8</file></files> => files/file[1] has type base64 but is not base64 on one line
<commands><command name='a' type='base64'/></commands> => commands/command[1] has type base64 but is not base64 on one line
<precommands><command name='a' type='gz' position='x'/></precommands> => precommands/command[1]/@type must be raw, base64 or url, not 'gz', precommands/command[1]/@position must be a whole number, not 'x'
<repositories><repository name='r'><url/><signed>maybe</signed></repository></repositories> => repositories/repository[1]/signed must be true, false, yes or no, not 'maybe'
<repositories><repository name='r'/><repository/></repositories> => missing required element <url> in <repositories/repository[1]>, missing required attribute 'name' on <repositories/repository[2]>, missing required element <url> in <repositories/repository[2]>
<repositories><repository name='r'><url/><clientkey/><cacert/></repository></repositories> => repositories/repository[1] has <clientkey> without <clientcert>, repositories/repository[1] has <cacert> without <sslverify>
<disk/> => missing required element <size> in <disk>";

    fn template(fragment: &str) -> String {
        match fragment.strip_prefix("<os>") {
            Some(os) => format!(
                "<template><name>t</name><os>{}</template>",
                os.replace("OS", OS).replace("INSTALL", INSTALL)
            ),
            None => format!("<template><name>t</name><os>{OS}{INSTALL}</os>{fragment}</template>"),
        }
    }

    /// What `parse` says, as the API would show it.
    fn outcome(xml: &str) -> String {
        parse(xml).map_or_else(|e| e.to_string(), |t| format!("valid: {t:?}"))
    }

    #[test]
    fn aeolus_cli_template_is_valid() {
        let expected = Template {
            name: "tmpl1".to_owned(),
            description: "foo".to_owned(),
            os_name: "Fedora".to_owned(),
            os_version: "14".to_owned(),
            arch: "x86_64".to_owned(),
            disk_size: 10 << 30,
            install: Some("url".to_owned()),
            content: Content {
                install_url: Some(
                    "http://download.fedoraproject.org/pub/fedora/linux/releases/14/Fedora/x86_64/os/"
                        .to_owned(),
                ),
                root_password: Some("password".to_owned()),
                repositories: vec![Repository {
                    name: "custom".to_owned(),
                    url: "http://repos.fedorapeople.org/repos/aeolus/demo/webapp/".to_owned(),
                    signed: false,
                }],
                ..Content::default()
            },
        };
        assert_eq!(parse(AEOLUS), Ok(expected));
    }

    #[test]
    fn every_element_of_both_schemas_is_accepted() {
        let expected = Template {
            name: "all & more!".to_owned(),
            description: String::new(),
            os_name: "Mageia".to_owned(),
            os_version: "9".to_owned(),
            arch: "aarch64".to_owned(),
            disk_size: 20 << 30,
            install: Some("iso".to_owned()),
            content: Content {
                install_url: None,
                root_password: None,
                packages: vec!["httpd".to_owned(), "vim".to_owned()],
                repositories: vec![Repository {
                    name: "r".to_owned(),
                    url: "http://r/".to_owned(),
                    signed: true,
                }],
                files: vec![
                    File {
                        path: "/a".to_owned(),
                        body: Body::Bytes(b"raw".to_vec()),
                    },
                    File {
                        path: "/b".to_owned(),
                        body: Body::Bytes(b"hello".to_vec()),
                    },
                    File {
                        path: "/c".to_owned(),
                        body: Body::Bytes(vec![]),
                    },
                    File {
                        path: "/d".to_owned(),
                        body: Body::Url("file:///x".to_owned()),
                    },
                ],
                precommands: vec![Command {
                    name: "p".to_owned(),
                    body: Body::Bytes(b"true".to_vec()),
                }],
                commands: vec![
                    Command {
                        name: "c".to_owned(),
                        body: Body::Bytes(b"echo <hi>".to_vec()),
                    },
                    Command {
                        name: "d".to_owned(),
                        body: Body::Bytes(b"echo".to_vec()),
                    },
                ],
            },
        };
        assert_eq!(parse(EVERYTHING), Ok(expected));
    }

    #[test]
    fn each_rule_reports_its_problem() {
        for line in CASES.lines().skip(1) {
            let (fragment, expected) = line.split_once(" => ").expect("a case");
            assert_eq!(outcome(&template(fragment)), expected, "{fragment}");
        }
        for name in ["", "<name> \n</name>"] {
            let xml = template("").replace("<name>t</name>", name);
            assert_eq!(outcome(&xml), "Name is not set.");
        }
        assert_eq!(
            outcome("<image/>"),
            "the root element must be <template>, not <image>"
        );
    }

    #[test]
    fn all_problems_are_collected() {
        let xml = "<template version='2'><os><name>Fedora</name><version>1</version><arch>arm</arch>\
                   <install type='url'/></os><foo/><disk><size>0</size></disk></template>";
        let expected = [
            "Name is not set.",
            "os/arch must be one of i386, x86_64, ppc64, ppc64le, aarch64, armv7l, s390x, not 'arm'",
            "missing required element <url> in <os/install>",
            "unknown element <foo> in <template>",
            "disk/size must be more than zero",
        ];
        assert_eq!(
            parse(xml).map_err(|e| e.problems),
            Err(expected.map(str::to_owned).to_vec())
        );
    }

    #[test]
    fn disk_size_units() {
        // A bare number and G mean GiB, as in Oz; SI and IEC units mean what they say.
        assert_eq!(disk_size("10"), Ok(10 << 30));
        assert_eq!(disk_size("10G"), Ok(10 << 30));
        assert_eq!(disk_size("10 GiB"), Ok(10 << 30));
        assert_eq!(disk_size("10gb"), Ok(10_000_000_000));
        assert_eq!(disk_size("1T"), Ok(1 << 40));
        assert_eq!(disk_size("16TiB"), Ok(16 << 40));
        assert_eq!(disk_size("512MiB"), Ok(512 << 20));
        assert_eq!(disk_size("512MB"), Ok(512_000_000));
        assert_eq!(disk_size("4096b"), Ok(4096));
        let unparsable =
            "disk/size must be a whole number of GiB or with a unit such as G, T, MB or GiB";
        for bad in [
            "512M", "-1", "1.5G", "", "G", " 10", "10 ZZ", "10GiB ", "1µB",
        ] {
            let refused = disk_size(bad).map_err(|e| e.to_string());
            assert_eq!(refused, Err(format!("{unparsable}, not '{bad}'")));
        }
        assert_eq!(disk_size("0T"), Err(SizeError::Zero("disk/size")));
        let overflow = format!("{}G", "9".repeat(40));
        for big in ["17T", "16385G", "1PB", "1YiB", &overflow] {
            assert_eq!(
                disk_size(big).map_err(|e| e.to_string()),
                Err(format!("disk/size must be at most 16 TiB, not '{big}'"))
            );
        }
        let parsed = parse(&template("<disk><size>512 MiB</size></disk>")).map(|t| t.disk_size);
        assert_eq!(parsed, Ok(512 << 20));
    }

    #[test]
    fn xml_must_be_well_formed_without_a_dtd() {
        let dtd = format!("<!DOCTYPE template [<!ENTITY x 'y'>]>{}", template(""));
        assert_eq!(outcome(&dtd), "DTDs are not allowed");
        let broken = [
            template("").replace("</os>", "</oz>"),
            template("") + " trailing",
            template("") + "<template/>",
            template("").replace("</template>", ""),
            template("<description>&nbsp;</description>"),
            template("<description>\u{1}</description>"),
            template("<description a='1' a='2'/>"),
            format!("<!-- a -->\n<?xml version='1.0'?>{}", template("")),
            String::new(),
        ];
        for xml in &broken {
            assert!(
                outcome(xml).starts_with("XML is not well-formed: "),
                "{xml}: {}",
                outcome(xml)
            );
        }
    }

    #[test]
    fn limits() {
        let huge = template(&"<description/>".repeat(MAX_INPUT / 10));
        let size = huge.len();
        assert_eq!(
            outcome(&huge),
            format!("the template is {size} bytes, more than 1 MiB")
        );
        // Long lists stop at the node cap, which also bounds the checker's time.
        let packages = format!(
            "<packages>{}</packages>",
            "<package name='p'/>".repeat(4_000)
        );
        assert!(parse(&template(&packages)).is_ok());
        let packages = format!("<packages>{}</packages>", "<package/>".repeat(MAX_NODES));
        assert_eq!(
            outcome(&template(&packages)),
            "the template has more than 10000 elements and attributes"
        );
        let attributes: String = (0..=MAX_ATTRIBUTES).map(|i| format!(" a{i}=''")).collect();
        assert_eq!(
            outcome(&template(&format!("<disk{attributes}/>"))),
            "element <disk> has more than 64 attributes"
        );
        let deep = template(&format!("{}{}", "<a>".repeat(40), "</a>".repeat(40)));
        assert_eq!(outcome(&deep), "XML nesting is deeper than 32 levels");
        // Identical problems are reported once, and those past MAX_PROBLEMS are not listed.
        let repeated = outcome(&template(&"<foo/><bar/>".repeat(30)));
        assert_eq!(
            repeated,
            "unknown element <foo> in <template>, unknown element <bar> in <template>"
        );
        let distinct: String = (0..60).map(|i| format!("<e{i}/>")).collect();
        let found = parse(&template(&distinct)).map_err(|e| e.problems);
        let counted = found.map_err(|problems| (problems.len(), problems.last().cloned()));
        let last = Some("and more problems that are not listed".to_owned());
        assert_eq!(counted.err(), Some((MAX_PROBLEMS + 1, last)));
    }
}
