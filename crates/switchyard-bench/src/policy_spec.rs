//! Naming a policy with its settings on one string: `marginal_utility`,
//! `marginal_utility/latency`, `marginal_utility/slo/difference` — the same objects the router
//! builds from its flags, for the simulation and for comparison labels.

use std::time::Duration;

use clap::ValueEnum;
use switchyard::load::estimator::EstimatorKind;
use switchyard::policies::{MarginalUtilityConfig, Objective, Overload, PolicyConfig, PolicyKind};

use crate::metrics::Slo;

/// The spec setting for `--mu-count-other-routers`.
const OTHERS: &str = "others";
/// The spec setting for `--mu-holder-margin X`: `hmX`.
const HOLDER_MARGIN: &str = "hm";

/// The holder margin a spec part names (`hm0.6`), when it is one and in [0, 1] (the flag's range).
fn holder_margin(part: &str) -> Option<f64> {
    part.strip_prefix(HOLDER_MARGIN)?.parse().ok().filter(|m| (0.0..=1.0).contains(m))
}

/// Parses `name[/objective][/estimator][/overload][/dN][/hmX][/others]` (`dN`: score N sampled
/// workers; `hmX`: holder margin X; `others`: count other routers' requests) into a policy
/// config with `slo` (in the time units the policy will observe) and `seed`.
pub fn parse(spec: &str, slo: &Slo, time_scale: f64, seed: u64) -> Result<PolicyConfig, String> {
    let mut parts = spec.split('/');
    let name = parts.next().unwrap_or_default();
    let kind = PolicyKind::from_str(name, true).map_err(|_| format!("unknown policy '{name}'"))?;
    let mut config = PolicyConfig::new(kind, Some(seed));
    if let PolicyConfig::MarginalUtility(c) = &mut config {
        *c = MarginalUtilityConfig {
            slo_ttft: Duration::from_secs_f64(slo.ttft_ms / 1e3 / time_scale),
            slo_tpot: Duration::from_secs_f64(slo.tpot_ms / 1e3 / time_scale),
            ..c.clone()
        };
        for p in parts {
            if let Ok(o) = Objective::from_str(p, true) {
                c.objective = o;
            } else if let Ok(e) = EstimatorKind::from_str(p, true) {
                c.estimator = e;
            } else if let Ok(o) = Overload::from_str(p, true) {
                c.overload = o;
            } else if p == OTHERS {
                c.count_other_routers = true;
            } else if let Some(m) = holder_margin(p) {
                c.holder_margin = m;
            } else if let Some(d) = p.strip_prefix('d').and_then(|d| d.parse().ok()) {
                c.candidates = d;
            } else {
                return Err(format!("unknown marginal_utility setting '{p}' in '{spec}'"));
            }
        }
    } else if parts.next().is_some() {
        return Err(format!("'{name}' takes no settings ('{spec}')"));
    }
    Ok(config)
}

/// The switchyard command-line flags for the same spec.
pub fn flags(spec: &str) -> Vec<String> {
    let mut parts = spec.split('/');
    let mut out = vec!["--policy".to_owned(), parts.next().unwrap_or_default().to_owned()];
    for p in parts {
        if Objective::from_str(p, true).is_ok() {
            out.extend(["--mu-objective".to_owned(), p.to_owned()]);
        } else if EstimatorKind::from_str(p, true).is_ok() {
            out.extend(["--mu-estimator".to_owned(), p.to_owned()]);
        } else if Overload::from_str(p, true).is_ok() {
            out.extend(["--mu-overload".to_owned(), p.to_owned()]);
        } else if p == OTHERS {
            out.push("--mu-count-other-routers".to_owned());
        } else if let Some(m) = holder_margin(p) {
            out.extend(["--mu-holder-margin".to_owned(), m.to_string()]);
        } else if let Some(d) = p.strip_prefix('d').filter(|d| d.parse::<usize>().is_ok()) {
            out.extend(["--mu-candidates".to_owned(), d.to_owned()]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_into_configs_and_flags() {
        let slo = Slo::default();
        let PolicyConfig::MarginalUtility(c) = parse("marginal_utility/latency/difference", &slo, 10.0, 1).unwrap()
        else {
            panic!("mu")
        };
        assert_eq!(
            (c.objective, c.estimator, c.slo_ttft),
            (Objective::Latency, EstimatorKind::Difference, Duration::from_millis(200))
        );
        assert!(parse("nope", &slo, 1.0, 1).is_err());
        assert!(parse("round_robin/x", &slo, 1.0, 1).is_err());
        assert_eq!(flags("marginal_utility/shed"), ["--policy", "marginal_utility", "--mu-overload", "shed"]);
        let PolicyConfig::MarginalUtility(c) = parse("marginal_utility/d16", &slo, 1.0, 1).unwrap() else {
            panic!("mu")
        };
        assert_eq!(c.candidates, 16);
        assert_eq!(flags("marginal_utility/d8")[2..], ["--mu-candidates", "8"]);
        let PolicyConfig::MarginalUtility(c) = parse("marginal_utility/others", &slo, 1.0, 1).unwrap() else {
            panic!("mu")
        };
        assert!(c.count_other_routers);
        assert_eq!(flags("marginal_utility/others")[2..], ["--mu-count-other-routers"]);
        let PolicyConfig::MarginalUtility(c) = parse("marginal_utility/hm0.6", &slo, 1.0, 1).unwrap() else {
            panic!("mu")
        };
        assert_eq!(c.holder_margin, 0.6);
        assert_eq!(flags("marginal_utility/hm0.6")[2..], ["--mu-holder-margin", "0.6"]);
        assert!(parse("marginal_utility/hm1.5", &slo, 1.0, 1).is_err());
    }
}
