//! The parsed view of an inference request, built once per request and read by policies.
//!
//! Only the fields routing needs are deserialised; everything else in the body is skipped
//! and forwarded to the worker byte for byte.

use std::borrow::Cow;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

/// What a prefix-aware policy matches on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RoutingText {
    /// Text: the prompt, or all chat messages joined in order as `role: content` lines.
    Text(String),
    /// Token ids (`input_ids`, or a token-id `prompt`).
    Tokens(Vec<u32>),
    /// Nothing to match on.
    #[default]
    None,
}

impl RoutingText {
    /// Length in characters (text) or tokens.
    pub fn len(&self) -> usize {
        match self {
            RoutingText::Text(s) => s.chars().count(),
            RoutingText::Tokens(t) => t.len(),
            RoutingText::None => 0,
        }
    }

    /// Whether there is nothing to match on.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The request as policies see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestView {
    /// Routing text.
    pub text: RoutingText,
    /// Session affinity key: `x-session-id` / `x-user-id` header, or the body's `user`.
    pub routing_key: Option<String>,
    /// Output token limit (`max_tokens`, `max_completion_tokens`, `sampling_params.max_new_tokens`).
    pub max_tokens: Option<u32>,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Model asked for.
    pub model: Option<String>,
    /// How long the router has held the request waiting for capacity (overload queueing).
    pub waited: Duration,
    /// The time of the decision when it is not the wall clock's (a simulation's virtual time).
    pub now: Option<tokio::time::Instant>,
}

impl RequestView {
    /// Prompt tokens: the token ids' count, or the text's bytes / [`crate::load::CHARS_PER_TOKEN`].
    pub fn prompt_tokens(&self) -> u32 {
        let n = match &self.text {
            RoutingText::Text(s) => s.len().div_ceil(crate::load::CHARS_PER_TOKEN),
            RoutingText::Tokens(t) => t.len(),
            RoutingText::None => 0,
        };
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// What the router knows about the request's size when it dispatches it to `route` on the
    /// worker `selection` chose: the policy's uncached estimate if it gave one, else the whole
    /// prompt.
    pub fn dispatch_info(
        &self,
        selection: &crate::policies::Selection,
        route: &'static str,
    ) -> crate::load::DispatchInfo {
        let prompt_tokens = self.prompt_tokens();
        let uncached_tokens = selection.uncached_tokens.map_or(prompt_tokens, |u| u.min(prompt_tokens));
        crate::load::DispatchInfo { prompt_tokens, uncached_tokens, route }
    }
}

/// A body that cannot be routed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// Not JSON, or a field of the wrong type.
    #[error("invalid JSON body: {0}")]
    Json(String),
    /// JSON, but not an object.
    #[error("the request body must be a JSON object")]
    NotAnObject,
}

#[derive(Deserialize)]
struct SamplingParams {
    #[serde(default)]
    max_new_tokens: Option<u32>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(default, borrow)]
    role: Option<Cow<'a, str>>,
    #[serde(default)]
    content: Option<Value>,
}

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(default, borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    messages: Option<Vec<Message<'a>>>,
    #[serde(default)]
    prompt: Option<Value>,
    #[serde(default)]
    text: Option<Value>,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    query: Option<Value>,
    #[serde(default)]
    input_ids: Option<Value>,
    #[serde(default, borrow)]
    user: Option<Cow<'a, str>>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    sampling_params: Option<SamplingParams>,
    #[serde(default)]
    stream: Option<bool>,
}

fn token_ids(v: &Value) -> Option<Vec<u32>> {
    let arr = v.as_array()?;
    if arr.is_empty() {
        return None;
    }
    arr.iter().map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok())).collect()
}

fn text_of(v: &Value) -> Option<RoutingText> {
    match v {
        Value::String(s) => Some(RoutingText::Text(s.clone())),
        Value::Array(a) if a.first().is_some_and(Value::is_string) => {
            Some(RoutingText::Text(a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("\n")))
        }
        Value::Array(_) => token_ids(v).map(RoutingText::Tokens),
        _ => None,
    }
}

fn push_content(out: &mut String, content: &Value) {
    match content {
        Value::String(s) => out.push_str(s),
        Value::Array(parts) => {
            for p in parts {
                if let Some(t) = p.get("text").and_then(Value::as_str) {
                    out.push_str(t);
                }
            }
        }
        _ => {}
    }
}

impl RequestView {
    /// Parses a request body. `header_key` is the session key from the headers, if any
    /// (it wins over the body's `user`).
    pub fn parse(body: &[u8], header_key: Option<&str>) -> Result<Self, ParseError> {
        // JSON is UTF-8 (RFC 8259); serde does not check strings in skipped fields, so check
        // here and never forward a body the worker would have to reject.
        if let Err(e) = std::str::from_utf8(body) {
            return Err(ParseError::Json(format!("the body is not valid UTF-8: {e}")));
        }
        let first = body.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            // Distinguish "not JSON" from "JSON but not an object" for a clearer error.
            return match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
                Ok(_) => Err(ParseError::NotAnObject),
                Err(e) => Err(ParseError::Json(e.to_string())),
            };
        }
        let f: Fields<'_> = serde_json::from_slice(body).map_err(|e| ParseError::Json(e.to_string()))?;
        let text = if let Some(messages) = &f.messages {
            let mut s = String::new();
            for m in messages {
                s.push_str(m.role.as_deref().unwrap_or(""));
                s.push_str(": ");
                if let Some(c) = &m.content {
                    push_content(&mut s, c);
                }
                s.push('\n');
            }
            RoutingText::Text(s)
        } else if let Some(ids) = f.input_ids.as_ref().and_then(token_ids) {
            RoutingText::Tokens(ids)
        } else {
            [&f.prompt, &f.text, &f.input, &f.query].into_iter().flatten().find_map(text_of).unwrap_or_default()
        };
        Ok(Self {
            text,
            routing_key: header_key.map(str::to_owned).or_else(|| f.user.map(Cow::into_owned)),
            max_tokens: f.max_completion_tokens.or(f.max_tokens).or(f.sampling_params.and_then(|s| s.max_new_tokens)),
            stream: f.stream.unwrap_or(false),
            model: f.model.map(Cow::into_owned),
            waited: Duration::ZERO,
            now: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_messages_joined_in_order_with_roles() {
        let v = RequestView::parse(
            br#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hi"}]}],"max_tokens":9,"stream":true,"user":"u1"}"#,
            None,
        )
        .unwrap();
        assert_eq!(v.text, RoutingText::Text("system: be brief\nuser: hi\n".into()));
        assert_eq!(
            (v.max_tokens, v.stream, v.model.as_deref(), v.routing_key.as_deref()),
            (Some(9), true, Some("m"), Some("u1"))
        );
    }

    #[test]
    fn prompt_text_and_token_ids() {
        let v = RequestView::parse(br#"{"text":"abc","sampling_params":{"max_new_tokens":4}}"#, Some("s")).unwrap();
        assert_eq!(
            (v.text, v.max_tokens, v.routing_key.as_deref()),
            (RoutingText::Text("abc".into()), Some(4), Some("s"))
        );
        let v = RequestView::parse(br#"{"input_ids":[1,2,3]}"#, None).unwrap();
        assert_eq!(v.text, RoutingText::Tokens(vec![1, 2, 3]));
        let v = RequestView::parse(br#"{"prompt":[7,8]}"#, None).unwrap();
        assert_eq!(v.text, RoutingText::Tokens(vec![7, 8]));
        let v = RequestView::parse(br#"{"input":"embed me"}"#, None).unwrap();
        assert_eq!(v.text, RoutingText::Text("embed me".into()));
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        assert!(matches!(RequestView::parse(b"{oops", None), Err(ParseError::Json(_))));
        assert_eq!(RequestView::parse(b"[1,2]", None), Err(ParseError::NotAnObject));
        assert!(matches!(RequestView::parse(b"", None), Err(ParseError::Json(_))));
        assert!(matches!(RequestView::parse(br#"{"max_tokens":"x"}"#, None), Err(ParseError::Json(_))));
        assert!(RequestView::parse(br#"{"messages":[{"role":"user","content":"hi"}],"extra":{"a":[1]}}"#, None).is_ok());
    }
}
