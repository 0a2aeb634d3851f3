//! The trace parsers on the shipped public traces (`../shared/data/traces`, or
//! `$SWITCHYARD_TRACES`): counts from the traces' README, CRLF, monotone timestamps, and
//! prompts whose 512-token blocks are identical exactly when their hash ids are.

use switchyard_bench::scenario::default_traces_dir;
use switchyard_bench::workload::{parse_azure, parse_mooncake, parse_sharegpt, PromptSpec, TraceRecord, BLOCK_TOKENS};
use switchyard_sim::model::tokenizer::BYTES_PER_TOKEN;

fn read(name: &str) -> (String, String) {
    let dir = std::env::var("SWITCHYARD_TRACES").unwrap_or_else(|_| default_traces_dir());
    let path = format!("{dir}/{name}");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e} (the traces live in ../shared/data/traces; set SWITCHYARD_TRACES)"));
    (path, text)
}

fn monotone(records: &[TraceRecord]) -> bool {
    records.windows(2).all(|w| w[0].at <= w[1].at)
}

#[test]
fn mooncake_conversation_trace() {
    let (path, text) = read("mooncake_conversation_trace.jsonl");
    let r = parse_mooncake(&path, &text).expect("parses");
    assert_eq!(r.len(), 12_031);
    assert!(monotone(&r) && r[0].at == 0.0);
    assert!((r[r.len() - 1].at - 3536.999).abs() < 1e-6, "last timestamp {}", r[r.len() - 1].at);
    assert!(r.iter().all(|x| x.hash_ids.len() == x.prompt_tokens.div_ceil(BLOCK_TOKENS) as usize));
    let mean_in = r.iter().map(|x| f64::from(x.prompt_tokens)).sum::<f64>() / r.len() as f64;
    assert!((mean_in - 12_035.0).abs() < 1.0, "mean input {mean_in}");
    // Two requests sharing their first two blocks but not the third: their prompts agree on
    // exactly the shared blocks.
    let pair = r.iter().enumerate().find_map(|(i, a)| {
        r[i + 1..]
            .iter()
            .find(|b| {
                a.hash_ids.len() > 2
                    && b.hash_ids.len() > 2
                    && a.hash_ids[..2] == b.hash_ids[..2]
                    && a.hash_ids[2] != b.hash_ids[2]
            })
            .map(|b| (a.clone(), b.clone()))
    });
    let (a, b) = pair.expect("the conversation trace shares prefixes");
    let text = |x: &TraceRecord| PromptSpec::Blocks { ids: x.hash_ids.clone(), tokens: x.prompt_tokens }.text();
    let (ta, tb) = (text(&a), text(&b));
    let block = BLOCK_TOKENS as usize * BYTES_PER_TOKEN;
    assert_eq!(ta[..2 * block], tb[..2 * block]);
    let end = (3 * block).min(ta.len()).min(tb.len());
    assert_ne!(ta[2 * block..end], tb[2 * block..end]);
}

#[test]
fn mooncake_synthetic_trace() {
    let (path, text) = read("mooncake_synthetic_trace.jsonl");
    let r = parse_mooncake(&path, &text).expect("parses");
    assert_eq!(r.len(), 3_993);
    assert!(monotone(&r));
}

#[test]
fn azure_traces_with_crlf_and_no_trailing_newline() {
    for (name, rows, mean_prompt) in
        [("AzureLLMInferenceTrace_code.csv", 8_819, 2048.0), ("AzureLLMInferenceTrace_conv.csv", 19_366, 1155.0)]
    {
        let (path, text) = read(name);
        assert!(text.contains("\r\n") && !text.ends_with('\n'), "{name} is CRLF without a final newline");
        let r = parse_azure(&path, &text).expect("parses");
        assert_eq!(r.len(), rows, "{name}");
        assert!(monotone(&r) && r[0].at == 0.0, "{name}");
        let span = r[r.len() - 1].at;
        assert!((3300.0..3600.0).contains(&span), "{name}: about an hour, got {span} s");
        let mean = r.iter().map(|x| f64::from(x.prompt_tokens)).sum::<f64>() / r.len() as f64;
        assert!((mean - mean_prompt).abs() < 1.0, "{name}: mean context {mean}");
    }
}

#[test]
fn sharegpt_lengths() {
    let (path, text) = read("sharegpt_8k_filtered_stats_llama2_tokenizer.csv");
    let r = parse_sharegpt(&path, &text).expect("parses");
    assert_eq!(r.len(), 30_731);
    assert!(r.iter().all(|x| x.prompt_tokens + x.output_tokens <= 8_149));
    let mean = r.iter().map(|x| f64::from(x.prompt_tokens)).sum::<f64>() / r.len() as f64;
    assert!((mean - 2_340.0).abs() < 1.0, "mean prompt {mean}");
}

#[test]
fn malformed_traces_are_clear_errors() {
    assert!(parse_mooncake("m", "{\"timestamp\": 1}\n").unwrap_err().to_string().contains("line 1"));
    assert!(parse_azure("a", "TIMESTAMP,ContextTokens,GeneratedTokens\r\n2023-11-16 18:15:46.6805900,x,1")
        .unwrap_err()
        .to_string()
        .contains("line 2"));
    assert!(parse_azure("a", "nope\r\n").is_err());
    assert!(parse_sharegpt("s", "num_prefill_tokens,num_decode_tokens\n1\n").is_err());
}
