//! `results.md` (headlines and every run) and the per-scenario SVG chart.
//!
//! Headlines (benchmarks.md): goodput at L* — the load where the best *peer* configuration's
//! goodput peaks (the best switchyard baseline other than marginal_utility when no peer ran) —
//! the peak-to-peak goodput ratio, the highest load whose p99 TTFT stays under the SLO, and
//! the highest load where at least 95 % of requests meet both SLOs.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::compare::{Results, Run};
use crate::metrics::{RequestResult, Slo};

fn is_peer(r: &Run) -> bool {
    r.router != "switchyard"
}

/// Runs grouped by `router:policy`, each sorted by load, in first-seen order.
fn series(results: &Results) -> Vec<(String, Vec<&Run>)> {
    let mut order: Vec<String> = Vec::new();
    let mut map: BTreeMap<String, Vec<&Run>> = BTreeMap::new();
    for r in &results.runs {
        let l = r.label();
        if !map.contains_key(&l) {
            order.push(l.clone());
        }
        map.entry(l).or_default().push(r);
    }
    order
        .into_iter()
        .map(|l| {
            let mut v = map.remove(&l).unwrap_or_default();
            v.sort_by(|a, b| a.load.total_cmp(&b.load));
            (l, v)
        })
        .collect()
}

/// The headline numbers of one router/policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Headline {
    /// `router:policy`.
    pub label: String,
    /// Goodput at L*.
    pub goodput_at_l_star: f64,
    /// Its best goodput.
    pub peak_goodput: f64,
    /// Highest load with p99 TTFT ≤ SLO (0 if none).
    pub max_load_p99_ttft: f64,
    /// Highest load with ≥ 95 % SLO attainment (0 if none).
    pub max_load_95: f64,
    /// Errors over all its runs.
    pub errors: usize,
}

/// L*, the reference label it came from, and each series' headline.
pub fn headlines(results: &Results) -> (f64, String, Vec<Headline>) {
    let all = series(results);
    let peak = |runs: &[&Run]| runs.iter().map(|r| r.goodput_rps).fold(0.0, f64::max);
    let reference = all
        .iter()
        .filter(|(_, runs)| runs.first().is_some_and(|r| is_peer(r)))
        .max_by(|a, b| peak(&a.1).total_cmp(&peak(&b.1)))
        .or_else(|| {
            all.iter().filter(|(l, _)| !l.contains("marginal_utility")).max_by(|a, b| peak(&a.1).total_cmp(&peak(&b.1)))
        });
    let (l_star, reference_label) = match reference {
        Some((label, runs)) => {
            let best = runs.iter().max_by(|a, b| a.goodput_rps.total_cmp(&b.goodput_rps));
            (best.map_or(1.0, |r| r.load), label.clone())
        }
        None => (1.0, String::new()),
    };
    let rows = all
        .iter()
        .map(|(label, runs)| {
            let at = runs
                .iter()
                .min_by(|a, b| (a.load - l_star).abs().total_cmp(&(b.load - l_star).abs()))
                .map_or(0.0, |r| r.goodput_rps);
            let max_load =
                |ok: &dyn Fn(&Run) -> bool| runs.iter().filter(|r| ok(r)).map(|r| r.load).fold(0.0, f64::max);
            Headline {
                label: label.clone(),
                goodput_at_l_star: at,
                peak_goodput: peak(runs),
                max_load_p99_ttft: max_load(&|r| r.ttft_p99_ms <= results.slo_ttft_ms && r.errors == 0),
                max_load_95: max_load(&|r| r.slo_attainment >= 0.95),
                errors: runs.iter().map(|r| r.errors).sum(),
            }
        })
        .collect();
    (l_star, reference_label, rows)
}

/// Writes `results.json`, `results.md` and `<scenario>.svg` under `dir`; returns the markdown.
pub fn write(dir: &std::path::Path, results: &Results, command: &str) -> Result<String, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let put = |name: String, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    put("results.json".into(), &serde_json::to_string_pretty(results).map_err(|e| e.to_string())?)?;
    let md = markdown(results, command);
    put("results.md".into(), &md)?;
    put(format!("{}.svg", results.scenario), &svg(results))?;
    Ok(md)
}

/// The file [`requests_csv`] of one run goes to: `requests-<policy>-<load>.csv`, the policy
/// spec's `/` written `_`.
pub fn requests_file(policy: &str, load: f64) -> String {
    format!("requests-{}-{load:.2}.csv", policy.replace(['/', '\\'], "_"))
}

/// One line per request, in arrival order: when it was sent, where it went, its tokens, its
/// latencies (seconds; empty where there is none) and whether it met both SLOs. Aggregates hide
/// *when* and *where* a run went wrong — a worker late from a burst on and never recovering
/// reads, in a summary, like a fleet a little short of capacity; `bench/timeline.py` turns
/// this into per-worker windows. In a PD fleet `worker` is the prefill leg's and
/// `decode_worker` the decode leg's (indices into the fleet's list); elsewhere it is empty.
pub fn requests_csv(results: &[RequestResult], slo: &Slo) -> String {
    let opt = |x: Option<f64>| x.map(|v| format!("{v:.6}")).unwrap_or_default();
    let mut out =
        String::from("sent_s,worker,prompt_tokens,cached_tokens,output_tokens,ttft_s,tpot_s,e2e_s,meets_slo,predicted_ttft_s,reason,error,decode_worker\n");
    for r in results {
        let _ = writeln!(
            out,
            "{:.6},{},{},{},{},{},{},{:.6},{},{},{},{},{}",
            r.sent_at,
            r.worker.map(|w| w.to_string()).unwrap_or_default(),
            r.prompt_tokens,
            r.cached_tokens,
            r.output_tokens,
            opt(r.ttft),
            opt(r.tpot()),
            r.e2e,
            u8::from(r.meets(slo)),
            opt(r.predicted_ttft_ms.map(|ms| f64::from(ms) / 1e3)),
            r.reason.unwrap_or(""),
            // One field: no commas or line breaks from an error's text.
            r.error.as_deref().unwrap_or("").replace([',', '\n', '\r'], " "),
            r.decode_worker.map(|w| w.to_string()).unwrap_or_default(),
        );
    }
    out
}

/// The markdown report; `command` is the command line that produced it.
pub fn markdown(results: &Results, command: &str) -> String {
    let (l_star, reference, rows) = headlines(results);
    let best_peer = |f: &dyn Fn(&Headline) -> f64| {
        rows.iter().filter(|h| !h.label.starts_with("switchyard:")).map(f).fold(0.0, f64::max)
    };
    let (peer_at, peer_peak, peer_load) =
        (best_peer(&|h| h.goodput_at_l_star), best_peer(&|h| h.peak_goodput), best_peer(&|h| h.max_load_p99_ttft));
    let ratio = |x: f64, base: f64| if base > 0.0 { format!("{:.2}×", x / base) } else { "–".into() };
    let method = if results.capacity_method.is_empty() {
        String::new()
    } else {
        format!(
            " Load 1.0 is the {}{}.",
            results.capacity_method,
            results.ceiling_rps.map(|c| format!(" (closed-loop ceiling {c:.2} req/s)")).unwrap_or_default()
        )
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### {} — load 1.0 = {:.2} req/s, SLO TTFT ≤ {} ms, TPOT ≤ {} ms\n\n`{command}`; L* = {l_star:.2} (peak of {reference}). Ratios are against the best peer router.{}\n",
        results.scenario,
        results.capacity_rps,
        results.slo_ttft_ms,
        results.slo_tpot_ms,
        method,
        reference = if reference.is_empty() { "–" } else { &reference },
    );
    let _ = writeln!(out, "| router:policy | goodput @ L* (req/s) | vs best peer | peak goodput | vs best peer peak | max load, p99 TTFT ≤ SLO | max load, ≥ 95 % in SLO | errors |");
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for h in &rows {
        let _ = writeln!(
            out,
            "| {} | {:.2} | {} | {:.2} | {} | {:.2} | {:.2} | {} |",
            h.label,
            h.goodput_at_l_star,
            ratio(h.goodput_at_l_star, peer_at),
            h.peak_goodput,
            ratio(h.peak_goodput, peer_peak),
            h.max_load_p99_ttft,
            h.max_load_95,
            h.errors
        );
    }
    if peer_load > 0.0 {
        let _ = writeln!(out, "\nBest peer's max load with p99 TTFT under SLO: {peer_load:.2}.");
    }
    for s in &results.skipped {
        let _ = writeln!(out, "\nSkipped: {s}");
    }
    let _ = writeln!(out, "\n<details><summary>every run</summary>\n");
    let _ = writeln!(
        out,
        "Goodput is per second of arrivals (the offered rate times the share within both SLOs); throughput and tok/s are per second from the first send to the last completion, the drain included, so past the knee, where the queues drain long after the last arrival, throughput can be the smaller.\n"
    );
    let _ = writeln!(out, "| router:policy | load | goodput | throughput | tok/s | TTFT p50/p99 ms | TPOT p50/p99 ms | E2E p99 ms | hit | in SLO | errors |");
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
    for (label, runs) in series(results) {
        for r in runs {
            let _ = writeln!(
                out,
                "| {label} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} / {:.0} | {:.1} / {:.1} | {:.0} | {:.2} | {:.1} % | {} |",
                r.load,
                r.goodput_rps,
                r.throughput_rps,
                r.output_tok_s,
                r.ttft_p50_ms,
                r.ttft_p99_ms,
                r.tpot_p50_ms,
                r.tpot_p99_ms,
                r.e2e_p99_ms,
                r.cache_hit_rate,
                r.slo_attainment * 100.0,
                r.errors
            );
        }
    }
    for (label, runs) in series(results) {
        for r in runs.iter().filter(|r| !r.error_kinds.is_empty()) {
            let kinds: Vec<String> = r.error_kinds.iter().map(|(k, n)| format!("{n}× `{k}`")).collect();
            let _ = writeln!(out, "\nErrors, {label} at {:.2}: {}.", r.load, kinds.join("; "));
        }
    }
    let _ = writeln!(out, "\n</details>");
    out
}

const COLORS: [&str; 12] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#000000", "#aa3377",
];

/// Two panels: goodput and p99 TTFT against load, one line per router/policy.
pub fn svg(results: &Results) -> String {
    let all = series(results);
    let (w, h, pad) = (520.0, 340.0, 56.0);
    let loads: Vec<f64> = results.runs.iter().map(|r| r.load).collect();
    let (x0, x1) = (loads.iter().copied().fold(f64::INFINITY, f64::min), loads.iter().copied().fold(0.0, f64::max));
    let (x0, x1) = if x1 > x0 { (x0, x1) } else { (x0 - 0.1, x0 + 0.1) };
    let gmax = results.runs.iter().map(|r| r.goodput_rps).fold(0.0, f64::max).max(1e-9) * 1.1;
    let tmax = (results.slo_ttft_ms * 3.0).max(1.0);
    let mut out = String::new();
    let total_w = 2.0 * w + 220.0;
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{total_w}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    type Metric<'a> = Box<dyn Fn(&Run) -> f64 + 'a>;
    let panels: [(&str, f64, Metric); 2] = [
        ("goodput (req/s)", gmax, Box::new(|r: &Run| r.goodput_rps)),
        ("p99 TTFT (ms, capped at 3× SLO)", tmax, Box::new(|r: &Run| r.ttft_p99_ms.min(tmax))),
    ];
    for (pi, (title, ymax, value)) in panels.iter().enumerate() {
        let ox = pi as f64 * w;
        let sx = |x: f64| ox + pad + (x - x0) / (x1 - x0) * (w - 2.0 * pad);
        let sy = |y: f64| h - pad + -(y / ymax) * (h - 2.0 * pad);
        let _ = writeln!(
            out,
            r#"<text x="{}" y="20" text-anchor="middle" font-size="13">{} — {}</text>"#,
            ox + w / 2.0,
            results.scenario,
            title
        );
        let _ = writeln!(
            out,
            r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#444"/>"##,
            sx(x0),
            sy(0.0),
            sx(x1),
            sy(0.0)
        );
        let _ = writeln!(
            out,
            r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#444"/>"##,
            sx(x0),
            sy(0.0),
            sx(x0),
            sy(*ymax)
        );
        for k in 0..=4 {
            let y = ymax * k as f64 / 4.0;
            let _ =
                writeln!(out, r#"<text x="{}" y="{}" text-anchor="end">{:.1}</text>"#, sx(x0) - 4.0, sy(y) + 4.0, y);
        }
        let mut xs: Vec<f64> = loads.clone();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        for x in xs {
            let _ = writeln!(out, r#"<text x="{}" y="{}" text-anchor="middle">{x:.2}</text>"#, sx(x), sy(0.0) + 14.0);
        }
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">load (fraction of capacity)</text>"#,
            ox + w / 2.0,
            h - 12.0
        );
        if pi == 1 {
            let y = sy(results.slo_ttft_ms);
            let _ = writeln!(
                out,
                r##"<line x1="{}" y1="{y}" x2="{}" y2="{y}" stroke="#d00" stroke-dasharray="4 3"/><text x="{}" y="{}" fill="#d00">SLO</text>"##,
                sx(x0),
                sx(x1),
                sx(x1) - 24.0,
                y - 4.0
            );
        }
        for (si, (_, runs)) in all.iter().enumerate() {
            let color = COLORS[si % COLORS.len()];
            let dash = if runs.first().is_some_and(|r| is_peer(r)) { r#" stroke-dasharray="6 3""# } else { "" };
            let points: Vec<String> = runs.iter().map(|r| format!("{:.1},{:.1}", sx(r.load), sy(value(r)))).collect();
            let _ = writeln!(
                out,
                r#"<polyline fill="none" stroke="{color}" stroke-width="1.8"{dash} points="{}"/>"#,
                points.join(" ")
            );
            for r in runs {
                let _ = writeln!(
                    out,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{color}"/>"#,
                    sx(r.load),
                    sy(value(r))
                );
            }
        }
    }
    for (si, (label, _)) in all.iter().enumerate() {
        let y = 40.0 + si as f64 * 16.0;
        let color = COLORS[si % COLORS.len()];
        let _ = writeln!(
            out,
            r#"<rect x="{}" y="{}" width="12" height="4" fill="{color}"/><text x="{}" y="{}">{label}</text>"#,
            2.0 * w + 4.0,
            y - 4.0,
            2.0 * w + 20.0,
            y
        );
    }
    out.push_str("</svg>\n");
    out
}

/// One scenario's line per router in the public table.
#[derive(Debug, Clone, PartialEq)]
pub struct TableRow {
    /// Scenario.
    pub scenario: String,
    /// `router:policy`.
    pub label: String,
    /// Goodput at load 1.0 (the knee), when that load ran.
    pub at_knee: Option<f64>,
    /// Peak goodput and its load.
    pub peak: (f64, f64),
    /// Highest load with p99 TTFT within the SLO.
    pub max_load_ttft: f64,
    /// Failed (incl. shed) requests per request, over every load.
    pub error_rate: f64,
    /// TTFT and TPOT p99 at the knee (ms).
    pub p99_at_knee: Option<(f64, f64)>,
    /// At the grid's highest load: that load, TTFT p99 (ms) and throughput over the run,
    /// drain included (req/s). Goodput alone hides what a policy pays past the knee (one
    /// worker left to run late keeps the rest in time, at the late requests' expense); these
    /// two show it, at the one load every router ran.
    pub at_top_load: Option<(f64, f64, f64)>,
}

/// The rows of the router-vs-router table for one scenario's results.
pub fn table_rows(results: &Results) -> Vec<TableRow> {
    series(results)
        .into_iter()
        .map(|(label, runs)| {
            let knee = runs.iter().find(|r| (r.load - 1.0).abs() < 1e-9);
            let peak =
                runs.iter().map(|r| (r.goodput_rps, r.load)).fold((0.0, 0.0), |a, b| if b.0 > a.0 { b } else { a });
            let max_load_ttft = runs
                .iter()
                .filter(|r| r.ttft_p99_ms <= results.slo_ttft_ms && r.errors == 0)
                .map(|r| r.load)
                .fold(0.0, f64::max);
            let errors: usize = runs.iter().map(|r| r.errors).sum();
            let sent: f64 = runs.len() as f64;
            let top = runs.iter().max_by(|a, b| a.load.total_cmp(&b.load));
            TableRow {
                scenario: results.scenario.clone(),
                label,
                at_knee: knee.map(|r| r.goodput_rps),
                peak,
                max_load_ttft,
                error_rate: errors as f64 / sent.max(1.0),
                p99_at_knee: knee.map(|r| (r.ttft_p99_ms, r.tpot_p99_ms)),
                at_top_load: top.map(|r| (r.load, r.ttft_p99_ms, r.throughput_rps)),
            }
        })
        .collect()
}

/// The public table over several scenarios' results: goodput at the knee (with its ratio
/// to the best peer there), peak goodput, the highest load with p99 TTFT within the SLO,
/// failures, the p99s at the knee, and at the grid's highest load the TTFT p99 and the
/// throughput drain included (the price of goodput past the knee) — router against router.
pub fn public_table(all: &[Results]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| scenario | router:policy | goodput @ knee (req/s) | vs best peer | peak goodput (@ load) | max load, p99 TTFT ≤ SLO | failed per level | TTFT / TPOT p99 @ knee (ms) | TTFT p99 (s) / throughput (req/s) @ top load |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for results in all {
        let rows = table_rows(results);
        let best_peer =
            rows.iter().filter(|r| !r.label.starts_with("switchyard:")).filter_map(|r| r.at_knee).fold(0.0, f64::max);
        for r in &rows {
            let ratio = match r.at_knee {
                Some(g) if best_peer > 0.0 => format!("{:.2}×", g / best_peer),
                _ => "–".into(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {:.2} (@ {:.1}) | {:.1} | {:.1} | {} | {} |",
                r.scenario,
                r.label,
                r.at_knee.map_or("–".into(), |g| format!("{g:.2}")),
                ratio,
                r.peak.0,
                r.peak.1,
                r.max_load_ttft,
                r.error_rate,
                r.p99_at_knee.map_or("–".into(), |(t, p)| format!("{t:.0} / {p:.1}")),
                r.at_top_load.map_or("–".into(), |(l, t, x)| format!("{:.1} / {x:.1} (@ {l:.1})", t / 1e3)),
            );
        }
    }
    out
}

/// Replaces the text between `<!-- results:begin -->` and `<!-- results:end -->` in `doc`.
pub fn splice(doc: &str, table: &str) -> Result<String, String> {
    const BEGIN: &str = "<!-- results:begin -->";
    const END: &str = "<!-- results:end -->";
    let a = doc.find(BEGIN).ok_or("no <!-- results:begin --> marker")? + BEGIN.len();
    let b = doc[a..].find(END).ok_or("no <!-- results:end --> marker")? + a;
    Ok(format!("{}\n{}{}", &doc[..a], table, &doc[b..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Summary;

    fn run(router: &str, policy: &str, load: f64, goodput: f64, ttft_p99: f64) -> Run {
        let s = Summary {
            goodput_rps: goodput,
            throughput_rps: goodput + 1.0,
            ttft_p99_ms: ttft_p99,
            slo_attainment: 0.99,
            ..Summary::default()
        };
        Run::new(router, policy, "t", load, &s)
    }

    fn results() -> Results {
        Results {
            capacity_rps: 10.0,
            capacity_method: String::new(),
            ceiling_rps: None,
            scenario: "t".into(),
            slo_ttft_ms: 2000.0,
            slo_tpot_ms: 100.0,
            skipped: vec![],
            runs: vec![
                run("switchyard", "marginal_utility", 0.9, 9.0, 900.0),
                run("switchyard", "marginal_utility", 1.0, 9.8, 1500.0),
                run("sglang-router", "cache_aware", 0.9, 8.5, 1900.0),
                run("sglang-router", "cache_aware", 1.0, 8.0, 4000.0),
                run("sglang-router", "cache_aware", 1.2, 5.0, 9000.0),
            ],
        }
    }

    #[test]
    fn l_star_is_the_best_peers_peak_and_headlines_follow() {
        let (l_star, reference, rows) = headlines(&results());
        assert_eq!((l_star, reference.as_str()), (0.9, "sglang-router:cache_aware"));
        let mu = &rows[0];
        assert_eq!((mu.goodput_at_l_star, mu.peak_goodput, mu.max_load_p99_ttft), (9.0, 9.8, 1.0));
        assert_eq!(rows[1].max_load_p99_ttft, 0.9);
        let md = markdown(&results(), "switchyard-bench compare --scenario s.toml");
        assert!(md.contains("| switchyard:marginal_utility | 9.00 | 1.06× | 9.80 | 1.15× |"), "{md}");
        let svg = svg(&results());
        assert!(svg.starts_with("<svg") && svg.matches("<polyline").count() == 4, "{svg}");
    }

    #[test]
    fn results_json_has_the_documented_schema() {
        let v = serde_json::to_value(results()).unwrap();
        assert!(v["capacity_rps"].is_number());
        for key in [
            "router",
            "policy",
            "scenario",
            "load",
            "goodput_rps",
            "throughput_rps",
            "output_tok_s",
            "ttft_p50_ms",
            "ttft_p99_ms",
            "tpot_p50_ms",
            "tpot_p99_ms",
            "e2e_p99_ms",
            "cache_hit_rate",
            "errors",
        ] {
            assert!(!v["runs"][0][key].is_null(), "missing {key}");
        }
        let back: Results = serde_json::from_value(v).unwrap();
        assert_eq!(back, results());
    }

    #[test]
    fn failed_requests_are_listed_by_kind_and_survive_results_json() {
        let mut r = results();
        r.runs[0].errors = 3;
        r.runs[0].error_kinds.insert("503: too many open connections (--max-connections)".into(), 3);
        let md = markdown(&r, "cmd");
        let label = r.runs[0].label();
        assert!(
            md.contains(&format!("Errors, {label} at 0.90: 3× `503: too many open connections (--max-connections)`.")),
            "{md}"
        );
        assert_eq!(md.matches("Errors, ").count(), 1, "only the run with errors is listed");
        let back: Results = serde_json::from_value(serde_json::to_value(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        // A results.json written before the field existed still reads.
        let mut old = serde_json::to_value(results()).unwrap();
        assert!(old["runs"][0].get("error_kinds").is_none(), "empty kinds are not written");
        old["runs"][0]["errors"] = 2.into();
        let back: Results = serde_json::from_value(old).unwrap();
        assert!(back.runs[0].error_kinds.is_empty());
    }

    #[test]
    fn the_public_table_compares_routers_at_the_knee_and_splices_into_a_document() {
        let table = public_table(&[results()]);
        assert!(table.contains("| t | switchyard:marginal_utility | 9.80 | 1.23× | 9.80 (@ 1.0) | 1.0 |"), "{table}");
        assert!(table.contains("| t | sglang-router:cache_aware | 8.00 | 1.00× | 8.50 (@ 0.9) | 0.9 |"), "{table}");
        // The last column is read at the grid's highest load, whichever row it is in.
        assert!(table.contains("| 1500 / 0.0 | 1.5 / 10.8 (@ 1.0) |"), "{table}");
        assert!(table.contains("| 4000 / 0.0 | 9.0 / 6.0 (@ 1.2) |"), "{table}");
        let doc = "a\n<!-- results:begin -->\nold\n<!-- results:end -->\nb";
        let spliced = splice(doc, &table).unwrap();
        assert!(spliced.contains("9.80") && !spliced.contains("old") && spliced.ends_with("<!-- results:end -->\nb"));
        assert!(splice("no markers", &table).is_err());
    }

    /// `bench/public_table.sh` ends by splicing its table into the README.
    #[test]
    fn the_readme_has_the_markers_the_public_table_is_spliced_between() {
        let readme = include_str!("../../../README.md");
        let spliced = splice(readme, &public_table(&[results()])).unwrap();
        assert!(spliced.contains("switchyard:marginal_utility | 9.80"));
    }
}
