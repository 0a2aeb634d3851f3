//! The engines' wire formats: parsing SGLang `/generate` and OpenAI-style requests, and
//! building their responses and SSE chunks.

use serde_json::{json, Value};

use crate::model::tokenizer::{self, output_token_id, output_token_text};

/// Which API a request came through (decides the response shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// SGLang native `POST /generate`.
    Generate,
    /// OpenAI `POST /v1/chat/completions`.
    Chat,
    /// OpenAI `POST /v1/completions`.
    Completion,
}

/// A parsed generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenRequest {
    /// The API it came through.
    pub api: Api,
    /// Prompt tokens.
    pub prompt: Vec<u32>,
    /// Upper bound on output tokens, if given.
    pub max_tokens: Option<u32>,
    /// Produce exactly `max_tokens` (no early stop).
    pub ignore_eos: bool,
    /// Stream SSE chunks.
    pub stream: bool,
    /// Send a usage chunk at the end of an OpenAI stream.
    pub include_usage: bool,
    /// Model name asked for (echoed back).
    pub model: Option<String>,
    /// SGLang PD bootstrap room, when the router set one.
    pub bootstrap_room: Option<u64>,
    /// SGLang PD: host of the prefill worker's bootstrap server.
    pub bootstrap_host: Option<String>,
    /// SGLang PD: its port.
    pub bootstrap_port: Option<u16>,
    /// vLLM PD: the `kv_transfer_params` object.
    pub kv_transfer_params: Option<Value>,
    /// SGLang: return prompt logprobs (`meta_info.input_token_logprobs`).
    pub return_logprob: bool,
    /// SGLang data parallelism: the rank to run on (`data_parallel_rank`).
    pub data_parallel_rank: Option<u32>,
    /// Output tokens already generated (a continuation: the prompt, or the final assistant
    /// message with `continue_final_message`, ends with them): generation carries on from here.
    pub output_offset: u32,
}

/// A 400 with the message the client will see.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct BadRequest(pub String);

fn bad(msg: impl Into<String>) -> BadRequest {
    BadRequest(msg.into())
}

/// SGLang's default `max_new_tokens`.
pub const GENERATE_DEFAULT_MAX_TOKENS: u32 = 128;

fn as_u32(v: &Value, field: &str) -> Result<Option<u32>, BadRequest> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => n
            .as_u64()
            .filter(|n| *n >= 1 && *n <= u64::from(u32::MAX))
            .map(|n| Some(n as u32))
            .ok_or_else(|| bad(format!("{field} must be a positive integer, got {n}"))),
        other => Err(bad(format!("{field} must be an integer, got {other}"))),
    }
}

fn as_bool(v: &Value, field: &str) -> Result<bool, BadRequest> {
    match v {
        Value::Null => Ok(false),
        Value::Bool(b) => Ok(*b),
        other => Err(bad(format!("{field} must be a boolean, got {other}"))),
    }
}

fn token_ids(v: &Value, field: &str) -> Result<Vec<u32>, BadRequest> {
    let arr = v.as_array().ok_or_else(|| bad(format!("{field} must be an array of token ids")))?;
    arr.iter()
        .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
        .collect::<Option<Vec<u32>>>()
        .ok_or_else(|| bad(format!("{field} must contain only non-negative integer token ids")))
}

/// Joins chat messages in order as `role: content` lines (text parts of multi-part content).
pub fn chat_prompt_text(messages: &Value) -> Result<String, BadRequest> {
    let list = messages.as_array().ok_or_else(|| bad("'messages' must be an array"))?;
    if list.is_empty() {
        return Err(bad("'messages' must contain at least one message"));
    }
    let mut text = String::new();
    for (i, m) in list.iter().enumerate() {
        let role =
            m.get("role").and_then(Value::as_str).ok_or_else(|| bad(format!("messages[{i}].role must be a string")))?;
        text.push_str(role);
        text.push_str(": ");
        match m.get("content") {
            Some(Value::String(s)) => text.push_str(s),
            Some(Value::Array(parts)) => {
                for p in parts {
                    if let Some(t) = p.get("text").and_then(Value::as_str) {
                        text.push_str(t);
                    }
                }
            }
            Some(Value::Null) | None => {}
            Some(_) => return Err(bad(format!("messages[{i}].content must be a string or an array of parts"))),
        }
        text.push('\n');
    }
    Ok(text)
}

/// Parses a request body for `api`.
pub fn parse(api: Api, body: &[u8]) -> Result<GenRequest, BadRequest> {
    let v: Value = serde_json::from_slice(body).map_err(|e| bad(format!("invalid JSON body: {e}")))?;
    if !v.is_object() {
        return Err(bad("the request body must be a JSON object"));
    }
    let null = Value::Null;
    let field = |k: &str| v.get(k).unwrap_or(&null);
    let stream = as_bool(field("stream"), "stream")?;
    let model = field("model").as_str().map(str::to_owned);
    let bootstrap_room = field("bootstrap_room").as_u64();
    let bootstrap_host = field("bootstrap_host").as_str().map(str::to_owned);
    let bootstrap_port = field("bootstrap_port").as_u64().and_then(|p| u16::try_from(p).ok());
    let kv_transfer_params = Some(field("kv_transfer_params").clone()).filter(Value::is_object);
    let return_logprob = as_bool(field("return_logprob"), "return_logprob")?;
    let data_parallel_rank = match field("data_parallel_rank") {
        Value::Null => None,
        v => Some(
            v.as_u64()
                .and_then(|r| u32::try_from(r).ok())
                .ok_or_else(|| bad(format!("data_parallel_rank must be a non-negative integer, got {v}")))?,
        ),
    };
    let prompt;
    let (max_tokens, ignore_eos, include_usage);
    let mut output_offset = 0;
    match api {
        Api::Generate => {
            prompt = match (field("text"), field("input_ids")) {
                (Value::String(s), _) => {
                    let (k, cut) = tokenizer::continued_tokens(s);
                    output_offset = k;
                    tokenizer::tokenize_continuation(s, k, cut)
                }
                (Value::Null, ids @ Value::Array(_)) => {
                    let ids = token_ids(ids, "input_ids")?;
                    output_offset = tokenizer::continued_token_ids(&ids);
                    ids
                }
                (Value::Array(_), _) => {
                    return Err(bad("batched 'text' is not supported by this simulator; send one prompt per request"))
                }
                (Value::Null, Value::Null) => return Err(bad("either 'text' or 'input_ids' must be provided")),
                _ => return Err(bad("'text' must be a string")),
            };
            let sp = field("sampling_params");
            if !(sp.is_null() || sp.is_object()) {
                return Err(bad("'sampling_params' must be an object"));
            }
            let spf = |k: &str| sp.get(k).unwrap_or(&null);
            max_tokens = Some(as_u32(spf("max_new_tokens"), "max_new_tokens")?.unwrap_or(GENERATE_DEFAULT_MAX_TOKENS));
            ignore_eos = as_bool(spf("ignore_eos"), "ignore_eos")?;
            include_usage = false;
        }
        Api::Chat | Api::Completion => {
            prompt = if api == Api::Chat {
                let text = chat_prompt_text(field("messages"))?;
                let continue_final = as_bool(field("continue_final_message"), "continue_final_message")?;
                if continue_final && as_bool(field("add_generation_prompt"), "add_generation_prompt")? {
                    return Err(bad("Cannot set both `add_generation_prompt` and `continue_final_message` to True."));
                }
                let messages = field("messages").as_array();
                let last = messages.and_then(|m| m.last());
                let partial = last
                    .filter(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
                    .and_then(|m| m.get("content"))
                    .and_then(Value::as_str)
                    .filter(|_| continue_final);
                match (partial, messages) {
                    // The partial answer is the generated tokens again, after the conversation
                    // before it (the template adds nothing where the answer continues).
                    (Some(partial), Some(messages)) => {
                        let (k, cut) = tokenizer::continued_tokens(partial);
                        output_offset = k;
                        let before = messages.get(..messages.len() - 1).map(|m| Value::Array(m.to_vec()));
                        let mut text = before.and_then(|b| chat_prompt_text(&b).ok()).unwrap_or_default();
                        text.push_str(&partial[..cut]);
                        tokenizer::tokenize_continuation(&text, k, text.len())
                    }
                    _ => tokenizer::tokenize(&text),
                }
            } else {
                match field("prompt") {
                    Value::String(s) => {
                        let (k, cut) = tokenizer::continued_tokens(s);
                        output_offset = k;
                        tokenizer::tokenize_continuation(s, k, cut)
                    }
                    Value::Array(a) if a.len() == 1 && a[0].is_string() => {
                        let s = a[0].as_str().unwrap_or_default();
                        let (k, cut) = tokenizer::continued_tokens(s);
                        output_offset = k;
                        tokenizer::tokenize_continuation(s, k, cut)
                    }
                    ids @ Value::Array(a) if a.iter().all(Value::is_number) => token_ids(ids, "prompt")?,
                    Value::Null => return Err(bad("'prompt' is required")),
                    _ => return Err(bad("'prompt' must be a string, a list of one string, or a list of token ids")),
                }
            };
            let mt = match field("max_completion_tokens") {
                Value::Null => as_u32(field("max_tokens"), "max_tokens")?,
                v => as_u32(v, "max_completion_tokens")?,
            };
            max_tokens = mt;
            ignore_eos = as_bool(field("ignore_eos"), "ignore_eos")?;
            let so = field("stream_options");
            include_usage = as_bool(so.get("include_usage").unwrap_or(&null), "stream_options.include_usage")?;
            let n = as_u32(field("n"), "n")?.unwrap_or(1);
            if n != 1 {
                return Err(bad("only n=1 is supported"));
            }
        }
    }
    if prompt.is_empty() {
        return Err(bad("the prompt is empty"));
    }
    Ok(GenRequest {
        api,
        prompt,
        max_tokens,
        ignore_eos,
        stream,
        include_usage,
        model,
        bootstrap_room,
        bootstrap_host,
        bootstrap_port,
        kv_transfer_params,
        return_logprob,
        data_parallel_rank,
        output_offset,
    })
}

/// Everything known about a finished (or finishing) request, for building responses.
#[derive(Debug, Clone)]
pub struct Summary<'a> {
    /// Response id (`chatcmpl-…`, `cmpl-…` or the SGLang rid).
    pub id: &'a str,
    /// Model name to echo.
    pub model: &'a str,
    /// Unix seconds of creation.
    pub created: u64,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Prompt tokens from the prefix cache.
    pub cached_tokens: u32,
    /// Tokens generated so far.
    pub completion_tokens: u32,
    /// Whether generation stopped before the limit ("stop") or at it ("length").
    pub stopped_early: bool,
    /// End-to-end latency so far in (unscaled) seconds.
    pub e2e_latency: f64,
    /// Index of this request's first output token in the whole answer (a continuation's).
    pub output_offset: u32,
}

impl Summary<'_> {
    fn finish_reason(&self) -> &'static str {
        if self.stopped_early {
            "stop"
        } else {
            "length"
        }
    }

    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        })
    }

    fn meta_info(&self, finished: bool) -> Value {
        let finish = if !finished {
            Value::Null
        } else if self.stopped_early {
            json!({"type": "stop", "matched": null})
        } else {
            json!({"type": "length", "length": self.completion_tokens})
        };
        json!({
            "id": self.id,
            "finish_reason": finish,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "e2e_latency": self.e2e_latency,
        })
    }

    /// The complete non-streaming response for `api`.
    pub fn response(&self, api: Api) -> Value {
        let text = self.text(self.completion_tokens);
        match api {
            Api::Generate => json!({"text": text, "output_ids": self.output_ids(self.completion_tokens),
                                    "meta_info": self.meta_info(true)}),
            Api::Chat => json!({
                "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": null, "finish_reason": self.finish_reason()}],
                "usage": self.usage(),
            }),
            Api::Completion => json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": self.finish_reason()}],
                "usage": self.usage(),
            }),
        }
    }

    /// The SSE chunk(s) announcing token `index` (`last` = final token), as `data: …\n\n` frames.
    pub fn token_chunk(&self, api: Api, index: u32, last: bool) -> String {
        let word = output_token_text(self.output_offset + index);
        let finish = if last { Value::from(self.finish_reason()) } else { Value::Null };
        let mut out = String::new();
        match api {
            Api::Generate => {
                // SGLang streams the whole text (and ids) so far in every chunk.
                push_sse(
                    &mut out,
                    &json!({"text": self.text(index + 1), "output_ids": self.output_ids(index + 1),
                            "meta_info": self.meta_info(last)}),
                )
            }
            Api::Chat => {
                if index == 0 {
                    push_sse(&mut out, &self.chat_chunk(json!({"role": "assistant", "content": ""}), Value::Null));
                }
                push_sse(&mut out, &self.chat_chunk(json!({"content": word}), finish));
            }
            Api::Completion => push_sse(
                &mut out,
                &json!({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                        "choices": [{"index": 0, "text": word, "logprobs": null, "finish_reason": finish}]}),
            ),
        }
        out
    }

    /// This request's first `n` output tokens' text.
    pub fn text(&self, n: u32) -> String {
        (self.output_offset..self.output_offset + n).map(output_token_text).collect()
    }

    fn output_ids(&self, n: u32) -> Vec<u32> {
        (self.output_offset..self.output_offset + n).map(output_token_id).collect()
    }

    fn chat_chunk(&self, delta: Value, finish: Value) -> Value {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
               "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
    }

    /// The final usage chunk of an OpenAI stream (`stream_options.include_usage`).
    pub fn usage_chunk(&self, api: Api) -> String {
        let object = if api == Api::Chat { "chat.completion.chunk" } else { "text_completion" };
        let mut out = String::new();
        push_sse(
            &mut out,
            &json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
                    "choices": [], "usage": self.usage()}),
        );
        out
    }
}

/// Appends one SSE `data:` frame.
pub fn push_sse(out: &mut String, v: &Value) {
    out.push_str("data: ");
    out.push_str(&v.to_string());
    out.push_str("\n\n");
}

/// The end-of-stream marker both engines send.
pub const SSE_DONE: &str = "data: [DONE]\n\n";

/// Text of the first `n` generated tokens.
pub fn output_text(n: u32) -> String {
    (0..n).map(output_token_text).collect()
}

/// The engines' JSON error body.
pub fn error_body(status: u16, message: &str) -> Value {
    let kind = match status {
        400 => "BadRequestError",
        404 => "NotFoundError",
        503 => "ServiceUnavailableError",
        _ => "InternalServerError",
    };
    json!({"object": "error", "message": message, "type": kind, "param": null, "code": status})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_api() {
        let g = parse(
            Api::Generate,
            br#"{"text":"hello world","sampling_params":{"max_new_tokens":5,"ignore_eos":true},"stream":true}"#,
        )
        .unwrap();
        assert_eq!((g.max_tokens, g.ignore_eos, g.stream), (Some(5), true, true));
        let g = parse(Api::Generate, br#"{"input_ids":[1,2,3]}"#).unwrap();
        assert_eq!(g.prompt, vec![1, 2, 3]);
        assert_eq!(g.max_tokens, Some(GENERATE_DEFAULT_MAX_TOKENS));
        let c = parse(Api::Chat, br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":7,"stream_options":{"include_usage":true}}"#).unwrap();
        assert_eq!((c.max_tokens, c.include_usage, c.model.as_deref()), (Some(7), true, Some("m")));
        let p = parse(Api::Completion, br#"{"prompt":[5,6],"max_completion_tokens":3}"#).unwrap();
        assert_eq!((p.prompt.len(), p.max_tokens), (2, Some(3)));
    }

    #[test]
    fn rejects_bad_input_with_reasons() {
        for (api, body, needle) in [
            (Api::Chat, &br"{not json"[..], "invalid JSON"),
            (Api::Chat, br"[1]", "JSON object"),
            (Api::Chat, br#"{"messages":[]}"#, "at least one"),
            (Api::Chat, br#"{"messages":[{"content":"x"}]}"#, "role"),
            (Api::Chat, br#"{"messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#, "max_tokens"),
            (Api::Completion, br#"{"model":"m"}"#, "prompt"),
            (Api::Generate, br#"{"sampling_params":{}}"#, "text"),
            (Api::Generate, br#"{"input_ids":[1,-2]}"#, "input_ids"),
            (Api::Generate, br#"{"text":"x","stream":"yes"}"#, "stream"),
        ] {
            let err = parse(api, body).unwrap_err();
            assert!(err.0.contains(needle), "{err} should mention {needle}");
        }
    }
}
