//! What the client of a stream has seen so far, read from the events as they pass, and how a
//! continuation's events are rewritten to extend it.
//!
//! The three streaming APIs differ in where the answer is: `choices[].delta.content` (chat,
//! one piece per event), `choices[].text` (completions, one piece per event) and SGLang's
//! `/generate`, whose every event carries the whole text and output ids so far. A
//! continuation is a new request whose answer starts where the old one stopped, so its events
//! are shifted onto the old ones: the old id, no second role delta, text and ids prefixed
//! (`/generate`), token counts added, prompt tokens counted once.

use serde_json::{Map, Value};

/// The streaming API of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completion,
    /// SGLang `/generate`.
    Generate,
}

impl Api {
    /// The API of `route`, if its streams can be continued.
    pub fn of(route: &str) -> Option<Self> {
        match route {
            "/v1/chat/completions" => Some(Api::Chat),
            "/v1/completions" => Some(Api::Completion),
            "/generate" => Some(Api::Generate),
            _ => None,
        }
    }
}

/// One server-sent event, by what it means for the stream.
#[derive(Debug)]
pub enum Event {
    /// `data: [DONE]`: the stream's end.
    Done,
    /// An error event (`{"error": …}` or `{"object": "error", …}`): the engine gave up.
    Error,
    /// A JSON chunk of the answer.
    Chunk(Value),
    /// A `data:` event that is not JSON (these APIs only send JSON): a worker that broke mid-event
    /// and ended the stream, or garbage. Never relayed.
    Garbled,
    /// Anything else (comments, keep-alives, non-JSON data): relayed untouched.
    Other,
}

impl Event {
    /// Tells only the end and error events from the rest, without parsing JSON.
    pub fn glance(event: &[u8]) -> Self {
        let has = |d: &[u8], m: &[u8]| d.windows(m.len()).any(|w| w == m);
        match event.strip_prefix(b"data:").map(|d| d.trim_ascii()) {
            Some(b"[DONE]") => Event::Done,
            Some(d)
                if d.starts_with(b"{\"error\"")
                    || has(d, b"\"object\":\"error\"")
                    || has(d, b"\"object\": \"error\"") =>
            {
                Event::Error
            }
            _ => Event::Other,
        }
    }

    /// Reads one complete event (its lines, without the blank line that ends it).
    pub fn read(event: &[u8]) -> Self {
        let Ok(text) = std::str::from_utf8(event) else { return Event::Other };
        let mut data = String::new();
        let mut has_data = false;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("data:") {
                has_data = true;
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(rest.strip_prefix(' ').unwrap_or(rest));
            }
        }
        if data.trim() == "[DONE]" {
            return Event::Done;
        }
        match serde_json::from_str::<Value>(&data) {
            Ok(v) if v.get("error").is_some_and(|e| !e.is_null()) => Event::Error,
            Ok(v) if v.get("object").and_then(Value::as_str) == Some("error") => Event::Error,
            Ok(v) => Event::Chunk(v),
            Err(_) if has_data => Event::Garbled,
            Err(_) => Event::Other,
        }
    }
}

/// The answer so far, as the client has received it.
#[derive(Debug, Clone)]
pub struct Transcript {
    api: Api,
    /// Response id, creation time and model of the first events (chat and completions).
    id: Option<Value>,
    created: Option<Value>,
    model: Option<Value>,
    /// The answer's text.
    pub text: String,
    /// Output token ids (`/generate`, when the engine sends them).
    pub output_ids: Option<Vec<Value>>,
    /// Output tokens: the engine's count when it gave one, else one per non-empty piece.
    pub tokens: u32,
    /// Prompt tokens, once the engine has said.
    pub prompt_tokens: Option<u64>,
    /// The finish reason, once an event carried one: the answer is complete.
    pub finished: bool,
    /// What makes the answer impossible to continue faithfully, once seen.
    pub blocker: Option<&'static str>,
    /// SGLang's `meta_info.id`.
    rid: Option<Value>,
    /// The client has had the assistant's role delta (chat).
    role_sent: bool,
}

impl Transcript {
    /// An empty transcript.
    pub fn new(api: Api) -> Self {
        Self {
            api,
            id: None,
            created: None,
            model: None,
            text: String::new(),
            output_ids: None,
            tokens: 0,
            prompt_tokens: None,
            finished: false,
            blocker: None,
            rid: None,
            role_sent: false,
        }
    }

    /// The API of the stream.
    pub fn api(&self) -> Api {
        self.api
    }

    /// Takes in one chunk the client is about to receive.
    /// Taken by value: `/generate` events carry the whole answer so far, which is moved in
    /// rather than copied on every event.
    pub fn observe(&mut self, mut chunk: Value) {
        let keep = |slot: &mut Option<Value>, v: Option<&Value>| {
            if slot.is_none() {
                *slot = v.filter(|v| !v.is_null()).cloned();
            }
        };
        match self.api {
            Api::Chat | Api::Completion => {
                keep(&mut self.id, chunk.get("id"));
                keep(&mut self.created, chunk.get("created"));
                keep(&mut self.model, chunk.get("model"));
                let choices = chunk.get("choices").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
                let mut counted_piece = false;
                for choice in choices {
                    if choice.get("index").and_then(Value::as_u64).unwrap_or(0) != 0 {
                        self.blocker.get_or_insert("the answer has several choices");
                    }
                    let piece = if self.api == Api::Chat {
                        let delta = choice.get("delta");
                        let field = |k: &str| delta.and_then(|d| d.get(k)).filter(|v| !v.is_null());
                        self.role_sent |= field("role").is_some();
                        if field("tool_calls").is_some() || field("function_call").is_some() {
                            self.blocker.get_or_insert("the answer is a tool call");
                        }
                        if field("reasoning_content").and_then(Value::as_str).is_some_and(|s| !s.is_empty()) {
                            self.blocker.get_or_insert("the answer has reasoning content");
                        }
                        field("content").and_then(Value::as_str)
                    } else {
                        choice.get("text").and_then(Value::as_str)
                    };
                    if let Some(piece) = piece.filter(|p| !p.is_empty()) {
                        self.text.push_str(piece);
                        counted_piece = true;
                    }
                    if choice.get("finish_reason").is_some_and(|f| !f.is_null()) {
                        self.finished = true;
                    }
                }
                match chunk.get("usage").filter(|u| u.is_object()) {
                    Some(usage) => self.take_counts(usage.get("prompt_tokens"), usage.get("completion_tokens")),
                    None if counted_piece => self.tokens += 1,
                    None => {}
                }
            }
            Api::Generate => {
                if let Some(Value::String(text)) = chunk.get_mut("text").map(Value::take) {
                    self.text = text;
                }
                if let Some(Value::Array(ids)) = chunk.get_mut("output_ids").map(Value::take) {
                    self.output_ids = Some(ids);
                }
                if let Some(meta) = chunk.get("meta_info") {
                    keep(&mut self.rid, meta.get("id"));
                    self.take_counts(meta.get("prompt_tokens"), meta.get("completion_tokens"));
                    if meta.get("finish_reason").is_some_and(|f| !f.is_null()) {
                        self.finished = true;
                    }
                }
            }
        }
    }

    fn take_counts(&mut self, prompt: Option<&Value>, completion: Option<&Value>) {
        if let Some(p) = prompt.and_then(Value::as_u64) {
            self.prompt_tokens = Some(p);
        }
        if let Some(c) = completion.and_then(Value::as_u64) {
            self.tokens = u32::try_from(c).unwrap_or(u32::MAX);
        }
    }

    /// Prompt tokens of the whole answer, from a continuation's count (which includes the
    /// answer so far as prompt) when the old stream never said.
    fn prompt_from(&self, continuation_prompt: Option<u64>) -> Option<u64> {
        self.prompt_tokens.or_else(|| continuation_prompt.map(|p| p.saturating_sub(u64::from(self.tokens))))
    }

    /// A continuation's chunk as a chunk of the old stream, or `None` when it only repeats
    /// what the client already has (the new stream's role delta). A stream that broke before
    /// the client had anything is simply replaced.
    pub fn splice(&self, mut chunk: Value) -> Option<Value> {
        let Some(obj) = chunk.as_object_mut() else { return Some(chunk) };
        match self.api {
            Api::Chat | Api::Completion => {
                for (key, value) in [("id", &self.id), ("created", &self.created), ("model", &self.model)] {
                    if let (Some(v), Some(slot)) = (value, obj.get_mut(key)) {
                        *slot = v.clone();
                    }
                }
                let mut says_something = obj.get("usage").is_some_and(|u| !u.is_null());
                if let Some(choices) = obj.get_mut("choices").and_then(Value::as_array_mut) {
                    for choice in choices {
                        if choice.get("finish_reason").is_some_and(|f| !f.is_null()) {
                            says_something = true;
                        }
                        if self.api == Api::Completion {
                            says_something = true;
                            continue;
                        }
                        if let Some(delta) = choice.get_mut("delta").and_then(Value::as_object_mut) {
                            if !self.role_sent {
                                says_something = true;
                                continue;
                            }
                            delta.remove("role");
                            let empty = |v: &Value| v.is_null() || v.as_str() == Some("");
                            if delta.values().any(|v| !empty(v)) {
                                says_something = true;
                            }
                        }
                    }
                }
                if !says_something {
                    return None;
                }
                if let Some(usage) = obj.get_mut("usage").and_then(Value::as_object_mut) {
                    self.shift_counts(usage, "prompt_tokens", "completion_tokens", Some("total_tokens"));
                }
            }
            Api::Generate => {
                if let Some(Value::String(text)) = obj.get_mut("text") {
                    text.insert_str(0, &self.text);
                }
                if let (Some(Value::Array(ids)), Some(before)) = (obj.get_mut("output_ids"), &self.output_ids) {
                    ids.splice(0..0, before.iter().cloned());
                }
                if let Some(meta) = obj.get_mut("meta_info").and_then(Value::as_object_mut) {
                    if let (Some(rid), Some(slot)) = (&self.rid, meta.get_mut("id")) {
                        *slot = rid.clone();
                    }
                    self.shift_counts(meta, "prompt_tokens", "completion_tokens", None);
                    let total = meta.get("completion_tokens").cloned();
                    if let (Some(Value::Object(finish)), Some(total)) = (meta.get_mut("finish_reason"), total) {
                        if finish.contains_key("length") {
                            finish.insert("length".into(), total);
                        }
                    }
                }
            }
        }
        Some(chunk)
    }

    fn shift_counts(&self, counts: &mut Map<String, Value>, prompt: &str, completion: &str, total: Option<&str>) {
        let prompt_tokens = self.prompt_from(counts.get(prompt).and_then(Value::as_u64));
        let completion_tokens = counts.get(completion).and_then(Value::as_u64).map(|c| c + u64::from(self.tokens));
        if let Some(p) = prompt_tokens {
            counts.insert(prompt.into(), p.into());
        }
        if let Some(c) = completion_tokens {
            counts.insert(completion.into(), c.into());
        }
        if let (Some(t), Some(p), Some(c)) = (total, prompt_tokens, completion_tokens) {
            counts.insert(t.into(), (p + c).into());
        }
    }

    /// The final chunk of an answer that was complete in length when its stream broke (its
    /// `max_tokens` reached, the finish reason not yet sent).
    pub fn length_end(&self) -> Value {
        let mut chunk = serde_json::json!({});
        match self.api {
            Api::Chat | Api::Completion => {
                let (object, choice) = if self.api == Api::Chat {
                    ("chat.completion.chunk", serde_json::json!({"index": 0, "delta": {}, "finish_reason": "length"}))
                } else {
                    ("text_completion", serde_json::json!({"index": 0, "text": "", "finish_reason": "length"}))
                };
                chunk["object"] = object.into();
                for (key, value) in [("id", &self.id), ("created", &self.created), ("model", &self.model)] {
                    if let Some(v) = value {
                        chunk[key] = v.clone();
                    }
                }
                chunk["choices"] = Value::Array(vec![choice]);
            }
            Api::Generate => {
                chunk["text"] = self.text.clone().into();
                if let Some(ids) = &self.output_ids {
                    chunk["output_ids"] = Value::Array(ids.clone());
                }
                chunk["meta_info"] = serde_json::json!({
                    "id": self.rid, "finish_reason": {"type": "length", "length": self.tokens},
                    "prompt_tokens": self.prompt_tokens, "completion_tokens": self.tokens,
                });
            }
        }
        chunk
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_are_told_apart() {
        assert!(matches!(Event::read(b"data: [DONE]"), Event::Done));
        assert!(matches!(Event::read(br#"data: {"error": {"message": "x"}}"#), Event::Error));
        assert!(matches!(Event::read(br#"data: {"object": "error", "message": "x"}"#), Event::Error));
        assert!(matches!(Event::read(br#"data: {"choices": []}"#), Event::Chunk(_)));
        assert!(matches!(Event::read(b": keep-alive"), Event::Other));
        assert!(matches!(Event::read(br#"data: {"choices":[{"tedata: {"error": {}}"#), Event::Garbled));
        assert!(matches!(Event::glance(b"data: [DONE]"), Event::Done));
        assert!(matches!(Event::glance(br#"data: {"error": {"message": "x"}}"#), Event::Error));
        assert!(matches!(Event::glance(br#"data: {"object": "error", "message": "x"}"#), Event::Error));
        assert!(matches!(Event::glance(br#"data: {"choices": []}"#), Event::Other));
    }

    #[test]
    fn a_chat_continuation_reads_as_the_same_answer() {
        let mut t = Transcript::new(Api::Chat);
        let chunk = |id: &str, delta: Value, finish: Value| {
            json!({"id": id, "object": "chat.completion.chunk", "created": 1, "model": "m",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        };
        t.observe(chunk("a", json!({"role": "assistant", "content": ""}), Value::Null));
        t.observe(chunk("a", json!({"content": "lorem "}), Value::Null));
        t.observe(chunk("a", json!({"content": "ipsum "}), Value::Null));
        assert_eq!((t.text.as_str(), t.tokens, t.finished), ("lorem ipsum ", 2, false));

        assert_eq!(t.splice(chunk("b", json!({"role": "assistant", "content": ""}), Value::Null)), None);
        let next = t.splice(chunk("b", json!({"role": "assistant", "content": "dolor "}), Value::Null)).unwrap();
        assert_eq!(next, chunk("a", json!({"content": "dolor "}), Value::Null));
        let usage = json!({"id": "b", "object": "chat.completion.chunk", "created": 2, "model": "m", "choices": [],
                           "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}});
        let usage = t.splice(usage).unwrap();
        assert_eq!(usage["id"], "a");
        assert_eq!(usage["usage"], json!({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}));
    }

    #[test]
    fn a_generate_continuation_is_prefixed_with_the_answer_so_far() {
        let mut t = Transcript::new(Api::Generate);
        t.observe(json!({"text": "lorem ipsum ", "output_ids": [1, 2],
                          "meta_info": {"id": "r1", "prompt_tokens": 7, "completion_tokens": 2, "finish_reason": null}}));
        let next = t
            .splice(json!({"text": "dolor ", "output_ids": [3],
                           "meta_info": {"id": "r2", "prompt_tokens": 9, "completion_tokens": 1,
                                         "finish_reason": {"type": "length", "length": 1}}}))
            .unwrap();
        assert_eq!(
            next,
            json!({"text": "lorem ipsum dolor ", "output_ids": [1, 2, 3],
                   "meta_info": {"id": "r1", "prompt_tokens": 7, "completion_tokens": 3,
                                 "finish_reason": {"type": "length", "length": 3}}})
        );
    }

    #[test]
    fn what_cannot_be_continued_is_noticed() {
        let mut t = Transcript::new(Api::Chat);
        t.observe(json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0}]}}]}));
        assert_eq!(t.blocker, Some("the answer is a tool call"));
        let mut t = Transcript::new(Api::Completion);
        t.observe(json!({"choices": [{"index": 1, "text": "x"}]}));
        assert!(t.blocker.is_some());
    }
}
