//! JSON answers for clients that ask for them (`Accept: application/json`, or a `.json`
//! suffix). Every handler writes XML; this turns a finished XML document into JSON with
//! the same fields, so the two can never disagree:
//!
//! - the root element becomes an object with one key, its name;
//! - an element with only text becomes a string; attributes (`id`, `href`, `name`)
//!   become keys, and text beside attributes becomes `text`;
//! - a list element (its children all named like it without the plural `s`, as
//!   `<images><image/>…</images>` or `<parameters><parameter/></parameters>`) becomes an
//!   array, also when it has one child or none (a `type="xs:list"` on it is dropped);
//! - other children become keys; a name that repeats becomes an array.

use quick_xml::Reader;
use quick_xml::events::{BytesStart, Event};
use serde_json::{Map, Value};

/// One element while the document is read.
#[derive(Default)]
struct Open {
    name: String,
    attributes: Vec<(String, String)>,
    children: Vec<(String, Value)>,
    text: String,
}

/// Why a document could not be turned into JSON: it was not well-formed XML.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error("{0}")]
    Xml(#[from] quick_xml::Error),
    #[error("{0}")]
    Encoding(#[from] quick_xml::encoding::EncodingError),
    #[error("{0}")]
    Escape(#[from] quick_xml::escape::EscapeError),
    #[error("{0}")]
    Attribute(#[from] quick_xml::events::attributes::AttrError),
    #[error("unbalanced XML")]
    Unbalanced,
    #[error("no root element")]
    NoRoot,
}

/// Converts an XML document this server wrote into JSON.
pub fn from_xml(xml: &[u8]) -> Result<Value, JsonError> {
    let mut reader = Reader::from_reader(xml);
    let mut stack: Vec<Open> = Vec::new();
    let mut root: Option<(String, Value)> = None;
    loop {
        match reader.read_event()? {
            Event::Start(start) => stack.push(open(&start)?),
            Event::Empty(start) => {
                let element = open(&start)?;
                let (name, value) = close(element);
                match stack.last_mut() {
                    Some(parent) => parent.children.push((name, value)),
                    None => root = Some((name, value)),
                }
            }
            Event::Text(text) => {
                if let Some(element) = stack.last_mut() {
                    let decoded = text.decode()?;
                    let unescaped = quick_xml::escape::unescape(&decoded)?;
                    element.text.push_str(&unescaped);
                }
            }
            Event::GeneralRef(reference) => {
                if let Some(element) = stack.last_mut() {
                    let name = reference.decode()?;
                    let entity = format!("&{name};");
                    let resolved = quick_xml::escape::unescape(&entity)?;
                    element.text.push_str(&resolved);
                }
            }
            Event::CData(data) => {
                if let Some(element) = stack.last_mut() {
                    element.text.push_str(&String::from_utf8_lossy(&data));
                }
            }
            Event::End(_) => {
                let element = stack.pop().ok_or(JsonError::Unbalanced)?;
                let (name, value) = close(element);
                match stack.last_mut() {
                    Some(parent) => parent.children.push((name, value)),
                    None => root = Some((name, value)),
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    let (name, value) = root.ok_or(JsonError::NoRoot)?;
    let mut object = Map::new();
    object.insert(name, value);
    Ok(Value::Object(object))
}

fn open(start: &BytesStart<'_>) -> Result<Open, JsonError> {
    let mut attributes = Vec::new();
    for attribute in start.attributes() {
        let attribute = attribute?;
        let key = String::from_utf8_lossy(attribute.key.as_ref()).into_owned();
        let value = attribute.unescape_value()?.into_owned();
        attributes.push((key, value));
    }
    Ok(Open {
        name: String::from_utf8_lossy(start.name().as_ref()).into_owned(),
        attributes,
        ..Open::default()
    })
}

/// Whether an element named `name` is a list of `child` elements.
fn is_list_of(name: &str, child: &str) -> bool {
    name.strip_suffix('s')
        .is_some_and(|singular| singular == child)
        || name
            .strip_suffix("es")
            .is_some_and(|singular| singular == child)
}

/// Names that are lists even when empty: the plural of an element this server lists.
fn is_plural(name: &str) -> bool {
    name.ends_with('s') && !name.ends_with("ss") && !name.ends_with("us")
}

fn close(element: Open) -> (String, Value) {
    let Open {
        name,
        attributes,
        children,
        text,
    } = element;
    let text = text.trim().to_owned();
    if attributes.is_empty() && children.is_empty() {
        let value = if text.is_empty() && is_plural(&name) {
            Value::Array(Vec::new())
        } else {
            Value::String(text)
        };
        return (name, value);
    }
    // Conductor marks some lists `type="xs:list"`; that says no more than the shape does.
    let only_list_type = attributes
        .iter()
        .all(|(k, v)| k == "type" && v == "xs:list");
    if only_list_type
        && text.is_empty()
        && (!children.is_empty() || !attributes.is_empty())
        && children.iter().all(|(child, _)| is_list_of(&name, child))
    {
        let items = children.into_iter().map(|(_, value)| value).collect();
        return (name, Value::Array(items));
    }
    let mut object = Map::new();
    for (key, value) in attributes {
        object.insert(key, Value::String(value));
    }
    if !text.is_empty() {
        object.insert("text".into(), Value::String(text));
    }
    // Keys whose array was made from repeats here, as opposed to a list element's array.
    let mut repeats: Vec<String> = Vec::new();
    for (key, value) in children {
        match object.get_mut(&key) {
            Some(Value::Array(items)) if repeats.contains(&key) => items.push(value),
            Some(existing) => {
                let first = existing.take();
                *existing = Value::Array(vec![first, value]);
                repeats.push(key);
            }
            None => {
                object.insert(key, value);
            }
        }
    }
    (name, Value::Object(object))
}

#[cfg(test)]
mod tests {
    use super::from_xml;
    use serde_json::json;

    #[test]
    fn documents_keep_their_fields() {
        let xml = br#"<image href="http://h/api/images/1" id="1"><name>fedora &amp; co</name>
            <builds><build href="http://h/api/builds/2" id="2"/></builds>
            <targets/><status_detail><activity>building</activity><error></error></status_detail>
            <provider href="http://h/api/providers/3" id="3">ec2-us-east-1</provider></image>"#;
        let value = from_xml(xml).expect("converts");
        assert_eq!(
            value,
            json!({"image": {
                "href": "http://h/api/images/1", "id": "1", "name": "fedora & co",
                "builds": [{"href": "http://h/api/builds/2", "id": "2"}],
                "targets": [],
                "status_detail": {"activity": "building", "error": ""},
                "provider": {"href": "http://h/api/providers/3", "id": "3", "text": "ec2-us-east-1"},
            }})
        );
    }

    #[test]
    fn lists_are_arrays_and_repeats_are_collected() {
        let xml = b"<builds type='xs:list'><build id='1'/></builds>";
        assert_eq!(
            from_xml(xml).expect("converts"),
            json!({"builds": [{"id": "1"}]})
        );
        let xml = b"<images><image id='1'/><image id='2'/></images>";
        assert_eq!(
            from_xml(xml).expect("converts"),
            json!({"images": [{"id": "1"}, {"id": "2"}]})
        );
        let xml = b"<provider_type><setting>region</setting><setting>endpoint</setting><x>1</x></provider_type>";
        assert_eq!(
            from_xml(xml).expect("converts"),
            json!({"provider_type": {"setting": ["region", "endpoint"], "x": "1"}})
        );
        let xml = b"<error><code>RecordNotFound</code><message>no</message></error>";
        assert_eq!(
            from_xml(xml).expect("converts"),
            json!({"error": {"code": "RecordNotFound", "message": "no"}})
        );
    }
}
