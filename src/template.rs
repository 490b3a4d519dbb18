//! Message templates: text with `{name}` placeholders filled from an event's fields.
//! `{{` and `}}` stand for literal braces. Templates are parsed when the configuration is
//! loaded, so a typo in a placeholder is a start-up error, not a strange message at 3 a.m.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(String),
}

/// A parsed template. Deserializes from (and serializes to) its source text.
#[derive(Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unclosed '{{' at byte {0} (write '{{{{' for a literal brace)")]
    Unclosed(usize),
    #[error("stray '}}' at byte {0} (write '}}}}' for a literal brace)")]
    Stray(usize),
    #[error("empty placeholder '{{}}' at byte {0}")]
    Empty(usize),
    #[error("unknown placeholder {{{name}}}; known: {known}")]
    Unknown { name: String, known: String },
}

impl Template {
    pub fn parse(source: &str) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = source.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, n)| n) == Some('{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek().map(|&(_, n)| n) == Some('}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some((_, '}')) => break,
                            Some((_, ch)) => name.push(ch),
                            None => return Err(TemplateError::Unclosed(i)),
                        }
                    }
                    let name = name.trim().to_owned();
                    if name.is_empty() {
                        return Err(TemplateError::Empty(i));
                    }
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(Part::Field(name));
                }
                '}' => return Err(TemplateError::Stray(i)),
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Template {
            source: source.to_owned(),
            parts,
        })
    }

    /// A template for a built-in default: parsed, or (should the text not parse) kept as plain
    /// text, so building defaults cannot fail.
    pub fn from_default(source: &str) -> Self {
        Template::parse(source).unwrap_or_else(|_| Template {
            source: source.to_owned(),
            parts: vec![Part::Text(source.to_owned())],
        })
    }

    /// Checks that every placeholder is one of `known`.
    pub fn check(&self, known: &[&str]) -> Result<(), TemplateError> {
        for part in &self.parts {
            if let Part::Field(name) = part {
                if !known.contains(&name.as_str()) {
                    return Err(TemplateError::Unknown {
                        name: name.clone(),
                        known: known.join(", "),
                    });
                }
            }
        }
        Ok(())
    }

    /// Fills the placeholders; a field without a value renders as empty text.
    pub fn render<'a>(&self, field: impl Fn(&str) -> Option<&'a str>) -> String {
        let mut out = String::with_capacity(self.source.len());
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field(name) => out.push_str(field(name).unwrap_or("")),
            }
        }
        out
    }

    /// Renders with `(name, value)` pairs.
    pub fn render_with(&self, fields: &[(&str, &str)]) -> String {
        self.render(|name| fields.iter().find(|(n, _)| *n == name).map(|(_, v)| *v))
    }

    pub fn source(&self) -> &str {
        &self.source
    }
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Template({:?})", self.source)
    }
}

impl serde::Serialize for Template {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

impl<'de> serde::Deserialize<'de> for Template {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Template::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_filled_and_braces_escaped() {
        let t = Template::parse("群名已改为「{title}」 {{ok}} by {operator}").unwrap();
        assert_eq!(
            t.render_with(&[("title", "开放平台"), ("operator", "u1")]),
            "群名已改为「开放平台」 {ok} by u1"
        );
        assert_eq!(t.render_with(&[]), "群名已改为「」 {ok} by ");
    }

    #[test]
    fn mistakes_are_reported() {
        assert_eq!(
            Template::parse("a {b").unwrap_err(),
            TemplateError::Unclosed(2)
        );
        assert_eq!(
            Template::parse("a } b").unwrap_err(),
            TemplateError::Stray(2)
        );
        assert_eq!(Template::parse("{ }").unwrap_err(), TemplateError::Empty(0));
        let err = Template::parse("{titel}")
            .unwrap()
            .check(&["title"])
            .unwrap_err();
        assert!(err.to_string().contains("titel") && err.to_string().contains("title"));
    }
}
