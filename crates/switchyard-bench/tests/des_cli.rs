//! The `des` command as users run it: its options reach the simulation.

use std::process::Command;

/// The `worker share` line of one `des` run of the random policy.
fn random_policy_run(policy_seed: Option<&str>) -> String {
    let scenario = format!("{}/../../bench/scenarios/homogeneous.toml", env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard-bench"));
    cmd.args(["des", "--scenario", &scenario, "--policy", "random", "--load", "0.8", "--requests", "400"]);
    if let Some(seed) = policy_seed {
        cmd.args(["--policy-seed", seed]);
    }
    let out = cmd.output().expect("run switchyard-bench des");
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
