//! Deserializers for fields DingTalk sends sometimes as a number, sometimes as a string.

use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// `"123"`, `123` or `null` → `Option<String>`. Ids and times change type between endpoints and
/// doc generations; keeping them as text loses nothing.
pub(crate) fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(Value::Bool(b)) => Some(b.to_string()),
        Some(other) => Some(other.to_string()),
    })
}

/// `123`, `"123"` or `null` → `Option<i64>`; anything unparsable becomes `None` rather than
/// failing the whole answer.
pub(crate) fn opt_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        Some(Value::Number(n)) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    })
}

/// A list that may be missing, `null`, or a list: missing and `null` become empty.
pub(crate) fn vec_or_null<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Sample {
        #[serde(default, deserialize_with = "opt_string")]
        id: Option<String>,
        #[serde(default, deserialize_with = "opt_i64")]
        time: Option<i64>,
        #[serde(default, deserialize_with = "vec_or_null")]
        list: Vec<String>,
    }

    #[test]
    fn accepts_numbers_strings_and_nulls() {
        let a: Sample =
            serde_json::from_str(r#"{"id": 12, "time": "1700", "list": null}"#).unwrap();
        assert_eq!(a.id.as_deref(), Some("12"));
        assert_eq!(a.time, Some(1700));
        assert!(a.list.is_empty());
        let b: Sample = serde_json::from_str(r#"{"id": "x", "time": 5, "list": ["u"]}"#).unwrap();
        assert_eq!(b.id.as_deref(), Some("x"));
        assert_eq!(b.time, Some(5));
        assert_eq!(b.list, vec!["u"]);
        let c: Sample = serde_json::from_str(r#"{"time": "soon"}"#).unwrap();
        assert_eq!((c.id, c.time), (None, None));
    }
}
