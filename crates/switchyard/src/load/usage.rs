//! Token counts read from a worker's answer without parsing it: the `usage` object of the
//! OpenAI API (`prompt_tokens`, `completion_tokens`, `prompt_tokens_details.cached_tokens`)
//! and SGLang's `meta_info` use the same key names, so one scan serves both, for whole
//! bodies and for stream chunks alike.

/// Token counts of one request, as far as they are known.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: Option<u32>,
    /// Prompt tokens served from the worker's prefix cache.
    pub cached_tokens: Option<u32>,
    /// Generated tokens.
    pub completion_tokens: Option<u32>,
}

impl Usage {
    /// Updates the counts from `data` (a body or an SSE chunk); later values win, so the
    /// final chunk of a stream (usage, or SGLang's cumulative `meta_info`) is what remains.
    pub fn scan(&mut self, data: &[u8]) {
        if !contains(data, b"_tokens\"") {
            return;
        }
        if let Some(v) = last_number_after(data, b"\"prompt_tokens\"") {
            self.prompt_tokens = Some(v);
        }
        if let Some(v) = last_number_after(data, b"\"completion_tokens\"") {
            self.completion_tokens = Some(v);
        }
        if let Some(v) = last_number_after(data, b"\"cached_tokens\"") {
            self.cached_tokens = Some(v);
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The unsigned integer after the last `key` (then optional spaces, `:`, spaces) in `data`.
fn last_number_after(data: &[u8], key: &[u8]) -> Option<u32> {
    let pos = data.windows(key.len()).rposition(|w| w == key)?;
    let mut rest = data[pos + key.len()..].iter().skip_while(|b| b.is_ascii_whitespace());
    if rest.next() != Some(&b':') {
        return None;
    }
    let digits: Vec<u8> =
        rest.skip_while(|b| b.is_ascii_whitespace()).take_while(|b| b.is_ascii_digit()).copied().collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_openai_usage_and_sglang_meta_info() {
        let mut u = Usage::default();
        u.scan(br#"{"usage":{"prompt_tokens":12,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":8}}}"#);
        assert_eq!(u, Usage { prompt_tokens: Some(12), cached_tokens: Some(8), completion_tokens: Some(5) });
        let mut u = Usage::default();
        u.scan(b"data: {\"text\":\"a\",\"meta_info\":{\"prompt_tokens\": 7,\"completion_tokens\":1,\"cached_tokens\":0}}\n\n");
        u.scan(b"data: {\"text\":\"ab\",\"meta_info\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"cached_tokens\":0}}\n\n");
        assert_eq!(u, Usage { prompt_tokens: Some(7), cached_tokens: Some(0), completion_tokens: Some(2) });
    }

    #[test]
    fn ignores_garbage() {
        let mut u = Usage::default();
        u.scan(br#"{"prompt_tokens":"x","completion_tokens":-1}"#);
        u.scan(b"\"cached_tokens\"");
        u.scan(br#"{"completion_tokens":99999999999}"#);
        assert_eq!(u, Usage::default());
    }
}
