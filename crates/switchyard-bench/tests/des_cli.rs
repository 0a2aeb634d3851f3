//! The `des` command as users run it: its options reach the simulation.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A shipped scenario's path.
fn scenario(name: &str) -> String {
    format!("{}/../../bench/scenarios/{name}.toml", env!("CARGO_MANIFEST_DIR"))
}

/// One `switchyard-bench des` run with `args`, optionally writing to `out`.
fn des(args: &[&str], out: Option<&Path>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard-bench"));
    cmd.arg("des").args(args);
    if let Some(dir) = out {
        cmd.arg("--out").arg(dir);
    }
    cmd.output().expect("run switchyard-bench des")
}

/// An empty directory of its own for one test's output.
fn fresh_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("switchyard-des-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The `worker share` line of one `des` run of the random policy.
fn random_policy_run(policy_seed: Option<&str>) -> String {
    let scenario = scenario("homogeneous");
    // A given knee: what this test compares is the policy's choices, not the bisection's.
    let mut args =
        vec!["--scenario", &scenario, "--policy", "random", "--load", "0.8", "--requests", "400", "--knee", "90"];
    if let Some(seed) = policy_seed {
        args.extend(["--policy-seed", seed]);
    }
    let out = des(&args, None);
    assert!(out.status.success(), "des failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let share = stdout.lines().find(|l| l.trim_start().starts_with("worker share:")).expect("a worker share line");
    share.trim().to_owned()
}

#[test]
fn the_policy_seed_changes_the_policies_choices_and_nothing_else_is_random() {
    // Same seed, same choices (the scenario's seed is 1): the run is deterministic.
    let default = random_policy_run(None);
    assert_eq!(random_policy_run(Some("1")), default);
    // Another seed for the policy's own draws routes the same 400 requests differently.
    let other = random_policy_run(Some("2"));
    assert_ne!(other, default, "--policy-seed 2 routed exactly as seed 1: {other}");
}

#[test]
fn per_request_output_is_the_run_the_results_summarise() {
    let dir = fresh_dir("per-request");
    let scenario = scenario("zipf-mixed");
    let args = ["--scenario", &scenario, "--policy", "marginal_utility", "--load", "1.2", "--requests", "600"];
    let out = des(&[&args[..], &["--per-request"]].concat(), Some(&dir));
    assert!(out.status.success(), "des failed: {}", String::from_utf8_lossy(&out.stderr));
    let csv = std::fs::read_to_string(dir.join("requests-marginal_utility-1.20.csv")).expect("the CSV");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).expect("results.json")).unwrap();
    let run = &results["runs"][0];
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some(
            "sent_s,worker,prompt_tokens,cached_tokens,output_tokens,ttft_s,tpot_s,e2e_s,meets_slo,predicted_ttft_s,reason,error,decode_worker"
        )
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 600);
    assert!(rows.iter().all(|r| r.len() == 13), "a row with the wrong number of fields");
    assert!(rows.iter().all(|r| r[12].is_empty()), "a decode worker outside a PD fleet");
    // In arrival order, and the same requests the summary counted: its SLO attainment and its
    // per-worker shares, from the rows.
    let sent: Vec<f64> = rows.iter().map(|r| r[0].parse().unwrap()).collect();
    assert!(sent.windows(2).all(|w| w[0] <= w[1]), "rows out of arrival order");
    let met = rows.iter().filter(|r| r[8] == "1").count() as f64 / 600.0;
    assert!((met - run["slo_attainment"].as_f64().unwrap()).abs() < 1e-9, "{met} vs {}", run["slo_attainment"]);
    let shares = run["worker_share"].as_array().unwrap();
    assert_eq!(shares.len(), 4);
    for (w, share) in shares.iter().enumerate() {
        let n = rows.iter().filter(|r| r[1] == w.to_string()).count() as f64 / 600.0;
        assert!((n - share.as_f64().unwrap()).abs() < 1e-9, "worker {w}: {n} vs {share}");
    }
    // Prefix traffic: some tokens came from the workers' caches, never more than the prompt.
    let tokens = |r: &Vec<&str>, i: usize| r[i].parse::<u64>().unwrap();
    assert!(rows.iter().all(|r| tokens(r, 3) <= tokens(r, 2)));
    assert!(rows.iter().any(|r| tokens(r, 3) > 0));
    // Each dispatched request carries the policy's prediction and reason, in the policy's words:
    // past the knee some go where no worker was feasible, and then the reason names the rule.
    for r in rows.iter().filter(|r| !r[1].is_empty()) {
        let predicted: f64 = r[9].parse().unwrap_or_else(|_| panic!("no predicted TTFT in {r:?}"));
        assert!(predicted >= 0.0);
        assert!(r[10].starts_with("feasible") || r[10].starts_with("best_effort_"), "reason {:?}", r[10]);
    }
    assert!(rows.iter().any(|r| r[10].starts_with("feasible")));
    assert!(rows.iter().any(|r| r[10] == "best_effort_late_furthest_behind"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn per_request_output_needs_a_directory() {
    let scenario = scenario("homogeneous");
    let out = des(&["--scenario", &scenario, "--per-request", "--requests", "10"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--out"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_given_knee_skips_the_bisection_and_pd_rows_name_both_legs() {
    let dir = fresh_dir("pd-knee");
    let scenario = scenario("pd-mixed");
    let args = ["--scenario", &scenario, "--policy", "marginal_utility", "--knee", "50", "--load", "2"];
    let out = des(&[&args[..], &["--requests", "300", "--per-request"]].concat(), Some(&dir));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "des failed: {stderr}");
    // The rate is the given knee's: no DES runs to find it.
    assert!(stderr.contains("load 1.0 = 50.00 req/s") && stderr.contains("given"), "{stderr}");
    assert!(!stderr.contains("found in"), "{stderr}");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).expect("results.json")).unwrap();
    assert_eq!(results["capacity_rps"].as_f64(), Some(50.0));
    assert!(
        results["capacity_method"].as_str().is_some_and(|m| m.contains("--knee")),
        "{}",
        results["capacity_method"]
    );
    assert!(results["ceiling_rps"].is_null(), "a ceiling nobody measured: {}", results["ceiling_rps"]);
    // Every row names its prefill worker (the fleet's first three) and its decode worker (the
    // last three); at twice the given knee some prefill legs run late, by a named rule.
    let csv = std::fs::read_to_string(dir.join("requests-marginal_utility-2.00.csv")).expect("the CSV");
    let rows: Vec<Vec<&str>> = csv.lines().skip(1).map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 300);
    for r in &rows {
        assert!(["0", "1", "2"].contains(&r[1]) && ["3", "4", "5"].contains(&r[12]), "{r:?}");
        assert!(r[10].starts_with("feasible") || r[10].starts_with("best_effort_"), "reason {:?}", r[10]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_knee_that_is_not_a_rate_is_refused() {
    let scenario = scenario("homogeneous");
    for bad in ["0", "-3", "NaN", "inf", "fast"] {
        let out = des(&["--scenario", &scenario, "--requests", "10", &format!("--knee={bad}")], None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--knee {bad} accepted");
        assert!(stderr.contains("--knee") && stderr.contains("above zero"), "{stderr}");
    }
}
