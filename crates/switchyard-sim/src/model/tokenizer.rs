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

/// How many generated tokens `text` ends with: the `k` such that its tail is the text of
/// output tokens `0..k`. A continuation request (a partial answer at the end of the prompt, or
/// of a final assistant message) carries on from token `k` rather than starting over, as an
/// engine continues the text it is given.
/// Returns `k` and the length of the text before those tokens.
pub fn continued_tokens(text: &str) -> (u32, usize) {
    let mut words = Vec::new();
    let mut end = text.len();
    while let Some(i) = FILLER.iter().position(|w| text[..end].ends_with(w)) {
        words.push(i);
        end -= FILLER[i].len();
    }
    let k = longest_output_run(&words);
    let partial: usize = (0..k).map(|i| output_token_text(i).len()).sum();
    (k, text.len() - partial)
}

/// The prompt tokens of a text ending with `k` output tokens (before at `cut`): the text
/// before them tokenised, then the output tokens themselves, as the engine that generated
/// them would see them again.
pub fn tokenize_continuation(text: &str, k: u32, cut: usize) -> Vec<u32> {
    let mut tokens = tokenize(&text[..cut]);
    tokens.extend((0..k).map(output_token_id));
    tokens
}

/// [`continued_tokens`] for token ids (`input_ids` ending with output token ids).
pub fn continued_token_ids(ids: &[u32]) -> u32 {
    let mut words = Vec::new();
    for id in ids.iter().rev() {
        match (0..FILLER.len() as u32).find(|i| output_token_id(*i) == *id) {
            Some(i) => words.push(i as usize),
            None => break,
        }
    }
    longest_output_run(&words)
}

/// The largest `k` such that the last `k` of `reversed` (filler indices, last first) are
/// output tokens `0..k` in order.
fn longest_output_run(reversed: &[usize]) -> u32 {
    (1..=reversed.len())
        .rev()
        .find(|&k| (0..k).all(|j| reversed[j] == (k - 1 - j) % FILLER.len()))
        .map_or(0, |k| k as u32)
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
    fn a_partial_answer_at_the_end_is_found() {
        let partial: String = (0..11).map(output_token_text).collect();
        let text = format!("user: hi\nassistant: {partial}");
        assert_eq!(continued_tokens(&text), (11, text.len() - partial.len()));
        assert_eq!(continued_tokens("no answer here"), (0, 14));
        // A tail of filler words not starting at token 0 is not a partial answer.
        assert_eq!(continued_tokens("x ipsum dolor ").0, 0);
        let (k, cut) = continued_tokens(&text);
        assert_eq!(tokenize_continuation(&text, k, cut).len(), tokenize("user: hi\nassistant: ").len() + 11);
        let ids: Vec<u32> = [7, 9].into_iter().chain((0..5).map(output_token_id)).collect();
        assert_eq!(continued_token_ids(&ids), 5);
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
