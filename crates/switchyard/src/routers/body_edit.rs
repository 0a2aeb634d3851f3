//! Edits of a request body's top-level fields without building a JSON tree of it.
//!
//! PD mode adds fields to each attempt's body (bootstrap rooms, `kv_transfer_params`, a
//! one-token prefill). Parsing a body into a `serde_json::Value` costs ~20× its size for a
//! long `input_ids` array; here the top level is scanned once into borrowed raw values and the
//! new body is written straight from them, so an edit costs one copy of the body.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// The top-level members of a JSON object, borrowed from its text, in order.
#[derive(Debug)]
pub struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Members<'a> {
    /// Scans `body`, which must be a JSON object.
    pub fn parse(body: &'a [u8]) -> Result<Self, String> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<(Cow<'de, str>, &'de RawValue)>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<Cow<'de, str>, &'de RawValue>()? {
                    out.push((k, v));
                }
                Ok(out)
            }
        }
        let mut de = serde_json::Deserializer::from_slice(body);
        let members = de.deserialize_map(V).map_err(|e| e.to_string())?;
        de.end().map_err(|e| e.to_string())?;
        Ok(Self(members))
    }

    /// The raw JSON text of `key`'s value (the last one if repeated).
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.get())
    }

    /// Number of elements when `key` holds an array (counted, not collected).
    pub fn array_len(&self, key: &str) -> Option<usize> {
        struct Count;
        impl<'de> Visitor<'de> for Count {
            type Value = usize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
                let mut n = 0;
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(n)
            }
        }
        let raw = self.get(key)?;
        serde_json::Deserializer::from_str(raw).deserialize_seq(Count).ok()
    }

    /// Whether `key` holds an array whose first element is itself an array.
    pub fn is_nested_array(&self, key: &str) -> bool {
        self.get(key)
            .and_then(|raw| raw.trim_start().strip_prefix('['))
            .is_some_and(|rest| rest.trim_start().starts_with('['))
    }

    /// The object rewritten: members named in `set` replaced (or added at the end) with the
    /// given raw JSON values, members named in `remove` left out, the rest copied verbatim.
    pub fn rewrite(&self, set: &[(&str, String)], remove: &[&str]) -> Bytes {
        let size: usize = self.0.iter().map(|(k, v)| k.len() + v.get().len() + 4).sum::<usize>()
            + set.iter().map(|(k, v)| k.len() + v.len() + 4).sum::<usize>();
        let mut out = String::with_capacity(size + 2);
        out.push('{');
        let mut first = true;
        let mut push = |out: &mut String, k: &str, v: &str| {
            if !std::mem::replace(&mut first, false) {
                out.push(',');
            }
            // Keys are re-escaped: a borrowed key is the unescaped text.
            out.push_str(&serde_json::Value::from(k).to_string());
            out.push(':');
            out.push_str(v);
        };
        for (k, v) in &self.0 {
            if set.iter().any(|(s, _)| s == k) || remove.contains(&k.as_ref()) {
                continue;
            }
            push(&mut out, k, v.get());
        }
        for (k, v) in set {
            push(&mut out, k, v);
        }
        out.push('}');
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_top_level_members_and_keeps_the_rest_verbatim() {
        let body = br#" {"text": ["a", "b"], "stream":true, "odd\"key": {"x": [1, 2]}, "max_tokens": 9 } "#;
        let m = Members::parse(body).unwrap();
        assert_eq!(m.array_len("text"), Some(2));
        assert_eq!(m.get("stream"), Some("true"));
        let out = m.rewrite(&[("max_tokens", "1".into()), ("room", "[1,2]".into())], &["stream"]);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"text": ["a", "b"], "odd\"key": {"x": [1, 2]}, "max_tokens": 1, "room": [1, 2]})
        );
        assert!(Members::parse(br#"{"input_ids": [[1, 2], [3]]}"#).unwrap().is_nested_array("input_ids"));
        assert!(!Members::parse(br#"{"input_ids": [1, 2]}"#).unwrap().is_nested_array("input_ids"));
        assert_eq!(&Members::parse(b"{}").unwrap().rewrite(&[("a", "1".into())], &[])[..], br#"{"a":1}"#);
        assert!(Members::parse(b"[1]").is_err() && Members::parse(b"{} x").is_err());
    }
}
