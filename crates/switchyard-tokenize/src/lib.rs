//! switchyard-tokenize: a model's prompt as its engine sees it.
//!
//! Engines tokenize a chat request by rendering the model's chat template (Jinja, from
//! `tokenizer_config.json` or `chat_template.jinja`) and encoding the text without adding
//! special tokens (the template writes them); a raw prompt is encoded with them. This crate
//! does the same with the HF tokenizers library and minijinja set up the way transformers
//! sets up Jinja (`trim_blocks`, `lstrip_blocks`, `raise_exception`, `strftime_now`, Python's
//! string methods, a `tojson` that writes what Python's `json.dumps` writes), so the router
//! and the simulator compute the token ids a real engine will see.

use std::path::{Path, PathBuf};

pub mod fixture;
mod segments;

pub use segments::SegmentCacheStats;

use serde::Serialize;

/// Why a tokenizer could not be loaded or a prompt not tokenized.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    /// A file is missing or unreadable.
    #[error("tokenizer: cannot load {path}: {reason}")]
    Load {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The chat template failed to compile or render (including its own `raise_exception`).
    #[error("chat template: {0}")]
    Template(String),
    /// A chat request, but the model has no chat template.
    #[error("the tokenizer has no chat template (tokenizer_config.json chat_template, or chat_template.jinja)")]
    NoChatTemplate,
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Encode(String),
    /// The request body is not what its API expects.
    #[error("request: {0}")]
    Request(String),
}

/// The fields of an OpenAI chat request the prompt depends on.
#[derive(serde::Deserialize)]
struct ChatBody {
    messages: Vec<serde_json::Value>,
    add_generation_prompt: Option<bool>,
    #[serde(default)]
    continue_final_message: bool,
}

/// A message whose `content` is a list of parts becomes one with the parts' text joined, as
/// vLLM and SGLang give text-only templates (which expect a string there).
fn flatten_content(mut message: serde_json::Value) -> serde_json::Value {
    if let Some(serde_json::Value::Array(parts)) = message.get("content") {
        let text: String =
            parts.iter().filter_map(|p| p.get("text").and_then(|t| t.as_str())).collect::<Vec<_>>().join("\n");
        message["content"] = serde_json::Value::String(text);
    }
    message
}

/// The request APIs whose prompt an engine tokenizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptApi {
    /// OpenAI chat: `messages` through the chat template.
    Chat,
    /// OpenAI completions: the `prompt` string, with special tokens.
    Completion,
    /// SGLang `/generate`: the `text` string, with special tokens.
    Generate,
}

/// The piece cache's default bound (`with_segment_cache`): 16 M token ids.
pub const DEFAULT_SEGMENT_CACHE_BYTES: usize = 64 << 20;

/// A model's tokenizer and chat template.
pub struct PromptTokenizer {
    tokenizer: tokenizers::Tokenizer,
    /// Prompts split at added tokens, pieces remembered (`None`: encoded whole).
    segmenter: Option<segments::Segmenter>,
    env: minijinja::Environment<'static>,
    has_template: bool,
    bos_token: String,
    eos_token: String,
    source: PathBuf,
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptTokenizer")
            .field("source", &self.source)
            .field("has_template", &self.has_template)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<String, TokenizeError> {
    std::fs::read_to_string(path)
        .map_err(|e| TokenizeError::Load { path: path.display().to_string(), reason: e.to_string() })
}

/// A special token in `tokenizer_config.json`: a string or an AddedToken object.
fn token_text(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).unwrap_or_default().to_owned(),
        _ => String::new(),
    }
}

impl PromptTokenizer {
    /// Loads `path`: a model directory (`tokenizer.json`, optionally `tokenizer_config.json`
    /// and `chat_template.jinja`) or a `tokenizer.json` file (no chat template then).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, TokenizeError> {
        let path = path.as_ref();
        let (file, dir) =
            if path.is_dir() { (path.join("tokenizer.json"), Some(path)) } else { (path.to_path_buf(), None) };
        let tokenizer = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| TokenizeError::Load { path: file.display().to_string(), reason: e.to_string() })?;
        let mut template = None;
        let (mut bos_token, mut eos_token) = (String::new(), String::new());
        if let Some(dir) = dir {
            let config_path = dir.join("tokenizer_config.json");
            if config_path.exists() {
                let config: serde_json::Value = serde_json::from_str(&read(&config_path)?).map_err(|e| {
                    TokenizeError::Load { path: config_path.display().to_string(), reason: e.to_string() }
                })?;
                bos_token = token_text(config.get("bos_token"));
                eos_token = token_text(config.get("eos_token"));
                template = match config.get("chat_template") {
                    Some(serde_json::Value::String(t)) => Some(t.clone()),
                    // Several named templates: the default one (tool-use templates are chosen
                    // by requests with tools, which routing does not need to reproduce).
                    Some(serde_json::Value::Array(named)) => named
                        .iter()
                        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                        .or_else(|| named.first())
                        .and_then(|t| t.get("template"))
                        .and_then(|t| t.as_str())
                        .map(str::to_owned),
                    _ => None,
                };
            }
            let jinja = dir.join("chat_template.jinja");
            if jinja.exists() {
                template = Some(read(&jinja)?);
            }
        }
        let mut env = environment();
        let has_template = template.is_some();
        if let Some(t) = template {
            env.add_template_owned("chat", t).map_err(|e| TokenizeError::Template(e.to_string()))?;
        }
        let segmenter = segments::Segmenter::for_tokenizer(&tokenizer, DEFAULT_SEGMENT_CACHE_BYTES);
        Ok(Self { tokenizer, segmenter, env, has_template, bos_token, eos_token, source: path.to_path_buf() })
    }

    /// Remember at most `bytes` of prompt pieces' ids (0: encode every prompt whole).
    pub fn with_segment_cache(mut self, bytes: usize) -> Self {
        self.segmenter = segments::Segmenter::for_tokenizer(&self.tokenizer, bytes);
        self
    }

    /// The piece cache's counters; `None` when prompts are encoded whole (no cache, or a
    /// tokenizer whose pieces do not compose).
    pub fn segment_cache_stats(&self) -> Option<SegmentCacheStats> {
        self.segmenter.as_ref().map(segments::Segmenter::stats)
    }

    /// Whether chat requests can be tokenized.
    pub fn has_chat_template(&self) -> bool {
        self.has_template
    }

    /// Token ids of `text`; `add_special_tokens` as the engines do for raw prompts (true) and
    /// rendered chat templates (false).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizeError> {
        if let Some(ids) = self.segmenter.as_ref().and_then(|s| s.encode(&self.tokenizer, text, add_special_tokens)) {
            return ids;
        }
        self.encode_whole(text, add_special_tokens)
    }

    /// [`encode`](Self::encode) without the piece cache.
    pub fn encode_whole(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizeError> {
        // Without offsets and word ids (routing needs only the ids): a little faster.
        self.tokenizer
            .encode_fast(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizeError::Encode(e.to_string()))
    }

    /// The chat template rendered for `messages` (any serialisable list of OpenAI messages).
    pub fn render_chat<M: Serialize>(
        &self,
        messages: &M,
        add_generation_prompt: bool,
    ) -> Result<String, TokenizeError> {
        if !self.has_template {
            return Err(TokenizeError::NoChatTemplate);
        }
        let template = self.env.get_template("chat").map_err(|e| TokenizeError::Template(e.to_string()))?;
        template
            .render(minijinja::context! {
                messages => minijinja::Value::from(minijinja::value::Serde(messages)),
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| TokenizeError::Template(e.to_string()))
    }

    /// Token ids of a request body to `api` as the engine computes them (`None`: the body
    /// carries token ids already, or a batch).
    pub fn encode_request(&self, api: PromptApi, body: &[u8]) -> Result<Option<Vec<u32>>, TokenizeError> {
        match api {
            PromptApi::Chat => self.encode_chat_body(body).map(Some),
            PromptApi::Completion => self.encode_prompt_field(body, "prompt"),
            PromptApi::Generate => self.encode_prompt_field(body, "text"),
        }
    }

    /// Token ids of an OpenAI chat request body as the engine computes them: content parts
    /// joined, the generation prompt added unless the request continues its final message.
    pub fn encode_chat_body(&self, body: &[u8]) -> Result<Vec<u32>, TokenizeError> {
        let chat: ChatBody = serde_json::from_slice(body).map_err(|e| TokenizeError::Request(e.to_string()))?;
        let messages: Vec<serde_json::Value> = chat.messages.into_iter().map(flatten_content).collect();
        let add_generation_prompt = !chat.continue_final_message && chat.add_generation_prompt.unwrap_or(true);
        self.encode_chat(&messages, add_generation_prompt)
    }

    /// Token ids of a raw prompt in `field` of a request body (`prompt` for completions,
    /// `text` for SGLang's `/generate`), with special tokens; `None` when the field is not a
    /// string (token ids given already, or a batch).
    pub fn encode_prompt_field(&self, body: &[u8], field: &str) -> Result<Option<Vec<u32>>, TokenizeError> {
        #[derive(serde::Deserialize)]
        struct Prompt<'a> {
            #[serde(borrow, default)]
            prompt: Option<&'a serde_json::value::RawValue>,
            #[serde(borrow, default)]
            text: Option<&'a serde_json::value::RawValue>,
        }
        let p: Prompt = serde_json::from_slice(body).map_err(|e| TokenizeError::Request(e.to_string()))?;
        let raw = if field == "text" { p.text } else { p.prompt };
        let Some(raw) = raw else { return Ok(None) };
        match serde_json::from_str::<std::borrow::Cow<'_, str>>(raw.get()) {
            Ok(text) => self.encode(&text, true).map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Token ids of a chat request: the rendered template, encoded without special tokens.
    pub fn encode_chat<M: Serialize>(
        &self,
        messages: &M,
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, TokenizeError> {
        self.encode(&self.render_chat(messages, add_generation_prompt)?, false)
    }
}

/// Jinja as transformers configures it for chat templates.
fn environment() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build() {
        env.set_syntax(syntax);
    }
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |format: String| strftime_now(&format));
    env.add_filter("tojson", tojson);
    env
}

/// Python's `json.dumps(value, ensure_ascii=False)` (", " and ": " separators), or with
/// `indent` as `json.dumps(..., indent=n)`.
fn tojson(value: minijinja::Value, indent: Option<usize>) -> Result<minijinja::Value, minijinja::Error> {
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_json(&mut out, &json, indent, 0);
    Ok(minijinja::Value::from_safe_string(out))
}

fn write_json(out: &mut String, v: &serde_json::Value, indent: Option<usize>, depth: usize) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        serde_json::Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(out, item, indent, depth + 1);
            }
            newline(out, depth);
            out.push(']');
        }
        serde_json::Value::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_json(out, item, indent, depth + 1);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// `strftime_now(format)` for the directives chat templates use (Llama 3.1: `"%d %b %Y"`).
fn strftime_now(format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_dir(template: Option<&str>) -> tempdir::Dir {
        let dir = tempdir::Dir::new();
        crate::fixture::write_model_dir(dir.path(), template).unwrap();
        dir
    }

    mod tempdir {
        pub struct Dir(std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p = std::env::temp_dir().join(format!("switchyard-tokenize-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }
            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn word_level_fixture_gives_one_token_per_known_word() {
        let dir = tempdir::Dir::new();
        let file = dir.path().join("tokenizer.json");
        crate::fixture::write_word_level(&file, ["abc", "xyz", "abc"].map(String::from)).unwrap();
        let t = PromptTokenizer::load(&file).unwrap();
        assert_eq!(t.encode("abc xyz abc ", true).unwrap(), vec![1, 2, 1]);
        assert_eq!(t.encode("xyz  lorem", false).unwrap(), vec![2, 0]);
    }

    #[test]
    fn prompts_split_at_added_tokens_encode_as_whole_ones_and_pieces_are_remembered() {
        let dir = tiny_dir(Some(LLAMA3));
        let t = PromptTokenizer::load(dir.path()).unwrap();
        assert_eq!(t.segment_cache_stats().map(|s| s.hits), Some(0));
        let turn = "a long enough turn of conversation, with ünïcödé and  spaces\n\nand lines ".repeat(2);
        let mut text = String::from("<s>");
        for i in 0..6 {
            text.push_str(&format!("{turn}{i}<s>"));
            for special in [false, true] {
                assert_eq!(t.encode(&text, special).unwrap(), t.encode_whole(&text, special).unwrap(), "{text:?}");
            }
        }
        let stats = t.segment_cache_stats().unwrap();
        // Every turn's piece after the first time is a hit; whole-text encodes never touch the cache.
        assert!(stats.hits >= 15, "{stats:?}");
        assert!(stats.bytes > 0 && stats.bytes <= stats.budget, "{stats:?}");
        assert!(t.encode("<s><s>", false).unwrap() == vec![0, 0]);
    }

    #[test]
    fn the_piece_cache_stays_within_its_bound() {
        let dir = tiny_dir(None);
        let t = PromptTokenizer::load(dir.path()).unwrap().with_segment_cache(64 << 10);
        for i in 0..2_000 {
            let text = format!("<s>{}<s>", format!("piece number {i} ").repeat(8));
            assert_eq!(t.encode(&text, false).unwrap(), t.encode_whole(&text, false).unwrap());
        }
        let stats = t.segment_cache_stats().unwrap();
        assert!(stats.misses >= 2_000 && stats.bytes <= 64 << 10, "{stats:?}");
        assert!(PromptTokenizer::load(dir.path()).unwrap().with_segment_cache(0).segment_cache_stats().is_none());
    }

    #[test]
    fn a_tokenizer_whose_pieces_do_not_compose_is_encoded_whole() {
        // Metaspace prepending "▁" to the text's first piece only: "hello" after an added token
        // is not "▁hello" as it would be alone.
        let dir = tempdir::Dir::new();
        let file = dir.path().join("tokenizer.json");
        let vocab = serde_json::json!({"[UNK]": 0, "<s>": 1, "▁hello": 2, "hello": 3, "▁world": 4, "world": 5});
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": true},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
        });
        std::fs::write(&file, json.to_string()).unwrap();
        let t = PromptTokenizer::load(&file).unwrap();
        let whole = t.encode_whole("hello<s>hello world", false).unwrap();
        assert_eq!(whole, vec![2, 1, 3, 4], "the tokenizer treats its first piece differently");
        assert!(t.segment_cache_stats().is_none());
        assert_eq!(t.encode("hello<s>hello world", false).unwrap(), whole);
    }

    const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    #[test]
    fn chat_templates_render_as_transformers_does() {
        let dir = tiny_dir(Some(LLAMA3));
        let t = PromptTokenizer::load(dir.path()).unwrap();
        let messages =
            serde_json::json!([{"role": "system", "content": " be brief "}, {"role": "user", "content": "hi"}]);
        let text = t.render_chat(&messages, true).unwrap();
        assert_eq!(
            text,
            "<s><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let ids = t.encode_chat(&messages, true).unwrap();
        assert_eq!(ids[0], 0, "the template's <s> is the special token: {ids:?}");
        assert!(ids.contains(&257), "the 'hi' merge applies");
    }

    #[test]
    fn python_isms_exceptions_and_tojson() {
        let template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0]['content'].strip().upper() }}|{{ messages | tojson }}";
        let dir = tiny_dir(Some(template));
        let t = PromptTokenizer::load(dir.path()).unwrap();
        let ok = t.render_chat(&serde_json::json!([{"role": "user", "content": "  hi <b> "}]), false).unwrap();
        assert_eq!(ok, r#"HI <B>|[{"content": "  hi <b> ", "role": "user"}]"#);
        let err = t.render_chat(&serde_json::json!([{"role": "system", "content": "x"}]), false).unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
    }

    #[test]
    fn a_bare_tokenizer_file_has_no_chat_template() {
        let dir = tiny_dir(None);
        let t = PromptTokenizer::load(dir.path().join("tokenizer.json")).unwrap();
        assert!(!t.has_chat_template());
        assert!(matches!(t.encode_chat(&serde_json::json!([]), true), Err(TokenizeError::NoChatTemplate)));
        assert_eq!(t.encode("hi", true).unwrap(), vec![257]);
        assert!(matches!(PromptTokenizer::load(dir.path().join("missing.json")), Err(TokenizeError::Load { .. })));
    }

    #[test]
    fn strftime_directives() {
        let s = strftime_now("%d %b %Y|%%");
        let parts: Vec<&str> = s.split(['|', ' ']).collect();
        assert_eq!(parts[0].len(), 2);
        assert_eq!(parts[1].len(), 3);
        assert!(parts[2].parse::<i32>().unwrap() >= 2024);
        assert_eq!(parts[3], "%");
    }
}
