//! Deterministic, cheap tokenisation: about four bytes of text per token.
//!
//! Real tokenizers are not needed to exercise routing: what matters is that the same text
//! always gives the same tokens, that a shared text prefix gives a shared token prefix
//! (so prefix caching behaves like the real thing), and that token counts scale with length.
//! Chunks never split a UTF-8 code point.

/// Bytes of text per token, on average.
pub const BYTES_PER_TOKEN: usize = 4;

/// Splits `text` into tokens of about [`BYTES_PER_TOKEN`] bytes and hashes each into an id.
pub fn tokenize(text: &str) -> Vec<u32> {
    let mut tokens = Vec::with_capacity(text.len() / BYTES_PER_TOKEN + 1);
    let mut start = 0;
    let bytes = text.as_bytes();
    while start < bytes.len() {
        let mut end = (start + BYTES_PER_TOKEN).min(bytes.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        tokens.push(fnv1a(&bytes[start..end]));
        start = end;
    }
    tokens
}

/// Number of tokens [`tokenize`] would produce, without allocating.
pub fn count_tokens(text: &str) -> usize {
    let mut n = 0;
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + BYTES_PER_TOKEN).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        n += 1;
        start = end;
    }
    n
}

fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Filler words the simulated model "generates"; token `i` of an output is word `i % len`.
const FILLER: [&str; 8] = ["lorem ", "ipsum ", "dolor ", "sit ", "amet ", "sed ", "do ", "tempor "];

/// Text of the `index`-th generated token.
pub fn output_token_text(index: u32) -> &'static str {
    FILLER[index as usize % FILLER.len()]
}

/// Id of the `index`-th generated token (the id of its text).
pub fn output_token_id(index: u32) -> u32 {
    fnv1a(output_token_text(index).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_text_same_tokens_and_shared_prefix() {
        let a = tokenize("You are a helpful assistant. What is 2+2?");
        let b = tokenize("You are a helpful assistant. What is the capital?");
        assert_eq!(a, tokenize("You are a helpful assistant. What is 2+2?"));
        let shared = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        assert!(shared >= 9, "shared prefix of {shared} tokens");
        assert_ne!(a, b);
    }

    #[test]
    fn multibyte_text_never_split_and_counts_agree() {
        for text in ["héllo wörld", "日本語のテキストです", "🚀🚀x", "", "abc"] {
            let t = tokenize(text);
            assert_eq!(t.len(), count_tokens(text));
            assert!(t.len() <= text.len().div_ceil(BYTES_PER_TOKEN).max(text.chars().count()));
        }
        assert_eq!(tokenize("abcdefgh").len(), 2);
    }
}
