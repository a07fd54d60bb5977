//! Reading request bodies into a small element tree, and writing response documents.
//! Both go through quick-xml, so text and attributes are always escaped and nothing is
//! pasted together from strings.
//!
//! Requests are untrusted: DTDs (and so entity declarations) are refused, nesting depth
//! and element counts are capped, and only the five predefined entities and character
//! references are expanded.

use quick_xml::Writer;
use quick_xml::events::{BytesEnd, BytesStart, BytesText, Event};
use quick_xml::reader::Reader;

/// Deeper nesting than any request or template needs; stops stack-heavy bodies.
const MAX_DEPTH: usize = 64;
/// More elements than any request or template needs.
const MAX_NODES: usize = 100_000;

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
    let text = std::str::from_utf8(input).map_err(|_| XmlError("the body is not UTF-8".into()))?;
    let mut reader = Reader::from_str(text);
    reader.config_mut().check_end_names = true;
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    let mut nodes = 0usize;
    let malformed = |e: &dyn std::fmt::Display| XmlError(format!("malformed XML: {e}"));
    loop {
        let event = reader.read_event().map_err(|e| malformed(&e))?;
        match event {
            Event::Start(start) | Event::Empty(start) if root.is_some() => {
                let _ = start;
                return Err(XmlError(
                    "malformed XML: content after the root element".into(),
                ));
            }
            Event::Start(start) => {
                nodes += 1;
                if stack.len() >= MAX_DEPTH || nodes > MAX_NODES {
                    return Err(XmlError(format!(
                        "the document is nested deeper than {MAX_DEPTH} levels or has more than {MAX_NODES} elements"
                    )));
                }
                stack.push(element_from(&start, &reader)?);
            }
            Event::Empty(start) => {
                nodes += 1;
                let element = element_from(&start, &reader)?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(Node::Element(element)),
                    None => root = Some(element),
                }
            }
            Event::End(_) => {
                let element = stack
                    .pop()
                    .ok_or_else(|| XmlError("malformed XML: unexpected end tag".into()))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(Node::Element(element)),
                    None => root = Some(element),
                }
            }
            Event::Text(t) => {
                let decoded = t.decode().map_err(|e| malformed(&e))?;
                let unescaped = quick_xml::escape::unescape(&decoded).map_err(|e| malformed(&e))?;
                match stack.last_mut() {
                    Some(parent) => push_text(parent, &unescaped),
                    None if unescaped.trim().is_empty() => {}
                    None => {
                        return Err(XmlError(
                            "malformed XML: text outside the root element".into(),
                        ));
                    }
                }
            }
            Event::GeneralRef(r) => {
                let name = r.decode().map_err(|e| malformed(&e))?;
                let resolved = resolve_reference(&name)
                    .ok_or_else(|| XmlError(format!("malformed XML: unknown entity &{name};")))?;
                match stack.last_mut() {
                    Some(parent) => push_text(parent, &resolved),
                    None => {
                        return Err(XmlError(
                            "malformed XML: text outside the root element".into(),
                        ));
                    }
                }
            }
            Event::CData(c) => {
                let value = String::from_utf8_lossy(&c.into_inner()).into_owned();
                match stack.last_mut() {
                    Some(parent) => push_text(parent, &value),
                    None => {
                        return Err(XmlError(
                            "malformed XML: CDATA outside the root element".into(),
                        ));
                    }
                }
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
    if !stack.is_empty() {
        return Err(XmlError(
            "malformed XML: the document ends inside an element".into(),
        ));
    }
    root.ok_or_else(|| XmlError("the body holds no XML element".into()))
}

fn push_text(parent: &mut Element, text: &str) {
    if let Some(Node::Text(last)) = parent.children.last_mut() {
        last.push_str(text);
    } else {
        parent.children.push(Node::Text(text.to_owned()));
    }
}

/// The five predefined entities and numeric character references; nothing else.
fn resolve_reference(name: &str) -> Option<String> {
    let c = match name {
        "lt" => '<',
        "gt" => '>',
        "amp" => '&',
        "apos" => '\'',
        "quot" => '"',
        _ => {
            let code = if let Some(hex) = name.strip_prefix("#x") {
                u32::from_str_radix(hex, 16).ok()?
            } else {
                name.strip_prefix('#')?.parse().ok()?
            };
            char::from_u32(code)?
        }
    };
    Some(c.to_string())
}

fn element_from(start: &BytesStart<'_>, reader: &Reader<&[u8]>) -> Result<Element, XmlError> {
    let name = String::from_utf8_lossy(start.name().as_ref()).into_owned();
    let mut attributes = Vec::new();
    for attr in start.attributes() {
        let attr = attr.map_err(|e| XmlError(format!("malformed XML attribute: {e}")))?;
        let key = String::from_utf8_lossy(attr.key.as_ref()).into_owned();
        let value = attr
            .decode_and_unescape_value(reader.decoder())
            .map_err(|e| XmlError(format!("malformed XML attribute: {e}")))?
            .into_owned();
        attributes.push((key, value));
    }
    Ok(Element {
        name,
        attributes,
        children: Vec::new(),
    })
}

/// Builds a response document element by element. Conductor put each element on its own
/// line; so do we, for people reading responses with curl.
pub struct Doc {
    writer: Writer<Vec<u8>>,
}

impl Default for Doc {
    fn default() -> Self {
        Self::new()
    }
}

impl Doc {
    pub fn new() -> Doc {
        Doc {
            writer: Writer::new(Vec::with_capacity(1024)),
        }
    }

    fn newline(&mut self) {
        self.writer.get_mut().push(b'\n');
    }

    /// Opens an element; attributes are written in the order given.
    pub fn open(&mut self, name: &str, attributes: &[(&str, &str)]) -> &mut Self {
        let mut start = BytesStart::new(name);
        for attribute in attributes {
            start.push_attribute(*attribute);
        }
        let _ = self.writer.write_event(Event::Start(start));
        self.newline();
        self
    }

    pub fn close(&mut self, name: &str) -> &mut Self {
        let _ = self.writer.write_event(Event::End(BytesEnd::new(name)));
        self.newline();
        self
    }

    /// An element with attributes and no content, written as an open/close pair the way
    /// Conductor did (`<build href='…' id='…'></build>`).
    pub fn empty(&mut self, name: &str, attributes: &[(&str, &str)]) -> &mut Self {
        let mut start = BytesStart::new(name);
        for attribute in attributes {
            start.push_attribute(*attribute);
        }
        let _ = self.writer.write_event(Event::Start(start));
        let _ = self.writer.write_event(Event::End(BytesEnd::new(name)));
        self.newline();
        self
    }

    /// `<name attributes…>text</name>`, with the text escaped.
    pub fn text_with(&mut self, name: &str, attributes: &[(&str, &str)], text: &str) -> &mut Self {
        let mut start = BytesStart::new(name);
        for attribute in attributes {
            start.push_attribute(*attribute);
        }
        let _ = self.writer.write_event(Event::Start(start));
        let _ = self.writer.write_event(Event::Text(BytesText::new(text)));
        let _ = self.writer.write_event(Event::End(BytesEnd::new(name)));
        self.newline();
        self
    }

    pub fn text(&mut self, name: &str, text: &str) -> &mut Self {
        self.text_with(name, &[], text)
    }

    pub fn finish(self) -> String {
        String::from_utf8(self.writer.into_inner()).unwrap_or_default()
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
    fn writes_escaped_documents_that_parse_back() -> Result<(), XmlError> {
        let mut doc = Doc::new();
        doc.open(
            "image",
            &[("href", "http://h/api/images/1?a=1&b=2"), ("id", "1")],
        )
        .text("name", "a <b> & 'c'")
        .empty("build", &[("id", "2")])
        .close("image");
        let text = doc.finish();
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
