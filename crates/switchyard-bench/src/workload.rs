//! What is sent: request shapes (synthetic or from public traces) and when (arrival processes).
//!
//! Prompts are synthetic text with exactly [`BYTES_PER_TOKEN`] bytes per token (three letters
//! and a space), so the simulator's tokenizer and every router's character-based prefix tree
//! see the same structure: text built from the same blocks is byte-identical, and a Mooncake
//! request's 512-token blocks are identical exactly when their `hash_ids` are.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use switchyard_sim::model::engine::standard_normal;
use switchyard_sim::model::tokenizer::BYTES_PER_TOKEN;

/// Tokens per Mooncake block.
pub const BLOCK_TOKENS: u32 = 512;

/// The prompt of one request, built on demand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptSpec {
    /// Concatenated blocks, each [`BLOCK_TOKENS`] tokens from its id, cut to `tokens`.
    Blocks {
        /// Block ids (Mooncake `hash_ids`).
        ids: Vec<u64>,
        /// Prompt length.
        tokens: u32,
    },
    /// A shared prefix (`prefix_tokens` from `group`) then a unique part from `seed`.
    Prefixed {
        /// Prefix group.
        group: u64,
        /// Prefix length.
        prefix_tokens: u32,
        /// Seed of the unique part.
        seed: u64,
        /// Whole prompt length.
        tokens: u32,
    },
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Appends `n` filler tokens derived from `stream` (4 bytes each: three letters, a space).
fn push_tokens(out: &mut String, stream: u64, n: u32) {
    let base = splitmix(stream);
    for i in 0..u64::from(n) {
        let h = splitmix(base ^ i.wrapping_mul(0x2545_f491_4f6c_dd1d));
        for k in 0..3 {
            out.push((b'a' + ((h >> (k * 8)) % 26) as u8) as char);
        }
        out.push(' ');
    }
}

/// Every word [`push_tokens`] writes (three lowercase letters): a tokenizer with one token per
/// word of this vocabulary counts prompts as the simulator's built-in one does.
pub fn prompt_vocabulary() -> impl Iterator<Item = String> {
    (0..26u32 * 26 * 26).map(|i| [i / 676, i / 26 % 26, i % 26].iter().map(|&c| char::from(b'a' + c as u8)).collect())
}

impl PromptSpec {
    /// Prompt length in tokens.
    pub fn tokens(&self) -> u32 {
        match self {
            PromptSpec::Blocks { tokens, .. } | PromptSpec::Prefixed { tokens, .. } => *tokens,
        }
    }

    /// The prompt text ([`BYTES_PER_TOKEN`] bytes per token).
    pub fn text(&self) -> String {
        let mut s = String::with_capacity(self.tokens() as usize * BYTES_PER_TOKEN);
        match self {
            PromptSpec::Blocks { ids, tokens } => {
                let mut left = *tokens;
                for id in ids {
                    let n = left.min(BLOCK_TOKENS);
                    push_tokens(&mut s, id.wrapping_mul(31).wrapping_add(7), n);
                    left -= n;
                    if left == 0 {
                        break;
                    }
                }
                push_tokens(&mut s, u64::MAX, left);
            }
            PromptSpec::Prefixed { group, prefix_tokens, seed, tokens } => {
                push_tokens(&mut s, 1 << 40 | group, (*prefix_tokens).min(*tokens));
                push_tokens(&mut s, 1 << 41 | seed, tokens.saturating_sub(*prefix_tokens));
            }
        }
        s
    }
}

/// One request of a workload.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestSpec {
    /// Arrival, seconds from the start in unscaled (simulated) time.
    pub at: f64,
    /// Prompt.
    pub prompt: PromptSpec,
    /// Exact output length.
    pub output_tokens: u32,
    /// Session (multi-turn conversations), sent as `x-session-id`.
    pub session: Option<u64>,
}

/// Request shapes without arrival times.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Workload {
    /// Independent prompts with lognormal lengths, no prefix reuse.
    Lognormal {
        /// Median prompt tokens.
        prompt_median: f64,
        /// σ of ln(prompt tokens).
        #[serde(default = "default_sigma")]
        prompt_sigma: f64,
        /// Median output tokens.
        output_median: f64,
        /// σ of ln(output tokens).
        #[serde(default = "default_sigma")]
        output_sigma: f64,
    },
    /// `groups` × `prompts_per_group` prompts sharing a per-group system prompt, in random order.
    SharedPrefix {
        /// Prefix groups.
        groups: u64,
        /// Prompts per group.
        prompts_per_group: u64,
        /// Shared system prompt tokens.
        system_tokens: u32,
        /// Unique question tokens.
        question_tokens: u32,
        /// Output tokens.
        output_tokens: u32,
    },
    /// Mooncake trace (`hash_ids` blocks), in trace order.
    Mooncake {
        /// Path of the JSONL file.
        path: String,
        /// Prompts longer than this are cut (tokens).
        #[serde(default = "default_max_prompt")]
        max_prompt_tokens: u32,
        /// Outputs longer than this are cut.
        #[serde(default = "default_max_output")]
        max_output_tokens: u32,
    },
    /// Azure LLM inference 2023 CSV lengths, in trace order.
    Azure {
        /// Path of the CSV file.
        path: String,
        /// Prompts longer than this are cut (tokens).
        #[serde(default = "default_max_prompt")]
        max_prompt_tokens: u32,
        /// Outputs longer than this are cut.
        #[serde(default = "default_max_output")]
        max_output_tokens: u32,
    },
    /// ShareGPT length distribution, sampled.
    Sharegpt {
        /// Path of the CSV file.
        path: String,
    },
    /// Many system prompts with skewed popularity: prompt group k (1-based rank) is drawn with
    /// probability ∝ 1/k^s, then a unique question follows.
    ZipfPrefix {
        /// System prompts (groups).
        prompts: u64,
        /// Zipf exponent s.
        zipf_s: f64,
        /// Tokens of each system prompt.
        system_tokens: u32,
        /// Unique question tokens.
        question_tokens: u32,
        /// Output tokens.
        output_tokens: u32,
    },
}

/// A Zipf(s) sampler over ranks 1..=n (inverse CDF by binary search).
#[derive(Debug, Clone)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    /// Ranks 1..=n with weights 1/k^s.
    pub fn new(n: u64, s: f64) -> Self {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n.max(1))
            .map(|k| {
                acc += 1.0 / (k as f64).powf(s);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Self { cdf }
    }

    /// A rank, 0-based (0 is the most popular).
    pub fn sample(&self, rng: &mut impl Rng) -> u64 {
        let u: f64 = rng.random();
        self.cdf.partition_point(|c| *c < u).min(self.cdf.len() - 1) as u64
    }
}

fn default_sigma() -> f64 {
    0.6
}
fn default_max_prompt() -> u32 {
    8192
}
fn default_max_output() -> u32 {
    1024
}

/// A trace could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// I/O.
    #[error("cannot read trace {path}: {source}")]
    Read {
        /// Path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Bad content.
    #[error("trace {path}, line {line}: {message}")]
    Parse {
        /// Path.
        path: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// One trace record: arrival (seconds from the trace start), lengths, blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceRecord {
    /// Seconds from the first record.
    pub at: f64,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Output tokens.
    pub output_tokens: u32,
    /// Mooncake block ids (empty for other traces).
    pub hash_ids: Vec<u64>,
    /// The conversation it belongs to (Mooncake: by prefix chaining), for session affinity.
    pub session: Option<u64>,
}

fn read(path: &str) -> Result<String, TraceError> {
    std::fs::read_to_string(path).map_err(|source| TraceError::Read { path: path.into(), source })
}

/// Parses a Mooncake JSONL trace.
pub fn parse_mooncake(path: &str, text: &str) -> Result<Vec<TraceRecord>, TraceError> {
    #[derive(Deserialize)]
    struct Line {
        timestamp: f64,
        input_length: u32,
        output_length: u32,
        hash_ids: Vec<u64>,
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let r: Line = serde_json::from_str(l).map_err(|e| TraceError::Parse {
                path: path.into(),
                line: i + 1,
                message: e.to_string(),
            })?;
            Ok(TraceRecord {
                at: r.timestamp / 1e3,
                prompt_tokens: r.input_length,
                output_tokens: r.output_length,
                hash_ids: r.hash_ids,
                session: None,
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(with_conversations)
}

/// Numbers the conversations of a Mooncake trace: a request continues the earlier request
/// whose blocks (all of them, or all but its last, partial one) are the longest prefix of its
/// own — the next turn resends the history. Every request starts with the same system block,
/// so the first block id (the previous key) put most of the trace in one "session".
pub fn with_conversations(mut records: Vec<TraceRecord>) -> Vec<TraceRecord> {
    let prefix_hashes = |ids: &[u64]| {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        ids.iter()
            .map(|id| {
                h = splitmix(h ^ id);
                h
            })
            .collect::<Vec<u64>>()
    };
    let mut known: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    let mut next = 0u64;
    for r in &mut records {
        let hashes = prefix_hashes(&r.hash_ids);
        // The longest earlier prefix of at least two blocks (one is the shared system block).
        let found = (2..=hashes.len()).rev().find_map(|j| known.get(&hashes[j - 1]).copied());
        let conversation = found.unwrap_or_else(|| {
            next += 1;
            next
        });
        r.session = Some(conversation);
        if let Some(&all) = hashes.last() {
            known.insert(all, conversation);
        }
        if hashes.len() > 2 {
            known.insert(hashes[hashes.len() - 2], conversation);
        }
    }
    records
}

/// Seconds since 1970 of `YYYY-MM-DD HH:MM:SS.fffffff` (no time zone; only differences matter).
fn azure_seconds(ts: &str) -> Option<f64> {
    let (date, time) = ts.trim().split_once(' ')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, min) = (t.next()?.parse::<i64>().ok()?, t.next()?.parse::<i64>().ok()?);
    let sec: f64 = t.next()?.parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + (h * 3600 + min * 60) as f64 + sec)
}

/// Parses an Azure LLM inference CSV (CRLF, header `TIMESTAMP,ContextTokens,GeneratedTokens`).
pub fn parse_azure(path: &str, text: &str) -> Result<Vec<TraceRecord>, TraceError> {
    let err = |line: usize, message: String| TraceError::Parse { path: path.into(), line, message };
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, h)) if h.trim_end() == "TIMESTAMP,ContextTokens,GeneratedTokens" => {}
        _ => return Err(err(1, "expected the header TIMESTAMP,ContextTokens,GeneratedTokens".into())),
    }
    let mut out = Vec::new();
    let mut first = None;
    for (i, l) in lines {
        let l = l.trim_end_matches('\r');
        if l.is_empty() {
            continue;
        }
        let mut f = l.split(',');
        let (ts, p, o) = (f.next(), f.next(), f.next());
        let (Some(ts), Some(p), Some(o)) = (ts, p, o) else { return Err(err(i + 1, "expected 3 fields".into())) };
        let secs = azure_seconds(ts).ok_or_else(|| err(i + 1, format!("bad timestamp '{ts}'")))?;
        let first = *first.get_or_insert(secs);
        out.push(TraceRecord {
            at: secs - first,
            prompt_tokens: p.trim().parse().map_err(|_| err(i + 1, format!("bad ContextTokens '{p}'")))?,
            output_tokens: o.trim().parse().map_err(|_| err(i + 1, format!("bad GeneratedTokens '{o}'")))?,
            hash_ids: Vec::new(),
            session: None,
        });
    }
    Ok(out)
}

/// Parses the ShareGPT length CSV (`num_prefill_tokens,num_decode_tokens,...`); no timestamps.
pub fn parse_sharegpt(path: &str, text: &str) -> Result<Vec<TraceRecord>, TraceError> {
    let err = |line: usize, message: String| TraceError::Parse { path: path.into(), line, message };
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, h)) if h.starts_with("num_prefill_tokens,num_decode_tokens") => {}
        _ => return Err(err(1, "expected the header num_prefill_tokens,num_decode_tokens,...".into())),
    }
    lines
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let mut f = l.split(',');
            let p = f.next().and_then(|v| v.trim().parse::<u32>().ok());
            let o = f.next().and_then(|v| v.trim().parse::<u32>().ok());
            match (p, o) {
                (Some(p), Some(o)) => {
                    Ok(TraceRecord { at: 0.0, prompt_tokens: p, output_tokens: o, hash_ids: vec![], session: None })
                }
                _ => Err(err(i + 1, "expected two integer lengths".into())),
            }
        })
        .collect()
}

/// How arrivals are spaced.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Default)]
#[serde(tag = "process", rename_all = "snake_case", deny_unknown_fields)]
pub enum Arrival {
    /// Poisson at the target rate.
    #[default]
    Poisson,
    /// Gamma-distributed gaps with this shape (< 1: bursty) at the target rate.
    Gamma {
        /// Shape k (coefficient of variation 1/√k).
        shape: f64,
    },
    /// The trace's own timestamps, scaled to the target mean rate.
    Trace,
}

/// A gamma(shape, 1) variate (Marsaglia–Tsang; boosted for shape < 1).
pub fn gamma(rng: &mut impl Rng, shape: f64) -> f64 {
    if shape < 1.0 {
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        return gamma(rng, shape + 1.0) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = standard_normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.random();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// `n` arrival times (seconds) at mean `rate` per second.
pub fn arrival_times(process: Arrival, rate: f64, n: usize, seed: u64, trace: Option<&[TraceRecord]>) -> Vec<f64> {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0xa11);
    let mut t = 0.0;
    match process {
        Arrival::Trace if trace.is_some_and(|t| t.len() >= 2) => {
            let tr = trace.unwrap_or_default();
            let take = n.min(tr.len());
            let span = (tr[take - 1].at - tr[0].at).max(1e-9);
            // Scale so the mean rate over the replayed part equals `rate`.
            let scale = (take as f64 - 1.0) / rate / span;
            tr[..take].iter().map(|r| (r.at - tr[0].at) * scale).collect()
        }
        Arrival::Gamma { shape } => (0..n)
            .map(|_| {
                t += gamma(&mut rng, shape) / (shape * rate);
                t
            })
            .collect(),
        _ => (0..n)
            .map(|_| {
                let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
                t += -u.ln() / rate;
                t
            })
            .collect(),
    }
}

impl Workload {
    /// The trace this workload reads, if any.
    pub fn trace(&self) -> Result<Option<Vec<TraceRecord>>, TraceError> {
        Ok(match self {
            Workload::Mooncake { path, .. } => Some(parse_mooncake(path, &read(path)?)?),
            Workload::Azure { path, .. } => Some(parse_azure(path, &read(path)?)?),
            Workload::Sharegpt { path } => Some(parse_sharegpt(path, &read(path)?)?),
            _ => None,
        })
    }

    /// `n` request shapes (arrival 0), deterministic for `seed`; `offset` skips into traces
    /// and prompt seeds so successive load points send different prompts.
    pub fn shapes(&self, n: usize, seed: u64, offset: usize, trace: Option<&[TraceRecord]>) -> Vec<RequestSpec> {
        let mut rng = SmallRng::seed_from_u64(seed ^ (offset as u64).wrapping_mul(0x9e37));
        let lognormal = |rng: &mut SmallRng, median: f64, sigma: f64| -> u32 {
            (median * (sigma * standard_normal(rng)).exp()).round().clamp(1.0, 32_768.0) as u32
        };
        let trace = trace.unwrap_or_default();
        let zipf = match self {
            Workload::ZipfPrefix { prompts, zipf_s, .. } => Some(Zipf::new(*prompts, *zipf_s)),
            _ => None,
        };
        (0..n)
            .map(|i| {
                let k = (offset + i) as u64;
                match self {
                    Workload::Lognormal { prompt_median, prompt_sigma, output_median, output_sigma } => RequestSpec {
                        at: 0.0,
                        prompt: PromptSpec::Prefixed {
                            group: 0,
                            prefix_tokens: 0,
                            seed: seed.wrapping_mul(1_000_003).wrapping_add(k),
                            tokens: lognormal(&mut rng, *prompt_median, *prompt_sigma).min(16_384),
                        },
                        output_tokens: lognormal(&mut rng, *output_median, *output_sigma).min(4096),
                        session: None,
                    },
                    Workload::SharedPrefix {
                        groups,
                        prompts_per_group,
                        system_tokens,
                        question_tokens,
                        output_tokens,
                    } => {
                        let group = rng.random_range(0..*groups);
                        let q = rng.random_range(0..*prompts_per_group);
                        RequestSpec {
                            at: 0.0,
                            prompt: PromptSpec::Prefixed {
                                group,
                                prefix_tokens: *system_tokens,
                                seed: group * prompts_per_group + q + (k << 32),
                                tokens: system_tokens + question_tokens,
                            },
                            output_tokens: *output_tokens,
                            session: None,
                        }
                    }
                    Workload::Mooncake { max_prompt_tokens, max_output_tokens, .. }
                    | Workload::Azure { max_prompt_tokens, max_output_tokens, .. } => {
                        let r = &trace[(offset + i) % trace.len().max(1)];
                        let ids = if r.hash_ids.is_empty() {
                            // No blocks: a prompt of its own.
                            vec![u64::MAX - k]
                        } else {
                            r.hash_ids.clone()
                        };
                        RequestSpec {
                            at: 0.0,
                            prompt: PromptSpec::Blocks { ids, tokens: r.prompt_tokens.clamp(1, *max_prompt_tokens) },
                            output_tokens: r.output_tokens.clamp(1, *max_output_tokens),
                            session: r.session,
                        }
                    }
                    Workload::ZipfPrefix { system_tokens, question_tokens, output_tokens, .. } => {
                        let group = zipf.as_ref().map_or(0, |z| z.sample(&mut rng));
                        RequestSpec {
                            at: 0.0,
                            prompt: PromptSpec::Prefixed {
                                group: group | 1 << 20,
                                prefix_tokens: *system_tokens,
                                seed: seed.wrapping_mul(7_000_003).wrapping_add(k),
                                tokens: system_tokens + question_tokens,
                            },
                            output_tokens: *output_tokens,
                            session: None,
                        }
                    }
                    Workload::Sharegpt { .. } => {
                        let r = &trace[rng.random_range(0..trace.len().max(1))];
                        RequestSpec {
                            at: 0.0,
                            prompt: PromptSpec::Blocks { ids: vec![u64::MAX - k], tokens: r.prompt_tokens.max(1) },
                            output_tokens: r.output_tokens.clamp(1, 4096),
                            session: None,
                        }
                    }
                }
            })
            .collect()
    }

    /// `n` requests at mean `rate`/s with `process` spacing.
    pub fn requests(
        &self,
        process: Arrival,
        rate: f64,
        n: usize,
        seed: u64,
        offset: usize,
        trace: Option<&[TraceRecord]>,
    ) -> Vec<RequestSpec> {
        let tail = trace.map(|t| &t[offset.min(t.len())..]);
        let times = arrival_times(process, rate, n, seed.wrapping_add(offset as u64), tail);
        let mut shapes = self.shapes(n, seed, offset, trace);
        for (s, t) in shapes.iter_mut().zip(times) {
            s.at = t;
        }
        shapes.truncate(n);
        shapes
    }
}

/// The best prompt-cache hit rate any routing could reach on `specs`: each request's leading
/// `page`-token pages already computed for an earlier request count as cached, as if every
/// worker held everything ever computed (unbounded memory, perfect affinity). Engines always
/// compute a prompt's last token, so at most the full pages of its first `n - 1` tokens hit.
pub fn hit_ceiling(specs: &[RequestSpec], page: usize) -> f64 {
    use switchyard_sim::model::prefix_cache::page_hashes;
    use switchyard_sim::model::tokenizer::tokenize;
    let mut seen = std::collections::HashSet::new();
    let (mut cached, mut total) = (0u64, 0u64);
    for s in specs {
        let tokens = tokenize(&s.prompt.text());
        total += tokens.len() as u64;
        let hashes = page_hashes(&tokens[..tokens.len().saturating_sub(1)], page);
        cached += (hashes.iter().take_while(|h| seen.contains(*h)).count() * page) as u64;
        seen.extend(hashes);
    }
    if total == 0 {
        0.0
    } else {
        cached as f64 / total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_block_ids_give_identical_text_blocks() {
        let a = PromptSpec::Blocks { ids: vec![1, 2, 3], tokens: 1400 }.text();
        let b = PromptSpec::Blocks { ids: vec![1, 2, 9], tokens: 1400 }.text();
        let block = BLOCK_TOKENS as usize * BYTES_PER_TOKEN;
        assert_eq!(a.len(), 1400 * BYTES_PER_TOKEN);
        assert_eq!(a[..2 * block], b[..2 * block]);
        assert_ne!(a[2 * block..], b[2 * block..]);
        assert_eq!(switchyard_sim::model::tokenizer::count_tokens(&a), 1400);
    }

    #[test]
    fn the_hit_ceiling_counts_pages_seen_before() {
        let spec = |ids: Vec<u64>| RequestSpec {
            at: 0.0,
            prompt: PromptSpec::Blocks { ids, tokens: 2 * BLOCK_TOKENS },
            output_tokens: 1,
            session: None,
        };
        // Two blocks each; the second prompt shares the first block, the third both.
        let specs = [spec(vec![1, 2]), spec(vec![1, 3]), spec(vec![1, 2])];
        let per_prompt = f64::from(2 * BLOCK_TOKENS);
        let block = f64::from(BLOCK_TOKENS);
        // The third repeats the first whole, but its last token is always computed: one page less.
        let want = (block + (per_prompt - 16.0)) / (3.0 * per_prompt);
        assert!((hit_ceiling(&specs, 16) - want).abs() < 1e-9, "{} vs {want}", hit_ceiling(&specs, 16));
    }

    #[test]
    fn poisson_and_gamma_rates_and_burstiness() {
        let cv = |t: &[f64]| {
            let gaps: Vec<f64> = t.windows(2).map(|w| w[1] - w[0]).collect();
            let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
            let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
            (1.0 / mean, var.sqrt() / mean)
        };
        let (rate, c) = cv(&arrival_times(Arrival::Poisson, 20.0, 20_000, 1, None));
        assert!((rate - 20.0).abs() < 0.6 && (c - 1.0).abs() < 0.05, "{rate} {c}");
        let (rate, c) = cv(&arrival_times(Arrival::Gamma { shape: 0.25 }, 20.0, 20_000, 2, None));
        assert!((rate - 20.0).abs() < 1.5 && (c - 2.0).abs() < 0.2, "{rate} {c}");
        assert_eq!(
            arrival_times(Arrival::Poisson, 5.0, 10, 3, None),
            arrival_times(Arrival::Poisson, 5.0, 10, 3, None)
        );
    }

    #[test]
    fn zipf_popularity_follows_its_exponent() {
        let z = Zipf::new(512, 1.0);
        let mut rng = SmallRng::seed_from_u64(5);
        let mut counts = vec![0u32; 512];
        for _ in 0..200_000 {
            counts[z.sample(&mut rng) as usize] += 1;
        }
        // P(rank k) ∝ 1/k: rank 1 about twice rank 2 and ten times rank 10.
        let r2 = f64::from(counts[0]) / f64::from(counts[1]);
        let r10 = f64::from(counts[0]) / f64::from(counts[9]);
        assert!((1.8..2.2).contains(&r2) && (8.5..11.5).contains(&r10), "{r2} {r10}");
        assert!(counts[511] > 0, "the tail is reachable");
    }

    #[test]
    fn mooncake_conversations_chain_by_prefix() {
        let r = |ids: &[u64]| TraceRecord {
            at: 0.0,
            prompt_tokens: 1,
            output_tokens: 1,
            hash_ids: ids.to_vec(),
            session: None,
        };
        let records = with_conversations(vec![
            r(&[0, 1, 2]),
            r(&[0, 5, 6]),
            r(&[0, 1, 2, 3, 4]), // continues the first
            r(&[0, 5, 7, 8]),    // continues the second: its last block was partial
            r(&[0, 9]),
        ]);
        let s: Vec<u64> = records.iter().map(|r| r.session.unwrap()).collect();
        assert_eq!((s[0], s[1]), (s[2], s[3]));
        assert!(s[0] != s[1] && s[4] != s[0] && s[4] != s[1]);
    }

    #[test]
    fn shared_prefix_groups_share_exactly_the_system_prompt() {
        let w = Workload::SharedPrefix {
            groups: 4,
            prompts_per_group: 16,
            system_tokens: 2048,
            question_tokens: 128,
            output_tokens: 256,
        };
        let reqs = w.shapes(64, 1, 0, None);
        let sys = 2048 * BYTES_PER_TOKEN;
        for a in &reqs {
            for b in &reqs {
                let (PromptSpec::Prefixed { group: ga, .. }, PromptSpec::Prefixed { group: gb, .. }) =
                    (&a.prompt, &b.prompt)
                else {
                    panic!("prefixed")
                };
                let (ta, tb) = (a.prompt.text(), b.prompt.text());
                assert_eq!(ta[..sys] == tb[..sys], ga == gb);
                assert_eq!(ta.len(), (2048 + 128) * BYTES_PER_TOKEN);
            }
        }
    }
}
