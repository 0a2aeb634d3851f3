//! Small tokenizers written to disk, for tests, demos and benchmarks that need one without a
//! model hub: [`write_model_dir`] (byte-level BPE, GPT-2's byte map, every byte a token, `<s>` a
//! special token, one merge `hi`) and [`write_word_level`] (one token per word of a given
//! vocabulary: what a benchmark needs for the router and the workers to tokenize alike while
//! keeping its own token counts).

use std::path::Path;

/// GPT-2's byte-to-unicode map.
fn byte_char(b: u8) -> String {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    if printable(b) {
        return char::from(b).to_string();
    }
    let n = (0..=b).filter(|x| !printable(*x)).count() as u32 - 1;
    char::from_u32(256 + n).map(|c| c.to_string()).unwrap_or_default()
}

/// Writes `tokenizer.json` (ids: `<s>` 0, byte `b` is `b + 1`, `hi` 257) and, with a chat
/// template, `tokenizer_config.json` (bos `<s>`, eos `</s>`) into `dir`.
pub fn write_model_dir(dir: &Path, chat_template: Option<&str>) -> std::io::Result<()> {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..=255u8)
        .map(|b| (byte_char(b), u32::from(b) + 1))
        .chain([("hi".to_owned(), 257), ("<s>".to_owned(), 0)])
        .map(|(k, v)| (k, serde_json::Value::from(v)))
        .collect();
    let byte_level =
        serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab, "merges": ["h i"]}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string())?;
    if let Some(t) = chat_template {
        let config = serde_json::json!({"bos_token": {"content": "<s>"}, "eos_token": "</s>", "chat_template": t});
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string())?;
    }
    Ok(())
}

/// Writes a `tokenizer.json` to `path` that splits text at whitespace and gives each word of
/// `words` its own id (from 1, in order); any other word is `[UNK]` (0).
pub fn write_word_level(path: &Path, words: impl IntoIterator<Item = String>) -> std::io::Result<()> {
    let mut vocab = serde_json::Map::new();
    vocab.insert("[UNK]".to_owned(), 0.into());
    for w in words {
        let id = vocab.len();
        vocab.entry(w).or_insert(id.into());
    }
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": 0, "content": "[UNK]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(path, tokenizer.to_string())
}
