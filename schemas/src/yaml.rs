//! YAML text to a JSON value plus a [`SourceMap`], so serde can deserialize the typed model and every
//! later error can still be pointed at its line and column.
//!
//! Flow: saphyr-parser events → a [`Node`] tree that keeps each node's position (anchors and aliases
//! expanded, with a budget against alias bombs) → [`to_value`], which checks keys (strings, no duplicates,
//! `<<` merges), interpolates `${VAR}` in scalars, resolves plain scalars by the YAML 1.2 core schema, and
//! records the location of every path.

use saphyr_parser::{Event, Parser, ScalarStyle, Span, Tag};
use serde_json::{Map, Number, Value};

use crate::diagnostic::{ConfigPath, Diagnostic, Location, SourceMap};
use crate::interpolate::{Environment, interpolate};

/// Most nodes a document may expand to through aliases.
const NODE_BUDGET: usize = 100_000;

#[derive(Clone, Debug)]
pub(crate) struct Node {
    kind: Kind,
    at: Location,
}

#[derive(Clone, Debug)]
enum Kind {
    Scalar { text: String, style: ScalarStyle, tag: Option<Tag> },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Node {
    fn size(&self) -> usize {
        match &self.kind {
            Kind::Scalar { .. } => 1,
            Kind::Seq(items) => 1 + items.iter().map(Node::size).sum::<usize>(),
            Kind::Map(entries) => 1 + entries.iter().map(|(k, v)| k.size() + v.size()).sum::<usize>(),
        }
    }
}

fn location(span: &Span) -> Location {
    Location { line: span.start.line(), column: span.start.col() + 1 }
}

fn fail(at: Location, message: impl Into<String>) -> Diagnostic {
    Diagnostic::new(ConfigPath::root(), message).at(Some(at))
}

/// A collection being built, with the anchor id to record it under.
enum Frame {
    Seq { anchor: usize, at: Location, items: Vec<Node> },
    Map { anchor: usize, at: Location, entries: Vec<(Node, Node)>, key: Option<Node> },
}

/// Parses one YAML document into a tree. An empty document is `None`.
pub(crate) fn parse(text: &str) -> Result<Option<Node>, Diagnostic> {
    let mut anchors: Vec<Option<Node>> = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut root: Option<Node> = None;
    let mut documents = 0;
    let mut expanded = 0usize;

    let record = |anchors: &mut Vec<Option<Node>>, anchor: usize, node: &Node| {
        if anchor > 0 {
            if anchors.len() <= anchor {
                anchors.resize(anchor + 1, None);
            }
            anchors[anchor] = Some(node.clone());
        }
    };

    for event in Parser::new_from_str(text) {
        let (event, span) = event.map_err(|error| {
            let marker = error.marker();
            fail(
                Location { line: marker.line(), column: marker.col() + 1 },
                format!("invalid YAML: {}", error.info()),
            )
        })?;
        let at = location(&span);
        let complete = match event {
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    return Err(fail(at, "a second YAML document: keel.yaml holds exactly one"));
                }
                None
            }
            Event::Scalar(text, style, anchor, tag) => {
                let node = Node {
                    kind: Kind::Scalar { text: text.into_owned(), style, tag: tag.map(|t| t.into_owned()) },
                    at,
                };
                record(&mut anchors, anchor, &node);
                Some(node)
            }
            Event::Alias(anchor) => {
                let node = anchors
                    .get(anchor)
                    .cloned()
                    .flatten()
                    .ok_or_else(|| fail(at, "alias to an unknown anchor"))?;
                expanded += node.size();
                if expanded > NODE_BUDGET {
                    return Err(fail(at, format!("aliases expand to more than {NODE_BUDGET} nodes")));
                }
                Some(Node { at, ..node })
            }
            Event::SequenceStart(anchor, _) => {
                stack.push(Frame::Seq { anchor, at, items: Vec::new() });
                None
            }
            Event::MappingStart(anchor, _) => {
                stack.push(Frame::Map { anchor, at, entries: Vec::new(), key: None });
                None
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (anchor, node) = match stack.pop() {
                    Some(Frame::Seq { anchor, at, items }) => (anchor, Node { kind: Kind::Seq(items), at }),
                    Some(Frame::Map { anchor, at, entries, .. }) => {
                        (anchor, Node { kind: Kind::Map(entries), at })
                    }
                    None => return Err(fail(at, "unbalanced YAML collection")),
                };
                record(&mut anchors, anchor, &node);
                Some(node)
            }
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd | Event::Nothing => None,
        };
        let Some(node) = complete else { continue };
        match stack.last_mut() {
            None => root = Some(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map { entries, key, .. }) => match key.take() {
                None => *key = Some(node),
                Some(k) => entries.push((k, node)),
            },
        }
    }
    Ok(root)
}

/// The value, its source map, and every problem found on the way.
pub(crate) struct Converted {
    pub value: Value,
    pub source_map: SourceMap,
    pub diagnostics: Vec<Diagnostic>,
}

/// Converts a tree to a JSON value, interpolating and resolving scalars.
pub(crate) fn to_value(root: Option<&Node>, env: &dyn Environment) -> Converted {
    let mut converted = Converted {
        value: Value::Object(Map::new()),
        source_map: SourceMap::default(),
        diagnostics: Vec::new(),
    };
    if let Some(root) = root {
        converted.value = convert(root, &ConfigPath::root(), None, env, &mut converted);
    }
    converted
}

fn convert(
    node: &Node,
    path: &ConfigPath,
    key_at: Option<Location>,
    env: &dyn Environment,
    out: &mut Converted,
) -> Value {
    out.source_map.insert(path.clone(), key_at, node.at);
    match &node.kind {
        Kind::Scalar { text, style, tag } => {
            scalar(text, *style, tag.as_ref(), env).unwrap_or_else(|message| {
                out.diagnostics.push(Diagnostic::new(path.clone(), message).at(Some(node.at)));
                Value::Null
            })
        }
        Kind::Seq(items) => Value::Array(
            items.iter().enumerate().map(|(i, item)| convert(item, &path.index(i), None, env, out)).collect(),
        ),
        Kind::Map(entries) => {
            let mut map = Map::new();
            let mut merged: Vec<&Node> = Vec::new();
            for (key, value) in entries {
                let Some(name) = key_text(key) else {
                    out.diagnostics.push(
                        Diagnostic::new(path.clone(), "mapping keys must be plain strings").at(Some(key.at)),
                    );
                    continue;
                };
                if name == "<<" && matches!(key.kind, Kind::Scalar { style: ScalarStyle::Plain, .. }) {
                    merged.push(value);
                    continue;
                }
                if map.contains_key(name) {
                    out.diagnostics.push(
                        Diagnostic::new(path.key(name), format!("duplicate key {name:?}")).at(Some(key.at)),
                    );
                    continue;
                }
                let child = convert(value, &path.key(name), Some(key.at), env, out);
                map.insert(name.to_string(), child);
            }
            for source in merged {
                merge(source, &mut map, path, env, out);
            }
            Value::Object(map)
        }
    }
}

/// Applies a `<<: *anchor` (or a list of them): keys the mapping already has win.
fn merge(
    source: &Node,
    map: &mut Map<String, Value>,
    path: &ConfigPath,
    env: &dyn Environment,
    out: &mut Converted,
) {
    match &source.kind {
        Kind::Map(entries) => {
            for (key, value) in entries {
                if let Some(name) = key_text(key)
                    && !map.contains_key(name)
                {
                    let child = convert(value, &path.key(name), Some(key.at), env, out);
                    map.insert(name.to_string(), child);
                }
            }
        }
        Kind::Seq(items) => items.iter().for_each(|item| merge(item, map, path, env, out)),
        Kind::Scalar { .. } => out.diagnostics.push(
            Diagnostic::new(path.clone(), "`<<` merges a mapping or a list of mappings").at(Some(source.at)),
        ),
    }
}

fn key_text(node: &Node) -> Option<&str> {
    match &node.kind {
        Kind::Scalar { text, .. } => Some(text),
        _ => None,
    }
}

fn scalar(text: &str, style: ScalarStyle, tag: Option<&Tag>, env: &dyn Environment) -> Result<Value, String> {
    let text = interpolate(text, env)?;
    let interpolated = matches!(text, std::borrow::Cow::Owned(_));
    match tag {
        Some(tag) if tag.is_yaml_core_schema() && tag.suffix == "str" => Ok(Value::String(text.into_owned())),
        Some(tag)
            if tag.is_yaml_core_schema()
                && ["int", "float", "bool", "null"].contains(&tag.suffix.as_str()) =>
        {
            Ok(resolve_plain(&text))
        }
        Some(tag) => Err(format!("unsupported YAML tag {tag}")),
        // A variable that expands to nothing (or to `null`) stays a string: `token: ${TOKEN}` with TOKEN
        // empty must read as an empty token, not as no token at all.
        None if style == ScalarStyle::Plain => match resolve_plain(&text) {
            Value::Null if interpolated => Ok(Value::String(text.into_owned())),
            value => Ok(value),
        },
        None => Ok(Value::String(text.into_owned())),
    }
}

/// Resolves a plain scalar by the YAML 1.2 core schema: null, booleans, integers (decimal, 0o, 0x) and
/// floats; anything else is a string.
fn resolve_plain(text: &str) -> Value {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    let unsigned = text.strip_prefix('+').unwrap_or(text);
    if let Some(hex) = text.strip_prefix("0x") {
        if let Ok(n) = u64::from_str_radix(hex, 16) {
            return Value::Number(n.into());
        }
    } else if let Some(octal) = text.strip_prefix("0o") {
        if let Ok(n) = u64::from_str_radix(octal, 8) {
            return Value::Number(n.into());
        }
    } else if is_decimal_integer(unsigned) {
        if let Ok(n) = unsigned.parse::<i64>() {
            return Value::Number(n.into());
        }
        if let Ok(n) = unsigned.parse::<u64>() {
            return Value::Number(n.into());
        }
    } else if is_float(unsigned)
        && let Some(n) = unsigned.parse::<f64>().ok().and_then(Number::from_f64)
    {
        return Value::Number(n);
    }
    Value::String(text.to_string())
}

fn is_decimal_integer(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// `[-]( .digits | digits[.digits] )[e[+-]digits]`, as the core schema spells a float.
fn is_float(text: &str) -> bool {
    let text = text.strip_prefix('-').unwrap_or(text);
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(i) => (&text[..i], Some(&text[i + 1..])),
        None => (text, None),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = digits(whole) && digits(fraction) && !(whole.is_empty() && fraction.is_empty());
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    mantissa_ok && exponent_ok && (mantissa.contains('.') || exponent.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interpolate::MapEnvironment;
    use serde_json::json;

    fn load(text: &str) -> Converted {
        let env = MapEnvironment::default().with_var("PORT", "8080");
        let root = parse(text).unwrap();
        to_value(root.as_ref(), &env)
    }

    #[test]
    fn resolves_core_schema_scalars() {
        let converted = load(
            "a: 1\nb: -2\nc: 1.5\nd: true\ne: ~\nf: '1'\ng: 127.0.0.1\nh: 5s\ni: 0x1F\nj: 1e3\nk: !!str 7\nl:\n",
        );
        assert!(converted.diagnostics.is_empty());
        assert_eq!(
            converted.value,
            json!({"a": 1, "b": -2, "c": 1.5, "d": true, "e": null, "f": "1", "g": "127.0.0.1",
                   "h": "5s", "i": 31, "j": 1000.0, "k": "7", "l": null})
        );
    }

    #[test]
    fn interpolates_and_retypes_plain_scalars() {
        let converted = load("port: ${PORT}\nquoted: \"${PORT}\"\naddr: 127.0.0.1:${PORT}\n");
        assert_eq!(converted.value, json!({"port": 8080, "quoted": "8080", "addr": "127.0.0.1:8080"}));
    }

    #[test]
    fn records_locations_of_keys_and_values() {
        let converted = load("listeners:\n  - name: a\n    cluster: db\n");
        let path = ConfigPath::root().key("listeners").index(0).key("cluster");
        assert_eq!(converted.source_map.key(&path), Some(Location { line: 3, column: 5 }));
        assert_eq!(converted.source_map.value(&path), Some(Location { line: 3, column: 14 }));
        let missing = ConfigPath::root().key("listeners").index(0).key("address");
        assert_eq!(converted.source_map.value(&missing), Some(Location { line: 2, column: 5 }));
    }

    #[test]
    fn expands_aliases_and_merge_keys() {
        let converted = load("base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  y: 3\nlist: [*b]\n");
        assert!(converted.diagnostics.is_empty(), "{:?}", converted.diagnostics);
        assert_eq!(converted.value["use"], json!({"y": 3, "x": 1}));
        assert_eq!(converted.value["list"], json!([{"x": 1, "y": 2}]));
    }

    #[test]
    fn reports_duplicate_keys_unset_vars_and_bad_yaml() {
        let converted = load("a: 1\nb: ${NOPE}\na: 2\n");
        let messages: Vec<String> = converted.diagnostics.iter().map(ToString::to_string).collect();
        assert_eq!(
            messages,
            [
                "2:4: b: environment variable NOPE is not set (write ${NOPE:-default} to give a default)",
                "3:1: a: duplicate key \"a\"",
            ]
        );
        let error = parse("a: [1, 2\n").unwrap_err();
        assert!(error.to_string().contains("invalid YAML"), "{error}");
        let error = parse("a: 1\n---\nb: 2\n").unwrap_err();
        assert!(error.to_string().contains("exactly one"), "{error}");
    }

    #[test]
    fn refuses_alias_bombs() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..8 {
            let p = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let error = parse(&text).unwrap_err();
        assert!(error.to_string().contains("expand to more than"), "{error}");
    }
}
