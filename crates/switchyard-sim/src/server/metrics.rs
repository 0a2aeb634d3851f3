//! Prometheus text with the engines' own metric names, so tools that scrape SGLang
//! (`sglang:` families) or vLLM (`vllm:` families) read the simulator unchanged.

use std::fmt::Write;

use crate::model::EngineStats;

pub(super) fn render(model: &str, s: &EngineStats) -> String {
    let usage = s.kv_used_tokens.saturating_sub(s.kv_evictable_tokens) as f64 / s.kv_capacity_tokens.max(1) as f64;
    let hit_rate = s.cached_tokens_total as f64 / s.prompt_tokens_total.max(1) as f64;
    let mut out = String::with_capacity(2048);
    let mut family = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{model_name=\"{model}\"}} {value}");
    };
    family("sglang:num_running_reqs", "gauge", "Running requests.", s.running as f64);
    family("sglang:num_queue_reqs", "gauge", "Queued requests.", s.waiting as f64);
    family("sglang:token_usage", "gauge", "KV token usage (0-1).", usage);
    family("sglang:num_used_tokens", "gauge", "KV tokens in use.", s.kv_used_tokens as f64);
    family("sglang:cache_hit_rate", "gauge", "Prefix cache hit rate.", hit_rate);
    family("sglang:prompt_tokens_total", "counter", "Prompt tokens processed.", s.prompt_tokens_total as f64);
    family("sglang:generation_tokens_total", "counter", "Tokens generated.", s.generation_tokens_total as f64);
    family("sglang:num_requests_total", "counter", "Requests finished.", s.requests_finished as f64);
    family("vllm:num_requests_running", "gauge", "Running requests.", s.running as f64);
    family("vllm:num_requests_waiting", "gauge", "Waiting requests.", s.waiting as f64);
    family("vllm:kv_cache_usage_perc", "gauge", "KV cache usage (1 = 100%).", usage);
    family("vllm:prompt_tokens_total", "counter", "Prompt tokens processed.", s.prompt_tokens_total as f64);
    family("vllm:generation_tokens_total", "counter", "Tokens generated.", s.generation_tokens_total as f64);
    family(
        "vllm:prefix_cache_queries_total",
        "counter",
        "Prompt tokens looked up in the prefix cache.",
        s.prompt_tokens_total as f64,
    );
    family(
        "vllm:prefix_cache_hits_total",
        "counter",
        "Prompt tokens found in the prefix cache.",
        s.cached_tokens_total as f64,
    );
    family("vllm:num_preemptions_total", "counter", "Preemptions.", s.preemptions as f64);
    out
}
