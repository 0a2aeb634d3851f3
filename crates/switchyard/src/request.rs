//! The parsed view of an inference request, built once per request and read by policies.
//!
//! Only the fields routing needs are deserialised; everything else in the body is skipped
//! and forwarded to the worker byte for byte.

use std::borrow::Cow;
use std::time::Duration;

use serde::Deserialize;

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
    /// Routing text (at most [`MAX_ROUTING_BYTES`] or [`MAX_ROUTING_TOKENS`] of the prompt).
    pub text: RoutingText,
    /// The prompt's whole length (bytes of text, or tokens) when `text` holds only its start.
    pub full_len: Option<usize>,
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
    /// How often a policy was asked to place this request before this ask: a held request's
    /// rechecks, a retry after a failed attempt, a re-choice after a breaker's refusal. A policy
    /// that counts each request once (marginal_utility's size means) counts it at 0.
    pub asks: u32,
    /// The time of the decision when it is not the wall clock's (a simulation's virtual time).
    pub now: Option<tokio::time::Instant>,
    /// The prompt's block hashes once the exact cache view has computed them.
    pub block_hashes: crate::kv_events::PromptHashes,
}

impl RequestView {
    /// Prompt tokens: the token ids' count, or the text's bytes / [`crate::load::CHARS_PER_TOKEN`].
    pub fn prompt_tokens(&self) -> u32 {
        let n = match &self.text {
            RoutingText::Text(s) => self.full_len.unwrap_or(s.len()).div_ceil(crate::load::CHARS_PER_TOKEN),
            RoutingText::Tokens(t) => self.full_len.unwrap_or(t.len()),
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
        crate::load::DispatchInfo {
            prompt_tokens,
            uncached_tokens,
            route,
            predicted_cached: selection.predicted_cached,
            policy: "",
            slot_wait_ms: selection.slot_wait_ms.unwrap_or(0),
        }
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

/// Routing text kept per request at most: a longer prompt is routed on its first MiB (prefix
/// groups diverge long before that), while its token count still covers the whole prompt.
/// Bounds the router's memory per request whatever the body holds.
pub const MAX_ROUTING_BYTES: usize = 1 << 20;
/// Token ids kept per request at most, likewise.
pub const MAX_ROUTING_TOKENS: usize = 1 << 18;

#[derive(Deserialize)]
struct SamplingParams {
    #[serde(default)]
    max_new_tokens: Option<u32>,
}

/// Appends `s` to `out` without passing `cap` bytes (cut at a character boundary).
fn push_capped(out: &mut String, s: &str, cap: usize) {
    let room = cap.saturating_sub(out.len());
    if s.len() <= room {
        out.push_str(s);
    } else {
        let mut end = room;
        while end > 0 && !s.is_char_boundary(end) {
            end -= 1;
        }
        out.push_str(&s[..end]);
    }
}

/// A prompt-like field (`prompt`, `text`, `input`, `query`, `input_ids`) as routing needs it,
/// read without building a JSON tree: a string, a list of strings (joined by newlines), or a
/// list of token ids, each kept up to the routing caps and measured whole. Anything else (a
/// batch of token lists, numbers out of range) routes on nothing.
#[derive(Debug, Default)]
struct Prompt {
    text: Option<String>,
    tokens: Option<Vec<u32>>,
    /// Bytes of text, or token ids, in the whole field.
    len: usize,
}

impl<'de> Deserialize<'de> for Prompt {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Prompt;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a prompt")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Prompt, E> {
                let mut text = String::new();
                push_capped(&mut text, v, MAX_ROUTING_BYTES);
                Ok(Prompt { text: Some(text), tokens: None, len: v.len() })
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Prompt, A::Error> {
                let mut p = Prompt::default();
                let mut usable = true;
                while let Some(e) = seq.next_element::<Element>()? {
                    match e {
                        Element::Text(t, n) if p.tokens.is_none() && usable => {
                            let text = p.text.get_or_insert_with(String::new);
                            if p.len > 0 {
                                push_capped(text, "\n", MAX_ROUTING_BYTES);
                                p.len += 1;
                            }
                            push_capped(text, &t, MAX_ROUTING_BYTES);
                            p.len += n;
                        }
                        Element::Token(t) if p.text.is_none() && usable => {
                            let tokens = p.tokens.get_or_insert_with(Vec::new);
                            if tokens.len() < MAX_ROUTING_TOKENS {
                                tokens.push(t);
                            }
                            p.len += 1;
                        }
                        _ => usable = false,
                    }
                }
                Ok(if usable { p } else { Prompt::default() })
            }
            fn visit_u64<E>(self, _: u64) -> Result<Prompt, E> {
                Ok(Prompt::default())
            }
            fn visit_i64<E>(self, _: i64) -> Result<Prompt, E> {
                Ok(Prompt::default())
            }
            fn visit_f64<E>(self, _: f64) -> Result<Prompt, E> {
                Ok(Prompt::default())
            }
            fn visit_bool<E>(self, _: bool) -> Result<Prompt, E> {
                Ok(Prompt::default())
            }
            fn visit_unit<E>(self) -> Result<Prompt, E> {
                Ok(Prompt::default())
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Prompt, A::Error> {
                while map.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
                Ok(Prompt::default())
            }
        }
        d.deserialize_any(V)
    }
}

/// One element of a prompt list: a string (capped, with its length), a token id, or other.
enum Element {
    Text(String, usize),
    Token(u32),
    Other,
}

impl<'de> Deserialize<'de> for Element {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Element;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a prompt element")
            }
            fn visit_str<E>(self, v: &str) -> Result<Element, E> {
                let mut text = String::new();
                push_capped(&mut text, v, MAX_ROUTING_BYTES);
                Ok(Element::Text(text, v.len()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Element, E> {
                Ok(u32::try_from(v).map_or(Element::Other, Element::Token))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Element, E> {
                Ok(Element::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Element, E> {
                Ok(Element::Other)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Element, E> {
                Ok(Element::Other)
            }
            fn visit_unit<E>(self) -> Result<Element, E> {
                Ok(Element::Other)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Element, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Element::Other)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Element, A::Error> {
                while map.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
                Ok(Element::Other)
            }
        }
        d.deserialize_any(V)
    }
}

/// A chat message's content as routing text: a string, or the `text` of each part (images and
/// other parts are skipped unread), capped.
#[derive(Default)]
struct Content(String, usize);

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Part<'a> {
            #[serde(default, borrow)]
            text: Option<Cow<'a, str>>,
        }
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Content;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("message content")
            }
            fn visit_str<E>(self, v: &str) -> Result<Content, E> {
                let mut c = Content::default();
                push_capped(&mut c.0, v, MAX_ROUTING_BYTES);
                c.1 = v.len();
                Ok(c)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Content, A::Error> {
                let mut c = Content::default();
                while let Some(part) = seq.next_element::<Option<Part<'de>>>()? {
                    if let Some(t) = part.and_then(|p| p.text) {
                        push_capped(&mut c.0, &t, MAX_ROUTING_BYTES);
                        c.1 += t.len();
                    }
                }
                Ok(c)
            }
            fn visit_unit<E>(self) -> Result<Content, E> {
                Ok(Content::default())
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(default, borrow)]
    role: Option<Cow<'a, str>>,
    #[serde(default)]
    content: Option<Content>,
}

/// Chat messages joined in order as `role: content` lines, capped, and their whole length.
#[derive(Default)]
struct Messages(String, usize);

impl<'de> Deserialize<'de> for Messages {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Messages;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of messages")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Messages, A::Error> {
                let mut m = Messages::default();
                while let Some(msg) = seq.next_element::<Message<'de>>()? {
                    let role = msg.role.as_deref().unwrap_or("");
                    let content = msg.content.unwrap_or_default();
                    for piece in [role, ": ", &content.0, "\n"] {
                        push_capped(&mut m.0, piece, MAX_ROUTING_BYTES);
                    }
                    m.1 += role.len() + 3 + content.1;
                }
                Ok(m)
            }
        }
        d.deserialize_seq(V)
    }
}

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(default, borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    messages: Option<Messages>,
    #[serde(default)]
    prompt: Option<Prompt>,
    #[serde(default)]
    text: Option<Prompt>,
    #[serde(default)]
    input: Option<Prompt>,
    #[serde(default)]
    query: Option<Prompt>,
    #[serde(default)]
    input_ids: Option<Prompt>,
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

impl RequestView {
    /// Parses a request body. `header_key` is the session key from the headers, if any
    /// (it wins over the body's `user`). Memory stays within the body plus the routing caps:
    /// prompts are read as they stream by, never as a JSON tree.
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
        let (text, full_len) = if let Some(Messages(text, len)) = f.messages {
            (RoutingText::Text(text), len)
        } else {
            let ids = f.input_ids.filter(|p| p.tokens.is_some());
            match ids.or_else(|| {
                [f.prompt, f.text, f.input, f.query]
                    .into_iter()
                    .flatten()
                    .find(|p| p.text.is_some() || p.tokens.is_some())
            }) {
                Some(Prompt { text: Some(t), len, .. }) => (RoutingText::Text(t), len),
                Some(Prompt { tokens: Some(t), len, .. }) => (RoutingText::Tokens(t), len),
                _ => (RoutingText::None, 0),
            }
        };
        let kept = match &text {
            RoutingText::Text(s) => s.len(),
            RoutingText::Tokens(t) => t.len(),
            RoutingText::None => 0,
        };
        Ok(Self {
            text,
            full_len: (full_len > kept).then_some(full_len),
            routing_key: header_key.map(str::to_owned).or_else(|| f.user.map(Cow::into_owned)),
            max_tokens: f.max_completion_tokens.or(f.max_tokens).or(f.sampling_params.and_then(|s| s.max_new_tokens)),
            stream: f.stream.unwrap_or(false),
            model: f.model.map(Cow::into_owned),
            waited: Duration::ZERO,
            asks: 0,
            now: None,
            block_hashes: Default::default(),
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

    #[test]
    fn long_prompts_are_routed_on_their_start_and_counted_whole() {
        let long = "a".repeat(3 * MAX_ROUTING_BYTES);
        let v = RequestView::parse(format!(r#"{{"prompt":"{long}"}}"#).as_bytes(), None).unwrap();
        assert_eq!(v.text.len(), MAX_ROUTING_BYTES);
        assert_eq!(v.prompt_tokens() as usize, 3 * MAX_ROUTING_BYTES / 4);
        let ids: Vec<String> = (0..MAX_ROUTING_TOKENS + 10).map(|i| (i % 7).to_string()).collect();
        let v = RequestView::parse(format!(r#"{{"input_ids":[{}]}}"#, ids.join(",")).as_bytes(), None).unwrap();
        assert_eq!((v.text.len(), v.prompt_tokens() as usize), (MAX_ROUTING_TOKENS, MAX_ROUTING_TOKENS + 10));
        // Multibyte text is cut at a character boundary.
        let wide = "é".repeat(MAX_ROUTING_BYTES);
        let v = RequestView::parse(format!(r#"{{"prompt":"{wide}"}}"#).as_bytes(), None).unwrap();
        let RoutingText::Text(t) = &v.text else { panic!() };
        assert!(t.len() <= MAX_ROUTING_BYTES && t.chars().all(|c| c == 'é'));
    }

    #[test]
    fn images_and_odd_fields_route_on_the_text_only() {
        let v = RequestView::parse(
            br#"{"messages":[{"content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}},{"type":"text","text":"what is it"}],"role":"user"}]}"#,
            None,
        )
        .unwrap();
        assert_eq!(v.text, RoutingText::Text("user: what is it\n".into()));
        let v = RequestView::parse(br#"{"input_ids":[[1,2],[3]]}"#, None).unwrap();
        assert_eq!(v.text, RoutingText::None, "a batch routes on nothing");
        let v = RequestView::parse(br#"{"prompt":[1,99999999999]}"#, None).unwrap();
        assert_eq!(v.text, RoutingText::None);
        let v = RequestView::parse(br#"{"prompt":["a","b"],"input":{"x":1}}"#, None).unwrap();
        assert_eq!(v.text, RoutingText::Text("a\nb".into()));
    }
}
