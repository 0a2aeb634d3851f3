//! Router-side tokenization (`--tokenizer-path`): a request's prompt as the token ids its
//! engine will compute, so prefix matching — the tree and the engines' KV events alike — works
//! in the engine's units. Chat requests go through the model's chat template.
//!
//! It runs on the request's own task, outside every shared lock; prompts above
//! [`INLINE_BYTES`] are tokenized on the blocking pool so a 100k-token prompt does not stall
//! the runtime thread serving other connections. A request that cannot be tokenized (no
//! chat template, the template raised) keeps its text view: routing falls back, never fails.

use std::sync::Arc;

use bytes::Bytes;
pub use switchyard_tokenize::{PromptApi, PromptTokenizer, SegmentCacheStats, TokenizeError};

use crate::request::{RequestView, RoutingText, MAX_ROUTING_TOKENS};

/// Bodies up to this size are tokenized inline (a few hundred microseconds at most).
pub const INLINE_BYTES: usize = 16 << 10;

/// The token ids of `body` sent to `route`, as its engine computes them (`None`: the route
/// has no prompt to tokenize, or the request carries token ids already).
pub fn prompt_ids(tokenizer: &PromptTokenizer, route: &str, body: &[u8]) -> Result<Option<Vec<u32>>, TokenizeError> {
    let api = match route {
        "/v1/chat/completions" => PromptApi::Chat,
        "/v1/completions" => PromptApi::Completion,
        "/generate" => PromptApi::Generate,
        _ => return Ok(None),
    };
    tokenizer.encode_request(api, body)
}

/// The tokenizer's piece cache in Prometheus text (`--tokenizer-cache-mb`).
pub fn render_cache_stats(s: &SegmentCacheStats, out: &mut String) {
    use std::fmt::Write;
    let _ = write!(
        out,
        "# HELP switchyard_tokenizer_cache_hits_total Prompt pieces (text between added tokens) whose ids were remembered.\n\
         # TYPE switchyard_tokenizer_cache_hits_total counter\nswitchyard_tokenizer_cache_hits_total {}\n\
         # HELP switchyard_tokenizer_cache_misses_total Prompt pieces tokenized.\n\
         # TYPE switchyard_tokenizer_cache_misses_total counter\nswitchyard_tokenizer_cache_misses_total {}\n\
         # HELP switchyard_tokenizer_cache_bytes Memory the piece cache holds.\n\
         # TYPE switchyard_tokenizer_cache_bytes gauge\nswitchyard_tokenizer_cache_bytes {}\n\
         # HELP switchyard_tokenizer_cache_max_bytes The piece cache's bound (--tokenizer-cache-mb).\n\
         # TYPE switchyard_tokenizer_cache_max_bytes gauge\nswitchyard_tokenizer_cache_max_bytes {}\n",
        s.hits, s.misses, s.bytes, s.budget
    );
}

/// Replaces a text view's routing text with the prompt's token ids.
pub async fn tokenize_view(
    tokenizer: &Arc<PromptTokenizer>,
    route: &'static str,
    body: &Bytes,
    view: &mut RequestView,
) {
    if !matches!(view.text, RoutingText::Text(_)) {
        return;
    }
    let ids = if body.len() <= INLINE_BYTES {
        prompt_ids(tokenizer, route, body)
    } else {
        let (t, b) = (tokenizer.clone(), body.clone());
        match tokio::task::spawn_blocking(move || prompt_ids(&t, route, &b)).await {
            Ok(r) => r,
            Err(e) => Err(TokenizeError::Encode(e.to_string())),
        }
    };
    match ids {
        Ok(Some(mut ids)) => {
            if ids.len() > MAX_ROUTING_TOKENS {
                view.full_len = Some(ids.len());
                ids.truncate(MAX_ROUTING_TOKENS);
            } else {
                view.full_len = None;
            }
            view.text = RoutingText::Tokens(ids);
        }
        Ok(None) => {}
        Err(e) => tracing::debug!(route, error = %e, "request not tokenized; routing on its text"),
    }
}
