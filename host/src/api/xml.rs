//! Reading request bodies into a small element tree, and writing response documents.
//! Requests are read with quick-xml. Answers are written by [`Doc`], whose only way to
//! add a value is through its escaping, so nothing is pasted together from strings; it
//! writes straight into one buffer because a 10,000-image list spent a third of its
//! time in quick-xml's per-event writer.
//!
//! Requests are untrusted: DTDs (and so entity declarations) are refused, nesting depth
//! and element counts are capped, and only the five predefined entities and character
//! references are expanded.

use quick_xml::Writer;
use quick_xml::events::{BytesEnd, BytesStart, BytesText, Event};
use quick_xml::reader::Reader;

/// The router refuses bodies over 1 MiB; the parser keeps the same cap itself because
/// handlers also parse text found inside a request (an image descriptor), and a caller
/// that forgets the router's limit must not get an unbounded tree.
const MAX_INPUT: usize = 1 << 20;
/// Deeper nesting than any request or template needs; stops stack-heavy bodies.
const MAX_DEPTH: usize = 64;
/// Elements, attributes and text runs together. Each costs around a hundred bytes of
/// tree, so without a cap a 1 MiB body of `<a/>` or `a=''` would cost dozens of MiB.
const MAX_NODES: usize = 100_000;
/// quick-xml checks every attribute against the element's earlier ones for duplicates,
/// which is quadratic: one tag with 150,000 attributes took 14 s of CPU in a release
/// build, on a runtime thread. No request or template element has more than a handful.
const MAX_ATTRIBUTES: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Element(Element),
    /// Text and CDATA, unescaped.
    Text(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Element {
    pub name: String,
    pub attributes: Vec<(String, String)>,
    pub children: Vec<Node>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct XmlError(pub String);

impl Element {
    /// The first child element with this name.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.elements().find(|e| e.name == name)
    }

    /// Child elements, in order.
    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    /// The element's own text (its text and CDATA children, joined), untrimmed.
    pub fn text(&self) -> String {
        self.children
            .iter()
            .filter_map(|n| match n {
                Node::Text(t) => Some(t.as_str()),
                Node::Element(_) => None,
            })
            .collect()
    }

    /// The text of a child element, trimmed; `None` when the child is absent.
    pub fn child_text(&self, name: &str) -> Option<String> {
        self.child(name).map(|e| e.text().trim().to_owned())
    }

    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Serialises the element and everything below it as a standalone document.
    pub fn to_xml(&self) -> String {
        let mut writer = Writer::new(Vec::new());
        write_element(&mut writer, self);
        String::from_utf8(writer.into_inner()).unwrap_or_default()
    }
}

fn write_element(writer: &mut Writer<Vec<u8>>, element: &Element) {
    let mut start = BytesStart::new(element.name.as_str());
    for (k, v) in &element.attributes {
        start.push_attribute((k.as_str(), v.as_str()));
    }
    // Writing into a Vec cannot fail.
    let _ = writer.write_event(Event::Start(start));
    for child in &element.children {
        match child {
            Node::Element(e) => write_element(writer, e),
            Node::Text(t) => {
                let _ = writer.write_event(Event::Text(BytesText::new(t)));
            }
        }
    }
    let _ = writer.write_event(Event::End(BytesEnd::new(element.name.as_str())));
}

/// Parses a whole document and returns its root element.
pub fn parse(input: &[u8]) -> Result<Element, XmlError> {
    if input.len() > MAX_INPUT {
        return Err(XmlError(format!(
            "the document is {} bytes, more than 1 MiB",
            input.len()
        )));
    }
    let text = std::str::from_utf8(input).map_err(|_| XmlError("the body is not UTF-8".into()))?;
    // quick-xml does not check characters, and a control character that got into a
    // stored name or description would make every later response that shows it
    // unreadable to XML clients.
    if let Some((at, c)) = text.char_indices().find(|&(_, c)| !is_xml_char(c)) {
        return Err(XmlError(format!(
            "malformed XML: character U+{:04X} at byte {at} is not allowed in XML",
            u32::from(c)
        )));
    }
    let mut reader = Reader::from_str(text);
    reader.config_mut().check_end_names = true;
    let mut tree = Tree::default();
    let malformed = |e: &dyn std::fmt::Display| XmlError(format!("malformed XML: {e}"));
    loop {
        let event = reader.read_event().map_err(|e| malformed(&e))?;
        match event {
            Event::Start(_) | Event::Empty(_) if tree.root.is_some() => {
                return Err(XmlError(
                    "malformed XML: content after the root element".into(),
                ));
            }
            Event::Start(start) => {
                if tree.stack.len() >= MAX_DEPTH {
                    return Err(XmlError(format!(
                        "the document is nested deeper than {MAX_DEPTH} levels"
                    )));
                }
                let element = tree.element_from(&start, &reader)?;
                tree.stack.push(element);
            }
            Event::Empty(start) => {
                let element = tree.element_from(&start, &reader)?;
                tree.close(element);
            }
            Event::End(_) => {
                let element = tree
                    .stack
                    .pop()
                    .ok_or_else(|| XmlError("malformed XML: unexpected end tag".into()))?;
                tree.close(element);
            }
            Event::Text(t) => {
                let decoded = t.decode().map_err(|e| malformed(&e))?;
                let unescaped = quick_xml::escape::unescape(&decoded).map_err(|e| malformed(&e))?;
                // XML whitespace may surround the root element; nothing else may.
                let blank = unescaped.trim_matches([' ', '\t', '\n', '\r']).is_empty();
                if !(tree.stack.is_empty() && blank) {
                    tree.text(&unescaped, "text")?;
                }
            }
            Event::GeneralRef(r) => {
                let resolved = match r.resolve_char_ref().map_err(|e| malformed(&e))? {
                    Some(c) if is_xml_char(c) => c.to_string(),
                    Some(c) => {
                        return Err(XmlError(format!(
                            "malformed XML: character U+{:04X} is not allowed in XML",
                            u32::from(c)
                        )));
                    }
                    None => {
                        let name = r.decode().map_err(|e| malformed(&e))?;
                        quick_xml::escape::resolve_predefined_entity(&name)
                            .ok_or_else(|| {
                                XmlError(format!("malformed XML: unknown entity &{name};"))
                            })?
                            .to_owned()
                    }
                };
                tree.text(&resolved, "a reference")?;
            }
            Event::CData(c) => {
                let value = String::from_utf8_lossy(&c.into_inner()).into_owned();
                tree.text(&value, "CDATA")?;
            }
            Event::DocType(_) => {
                return Err(XmlError(
                    "DTDs and entity declarations are not accepted".into(),
                ));
            }
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }
    if !tree.stack.is_empty() {
        return Err(XmlError(
            "malformed XML: the document ends inside an element".into(),
        ));
    }
    tree.root
        .ok_or_else(|| XmlError("the body holds no XML element".into()))
}

/// The characters XML 1.0 allows in a document, raw or as a character reference.
fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | ' '..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// XML's `Name` production. quick-xml takes everything up to white space as the name, so
/// `<a='x'>` would otherwise be an element called `a='x'`, which `Element::to_xml` could
/// not write back as the same tree.
fn is_name(name: &str) -> bool {
    let start = |c: char| {
        matches!(c, ':' | 'A'..='Z' | '_' | 'a'..='z' | '\u{C0}'..='\u{D6}' | '\u{D8}'..='\u{F6}'
            | '\u{F8}'..='\u{2FF}' | '\u{370}'..='\u{37D}' | '\u{37F}'..='\u{1FFF}'
            | '\u{200C}'..='\u{200D}' | '\u{2070}'..='\u{218F}' | '\u{2C00}'..='\u{2FEF}'
            | '\u{3001}'..='\u{D7FF}' | '\u{F900}'..='\u{FDCF}' | '\u{FDF0}'..='\u{FFFD}'
            | '\u{10000}'..='\u{EFFFF}')
    };
    let rest = |c: char| {
        start(c)
            || matches!(c, '-' | '.' | '0'..='9' | '\u{B7}' | '\u{300}'..='\u{36F}' | '\u{203F}'..='\u{2040}')
    };
    let mut chars = name.chars();
    chars.next().is_some_and(start) && chars.all(rest)
}

/// The tree being built: the open elements, the finished root, and the node budget.
#[derive(Default)]
struct Tree {
    stack: Vec<Element>,
    root: Option<Element>,
    nodes: usize,
}

impl Tree {
    /// Charges `count` nodes against [`MAX_NODES`].
    fn spend(&mut self, count: usize) -> Result<(), XmlError> {
        self.nodes += count;
        if self.nodes > MAX_NODES {
            return Err(XmlError(format!(
                "the document has more than {MAX_NODES} elements, attributes and text nodes"
            )));
        }
        Ok(())
    }

    /// Attaches a finished element to its parent, or makes it the root.
    fn close(&mut self, element: Element) {
        match self.stack.last_mut() {
            Some(parent) => parent.children.push(Node::Element(element)),
            None => self.root = Some(element),
        }
    }

    /// Appends text to the open element, joining it to a text node just before it, so
    /// that `a&amp;b` is one node, as it is once written back out. Empty text (an empty
    /// CDATA section) adds no node, since writing it back would not produce one.
    fn text(&mut self, text: &str, what: &str) -> Result<(), XmlError> {
        let Some(parent) = self.stack.last_mut() else {
            return Err(XmlError(format!(
                "malformed XML: {what} outside the root element"
            )));
        };
        if text.is_empty() {
            return Ok(());
        }
        if let Some(Node::Text(last)) = parent.children.last_mut() {
            last.push_str(text);
            return Ok(());
        }
        parent.children.push(Node::Text(text.to_owned()));
        self.spend(1)
    }

    fn element_from(
        &mut self,
        start: &BytesStart<'_>,
        reader: &Reader<&[u8]>,
    ) -> Result<Element, XmlError> {
        self.spend(1)?;
        let name = String::from_utf8_lossy(start.name().as_ref()).into_owned();
        if !is_name(&name) {
            return Err(XmlError(format!(
                "malformed XML: '{name}' is not an element name"
            )));
        }
        let mut attributes = Vec::new();
        for (index, attr) in start.attributes().enumerate() {
            // Checked before the next attribute is read, which bounds quick-xml's
            // duplicate check to MAX_ATTRIBUTES² comparisons.
            if index >= MAX_ATTRIBUTES {
                return Err(XmlError(format!(
                    "element <{name}> has more than {MAX_ATTRIBUTES} attributes"
                )));
            }
            let attr = attr.map_err(|e| XmlError(format!("malformed XML attribute: {e}")))?;
            let key = String::from_utf8_lossy(attr.key.as_ref()).into_owned();
            if !is_name(&key) {
                return Err(XmlError(format!(
                    "malformed XML: '{key}' in <{name}> is not an attribute name"
                )));
            }
            let value = attr
                .decode_and_unescape_value(reader.decoder())
                .map_err(|e| XmlError(format!("malformed XML attribute: {e}")))?
                .into_owned();
            // quick-xml expands character references in attribute values without
            // checking them against XML's character set, so `&#1;` is caught here.
            if let Some(c) = value.chars().find(|&c| !is_xml_char(c)) {
                return Err(XmlError(format!(
                    "malformed XML: character U+{:04X} in attribute '{key}' is not allowed in XML",
                    u32::from(c)
                )));
            }
            attributes.push((key, value));
            self.spend(1)?;
        }
        Ok(Element {
            name,
            attributes,
            children: Vec::new(),
        })
    }
}

/// Builds a response document element by element. Conductor put each element on its own
/// line; so do we, for people reading responses with curl.
pub struct Doc {
    out: String,
}

impl Default for Doc {
    fn default() -> Self {
        Self::new()
    }
}

fn is_special(b: u8) -> bool {
    matches!(b, b'<' | b'>' | b'&' | b'\'' | b'"')
}

/// Where the first character needing an entity is. Sixteen bytes are tested at a time
/// without stopping early inside them, which the compiler turns into vector compares:
/// most values are ids and hrefs that have none.
fn first_special(bytes: &[u8]) -> Option<usize> {
    let (chunks, _) = bytes.as_chunks::<16>();
    let clean = chunks
        .iter()
        .take_while(|chunk| !chunk.iter().fold(false, |any, &b| any | is_special(b)))
        .count()
        * 16;
    bytes[clean..]
        .iter()
        .position(|&b| is_special(b))
        .map(|at| clean + at)
}

/// Appends `text` with the five characters XML gives meaning to replaced by their
/// entities (the same as quick-xml's `escape`), in attribute values and text alike. Runs
/// without one are copied whole.
fn push_escaped(out: &mut String, text: &str) {
    let mut rest = text;
    while let Some(at) = first_special(rest.as_bytes()) {
        out.push_str(&rest[..at]);
        out.push_str(match rest.as_bytes()[at] {
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'&' => "&amp;",
            b'\'' => "&apos;",
            _ => "&quot;",
        });
        rest = &rest[at + 1..];
    }
    out.push_str(rest);
}

impl Doc {
    pub fn new() -> Doc {
        Doc::with_capacity(1024)
    }

    /// A document expected to grow to about `bytes`: a long list is written without
    /// growing (and copying) its buffer a dozen times.
    pub fn with_capacity(bytes: usize) -> Doc {
        Doc {
            out: String::with_capacity(bytes),
        }
    }

    /// `<name a="v"…>`; element and attribute names come from this program, values are
    /// escaped.
    fn start(&mut self, name: &str, attributes: &[(&str, &str)]) {
        self.out.push('<');
        self.out.push_str(name);
        for (key, value) in attributes {
            self.out.push(' ');
            self.out.push_str(key);
            self.out.push_str("=\"");
            push_escaped(&mut self.out, value);
            self.out.push('"');
        }
        self.out.push('>');
    }

    fn end(&mut self, name: &str) {
        self.out.push_str("</");
        self.out.push_str(name);
        self.out.push_str(">\n");
    }

    /// Opens an element; attributes are written in the order given.
    pub fn open(&mut self, name: &str, attributes: &[(&str, &str)]) -> &mut Self {
        self.start(name, attributes);
        self.out.push('\n');
        self
    }

    pub fn close(&mut self, name: &str) -> &mut Self {
        self.end(name);
        self
    }

    /// An element with attributes and no content, written as an open/close pair the way
    /// Conductor did (`<build href='…' id='…'></build>`).
    pub fn empty(&mut self, name: &str, attributes: &[(&str, &str)]) -> &mut Self {
        self.start(name, attributes);
        self.end(name);
        self
    }

    /// `<name attributes…>text</name>`, with the text escaped.
    pub fn text_with(&mut self, name: &str, attributes: &[(&str, &str)], text: &str) -> &mut Self {
        self.start(name, attributes);
        push_escaped(&mut self.out, text);
        self.end(name);
        self
    }

    pub fn text(&mut self, name: &str, text: &str) -> &mut Self {
        self.text_with(name, &[], text)
    }

    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_elements_text_entities_and_cdata() -> Result<(), XmlError> {
        let doc = parse(b"<?xml version='1.0'?><a x='1&amp;2'><b>t&lt;&#65;</b><c><![CDATA[<raw>]]></c><d/></a>")?;
        assert_eq!(doc.name, "a");
        assert_eq!(doc.attribute("x"), Some("1&2"));
        assert_eq!(doc.child_text("b").as_deref(), Some("t<A"));
        assert_eq!(doc.child_text("c").as_deref(), Some("<raw>"));
        assert_eq!(doc.child_text("d").as_deref(), Some(""));
        assert_eq!(doc.child("missing"), None);
        Ok(())
    }

    #[test]
    fn refuses_dtds_malformed_and_deep_documents() {
        let laughs = b"<?xml version='1.0'?><!DOCTYPE l [<!ENTITY a 'aa'>]><l>&a;</l>";
        assert!(parse(laughs).is_err_and(|e| e.0.contains("DTD")));
        assert!(parse(b"<a><b></a>").is_err());
        assert!(parse(b"<a></a><b></b>").is_err());
        assert!(parse(b"").is_err());
        assert!(parse(b"<a>&unknown;</a>").is_err());
        let deep = "<a>".repeat(100) + &"</a>".repeat(100);
        assert!(parse(deep.as_bytes()).is_err_and(|e| e.0.contains("nested")));
    }

    #[test]
    fn limits_bound_what_a_body_can_cost() {
        let over = |body: String, needle: &str| {
            let outcome = parse(body.as_bytes());
            assert!(
                outcome.as_ref().is_err_and(|e| e.0.contains(needle)),
                "{needle}: {outcome:?}"
            );
        };
        // Empty elements, attributes and text runs all count against the node cap, so
        // none of them can stand in for another to build a huge tree.
        over(
            format!("<a>{}</a>", "<b/>".repeat(MAX_NODES)),
            "100000 elements",
        );
        let attributes: String = (0..60).map(|i| format!(" a{i}=''")).collect();
        let element = format!("<b{attributes}/>");
        over(
            format!("<a>{}</a>", element.repeat(MAX_NODES / 60)),
            "100000 elements",
        );
        over(
            format!("<a>{}</a>", "t<b/>".repeat(MAX_NODES / 2)),
            "100000 elements",
        );
        let attributes: String = (0..=MAX_ATTRIBUTES).map(|i| format!(" a{i}=''")).collect();
        over(format!("<a{attributes}/>"), "more than 64 attributes");
        over(
            format!("<a>{}</a>", "x".repeat(MAX_INPUT)),
            "more than 1 MiB",
        );
        // Just under the caps is fine.
        let attributes: String = (0..MAX_ATTRIBUTES).map(|i| format!(" a{i}=''")).collect();
        assert!(parse(format!("<a{attributes}/>").as_bytes()).is_ok());
        let wide = format!("<a>{}</a>", "<b/>".repeat(MAX_NODES - 1));
        assert!(parse(wide.as_bytes()).is_ok());
    }

    #[test]
    fn refuses_characters_that_xml_does_not_allow() {
        for body in [
            "<a>\u{1}</a>",
            "<a>&#1;</a>",
            "<a>&#0;</a>",
            "<a>&#x1B;</a>",
            "<a x='&#1;'/>",
            "<a x='\u{1b}'/>",
            "<a>\u{FFFE}</a>",
            "<a><![CDATA[\u{7}]]></a>",
        ] {
            let outcome = parse(body.as_bytes());
            assert!(
                outcome
                    .as_ref()
                    .is_err_and(|e| e.0.starts_with("malformed XML") && e.0.contains("character")),
                "{body:?}: {outcome:?}"
            );
        }
        // Tabs, line ends and characters beyond the Basic Multilingual Plane are allowed.
        let fine = parse("<a x='&#9;'>&#x1F600;\t\r\n\u{10FFFF}</a>".as_bytes());
        assert_eq!(
            fine.map(|a| a.text()),
            Ok("\u{1F600}\t\r\n\u{10FFFF}".to_owned())
        );
    }

    #[test]
    fn names_must_be_xml_names() {
        for body in [
            "<a='x'/>",
            "<a b='1' x&y='2'/>",
            "<1a/>",
            "<-a/>",
            "<a 1='x'/>",
        ] {
            let outcome = parse(body.as_bytes());
            assert!(
                outcome.as_ref().is_err_and(|e| e.0.contains(" name")),
                "{body}: {outcome:?}"
            );
        }
        assert!(parse("<x:y-z.1 _é·='v'><Ω/></x:y-z.1>".as_bytes()).is_ok());
    }

    #[test]
    fn text_outside_the_root_and_empty_cdata() -> Result<(), XmlError> {
        // Only XML's own whitespace may surround the root element.
        assert!(parse(b" \r\n\t<a/>\n").is_ok());
        assert!(parse("\u{A0}<a/>".as_bytes()).is_err());
        assert!(parse(b"<a/>&amp;").is_err());
        assert!(parse(b"<a/><![CDATA[x]]>").is_err());
        // An empty CDATA section adds no text node: written back, it would not be there.
        let a = parse(b"<a><![CDATA[]]><b/>x<![CDATA[y]]>&amp;</a>")?;
        assert_eq!(a.children.len(), 2);
        assert_eq!(a.text(), "xy&");
        assert_eq!(parse(a.to_xml().as_bytes())?, a);
        Ok(())
    }

    #[test]
    fn writes_escaped_documents_that_parse_back() -> Result<(), XmlError> {
        let mut doc = Doc::new();
        doc.open(
            "image",
            &[("href", "http://h/api/images/1?a=1&b=2"), ("id", "1")],
        )
        .text("name", "a <b> & 'c'")
        .empty("build", &[("id", "2\"")])
        .close("image");
        let text = doc.finish();
        assert_eq!(
            text,
            "<image href=\"http://h/api/images/1?a=1&amp;b=2\" id=\"1\">\n\
             <name>a &lt;b&gt; &amp; &apos;c&apos;</name>\n\
             <build id=\"2&quot;\"></build>\n\
             </image>\n"
        );
        let back = parse(text.as_bytes())?;
        assert_eq!(
            back.attribute("href"),
            Some("http://h/api/images/1?a=1&b=2")
        );
        assert_eq!(back.child_text("name").as_deref(), Some("a <b> & 'c'"));
        assert_eq!(back.to_xml().matches("<build").count(), 1);
        Ok(())
    }
}
