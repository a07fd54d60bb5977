//! The element tree of a TDL document, read with the well-formedness rules quick-xml
//! leaves to its caller and with limits on size, depth, nodes and attributes, so a
//! hostile template costs little before it is refused.

use quick_xml::Reader;
use quick_xml::escape::resolve_predefined_entity;
use quick_xml::events::{BytesRef, BytesStart, Event};

/// Templates travel inside request bodies, so anything larger is a mistake or an attack.
pub(super) const MAX_INPUT: usize = 1024 * 1024;
/// The schema needs five levels; the limit keeps hostile nesting from costing memory.
const MAX_DEPTH: usize = 32;
/// Elements and attributes together. A template names a few dozen packages, files and
/// repositories; the cap keeps a hostile one from building a huge tree, and bounds the
/// checker, whose numbering of list items costs time in the square of a list's length
/// (30,000 `<package>`s took 3 s of CPU in a release build).
pub(super) const MAX_NODES: usize = 10_000;
/// quick-xml's duplicate check compares each attribute with the element's earlier ones;
/// the schema's elements have at most three.
pub(super) const MAX_ATTRIBUTES: usize = 64;
/// An element as the checker needs it; the text of mixed content is concatenated because the
/// schema only ever asks whether an element holds text, never where.
#[derive(Default)]
pub(super) struct Node {
    pub(super) name: String,
    pub(super) attrs: Vec<(String, String)>,
    pub(super) children: Vec<Node>,
    pub(super) text: String,
}

/// Why a document has no element tree: the one problem that stopped the reading.
#[derive(Debug, thiserror::Error)]
pub(super) enum TreeError {
    #[error("XML is not well-formed: {0}")]
    Malformed(String),
    #[error("DTDs are not allowed")]
    Dtd,
    #[error("XML nesting is deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("the template has more than {MAX_NODES} elements and attributes")]
    TooManyNodes,
    #[error("element <{0}> has more than {MAX_ATTRIBUTES} attributes")]
    TooManyAttributes(String),
}

pub(super) fn malformed(detail: impl std::fmt::Display) -> TreeError {
    TreeError::Malformed(detail.to_string())
}

pub(super) fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | ' '..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

pub(super) fn xml_trim(s: &str) -> &str {
    s.trim_matches([' ', '\t', '\n', '\r'])
}

/// Builds the element tree, enforcing the well-formedness rules quick-xml leaves to its caller
/// (one root, nothing but markup around it, legal characters, known entities). Returns the single
/// problem that stopped it.
pub(super) fn read_tree(xml: &str) -> Result<Node, TreeError> {
    let xml = xml.strip_prefix('\u{feff}').unwrap_or(xml);
    if let Some((at, c)) = xml.char_indices().find(|&(_, c)| !is_xml_char(c)) {
        let code = u32::from(c);
        return Err(malformed(format!(
            "character U+{code:04X} at byte {at} is not allowed"
        )));
    }
    let mut reader = Reader::from_str(xml);
    reader.config_mut().check_comments = true;
    let mut stack: Vec<Node> = Vec::new();
    let mut root: Option<Node> = None;
    let mut nodes = 0;
    loop {
        let start = reader.buffer_position();
        let event = reader
            .read_event()
            .map_err(|e| malformed(format!("{e} at byte {}", reader.error_position())))?;
        let text = match event {
            // Refusing DTDs outright shuts out entity expansion and external fetches at once.
            Event::DocType(_) => return Err(TreeError::Dtd),
            Event::Decl(_) if start != 0 => {
                return Err(malformed("the XML declaration is not first"));
            }
            Event::Start(e) => {
                stack.push(open(&e, &stack, root.is_some(), &mut nodes)?);
                continue;
            }
            Event::Empty(e) => {
                let node = open(&e, &stack, root.is_some(), &mut nodes)?;
                close(node, &mut stack, &mut root);
                continue;
            }
            Event::End(_) => {
                // quick-xml has already matched the end tag against the open one.
                if let Some(node) = stack.pop() {
                    close(node, &mut stack, &mut root);
                }
                continue;
            }
            Event::Text(t) => t.xml10_content().map_err(malformed)?.into_owned(),
            Event::CData(c) => c.decode().map_err(malformed)?.into_owned(),
            Event::GeneralRef(r) => resolve_reference(&r)?,
            Event::Eof => break,
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => continue,
        };
        match stack.last_mut() {
            Some(node) => node.text.push_str(&text),
            None if xml_trim(&text).is_empty() => {}
            None => return Err(malformed("text outside the root element")),
        }
    }
    if let Some(node) = stack.last() {
        return Err(malformed(format!("element <{}> is not closed", node.name)));
    }
    root.ok_or_else(|| malformed("there is no root element"))
}

/// Reads a start tag into a node, charging it and its attributes to `nodes`.
pub(super) fn open(
    e: &BytesStart,
    stack: &[Node],
    have_root: bool,
    nodes: &mut usize,
) -> Result<Node, TreeError> {
    if stack.is_empty() && have_root {
        return Err(malformed("more than one root element"));
    }
    if stack.len() >= MAX_DEPTH {
        return Err(TreeError::TooDeep);
    }
    *nodes += 1;
    if *nodes > MAX_NODES {
        return Err(TreeError::TooManyNodes);
    }
    let decoder = e.decoder();
    let name = decoder
        .decode(e.name().as_ref())
        .map_err(malformed)?
        .into_owned();
    let mut attrs = Vec::new();
    for (index, attr) in e.attributes().enumerate() {
        // Checked before the next attribute is read, which bounds quick-xml's duplicate
        // check to MAX_ATTRIBUTES² comparisons.
        if index >= MAX_ATTRIBUTES {
            return Err(TreeError::TooManyAttributes(name.to_string()));
        }
        *nodes += 1;
        if *nodes > MAX_NODES {
            return Err(TreeError::TooManyNodes);
        }
        let attr = attr.map_err(|err| malformed(format!("{err} in <{name}>")))?;
        let key = decoder.decode(attr.key.as_ref()).map_err(malformed)?;
        let value = attr.decode_and_unescape_value(decoder).map_err(malformed)?;
        attrs.push((key.into_owned(), value.into_owned()));
    }
    Ok(Node {
        name,
        attrs,
        ..Node::default()
    })
}

pub(super) fn close(node: Node, stack: &mut [Node], root: &mut Option<Node>) {
    match stack.last_mut() {
        Some(parent) => parent.children.push(node),
        None => *root = Some(node),
    }
}

pub(super) fn resolve_reference(r: &BytesRef) -> Result<String, TreeError> {
    match r.resolve_char_ref().map_err(malformed)? {
        Some(c) if is_xml_char(c) => Ok(c.to_string()),
        Some(c) => {
            let code = u32::from(c);
            Err(malformed(format!("character U+{code:04X} is not allowed")))
        }
        None => {
            let name = r.decode().map_err(malformed)?;
            let text = resolve_predefined_entity(&name);
            text.map(str::to_owned)
                .ok_or_else(|| malformed(format!("unknown entity &{name};")))
        }
    }
}

pub(super) fn child<'n>(node: &'n Node, name: &str) -> Option<&'n Node> {
    node.children.iter().find(|c| c.name == name)
}

/// How many children of `node` have one of `names`.
pub(super) fn count(node: &Node, names: &[&str]) -> usize {
    node.children
        .iter()
        .filter(|c| names.contains(&c.name.as_str()))
        .count()
}

pub(super) fn attr<'n>(node: &'n Node, key: &str) -> Option<&'n str> {
    node.attrs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}
