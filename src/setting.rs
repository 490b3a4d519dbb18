//! How one setting may be written, in the TOML file or as an environment variable (where every
//! value is a string): `on`/`off` words for switches, comma-separated text for lists. Used by
//! each module's configuration section with `#[serde(deserialize_with = …)]`.

use serde::de::{Deserialize, Deserializer, Error};

/// A list given as a TOML array or as one comma-separated string (`"a, b,,c"` → `a`, `b`,
/// `c`).
pub fn list_or_csv<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Form {
        List(Vec<String>),
        Text(String),
    }
    Ok(match Form::deserialize(d)? {
        Form::List(items) => items,
        Form::Text(text) => text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

/// Like [`list_or_csv`], each entry a [`Secret`](crate::secret::Secret).
pub fn secret_list<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Vec<crate::secret::Secret>, D::Error> {
    Ok(list_or_csv(d)?
        .into_iter()
        .map(crate::secret::Secret::new)
        .collect())
}

/// A switch: `true`/`false`, or the words `on`/`off`, `true`/`false`, `1`/`0`.
pub fn switch<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Form {
        Bool(bool),
        Number(u8),
        Text(String),
    }
    match Form::deserialize(d)? {
        Form::Bool(b) => Ok(b),
        Form::Number(1) => Ok(true),
        Form::Number(0) => Ok(false),
        Form::Number(n) => Err(D::Error::custom(format!("{n} is not on or off"))),
        Form::Text(t) => match t.trim() {
            "true" | "on" | "1" => Ok(true),
            "false" | "off" | "0" => Ok(false),
            other => Err(D::Error::custom(format!("{other:?} is not on or off"))),
        },
    }
}

/// An optional number where an empty string means "not set".
pub fn optional_number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Form {
        Number(i64),
        Text(String),
    }
    match Option::<Form>::deserialize(d)? {
        None => Ok(None),
        Some(Form::Number(n)) => Ok(Some(n)),
        Some(Form::Text(t)) if t.trim().is_empty() => Ok(None),
        Some(Form::Text(t)) => t
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| D::Error::custom(format!("{t:?} is not a number"))),
    }
}

/// A number written as a number or as text (`"40"`, as an environment variable gives it).
pub fn number<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr + Deserialize<'de>,
{
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Form<T> {
        Number(T),
        Text(String),
    }
    match Form::<T>::deserialize(d)? {
        Form::Number(n) => Ok(n),
        Form::Text(t) => t
            .trim()
            .parse()
            .map_err(|_| D::Error::custom(format!("{t:?} is not a number"))),
    }
}
