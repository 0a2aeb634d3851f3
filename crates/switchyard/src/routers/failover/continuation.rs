//! The request that continues a broken stream: the original request, with the answer so far
//! added where each API lets an engine carry on from it, and the output budget reduced by what
//! was produced.
//!
//! - `/v1/completions`: the prompt followed by the text already sent.
//! - `/v1/chat/completions`: the messages followed by an assistant message holding the
//!   partial answer, with `continue_final_message: true` and `add_generation_prompt: false`
//!   (vLLM and SGLang both take these and render the last message open, without an end of turn).
//! - SGLang `/generate`: `text` followed by the text so far, or `input_ids` followed by the
//!   output ids the engine streamed.
//!
//! Everything else in the body (sampling parameters, stop sequences, the model, user fields)
//! is copied unchanged.

use bytes::Bytes;
use serde_json::Value;

use super::transcript::{Api, Transcript};
use crate::routers::Members;

/// Output budgets the engines apply when a request sets none: a continuation sets the rest of
/// it explicitly, or it would get the whole budget again. Chat has no such default (the
/// context bounds it), so it stays unset there.
const COMPLETIONS_DEFAULT_MAX_TOKENS: u64 = 16;
const GENERATE_DEFAULT_MAX_NEW_TOKENS: u64 = 128;

/// Why a stream is not continued.
#[derive(Debug, PartialEq, Eq)]
pub enum NotContinued {
    /// The answer already has all the tokens it may have: it only needs its end.
    Complete,
    /// The request or its answer cannot be continued faithfully.
    Unfaithful(&'static str),
}

/// What in the request itself keeps its stream from being continued, if anything (checked
/// once, before relaying).
pub fn blocker(api: Api, body: &[u8]) -> Option<&'static str> {
    let Ok(m) = Members::parse(body) else { return Some("the body is not a JSON object") };
    let raw = |k: &str| m.get(k).map(str::trim).filter(|v| *v != "null");
    let is = |k: &str, v: &str| raw(k) == Some(v);
    let above_one = |k: &str| raw(k).is_some_and(|v| v.parse::<u64>().map_or(true, |n| n > 1));
    if above_one("n") || above_one("best_of") {
        return Some("it asks for several answers (n > 1)");
    }
    match api {
        Api::Chat => {
            if is("logprobs", "true") || raw("top_logprobs").is_some() {
                return Some("it asks for logprobs, which the router cannot merge");
            }
            if is("continue_final_message", "true") {
                return Some("it already continues a final message");
            }
            if !raw("messages").is_some_and(|v| v.starts_with('[')) {
                return Some("its messages are not a list");
            }
        }
        Api::Completion => {
            if raw("logprobs").is_some() {
                return Some("it asks for logprobs, which the router cannot merge");
            }
            if is("echo", "true") || raw("suffix").is_some() {
                return Some("it asks for echo or a suffix");
            }
            if prompt_text(raw("prompt")).is_none() {
                return Some("its prompt is not one string");
            }
        }
        Api::Generate => {
            if is("return_logprob", "true") {
                return Some("it asks for logprobs, which the router cannot merge");
            }
            let text = raw("text").is_some_and(|v| v.starts_with('"'));
            let ids = raw("input_ids").is_some_and(|v| v.starts_with('[')) && !m.is_nested_array("input_ids");
            if !(text || ids) {
                return Some("its input is not one text or one list of token ids");
            }
        }
    }
    None
}

/// A completion prompt as one string: `"…"` or `["…"]`.
fn prompt_text(raw: Option<&str>) -> Option<(String, bool)> {
    match serde_json::from_str::<Value>(raw?).ok()? {
        Value::String(s) => Some((s, false)),
        Value::Array(mut a) if a.len() == 1 => match a.pop() {
            Some(Value::String(s)) => Some((s, true)),
            _ => None,
        },
        _ => None,
    }
}

/// The continuation of `original` after the answer in `so_far`.
pub fn body(api: Api, original: &[u8], so_far: &Transcript) -> Result<Bytes, NotContinued> {
    if let Some(why) = so_far.blocker {
        return Err(NotContinued::Unfaithful(why));
    }
    if so_far.finished {
        return Err(NotContinued::Complete);
    }
    let m = Members::parse(original).map_err(|_| NotContinued::Unfaithful("the body is not a JSON object"))?;
    let produced = u64::from(so_far.tokens);
    let partial = Value::from(so_far.text.as_str()).to_string();
    // A budget less what was produced; none left means the answer is complete.
    let left = |raw: Option<&str>, default: Option<u64>| -> Result<Option<String>, NotContinued> {
        let limit = match raw.map(str::trim).filter(|v| *v != "null") {
            Some(v) => Some(v.parse::<u64>().map_err(|_| NotContinued::Unfaithful("its token limit is not a number"))?),
            None => default,
        };
        match limit {
            Some(l) if l <= produced => Err(NotContinued::Complete),
            Some(l) => Ok(Some((l - produced).to_string())),
            None => Ok(None),
        }
    };
    let at_least = |raw: Option<&str>| {
        raw.and_then(|v| v.trim().parse::<u64>().ok()).map(|n| n.saturating_sub(produced).to_string())
    };
    let mut set: Vec<(&str, String)> = Vec::new();
    match api {
        Api::Chat => {
            let messages = m.get("messages").map(str::trim).unwrap_or("[]");
            let Some(open) = messages.strip_suffix(']') else {
                return Err(NotContinued::Unfaithful("its messages are not a list"));
            };
            let sep = if open.trim_end().ends_with('[') { "" } else { "," };
            set.push(("messages", format!(r#"{open}{sep}{{"role":"assistant","content":{partial}}}]"#)));
            set.push(("continue_final_message", "true".into()));
            set.push(("add_generation_prompt", "false".into()));
            for key in ["max_tokens", "max_completion_tokens"] {
                if let Some(v) = left(m.get(key), None)? {
                    set.push((key, v));
                }
            }
            if let Some(v) = at_least(m.get("min_tokens")) {
                set.push(("min_tokens", v));
            }
        }
        Api::Completion => {
            let Some((mut prompt, listed)) = prompt_text(m.get("prompt")) else {
                return Err(NotContinued::Unfaithful("its prompt is not one string"));
            };
            prompt.push_str(&so_far.text);
            let prompt = Value::from(prompt);
            set.push(("prompt", if listed { Value::Array(vec![prompt]) } else { prompt }.to_string()));
            if let Some(v) = left(m.get("max_tokens"), Some(COMPLETIONS_DEFAULT_MAX_TOKENS))? {
                set.push(("max_tokens", v));
            }
            if let Some(v) = at_least(m.get("min_tokens")) {
                set.push(("min_tokens", v));
            }
        }
        Api::Generate => {
            let raw_text = m.get("text").map(str::trim).filter(|v| v.starts_with('"'));
            if let Some(raw) = raw_text {
                let mut text: String =
                    serde_json::from_str(raw).map_err(|_| NotContinued::Unfaithful("its text is not a string"))?;
                text.push_str(&so_far.text);
                set.push(("text", Value::from(text).to_string()));
            } else {
                let Some(ids) = &so_far.output_ids else {
                    return Err(NotContinued::Unfaithful("the engine sent no output ids to continue input_ids with"));
                };
                let mut input: Vec<Value> = m
                    .get("input_ids")
                    .and_then(|v| serde_json::from_str(v).ok())
                    .ok_or(NotContinued::Unfaithful("its input_ids are not a list"))?;
                input.extend(ids.iter().cloned());
                set.push(("input_ids", Value::Array(input).to_string()));
            }
            let mut params: serde_json::Map<String, Value> = match m.get("sampling_params") {
                Some(raw) if raw.trim() != "null" => serde_json::from_str(raw)
                    .map_err(|_| NotContinued::Unfaithful("its sampling_params are not an object"))?,
                _ => serde_json::Map::new(),
            };
            let max = params.get("max_new_tokens").map(Value::to_string);
            if let Some(v) = left(max.as_deref(), Some(GENERATE_DEFAULT_MAX_NEW_TOKENS))? {
                params.insert("max_new_tokens".into(), Value::from(v.parse::<u64>().unwrap_or_default()));
            }
            let min = params.get("min_new_tokens").map(Value::to_string);
            if let Some(v) = at_least(min.as_deref()) {
                params.insert("min_new_tokens".into(), Value::from(v.parse::<u64>().unwrap_or_default()));
            }
            set.push(("sampling_params", Value::Object(params).to_string()));
        }
    }
    Ok(m.rewrite(&set, &[]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn so_far(api: Api, chunks: &[Value]) -> Transcript {
        let mut t = Transcript::new(api);
        for c in chunks {
            t.observe(c.clone());
        }
        t
    }

    fn parsed(b: Bytes) -> Value {
        serde_json::from_slice(&b).unwrap()
    }

    #[test]
    fn a_chat_continues_from_a_final_assistant_message() {
        let t = so_far(Api::Chat, &[json!({"choices": [{"index": 0, "delta": {"content": "lorem "}}]})]);
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":5,"stop":["x"]}"#;
        assert_eq!(blocker(Api::Chat, body), None);
        assert_eq!(
            parsed(super::body(Api::Chat, body, &t).unwrap()),
            json!({"model": "m", "stop": ["x"], "max_tokens": 4, "continue_final_message": true,
                   "add_generation_prompt": false,
                   "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "lorem "}]})
        );
    }

    #[test]
    fn completions_and_generate_append_the_answer_so_far() {
        let t = so_far(Api::Completion, &[json!({"choices": [{"index": 0, "text": "ab"}]})]);
        let out = parsed(super::body(Api::Completion, br#"{"prompt":["x: "]}"#, &t).unwrap());
        assert_eq!(out, json!({"prompt": ["x: ab"], "max_tokens": 15}));

        let t = so_far(
            Api::Generate,
            &[json!({"text": "ab", "output_ids": [4, 5], "meta_info": {"completion_tokens": 2}})],
        );
        let out = parsed(
            super::body(Api::Generate, br#"{"input_ids":[1,2],"sampling_params":{"max_new_tokens":8}}"#, &t).unwrap(),
        );
        assert_eq!(out, json!({"input_ids": [1, 2, 4, 5], "sampling_params": {"max_new_tokens": 6}}));
        let out = parsed(super::body(Api::Generate, br#"{"text":"q "}"#, &t).unwrap());
        assert_eq!(out, json!({"text": "q ab", "sampling_params": {"max_new_tokens": 126}}));
    }

    #[test]
    fn what_cannot_be_continued_says_why() {
        for (api, body) in [
            (Api::Chat, &br#"{"messages":[],"n":2}"#[..]),
            (Api::Chat, br#"{"messages":[],"logprobs":true}"#),
            (Api::Completion, br#"{"prompt":[1,2,3]}"#),
            (Api::Completion, br#"{"prompt":"x","echo":true}"#),
            (Api::Generate, br#"{"text":["a","b"]}"#),
            (Api::Generate, br#"{"input_ids":[[1],[2]]}"#),
        ] {
            assert!(blocker(api, body).is_some(), "{}", String::from_utf8_lossy(body));
        }
        let done = so_far(Api::Completion, &[json!({"choices": [{"index": 0, "text": "ab"}]})]);
        assert_eq!(
            super::body(Api::Completion, br#"{"prompt":"x","max_tokens":1}"#, &done),
            Err(NotContinued::Complete)
        );
    }
}
